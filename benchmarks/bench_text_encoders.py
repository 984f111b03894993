"""Prompt encoding at FLUX's real text-encoder sizes (T5-XXL 4.76B, CLIP-L 123M; random weights):
the JAX ports (flux_flax.t5, flux_flax.clip, jitted, on the default device; T5 in bf16, or 4-bit
through `t5_default_policy`'s layers: W4A16, the default, or W4A4) against transformers' PyTorch
models (bf16) on the GPU and on the CPU, for 1 and 8 prompts of 512 T5 tokens (77 CLIP tokens).
Each variant runs in its own process (benchmarks.harness), so each one's peak GPU memory is its
own; the 4-bit T5 is quantized block by block as it is built (`random_t5`), as when loaded from
a converted checkpoint.

    PYTHONPATH=. python3 -m benchmarks.bench_text_encoders --out benchmarks/results
    PYTHONPATH=. python3 -m benchmarks.bench_text_encoders --small --variants jax torch_cpu --out /tmp/te  # CPU smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import Variant

NAME = "text_encoders"
MODULE = "benchmarks.bench_text_encoders"
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu")
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2)
SMALL = {"t5": dict(T5_XXL, d_model=256, d_ff=512, num_layers=2, num_heads=4),
         "clip": dict(CLIP_L, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)}
T5_TOKENS, CLIP_TOKENS = 512, 77
BATCHES = (1, 8)
VARIANTS = harness.registry(
    Variant("jax", "flux_flax.t5 / flux_flax.clip, jitted, bf16, default JAX device"),
    Variant("jax_w4a16", "the same, T5's block linears W4A16 (t5_default_policy)", options={"t5": "w4a16"}),
    Variant("jax_w4a4", "the same, T5's block linears W4A4 (Pallas kernels on Hopper)", options={"t5": "w4a4"}),
    Variant("torch_gpu", "transformers T5EncoderModel / CLIPTextModel, bf16, CUDA", requires=("torch",)),
    Variant("torch_cpu", "transformers T5EncoderModel / CLIPTextModel, bf16, CPU (all threads)", requires=("torch",)),
)


def _median_s(call, iters: int) -> float:
    call()  # compile / warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def t5_policy(treatment: str | None):
    """None (bf16) or `t5_default_policy()` with every rule's treatment set to `treatment`."""
    from convrot_jax import QuantPolicy
    from flux_flax.policy import t5_default_policy

    if treatment is None:
        return None
    return QuantPolicy(tuple((pattern, treatment) for pattern, _ in t5_default_policy().rules))


def random_text_encoders(small: bool, treatment: str | None):
    """(random CLIP-L, random T5-XXL: bf16, or its linears quantized per `treatment`) on the default device."""
    import jax.numpy as jnp
    from flax import nnx

    from flux_flax.clip import CLIPTextConfig, CLIPTextModel
    from flux_flax.random_weights import random_t5
    from flux_flax.t5 import T5Config

    sizes = SMALL if small else {"t5": T5_XXL, "clip": CLIP_L}
    t5 = random_t5(T5Config(**sizes["t5"]), dtype=jnp.bfloat16, policy=t5_policy(treatment))
    clip = nnx.jit(lambda: CLIPTextModel(CLIPTextConfig(**sizes["clip"]), dtype=jnp.bfloat16, rngs=nnx.Rngs(1)))()
    return clip, t5


