"""Peak host memory of `convrot-convert` is bounded by its largest tensors, not by the file: a
generated ~2 GB FLUX-shaped checkpoint (hidden 1024, 14 + 28 blocks, 860 tensors) converts with
peak RSS under 3x its largest tensor + 1 GiB, measured by the kernel in a child process."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convrot_jax import quantize_weight
from flux_flax import FluxConfig, abstract_transformer, expected_shapes
from flux_flax.checkpoint import load_checkpoint
from flux_flax.random_weights import write_random_diffusers_dir

REPO = Path(__file__).resolve().parents[1]
CONFIG = FluxConfig(
    in_channels=64, num_layers=14, num_single_layers=28, attention_head_dim=128, num_attention_heads=8,
    joint_attention_dim=1024, pooled_projection_dim=768, guidance_embeds=True,
)
# The child's child is the converter: RUSAGE_CHILDREN then holds its peak RSS alone.
MEASURE = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-m", "convert.cli", *sys.argv[1:]], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_peak_rss_bounded_by_largest_tensor(tmp_path):
    shapes = expected_shapes(abstract_transformer(CONFIG))
    largest = max(2 * math.prod(s) for s in shapes.values())
    src, out = tmp_path / "transformer", tmp_path / "w4a4"
    try:
        (file,) = write_random_diffusers_dir(src, CONFIG, shapes)
        assert file.stat().st_size > 1.9e9 and len(shapes) > 800

        run = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(out), "--quiet"], cwd=REPO,
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        peak = int(run.stdout.split()[-1])
        limit = 3 * largest + (1 << 30)
        print(f"peak RSS {peak / 2**20:.0f} MiB, limit {limit / 2**20:.0f} MiB, "
              f"file {file.stat().st_size / 2**30:.2f} GiB")
        assert peak < limit

        # And the checkpoint is right: a quantized layer equals quantizing its source tensor.
        model, _ = load_checkpoint(out)
        from safetensors import safe_open

        with safe_open(str(file), framework="flax") as f:
            weight = f.get_tensor("single_transformer_blocks.27.proj_out.weight")
        layer = model.single_transformer_blocks[27].proj_out
        expected = quantize_weight(weight)
        np.testing.assert_array_equal(np.asarray(layer.packed[...]), np.asarray(expected.packed))
        np.testing.assert_array_equal(np.asarray(layer.scales[...]), np.asarray(expected.scales))
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
