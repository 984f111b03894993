#!/usr/bin/env bash
# The main job on an embedded default: set up .venv, then text-to-image with a small random-weight
# FLUX pipeline, bf16 and ConvRot W4A4 (no downloads; PNGs in demo_out/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh torch  # the demo makes its tiny random text encoders with transformers in PyTorch
exec .venv/bin/convrot-flux demo "$@"
