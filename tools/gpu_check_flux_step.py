"""GPU check for issue 4: one bf16 FLUX.1-dev transformer step at 1024² under jit.

FLUX.1-dev config, random weights made on the GPU (a jitted constructor: nothing goes through
the host), one forward at 1024² (4096 image tokens from the 64 x 64 packed latent grid + 512 T5
tokens), batch 1, bf16. Reports compile time, step time (median after warm-up), and GPU memory
(weights, XLA's plan for the step, the process peak). Writes flux_step.json and flux_step.md
through benchmarks.harness. A one-off check kept as a tool: `python -m benchmarks.bench_e2e
--variants jax_bf16` measures the same step (and more) in the benchmark suite.

    PYTHONPATH=. python3 tools/gpu_check_flux_step.py --out benchmarks/results
    PYTHONPATH=. JAX_PLATFORMS=cpu python3 tools/gpu_check_flux_step.py --config tiny --out /tmp/fs  # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import harness
from flux_flax import FluxConfig, FluxTransformer2DModel, abstract_transformer

GIB = 2**30


def inputs_1024(config: FluxConfig) -> dict[str, jax.Array]:
    """A 1024² request: 64 x 64 packed latent tokens (16 channels x 2 x 2 = 64), 512 T5 tokens."""
    h = w = 64
    key = jax.random.key(1)
    k1, k2, k3 = jax.random.split(key, 3)
    img_ids = np.zeros((h, w, 3), np.float32)
    img_ids[..., 1], img_ids[..., 2] = np.arange(h)[:, None], np.arange(w)[None, :]
    return {
        "hidden_states": jax.random.normal(k1, (1, h * w, config.in_channels), jnp.bfloat16),
        "encoder_hidden_states": jax.random.normal(k2, (1, 512, config.joint_attention_dim), jnp.bfloat16),
        "pooled_projections": jax.random.normal(k3, (1, config.pooled_projection_dim), jnp.bfloat16),
        "timestep": jnp.array([0.5], jnp.bfloat16),
        "img_ids": jnp.asarray(img_ids.reshape(h * w, 3)),
        "txt_ids": jnp.zeros((512, 3), jnp.float32),
        "guidance": jnp.array([3.5], jnp.bfloat16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--config", choices=["dev", "tiny"], default="dev", help="tiny: a CPU smoke test of this script")
    args = parser.parse_args()
    device = jax.devices()[0]
    config = FluxConfig.dev() if args.config == "dev" else FluxConfig.tiny()

    graphdef, _ = nnx.split(abstract_transformer(config))

    @jax.jit
    def init_state():
        return nnx.state(FluxTransformer2DModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))

    t0 = time.perf_counter()
    state = jax.block_until_ready(init_state())
    init_s = time.perf_counter() - t0
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    memory_stats = lambda: device.memory_stats() or {}  # None on the CPU
    in_use_after_init = memory_stats().get("bytes_in_use", 0)
    print(f"weights on GPU: {weight_bytes / GIB:.2f} GiB in {init_s:.1f} s (init compile + run)", flush=True)

    @jax.jit
    def step(state, inputs):
        return nnx.merge(graphdef, state)(**inputs)

    inputs = inputs_1024(config)
    t0 = time.perf_counter()
    compiled = step.lower(state, inputs).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp_bytes = getattr(mem, "temp_size_in_bytes", None)
    print(f"compile: {compile_s:.1f} s; XLA temp buffer for the step: {temp_bytes and temp_bytes / GIB:.2f} GiB",
          flush=True)

    out = jax.block_until_ready(compiled(state, inputs))  # warm-up
    jax.block_until_ready(compiled(state, inputs))
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(state, inputs))
        times.append(time.perf_counter() - t0)
    stats = memory_stats()
    out32 = np.asarray(out, np.float32)

    hlo = compiled.as_text()
    result = {
        "device": device.device_kind,
        "jax": jax.__version__,
        "config": f"FLUX.1-{args.config}: {config.num_layers} double + {config.num_single_layers} single blocks, "
                  f"hidden {config.inner_dim}",
        "tokens": {"image": 4096, "text": 512},
        "batch": 1,
        "dtype": "bfloat16",
        "attention": "cudnn" if "cudnn" in hlo.lower() else "xla",
        "weights_gib": round(weight_bytes / GIB, 3),
        "init_s": round(init_s, 2),
        "compile_s": round(compile_s, 2),
        "step_ms_median": round(1e3 * statistics.median(times), 2),
        "step_ms_all": [round(1e3 * t, 2) for t in times],
        "xla_temp_gib": None if temp_bytes is None else round(temp_bytes / GIB, 3),
        "bytes_in_use_after_init_gib": round(in_use_after_init / GIB, 3),
        "peak_gib": round(stats.get("peak_bytes_in_use", 0) / GIB, 3),
        "output_shape": list(out32.shape),
        "output_finite_fraction": float(np.isfinite(out32).mean()),
        "output_std": float(np.nanstd(out32)),
    }
    print(json.dumps(result, indent=1), flush=True)

    lines = [
        "# FLUX.1-dev transformer, one bf16 step at 1024² (JAX, jit)", "",
        f"`tools/gpu_check_flux_step.py` on {result['device']}, jax {result['jax']}: random weights made on "
        "the GPU, batch 1, 4096 image + 512 text tokens, guidance on, attention through "
        f"`jax.nn.dot_product_attention` ({result['attention']}). Median of {args.iters} steps after 2 warm-ups.", "",
        *harness.md_table(["what", "figure"], [
            ("weights (bf16)", f"{result['weights_gib']} GiB"),
            ("compile (lower + compile)", f"{result['compile_s']} s"),
            ("step (median)", f"{result['step_ms_median']} ms (all: {result['step_ms_all']})"),
            ("XLA temp buffer of the step", f"{result['xla_temp_gib']} GiB"),
            ("GPU peak bytes in use (process)", f"{result['peak_gib']} GiB"),
            ("output finite / std", f"{result['output_finite_fraction']} / {result['output_std']:.3g}")]),
    ]
    harness.write_results("flux_step", result, lines, args.out, meta=harness.run_meta(),
                          command="python tools/gpu_check_flux_step.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
