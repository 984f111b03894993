#!/usr/bin/env bash
# Set up .venv with the test extras, then run the test suite (CPU; GPU-marked tests are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
