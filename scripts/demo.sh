#!/usr/bin/env bash
# strato's main job: set up on a fresh machine, then boot the default guest and show its console.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m strato.cli.demo "$@"
