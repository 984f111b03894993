"""GPU check for issue 8: the whole text-to-image pipeline, FLUX.1-dev-shaped, 1024², 28 steps,
bf16 and ConvRot W4A4: seconds per image and peak GPU memory.

The transformer is FLUX.1-dev's shape with random weights made on the GPU in bf16, one block at a
time from a fixed seed per block, so every variant holds the same weights. For W4A4 each block is
quantized (`quantize_model`) as soon as it exists, so the bf16 model never sits in memory whole:
as when a converted checkpoint is loaded. The VAE decoder has FLUX's shape (random, bf16). The
text encoders are tiny random CLIP/T5 with the real output widths (768, 4096; T5 at 512 tokens)
on the CPU: their time is reported apart and is not that of CLIP-L/T5-XXL.

Variants: bf16; W4A4 with the XLA reference layers; W4A4 with implementation "auto" (the Pallas
kernels on a Hopper GPU). Each runs in its own process (so the peak-memory figure is its own):
one run with compilation, then `--runs` timed runs; the sure ones first, all within `--deadline`
seconds (a variant still compiling then is killed and reported so; benchmarks.harness.run_isolated).
The parent writes pipeline.{json,md} after each variant (benchmarks.harness.write_results), with
each W4A4 variant's final latents against bf16's. A one-off check kept as a tool.

    PYTHONPATH=. python3 tools/gpu_check_pipeline.py --out benchmarks/results
    PYTHONPATH=. JAX_PLATFORMS=cpu python3 tools/gpu_check_pipeline.py --config small --out /tmp/x   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from benchmarks import harness

GIB = 2**30


VARIANTS = {"bf16": None, "w4a4-xla": "xla", "w4a4-auto": "auto"}  # name -> W4A4 implementation


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from convrot_jax.ops import resolve_implementation
    from flux_flax.config import FluxConfig
    from flux_flax.demo import weight_bytes
    from flux_flax.demo_assets import tiny_text_encoders
    from flux_flax.fusion import fuse_projections
    from flux_flax.pipeline import FluxPipeline, GenerationSettings
    from flux_flax.random_weights import random_transformer
    from flux_flax.vae import AutoencoderKLDecoder, VAEConfig

    device = jax.devices()[0]
    dev = args.config == "dev"
    config = FluxConfig.dev() if dev else FluxConfig.small()
    t0 = time.perf_counter()
    implementation = VARIANTS[variant]
    transformer = fuse_projections(random_transformer(config, dtype=jnp.bfloat16, quantize=implementation))
    jax.block_until_ready(nnx.state(transformer))
    build_s = time.perf_counter() - t0
    vae_config = VAEConfig() if dev else VAEConfig.tiny()
    vae = nnx.jit(lambda: AutoencoderKLDecoder(vae_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(1)))()
    text = tiny_text_encoders(config.pooled_projection_dim, config.joint_attention_dim, max_sequence_length=512,
                              t5_d_ff=1024, num_layers=1)
    pipe = FluxPipeline(transformer, vae, text, progress=True)
    settings = GenerationSettings(args.size, args.size, args.steps, 3.5, seed=0)

    def peak_gib() -> float:
        return (device.memory_stats() or {}).get("peak_bytes_in_use", 0) / GIB

    peaks = {"after_build_gib": peak_gib()}

    def one_image() -> tuple[dict, np.ndarray]:
        t = time.perf_counter()
        embeds = pipe.encode_prompts([args.prompt])
        t_text = time.perf_counter()
        latents = pipe.denoise(pipe.prepare_latents([settings.seed], args.size, args.size), embeds, settings)
        t_denoise = time.perf_counter()
        peaks.setdefault("after_denoise_gib", peak_gib())
        jax.block_until_ready(pipe.decode(latents, args.size, args.size))
        t_decode = time.perf_counter()
        peaks.setdefault("after_decode_gib", peak_gib())
        times = {"text_s": t_text - t, "denoise_s": t_denoise - t_text, "decode_s": t_decode - t_denoise}
        return times, np.asarray(latents, np.float32)

    first, _ = one_image()
    runs = [one_image() for _ in range(args.runs)]
    latents = runs[-1][1]
    np.save(Path(args.out) / f"latents_{variant}.npy", latents)
    med = {k: statistics.median(r[0][k] for r in runs) for k in first}
    return {
        "variant": variant,
        "w4a4_implementation": resolve_implementation(implementation) if implementation else None,
        "config": args.config,
        "size": args.size,
        "steps": args.steps,
        "device": device.device_kind,
        "jax": jax.__version__,
        "transformer_weight_gib": weight_bytes(transformer) / GIB,
        "vae_weight_gib": weight_bytes(vae) / GIB,
        "build_s": build_s,
        "first_run_s": first,
        "timed_runs": args.runs,
        "median_s": med,
        "seconds_per_image": med["denoise_s"] + med["decode_s"],
        "seconds_per_step": med["denoise_s"] / args.steps,
        "peak_gpu_gib": peak_gib(),
        "peak_gpu_steps": peaks,  # the process peak after building, after the first denoising, after its decode
        "finite": bool(np.isfinite(latents).all()),
    }


def report(results: dict, comparison: dict, args: argparse.Namespace) -> None:
    device = next((r["device"] for r in results.values() if "device" in r), "?")
    lines = [
        "# Pipeline GPU check (issue 8)",
        "",
        f"FLUX.1-{args.config}-shaped random-weight transformer, {args.size}², {args.steps} steps, batch 1, "
        f"on {device}; `tools/gpu_check_pipeline.py`.",
        "Random weights made on the GPU in bf16 (same seeds for every variant); FLUX-shaped VAE decoder (bf16, random);",
        "text encoders tiny random CLIP/T5 with the real output widths (768 pooled, 4096 x 512 tokens) on the CPU:",
        "their time is not CLIP-L/T5-XXL's and is left out of seconds per image (denoise + decode).",
        f"Timed: median of {args.runs} run(s) after one run with compilation. The denoising loop is one",
        "`lax.fori_loop` program with a tqdm progress callback per step, projections fused (as the CLI runs it).",
        "",
        "| variant | W4A4 kernels | s / image | s / step | VAE decode s | first run (compile) s | transformer weights GiB"
        " | peak GPU GiB: build / +denoise / +decode | final latents vs bf16 (rel. L2) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | | | |")
            continue
        first_total = r["first_run_s"]["denoise_s"] + r["first_run_s"]["decode_s"]
        err = comparison.get(name)
        lines.append(
            f"| {name} | {r['w4a4_implementation'] or '-'} | {r['seconds_per_image']:.2f} | "
            f"{r['seconds_per_step'] * 1e3:.0f} ms | {r['median_s']['decode_s']:.2f} | {first_total:.1f} | "
            f"{r['transformer_weight_gib']:.2f} | {r['peak_gpu_steps']['after_build_gib']:.2f} / "
            f"{r['peak_gpu_steps']['after_denoise_gib']:.2f} / {r['peak_gpu_gib']:.2f} | "
            f"{'-' if err is None else f'{err:.4f}'} |"
        )
    harness.write_results("pipeline", {"variants": results, "vs_bf16": comparison}, lines, args.out,
                          summary=summarize(results), meta=harness.run_meta(device=device),
                          command="python tools/gpu_check_pipeline.py " + " ".join(sys.argv[1:]))


def summarize(results: dict) -> list[dict]:
    """W4A4 (auto: the Pallas kernels on Hopper) against bf16, one image, same run."""
    q, b = results.get("w4a4-auto", {}), results.get("bf16", {})
    if "seconds_per_image" not in q or "seconds_per_image" not in b:
        return []
    kernels = "Pallas kernels" if q.get("w4a4_implementation") == "pallas" else "XLA reference ops"
    return [harness.figure(
        f"whole pipeline, W4A4 ({kernels})", f"{q['seconds_per_image']:.2f} s per image, peak GPU "
        f"{q['peak_gpu_gib']:.2f} GiB (bf16: {b['seconds_per_image']:.2f} s, {b['peak_gpu_gib']:.2f} GiB)",
        shape=f"{q['size']}², {q['steps']} steps, denoise + VAE decode", baseline="bf16",
        ratio=b["seconds_per_image"] / q["seconds_per_image"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--config", choices=("dev", "small"), default="dev", help="small: a CPU smoke test")
    parser.add_argument("--size", type=int, default=None, help="square image side (default 1024; small: 128)")
    parser.add_argument("--steps", type=int, default=None, help="steps (default 28; small: 2)")
    parser.add_argument("--runs", type=int, default=1, help="timed runs after the compiling one")
    parser.add_argument("--prompt", default="a photo of a cat sitting on a red chair next to the window")
    parser.add_argument("--variant", choices=tuple(VARIANTS), help="internal: run one variant in this process")
    parser.add_argument("--deadline", type=float, default=560, help="seconds for all variants (each in a subprocess)")
    args = parser.parse_args()
    args.size = args.size or (1024 if args.config == "dev" else 128)
    args.steps = args.steps or (28 if args.config == "dev" else 2)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.variant:
        harness.emit(run_variant(args.variant, args))
        return

    import numpy as np

    start = time.perf_counter()
    results, comparison = {}, {}
    for variant in VARIANTS:  # the sure ones first: a slow compile cannot cost the others
        left = args.deadline - (time.perf_counter() - start)
        if left < 60:
            results[variant] = {"variant": variant, "error": f"not run: {left:.0f} s of the deadline left"}
            report(results, comparison, args)
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--variant", variant]
        print(f"== {variant} ({left:.0f} s left): {' '.join(cmd)}", flush=True)
        got = harness.run_isolated(cmd, timeout=left, label=variant)
        results[variant] = {"variant": variant, **got}
        print(json.dumps(results[variant], indent=2), flush=True)
        latents = args.out / f"latents_{variant}.npy"
        ref = args.out / "latents_bf16.npy"
        if variant != "bf16" and latents.is_file() and ref.is_file():
            q, r = np.load(latents), np.load(ref)
            comparison[variant] = float(np.linalg.norm(q - r) / np.linalg.norm(r))
        report(results, comparison, args)  # after each variant: a later timeout keeps what is done
    for p in args.out.glob("latents_*.npy"):
        p.unlink()
    print((args.out / "pipeline.md").read_text())
    print(f"python {platform.python_version()}")


if __name__ == "__main__":
    main()