def time_jax_encoders(clip, t5, iters: int) -> dict:
    """Median seconds of a jitted T5 and CLIP forward for 1 and 8 prompts (random ids), the T5's weight
    GiB, and the temporary buffers XLA gives each T5 program (`t5_temp_gib_b*`: a 4-bit T5 whose
    dequantized weights were all materialised at once would show them here)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    def compiled(model, run, ids):
        graphdef, state = nnx.split(model)
        return jax.jit(lambda s, i: run(nnx.merge(graphdef, s), i)).lower(state, ids).compile(), state

    out = {"t5_weight_gib": sum(x.nbytes for x in jax.tree.leaves(nnx.state(t5))) / 2**30}
    rng = np.random.default_rng(0)
    for b in BATCHES:
        t5_ids = jnp.asarray(rng.integers(1, 1000, (b, T5_TOKENS)), jnp.int32)
        clip_ids = jnp.asarray(rng.integers(1, 1000, (b, CLIP_TOKENS)), jnp.int32)
        encode_t5, t5_state = compiled(t5, lambda m, i: m(i), t5_ids)
        encode_clip, clip_state = compiled(clip, lambda m, i: m(i)[1], clip_ids)
        memory = encode_t5.memory_analysis()
        out[f"t5_temp_gib_b{b}"] = None if memory is None else memory.temp_size_in_bytes / 2**30
        out[f"t5_s_b{b}"] = _median_s(lambda: encode_t5(t5_state, t5_ids).block_until_ready(), iters)
        out[f"clip_s_b{b}"] = _median_s(lambda: encode_clip(clip_state, clip_ids).block_until_ready(), iters)
    return out


def run_jax(small: bool, iters: int, treatment: str | None) -> dict:
    import jax

    out = time_jax_encoders(*random_text_encoders(small, treatment), iters)
    stats = jax.devices()[0].memory_stats() or {}
    out["peak_device_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
    return out


def run_torch(small: bool, iters: int, device: str) -> dict:
    import numpy as np
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    sizes = SMALL if small else {"t5": T5_XXL, "clip": CLIP_L}
    torch.manual_seed(0)
    with torch.device(device):
        t5 = T5EncoderModel(T5Config(**sizes["t5"], is_encoder_decoder=False)).to(torch.bfloat16).eval()
        clip = CLIPTextModel(CLIPTextConfig(**sizes["clip"])).to(torch.bfloat16).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {"threads": torch.get_num_threads()}
    rng = np.random.default_rng(0)
    for b in BATCHES if device == "cuda" else BATCHES[:1]:  # 8 prompts of T5-XXL on the CPU: ~15 s each
        t5_ids = torch.as_tensor(rng.integers(1, 1000, (b, T5_TOKENS)), device=device)
        clip_ids = torch.as_tensor(rng.integers(1, 1000, (b, CLIP_TOKENS)), device=device)

        def t5_call():
            with torch.no_grad():
                t5(t5_ids)[0]
            sync()

        def clip_call():
            with torch.no_grad():
                clip(clip_ids).pooler_output
            sync()

        out[f"t5_s_b{b}"] = _median_s(t5_call, iters if device == "cuda" else 2)
        out[f"clip_s_b{b}"] = _median_s(clip_call, iters)
    if device == "cuda":
        out["peak_device_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def worker(args: argparse.Namespace) -> None:
    if args.worker.startswith("jax"):
        harness.emit(run_jax(args.small, args.iters, VARIANTS[args.worker].options.get("t5")))
    else:
        harness.emit(run_torch(args.small, args.iters, "cuda" if args.worker == "torch_gpu" else "cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--small", action="store_true", help="tiny widths: a CPU smoke test of the script")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=400)
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    argv = ["--iters", str(args.iters), *(["--small"] if args.small else [])]
    harness.run_each(MODULE, VARIANTS, args.variants, argv, timeout=args.timeout, write=lambda rows: write(rows, args))


def write(rows: dict, args: argparse.Namespace) -> None:
    def cell(name, key, scale=1e3, fmt="{:.0f}"):
        value = rows.get(name, {}).get(key)
        return fmt.format(value * scale) if isinstance(value, (int, float)) else "-"

    table = []
    for name in rows:
        if "error" in rows[name]:
            table.append([name, VARIANTS[name].doc, rows[name]["error"], "", "", "", "", ""])
            continue
        table.append([name, VARIANTS[name].doc, cell(name, "t5_s_b1"), cell(name, "t5_s_b8"),
                      cell(name, "clip_s_b1"), cell(name, "clip_s_b8"), cell(name, "t5_weight_gib", 1, "{:.2f}"),
                      cell(name, "peak_device_gib", 1, "{:.2f}")])
    summary = []
    jax_row, gpu_row = rows.get("jax", {}), rows.get("torch_gpu", {})
    if "t5_s_b1" in jax_row:
        baseline = f"transformers bf16 on the GPU {gpu_row['t5_s_b1'] * 1e3:.0f} ms" if "t5_s_b1" in gpu_row else None
        ratio = gpu_row["t5_s_b1"] / jax_row["t5_s_b1"] if baseline else None
        summary.append(harness.figure("T5-XXL encode, JAX bf16 (flux_flax.t5)", f"{jax_row['t5_s_b1'] * 1e3:.0f} ms",
                                      shape="1 prompt, 512 tokens", baseline=baseline, ratio=ratio))
    four_bit = rows.get("jax_w4a16", {})
    if "t5_s_b1" in four_bit and "t5_s_b1" in jax_row:
        summary.append(harness.figure(
            "T5-XXL encode, JAX 4-bit (W4A16, t5_default_policy)",
            f"{four_bit['t5_s_b1'] * 1e3:.0f} ms, weights {four_bit['t5_weight_gib']:.2f} GiB",
            shape="1 prompt, 512 tokens",
            baseline=f"JAX bf16 {jax_row['t5_s_b1'] * 1e3:.0f} ms, {jax_row['t5_weight_gib']:.2f} GiB",
            ratio=jax_row["t5_s_b1"] / four_bit["t5_s_b1"]))
    markdown = [
        "# Text encoders at FLUX's sizes: JAX ports against transformers' PyTorch models",
        "",
        ("Tiny widths (a smoke test). " if args.small else
         "T5-XXL (4.76B parameters) and CLIP-L, random weights, bf16. ")
        + f"T5 at {T5_TOKENS} tokens, CLIP at {CLIP_TOKENS}; median of {args.iters} after a warm-up call "
        "(the CPU row: 2 T5 runs, 1 prompt only); each variant in its own process.",
        "",
        *harness.md_table(["variant", "what", "T5 ms, 1 prompt", "T5 ms, 8 prompts", "CLIP ms, 1", "CLIP ms, 8",
                           "T5 weights GiB (JAX)", "peak device GiB"], table,
                          numeric=[False, False, True, True, True, True, True, True]),
    ]
    harness.write_results(NAME, {"rows": rows, "small": args.small}, markdown, args.out, summary=summary,
                          meta=harness.run_meta(probe=True),
                          command="PYTHONPATH=. python3 -m benchmarks.bench_text_encoders --out benchmarks/results")


if __name__ == "__main__":
    sys.exit(main())
