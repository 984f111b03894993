#!/usr/bin/env bash
# The main job on an embedded default: set up .venv, then text-to-image with a small random-weight
# FLUX pipeline, bf16 and ConvRot W4A4 (no downloads; PNGs in demo_out/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh  # no torch: the demo's tiny random text encoders are the JAX ports (flux_flax.t5, flux_flax.clip)
exec .venv/bin/convrot-flux demo "$@"
