"""Seconds per image: the whole text-to-image pipeline, FLUX.1-dev-shaped, 1024², 28 steps, batch 1
(denoising + VAE decode), for the JAX pipeline in bf16 and W4A4 and for diffusers' FluxPipeline.

Variants (each in its own process, so each peak-memory figure is its own):
  jax_bf16       flux_flax.FluxPipeline, bf16 transformer (the baseline)
  jax_w4a4       the same with ConvRot W4A4 layers, implementation "auto" (the Pallas kernels on Hopper)
  jax_w4a4_xla   the same with the XLA reference layers (not run by default)
  torch_eager    diffusers FluxPipeline, bf16 transformer and VAE (needs diffusers)
  torch_compile  the same with the transformer under torch.compile (default mode)
  torch_fp8      the same with torchao's fp8 dynamic row-wise W8A8 and fused QKV before the compile
                 (`benchmarks.models.quantize_fp8_peer`; needs torchao; not run by default: its
                 compile took 3.6 min on a cold H200, so run it with the JAX rows, not the torch bf16 ones)
  torch_fp8_regional  torch_fp8 under diffusers' regional compilation (`compile_repeated_blocks`:
                 each block class compiled once, not the 57 blocks of the whole graph), for when
                 the whole compile does not fit a call; its ms / step against bench_e2e's torch_fp8
                 row says what the regional graph costs at run time

The JAX transformer is FLUX.1-dev's shape with random weights made on the GPU in bf16, one block
at a time from a fixed seed per block, so every JAX variant holds the same weights; for W4A4 each
block is quantized as soon as it exists (as when a converted checkpoint loads). diffusers' rows
use the same shapes with diffusers' own random initialisation (`benchmarks.models.torch_transformer`).
The VAE decoder has FLUX's shape (random, bf16). Text encoders are left out of seconds per image:
the JAX rows encode with tiny random CLIP/T5 of the real output widths (768, 4096 x 512 tokens),
diffusers' rows take random prompt embeddings of those shapes. The JAX denoising loop is one
`lax.fori_loop` program with a progress callback per step (as the CLI runs it), projections and
the default producers (the GELUs) fused as `FluxPipeline.from_pretrained` fuses them.
Timed: the median of `--runs` runs after one that compiles; the W4A4 rows' final latents against
jax_bf16's (relative L2; the workers hand them over in a temporary folder). The parent writes
generation.{json,md} after each variant.

    PYTHONPATH=. python3 -m benchmarks.bench_generation [--variants jax_bf16 jax_w4a4 torch_eager torch_compile]
    JAX_PLATFORMS=cpu PYTHONPATH=. python3 -m benchmarks.bench_generation --config small --variants jax_bf16 torch_eager --out /tmp/g   # CPU smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks import harness, step_trace
from benchmarks.harness import Variant

NAME = "generation"
MODULE = "benchmarks.bench_generation"
BASELINE = "jax_bf16"
GIB = 2**30
_TORCH = ("torch", "diffusers")
VARIANTS = harness.registry(
    Variant("jax_bf16", "flux_flax.FluxPipeline, bf16", options={"quantize": None}),
    Variant("jax_w4a4", "flux_flax.FluxPipeline, W4A4 (auto: Pallas kernels on Hopper)", options={"quantize": "auto"}),
    Variant("jax_w4a4_xla", "flux_flax.FluxPipeline, W4A4 (XLA reference layers)", options={"quantize": "xla"}),
    Variant("torch_eager", "diffusers FluxPipeline, bf16", _TORCH, options={"compile": None}),
    Variant("torch_compile", "diffusers FluxPipeline, bf16, transformer under torch.compile", _TORCH,
            options={"compile": "whole"}),
    Variant("torch_fp8", "diffusers FluxPipeline, transformer in torchao fp8 (W8A8, row-wise) under torch.compile",
            (*_TORCH, "torchao"), options={"compile": "whole", "fp8": True}),
    Variant("torch_fp8_regional", "torch_fp8 with the transformer's repeated blocks compiled, not the whole graph",
            (*_TORCH, "torchao"), options={"compile": "regional", "fp8": True}),
)
DEFAULT_VARIANTS = ("jax_bf16", "jax_w4a4", "torch_eager", "torch_compile")


def _configs(args):
    from flux_flax.config import FluxConfig
    from flux_flax.vae import VAEConfig

    return (FluxConfig.dev(), VAEConfig()) if args.config == "dev" else (FluxConfig.small(), VAEConfig.tiny())


def _timed(one_image, runs: int) -> dict:
    """One run that compiles, then the median of `runs` runs: seconds of each phase."""
    first = one_image()
    timed = [one_image() for _ in range(runs)]
    med = {k: statistics.median(t[k] for t in timed) for k in first}
    return {"first_run_s": first, "median_s": med, "seconds_per_image": med["denoise_s"] + med["decode_s"]}


def jax_worker(variant: str, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from convrot_jax.ops import resolve_implementation
    from flux_flax.demo import weight_bytes
    from flux_flax.demo_assets import tiny_text_encoders
    from flux_flax.fusion import fuse_projections
    from flux_flax.pipeline import FluxPipeline, GenerationSettings
    from flux_flax.producers import fuse_producers
    from flux_flax.random_weights import random_transformer
    from flux_flax.vae import AutoencoderKLDecoder

    device = jax.devices()[0]
    config, vae_config = _configs(args)
    implementation = VARIANTS[variant].options["quantize"]
    t0 = time.perf_counter()
    transformer = fuse_producers(fuse_projections(  # as FluxPipeline.from_pretrained builds it
        random_transformer(config, dtype=jnp.bfloat16, quantize=implementation)))
    jax.block_until_ready(nnx.state(transformer))
    build_s = time.perf_counter() - t0
    vae = nnx.jit(lambda: AutoencoderKLDecoder(vae_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(1)))()
    text = tiny_text_encoders(config.pooled_projection_dim, config.joint_attention_dim, max_sequence_length=512,
                              t5_d_ff=1024, num_layers=1)
    pipe = FluxPipeline(transformer, vae, text, progress=True)
    settings = GenerationSettings(args.size, args.size, args.steps, 3.5, seed=0)

    def peak_gib() -> float:
        return (device.memory_stats() or {}).get("peak_bytes_in_use", 0) / GIB

    peaks = {"after_build_gib": peak_gib()}
    latents = []

    def one_image() -> dict:
        embeds = pipe.encode_prompts([args.prompt])
        jax.block_until_ready(embeds)
        t = time.perf_counter()
        out = pipe.denoise(pipe.prepare_latents([settings.seed], args.size, args.size), embeds, settings)
        jax.block_until_ready(out)
        t_denoise = time.perf_counter()
        peaks.setdefault("after_denoise_gib", peak_gib())
        jax.block_until_ready(pipe.decode(out, args.size, args.size))
        t_decode = time.perf_counter()
        peaks.setdefault("after_decode_gib", peak_gib())
        latents[:] = [out]
        return {"denoise_s": t_denoise - t, "decode_s": t_decode - t_denoise}

    row = _timed(one_image, args.runs)
    if args.trace:  # the denoising loop's timeline: what a step costs inside the loop beyond its kernels
        initial = pipe.prepare_latents([settings.seed], args.size, args.size)
        embeds = jax.block_until_ready(pipe.encode_prompts([args.prompt]))
        step_trace.capture(lambda: jax.block_until_ready(pipe.denoise(initial, embeds, settings)),
                           args.trace / f"{variant}.denoise.xplane.pb", steps=1, warmup=0)  # timed runs warmed it
    final = np.asarray(latents[0], np.float32)
    np.save(args.latents_dir / f"latents_{variant}.npy", final)
    return {"variant": variant, "device": device.device_kind,
            "w4a4_implementation": resolve_implementation(implementation) if implementation else None,
            "transformer_weight_gib": weight_bytes(transformer) / GIB, "build_s": build_s, **row,
            "peak_gpu_gib": peak_gib(), "peak_gpu_steps": peaks, "finite": bool(np.isfinite(final).all())}


def torch_worker(variant: str, args) -> dict:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from diffusers import FluxPipeline as DiffusersFluxPipeline

    from benchmarks.models import quantize_fp8_peer, torch_transformer, torch_weight_bytes

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    config, vae_config = _configs(args)
    t0 = time.perf_counter()
    transformer = torch_transformer(config, dev)
    fp8 = bool(VARIANTS[variant].options.get("fp8"))
    if fp8:
        quantize_fp8_peer(transformer)
    weight_bytes = torch_weight_bytes(transformer, measured=fp8)  # before the VAE: the transformer's alone
    with torch.device(dev):
        vae = AutoencoderKL(**vae_config.to_diffusers()).to(torch.bfloat16).eval().requires_grad_(False)
    build_s = time.perf_counter() - t0
    compile_how = VARIANTS[variant].options["compile"]
    if compile_how == "whole":
        transformer.compile()
    elif compile_how == "regional":
        transformer.compile_repeated_blocks()
    # FLUX.1-dev's scheduler settings (its scheduler/scheduler_config.json).
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = DiffusersFluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                 text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator(dev).manual_seed(0)
    embeds = torch.randn(1, 512, config.joint_attention_dim, generator=g, device=dev, dtype=torch.bfloat16)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=g, device=dev, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    # The pipeline's own VAE decode, timed where the pipeline calls it (synchronised on both sides),
    # so that one run gives both phases.
    decode, decode_s = vae.decode, []

    def timed_decode(*a, **kw):
        sync()
        t = time.perf_counter()
        out = decode(*a, **kw)
        sync()
        decode_s.append(time.perf_counter() - t)
        return out

    vae.decode = timed_decode
    images = []

    def one_image() -> dict:
        t = time.perf_counter()
        images[:] = [pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=args.size, width=args.size,
                          num_inference_steps=args.steps, guidance_scale=3.5,
                          generator=torch.Generator(dev).manual_seed(0), output_type="pt").images]
        sync()
        total = time.perf_counter() - t
        return {"denoise_s": total - decode_s[-1], "decode_s": decode_s[-1]}

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        row = _timed(one_image, args.runs)
    peak = torch.cuda.max_memory_allocated() / GIB if dev == "cuda" else 0.0
    return {"variant": variant, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "w4a4_implementation": None, "transformer_weight_gib": weight_bytes / GIB, "build_s": build_s, **row,
            "peak_gpu_gib": peak, "peak_gpu_steps": None, "finite": bool(torch.isfinite(images[0]).all())}


def markdown(log: dict, args) -> list[str]:
    rows, vs = log["rows"], log["vs_bf16"]
    base = next((r for r in rows if r["variant"] == BASELINE and "seconds_per_image" in r), None)
    lines = [
        "# Seconds per image: the whole pipeline, JAX and diffusers", "",
        f"FLUX.1-{args.config}-shaped random-weight transformer, {args.size}², {args.steps} steps, batch 1, guidance "
        "3.5; seconds per image = denoising + VAE decode (text encoders left out: module docstring). Median of "
        f"{args.runs} run(s) after one that compiles; ratios: {BASELINE}'s seconds per image / this variant's, "
        "same run. First run: the compiling one (denoise + decode).", "",
        "| variant | s / image | vs jax_bf16 | ms / step | VAE decode s | first run s | transformer weights GiB "
        "| peak GPU GiB | final latents vs jax_bf16 (rel. L2) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "seconds_per_image" not in r:
            lines.append(f"| {r['variant']} | failed: {r.get('error', '?')} | | | | | | | |")
            continue
        first = r["first_run_s"]["denoise_s"] + r["first_run_s"]["decode_s"]
        ratio = f"{base['seconds_per_image'] / r['seconds_per_image']:.2f}x" if base else "-"
        err = vs.get(r["variant"])
        lines.append(f"| {r['variant']} | {r['seconds_per_image']:.2f} | {ratio} | "
                     f"{r['median_s']['denoise_s'] / args.steps * 1e3:.1f} | {r['median_s']['decode_s']:.2f} | "
                     f"{first:.1f} | {r['transformer_weight_gib']:.2f} | {r['peak_gpu_gib']:.2f} | "
                     f"{'-' if err is None else f'{err:.4f}'} |")
    return lines


def summarize(rows: list[dict], args) -> list[dict]:
    """JAX W4A4 against JAX bf16 and against the diffusers rows, one image, same run."""
    by = {r["variant"]: r for r in rows if "seconds_per_image" in r}
    q = by.get("jax_w4a4")
    if q is None:
        return []
    kernels = "Pallas kernels" if q.get("w4a4_implementation") == "pallas" else "XLA reference ops"
    labels = {"jax_bf16": "flux_flax bf16", "torch_eager": "diffusers bf16", "torch_compile": "diffusers bf16 + compile",
              "torch_fp8": "diffusers + torchao fp8 + compile",
              "torch_fp8_regional": "diffusers + torchao fp8 + regional compile"}
    return [harness.figure(f"whole pipeline, W4A4 ({kernels})", f"{q['seconds_per_image']:.2f} s per image, peak GPU "
                           f"{q['peak_gpu_gib']:.2f} GiB ({labels[b]}: {by[b]['seconds_per_image']:.2f} s, "
                           f"{by[b]['peak_gpu_gib']:.2f} GiB)",
                           shape=f"{args.size}², {args.steps} steps, denoise + VAE decode",
                           baseline=labels[b], ratio=by[b]["seconds_per_image"] / q["seconds_per_image"])
            for b in labels if b in by]


def _not_runnable(variant: str, left_s: float) -> str | None:
    """Why `variant` is not started (a missing import such as diffusers, or too little of the
    deadline left), or None."""
    try:
        harness.check_requires(VARIANTS[variant])
    except harness.MissingDependency as e:
        return str(e)
    return f"not run: {left_s:.0f} s of the deadline left" if left_s < 60 else None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = harness.argument_parser(__doc__)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=harness.RESULTS)
    p.add_argument("--config", choices=("dev", "small"), default="dev", help="small: a CPU smoke test")
    p.add_argument("--size", type=int, default=None, help="square image side (default 1024; small: 128)")
    p.add_argument("--steps", type=int, default=None, help="steps (default 28; small: 2)")
    p.add_argument("--runs", type=int, default=1, help="timed runs after the compiling one")
    p.add_argument("--prompt", default="a photo of a cat sitting on a red chair next to the window")
    p.add_argument("--deadline", type=float, default=560, help="seconds for all variants (each in a subprocess)")
    p.add_argument("--trace", type=Path, default=None, metavar="DIR",
                   help="JAX variants: write the XLA profiler timeline of one more denoising run to "
                        "DIR/VARIANT.denoise.xplane.pb (`benchmarks.step_trace`)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--latents-dir", type=Path, help=argparse.SUPPRESS)  # where a worker leaves its final latents
    args = p.parse_args(argv)
    args.size = args.size or (1024 if args.config == "dev" else 128)
    args.steps = args.steps or (28 if args.config == "dev" else 2)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        work = torch_worker if args.worker.startswith("torch") else jax_worker
        harness.emit(work(args.worker, args))
        return

    import tempfile

    import numpy as np

    start = time.perf_counter()
    log: dict = {"rows": [], "vs_bf16": {}}
    meta = harness.run_meta(probe=True)
    ordered = [v for v in VARIANTS if v in args.variants]
    with tempfile.TemporaryDirectory(prefix="bench_generation_") as latents:
        worker_argv = [*argv, "--latents-dir", latents]
        for variant in ordered:  # registry order: the baseline first, the slow compiles last
            left = args.deadline - (time.perf_counter() - start)
            skip = _not_runnable(variant, left)
            if skip:
                log["rows"].append({"variant": variant, "error": skip})
            else:
                got = harness.run_isolated(harness.worker_command(MODULE, variant, worker_argv), timeout=left,
                                           label=variant)
                log["rows"].append({"variant": variant, **got})
                mine, ref = Path(latents, f"latents_{variant}.npy"), Path(latents, f"latents_{BASELINE}.npy")
                if variant.startswith("jax_w4a4") and mine.is_file() and ref.is_file():
                    q, r = np.load(mine), np.load(ref)
                    log["vs_bf16"][variant] = float(np.linalg.norm(q - r) / np.linalg.norm(r))
            harness.write_results(NAME, log, markdown(log, args), args.out, summary=summarize(log["rows"], args),
                                  meta=meta, command="python -m " + MODULE + " " + " ".join(argv))  # after each variant
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
