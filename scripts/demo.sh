#!/usr/bin/env bash
# The main job on an embedded default: set up .venv, then run the ConvRot demo (no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/convrot-demo "$@"
