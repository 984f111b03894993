#!/usr/bin/env bash
# Set up .venv with the test extras, then run the test suite (CPU; GPU-marked tests are skipped),
# one worker per CPU core (pytest-xdist, idle workers take tests from busy ones).
# Extra arguments go to pytest: -m "not slow" skips the slow tests, -n 0 runs in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q -n auto --dist worksteal "$@"
