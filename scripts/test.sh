#!/usr/bin/env bash
# The test command: set-up on a fresh machine, then lint, types, layer contract and the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON="${PYTHON:-python3}"

echo "== ruff format --check"; "$PYTHON" -m ruff format --check src tests bench
echo "== ruff check"; "$PYTHON" -m ruff check src tests bench
echo "== mypy --strict"; "$PYTHON" -m mypy
echo "== import contract"; lint-imports
echo "== pytest"
"$PYTHON" -m pytest "$@"
