"""Peak GPU memory of the whole text-to-image pipeline at 1024²: the real-size text encoders (CLIP-L
and T5-XXL, the JAX ports, random weights) + FLUX.1-dev's W4A4 transformer (random, Pallas kernels,
projections fused) + FLUX's VAE decoder, one `FluxPipeline` call (encode, 28 steps, decode), with
the T5 in 4 bits (`t5_default_policy`, W4A16) against the same with a bf16 T5, and against
diffusers' FluxPipeline in bf16 built with the same shapes. Target: <= 12 GiB with the 4-bit T5.
After the calls (and their peak), the JAX variants also time the T5 and CLIP forwards alone for 1
and 8 prompts (`bench_text_encoders.time_jax_encoders`): 4-bit against bf16 T5 in one run.

Each variant runs in its own process (benchmarks.harness), so each peak is its own. The models
are built on the device block by block, quantized as they grow (`random_transformer`,
`random_t5`), as when converted checkpoints are loaded. The JAX variants share one persistent
compilation cache (`--compile-cache`): the transformer's program is the same in both, so the
second variant does not compile it again. Reported per variant: weights by part, the peak after
building, the peak over the call, and the call's seconds (first call, with compilation; second).

    PYTHONPATH=. python3 -m benchmarks.bench_pipeline_memory --out benchmarks/results
    PYTHONPATH=. python3 -m benchmarks.bench_pipeline_memory --small --variants jax_t5_4bit jax_t5_bf16 \\
        --out /tmp/pm                                                           # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import Variant

NAME = "pipeline_memory"
MODULE = "benchmarks.bench_pipeline_memory"
GIB = 2**30
PROMPTS = ("a photo of a cat sitting on a red chair next to the window", "a red fox in fresh snow, morning light")
TARGET_GIB = 12
VARIANTS = harness.registry(
    Variant("jax_t5_4bit", "JAX: CLIP-L + T5-XXL W4A16 + FLUX.1-dev W4A4 + VAE", options={"t5": "w4a16"}),
    Variant("jax_t5_bf16", "JAX: CLIP-L + T5-XXL bf16 + FLUX.1-dev W4A4 + VAE", options={"t5": None}),
    Variant("diffusers_bf16", "diffusers FluxPipeline, everything bf16 (CUDA, eager)", requires=("torch", "diffusers")),
)


def _gib(tree) -> float:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(tree)) / GIB


def run_jax(args: argparse.Namespace, treatment: str | None) -> dict:
    from flux_flax.command_line import enable_compilation_cache

    enable_compilation_cache(Path(args.compile_cache))
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.bench_text_encoders import random_text_encoders, time_jax_encoders
    from flux_flax.config import FluxConfig
    from flux_flax.demo_assets import tiny_clip_tokenizer, tiny_t5_tokenizer
    from flux_flax.fusion import fuse_projections
    from flux_flax.pipeline import FluxPipeline
    from flux_flax.producers import fuse_producers
    from flux_flax.settings import GenerationSettings
    from flux_flax.random_weights import random_transformer
    from flux_flax.text_jax import JaxTextEncoders
    from flux_flax.vae import AutoencoderKLDecoder, VAEConfig

    device = jax.devices()[0]
    config = FluxConfig.small(pooled_projection_dim=64) if args.small else FluxConfig.dev()
    start = time.perf_counter()
    clip, t5 = random_text_encoders(args.small, treatment)
    transformer = fuse_producers(fuse_projections(  # as FluxPipeline.from_pretrained builds it
        random_transformer(config, dtype=jnp.bfloat16, quantize="auto")))
    vae_config = VAEConfig.tiny() if args.small else VAEConfig()
    vae = nnx.jit(lambda: AutoencoderKLDecoder(vae_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(1)))()
    text = JaxTextEncoders(tiny_clip_tokenizer(), clip, tiny_t5_tokenizer(), t5, max_sequence_length=512)
    pipe = FluxPipeline(transformer, vae, text, progress=False)
    jax.block_until_ready([nnx.state(m) for m in (clip, t5, transformer, vae)])
    out = {
        "build_s": time.perf_counter() - start,
        "weights_gib": {"clip": _gib(nnx.state(clip)), "t5": _gib(nnx.state(t5)),
                        "transformer": _gib(nnx.state(transformer)), "vae": _gib(nnx.state(vae))},
    }
    peak = lambda: (device.memory_stats() or {}).get("peak_bytes_in_use", 0) / GIB  # noqa: E731
    out["peak_after_build_gib"] = peak()
    settings = GenerationSettings(args.size, args.size, args.steps, 3.5, 0)
    for run, prompt in zip(("first", "second"), PROMPTS):
        start = time.perf_counter()
        # FluxPipeline.__call__'s steps without its NaN check: random weights may overflow, which
        # changes no buffer size; `finite` records it.
        latents = pipe.denoise(pipe.prepare_latents([0], args.size, args.size), pipe.encode_prompts([prompt]), settings)
        images = jax.block_until_ready(pipe.decode(latents, args.size, args.size))
        out[f"{run}_call_s"] = time.perf_counter() - start
    out["image_shape"] = list(images.shape)
    out["finite"] = bool(jnp.isfinite(images).all())
    out["peak_gib"] = peak()
    out["encode"] = time_jax_encoders(clip, t5, iters=5)
    return out


def run_diffusers(args: argparse.Namespace) -> dict:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from benchmarks.bench_first_png import DEV_SCHEDULER
    from benchmarks.bench_text_encoders import CLIP_L, SMALL, T5_XXL
    from flux_flax.config import FluxConfig
    from flux_flax.demo_assets import tiny_clip_tokenizer, tiny_t5_tokenizer
    from flux_flax.vae import VAEConfig

    config = FluxConfig.small(pooled_projection_dim=64) if args.small else FluxConfig.dev()
    sizes = SMALL if args.small else {"t5": T5_XXL, "clip": CLIP_L}
    vae_config = VAEConfig.tiny() if args.small else VAEConfig()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the smoke test
    cuda = device == "cuda"
    peak = lambda: torch.cuda.max_memory_allocated() / GIB if cuda else 0.0  # noqa: E731
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the GPU: no float32 copy on the way
    with torch.device(device), torch.no_grad():
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**{k: v for k, v in DEV_SCHEDULER.items() if k != "_class_name"}),
            vae=AutoencoderKL(**vae_config.to_diffusers()).eval(),
            text_encoder=CLIPTextModel(CLIPTextConfig(**sizes["clip"])).eval(), tokenizer=tiny_clip_tokenizer(),
            text_encoder_2=T5EncoderModel(T5Config(**sizes["t5"], is_encoder_decoder=False)).eval(),
            tokenizer_2=tiny_t5_tokenizer(), transformer=FluxTransformer2DModel(**config.to_dict()).eval(),
        )
    torch.set_default_dtype(torch.float32)
    sync()
    out = {"build_s": time.perf_counter() - start,
           "weights_gib": {name: sum(p.numel() * p.element_size() for p in getattr(pipe, name).parameters()) / GIB
                           for name in ("text_encoder", "text_encoder_2", "transformer", "vae")},
           "peak_after_build_gib": peak()}
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the peak of the call (the weights included), not of the build
    for run, prompt in zip(("first", "second"), PROMPTS):
        start = time.perf_counter()
        with torch.no_grad():
            images = pipe(prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
                          guidance_scale=3.5, max_sequence_length=512, output_type="np").images
        sync()
        out[f"{run}_call_s"] = time.perf_counter() - start
    out["image_shape"] = list(images.shape)
    out["peak_gib"] = peak()
    return out


def worker(args: argparse.Namespace) -> None:
    if args.worker == "diffusers_bf16":
        harness.emit(run_diffusers(args))
    else:
        harness.emit(run_jax(args, VARIANTS[args.worker].options["t5"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--small", action="store_true", help="small widths, tiny VAE: a CPU smoke test of the script")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per variant")
    parser.add_argument("--compile-cache", help="JAX compilation cache shared by the JAX variants (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    cache = args.compile_cache or tempfile.mkdtemp(prefix="pipeline_memory_cache_")
    argv = ["--size", str(args.size), "--steps", str(args.steps), "--compile-cache", cache,
            *(["--small"] if args.small else [])]
    harness.run_each(MODULE, VARIANTS, args.variants, argv, timeout=args.timeout, write=lambda rows: write(rows, args))


def write(rows: dict, args: argparse.Namespace, meta: dict | None = None) -> None:
    """The results files from the variants' rows (`meta`: the run's, when rendering a stored run again)."""
    table = []
    for name, row in rows.items():
        if "error" in row:
            table.append([name, VARIANTS[name].doc, row["error"], "", "", "", "", "", "", "", ""])
            continue
        weights = " + ".join(f"{part} {gib:.2f}" for part, gib in row["weights_gib"].items())
        encode = row.get("encode", {})
        t5_ms = [f"{encode[k] * 1e3:.0f}" if k in encode else "-" for k in ("t5_s_b1", "t5_s_b8")]
        t5_temp = encode.get("t5_temp_gib_b1")
        t5_ms.append("-" if t5_temp is None else f"{t5_temp:.2f}")
        table.append([name, VARIANTS[name].doc, f"{row['peak_gib']:.2f}", f"{row['peak_after_build_gib']:.2f}",
                      weights, f"{sum(row['weights_gib'].values()):.2f}", f"{row['first_call_s']:.1f}",
                      f"{row['second_call_s']:.1f}", *t5_ms])
    summary = []
    four_bit, bf16, torch_row = (rows.get(k, {}) for k in VARIANTS)
    shape = f"{args.size}², {args.steps} steps, one call: encode, denoise, decode"
    if four_bit.get("peak_gib"):  # 0 where the device reports no memory statistics (the CPU)
        for label, row in (("diffusers FluxPipeline bf16", torch_row), ("the same with a bf16 T5", bf16)):
            if "peak_gib" in row:  # ratio: how many times less memory the 4-bit pipeline peaks at
                summary.append(harness.figure(
                    "whole pipeline peak GPU memory, 4-bit T5-XXL + W4A4 FLUX.1-dev",
                    f"{four_bit['peak_gib']:.2f} GiB (target <= {TARGET_GIB})", shape=shape,
                    baseline=f"{label} {row['peak_gib']:.2f} GiB", ratio=row["peak_gib"] / four_bit["peak_gib"]))
    if "t5_s_b1" in four_bit.get("encode", {}) and "t5_s_b1" in bf16.get("encode", {}):
        q, b = four_bit["encode"], bf16["encode"]
        summary.append(harness.figure(
            "T5-XXL encode, JAX 4-bit (W4A16, t5_default_policy)",
            f"{q['t5_s_b1'] * 1e3:.0f} ms (8 prompts {q['t5_s_b8'] * 1e3:.0f} ms), weights {q['t5_weight_gib']:.2f} GiB",
            shape="1 prompt, 512 tokens", ratio=b["t5_s_b1"] / q["t5_s_b1"],
            baseline=f"JAX bf16 {b['t5_s_b1'] * 1e3:.0f} ms (8 prompts {b['t5_s_b8'] * 1e3:.0f} ms), "
                     f"{b['t5_weight_gib']:.2f} GiB"))
    markdown = [
        "# Whole-pipeline peak GPU memory: text encoders + W4A4 transformer + VAE",
        "",
        ("Small widths (a smoke test). " if args.small else
         "FLUX.1-dev's W4A4 transformer (random, Pallas kernels, fused projections), FLUX's VAE decoder (bf16), "
         "CLIP-L and T5-XXL at their real sizes (random; T5 at 512 tokens), on the GPU. ")
        + f"{args.size}², {args.steps} steps, one prompt; two calls (the first compiles); peak over the process "
        "(the diffusers row: over its calls, after the build). Each variant in its own process; the JAX ones "
        "share a compilation cache, so the transformer compiles in the first only. T5 ms: the jitted T5 forward "
        "alone, median of 5, after the calls; T5 temp: XLA's temporary buffers of that program (1 prompt).",
        "",
        *harness.md_table(["variant", "what", "peak GiB", "peak after build GiB", "weights GiB by part",
                           "weights GiB", "first call s", "second call s", "T5 ms, 1 prompt", "T5 ms, 8 prompts",
                           "T5 temp GiB"],
                          table, numeric=[False, False, True, True, False, True, True, True, True, True, True]),
    ]
    harness.write_results(NAME, {"rows": rows, "small": args.small, "size": args.size, "steps": args.steps},
                          markdown, args.out, summary=summary, meta=meta or harness.run_meta(probe=True),
                          command="PYTHONPATH=. python3 -m benchmarks.bench_pipeline_memory --out benchmarks/results")


if __name__ == "__main__":
    sys.exit(main())
