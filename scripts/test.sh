#!/usr/bin/env bash
# The test command: set-up on a fresh machine, then lint, types, layer contract and the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYTHON="${PYTHON:-python3}"

echo "== ruff format --check"; "$PYTHON" -m ruff format --check src tests bench
echo "== ruff check"; "$PYTHON" -m ruff check src tests bench
echo "== mypy --strict"; "$PYTHON" -m mypy
echo "== import contract"
# (through the interpreter: a fresh pyenv has no shim for a newly installed console script)
"$PYTHON" -c "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"
echo "== pytest"
set +e
"$PYTHON" -m pytest "$@"
status=$?
set -e
# pytest's 5 means it collected no test: that is a failure here, not a pass.
if [ "$status" = 5 ]; then echo "test.sh: no tests ran"; exit 1; fi
exit "$status"
