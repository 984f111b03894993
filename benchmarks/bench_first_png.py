"""Time from `convrot-flux generate` starting to its first PNG, cold (empty JAX compilation cache)
and warm (the cache the cold run filled), and what checking a checkpoint's integrity costs.

The model folder is FLUX.1-dev's shape with random weights: a W4A4 checkpoint made on the device
block by block (`flux_flax.checkpoint.save_checkpoint`, the format `convrot-convert` writes), a
FLUX-shaped VAE decoder, and text encoders: tiny random CLIP/T5 with the real output widths
(`--text tiny`, their time is not CLIP-L/T5-XXL's), or CLIP-L and T5-XXL at their real sizes
(`--text real`: random bf16 safetensors in transformers' layout, the T5 converted to a 4-bit
checkpoint by `convrot-convert --part text_encoder_2`, both run by the JAX backend). Each
`generate` runs in its own process, as a user runs it.

    PYTHONPATH=. python3 benchmarks/bench_first_png.py --workdir /tmp/first_png --out benchmarks/results
    PYTHONPATH=. python3 benchmarks/bench_first_png.py --text real --workdir /tmp/first_png --out benchmarks/results
    PYTHONPATH=. python3 benchmarks/bench_first_png.py --config small --size 256 --steps 2 \\
        --workdir /tmp/first_png --out /tmp/first_png_out                       # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
DEV_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def write_real_size_text_parts(folder: Path, config) -> Path:
    """Tokenizers (tiny, in code) and random CLIP-L + T5-XXL (for another transformer than FLUX.1-dev's:
    bench_text_encoders' small widths, CLIP's set to the pooled width) in transformers' layout under
    `folder`, torch-free; the T5 converted to a 4-bit checkpoint beside it, which is returned."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.bench_text_encoders import CLIP_L, SMALL, T5_XXL
    from convert.convert import convert_checkpoint
    from flux_flax.clip import CLIPTextConfig, CLIPTextModel
    from flux_flax.demo_assets import tiny_clip_tokenizer, tiny_t5_tokenizer
    from flux_flax.random_weights import write_random_text_encoder
    from flux_flax.t5 import T5Config, T5EncoderModel

    sizes = {"t5": T5_XXL, "clip": CLIP_L}
    if config.joint_attention_dim != T5_XXL["d_model"]:
        sizes = {"t5": SMALL["t5"], "clip": dict(SMALL["clip"], hidden_size=config.pooled_projection_dim)}
    clip_tokenizer, t5_tokenizer = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip_tokenizer.save_pretrained(folder / "tokenizer")
    t5_tokenizer.save_pretrained(folder / "tokenizer_2")
    clip_config = CLIPTextConfig(**{**sizes["clip"], "eos_token_id": clip_tokenizer.eos_token_id})
    t5_config = T5Config(**sizes["t5"])
    for part, model_class, model_config, model_type in (
        ("text_encoder", CLIPTextModel, clip_config, "clip_text_model"),
        ("text_encoder_2", T5EncoderModel, t5_config, "t5"),
    ):
        abstract = nnx.eval_shape(lambda: model_class(model_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
        write_random_text_encoder(folder / part, abstract, {"model_type": model_type,
                                                            **dataclasses.asdict(model_config)})
    checkpoint = folder.parent / "t5-w4a16"
    print(convert_checkpoint(folder, checkpoint, part="text_encoder_2", progress=False), flush=True)
    return checkpoint


def make_model_folder(root: Path, config, *, t5_length: int, text: str = "tiny") -> tuple[Path, list[Path]]:
    """(diffusers-format folder without transformer weights, [W4A4 checkpoint, and with `text`
    "real" the 4-bit T5 checkpoint]) under `root`."""
    import jax.numpy as jnp
    from flax import nnx

    from flux_flax.checkpoint import save_checkpoint
    from flux_flax.policy import flux_default_policy
    from flux_flax.random_weights import random_transformer
    from flux_flax.vae import AutoencoderKLDecoder, VAEConfig, save_vae

    folder = root / "FLUX-random"
    checkpoints = []
    if text == "real":
        checkpoints.append(write_real_size_text_parts(folder, config))
    else:
        from flux_flax.demo_assets import save_text_parts, tiny_text_encoders

        encoders = tiny_text_encoders(config.pooled_projection_dim, config.joint_attention_dim,
                                      max_sequence_length=t5_length)
        save_text_parts(encoders, folder)
    vae_config = VAEConfig(latent_channels=config.in_channels // 4)
    save_vae(AutoencoderKLDecoder(vae_config, dtype=jnp.float32, rngs=nnx.Rngs(0)), folder / "vae")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(DEV_SCHEDULER))
    (folder / "transformer").mkdir(exist_ok=True)
    transformer_config = {"_class_name": "FluxTransformer2DModel", **config.to_dict()}
    (folder / "transformer" / "config.json").write_text(json.dumps(transformer_config))

    quantization = {"group_size": 256, "hadamard": "regular", "scale_group": None,
                    "policy": flux_default_policy().to_dict()}
    checkpoint = save_checkpoint(random_transformer(config, dtype=jnp.bfloat16, quantize="auto"), root / "flux-random-w4a4",
                                 quantization=quantization, source={"layout": "random (bench_first_png)"})
    return folder, [checkpoint, *checkpoints]


def drop_page_cache() -> bool:
    """Asks the kernel to drop clean pages, so that reads hit the disk; False where not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def time_verification(checkpoint: Path) -> dict:
    """Seconds to verify the manifest (page cache dropped first where possible) and to load with
    and without verification, each in a fresh process."""
    from flux_flax.integrity import verify_manifest

    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    dropped = drop_page_cache()
    start = time.perf_counter()
    verify_manifest(checkpoint)
    verify_cold = time.perf_counter() - start
    start = time.perf_counter()
    verify_manifest(checkpoint)
    verify_warm = time.perf_counter() - start
    loads = {}
    for verify in (True, False):
        code = ("import sys, time; from flux_flax.checkpoint import load_checkpoint; import jax\n"
                f"t = time.perf_counter(); m, _ = load_checkpoint(sys.argv[1], verify={verify})\n"
                "jax.block_until_ready(jax.tree.leaves(m)); print(time.perf_counter() - t)\n")
        drop_page_cache()
        out = subprocess.run([sys.executable, "-c", code, str(checkpoint)], capture_output=True, text=True, check=True)
        loads["load_verified_s" if verify else "load_unverified_s"] = float(out.stdout.split()[-1])
    return {"checkpoint_bytes": size, "page_cache_dropped": dropped, "verify_cold_s": verify_cold,
            "verify_warm_s": verify_warm, "verify_cold_gb_per_s": size / verify_cold / 1e9, **loads}


def time_generate(folder: Path, checkpoints: list[Path], cache: Path, out: Path, *, size: int, steps: int,
                  t5_length: int) -> dict:
    """One `convrot-flux generate` process: wall seconds to its exit (its PNG is the last thing it writes)."""
    argv = [sys.executable, "-m", "flux_flax.cli", "generate", "--model", str(folder),
            *(arg for c in checkpoints for arg in ("--checkpoint", str(c))), "--prompt", "a red fox in fresh snow", "--size", f"{size}x{size}", "--steps", str(steps),
            "--max-sequence-length", str(t5_length), "--out", str(out), "--compile-cache", str(cache)]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"generate failed ({proc.returncode}): {proc.stderr[-3000:]}")
    lines = proc.stderr.strip().splitlines()
    return {"seconds_to_png": wall, "png": proc.stdout.split()[-1], "stderr_tail": lines[-1],
            "sources": [line for line in lines if line.startswith(("transformer: ", "text_encoder_2: ", "loaded in "))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("dev", "small"), default="dev")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--text", choices=("tiny", "real"), default="tiny",
                        help="tiny random text encoders, or CLIP-L + a 4-bit T5-XXL checkpoint at their real sizes")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from flux_flax.config import FluxConfig

    config = FluxConfig.dev() if args.config == "dev" else FluxConfig.small(guidance_embeds=True)
    t5_length = 512 if args.config == "dev" else 64
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    start = time.perf_counter()
    folder, checkpoints = make_model_folder(args.workdir, config, t5_length=t5_length, text=args.text)
    setup_s = time.perf_counter() - start
    result = {
        "host_cpus": os.cpu_count(), "config": args.config, "size": args.size, "steps": args.steps, "text": args.text,
        "setup_s": setup_s, "verification": time_verification(checkpoints[0]),
    }
    cache = args.workdir / "compile-cache"
    for run in ("cold", "warm"):
        result[run] = time_generate(folder, checkpoints, cache, args.workdir / "pngs", size=args.size,
                                    steps=args.steps, t5_length=t5_length)
        result[run]["cache_files"] = sum(1 for p in cache.rglob("*") if p.is_file())
        print(run, json.dumps(result[run]), flush=True)
    write_results(result, args.out)


def write_results(result: dict, out: Path) -> None:
    from benchmarks import harness

    v = result["verification"]
    cold, warm = result["cold"]["seconds_to_png"], result["warm"]["seconds_to_png"]
    real = result.get("text") == "real"
    shape = f"FLUX.1-{result['config']} W4A4{' + 4-bit T5-XXL, CLIP-L' if real else ''}, {result['size']}², " \
            f"{result['steps']} steps"
    load_ratio = v["load_verified_s"] / v["load_unverified_s"]
    summary = [
        harness.figure("convrot-flux generate, time to the first PNG, warm compilation cache", f"{warm:.1f} s",
                       shape=shape, baseline=f"cold cache {cold:.1f} s", ratio=cold / warm),
        harness.figure("load_checkpoint with SHA-256 verification", f"{v['load_verified_s']:.1f} s "
                       f"({v['checkpoint_bytes'] / GIB:.2f} GiB; manifest alone {v['verify_cold_gb_per_s']:.1f} GB/s)",
                       shape=shape, baseline=f"--no-verify {v['load_unverified_s']:.1f} s",
                       ratio=f"{load_ratio:.2f}x the time"),
    ]
    markdown = [
        "# Time to the first PNG (`convrot-flux generate`) and checkpoint verification",
        "",
        f"{result['host_cpus']} host CPUs. FLUX.1-{result['config']} shape, random W4A4 checkpoint, "
        f"{result['size']}², {result['steps']} steps, batch 1; "
        + ("CLIP-L and T5-XXL at their real sizes (random bf16 safetensors; the T5 from a 4-bit checkpoint "
           "made by `convrot-convert --part text_encoder_2`), JAX text backend. " if real else
           "tiny random text encoders with the real widths. ")
        + "One process per run, as a user runs it.",
        "",
        *harness.md_table(["run", "seconds to the PNG", "ratio to cold", "compilation cache files after"], [
            ["cold (empty cache)", f"{cold:.1f}", "1.00", result["cold"]["cache_files"]],
            ["warm (cache from the cold run)", f"{warm:.1f}", f"{warm / cold:.2f}", result["warm"]["cache_files"]],
        ], numeric=[False, True, True, True]),
        "",
        *harness.md_table(["verification", "figure"], [
            ["checkpoint size", f"{v['checkpoint_bytes'] / GIB:.2f} GiB"],
            [f"verify the manifest, page cache dropped: {v['page_cache_dropped']}",
             f"{v['verify_cold_s']:.2f} s ({v['verify_cold_gb_per_s']:.2f} GB/s)"],
            ["verify again (page cache warm)", f"{v['verify_warm_s']:.2f} s"],
            ["load_checkpoint, verified", f"{v['load_verified_s']:.2f} s"],
            ["load_checkpoint, --no-verify", f"{v['load_unverified_s']:.2f} s (verified / unverified: {load_ratio:.2f})"],
        ]),
    ]
    harness.write_results("first_png_real_text" if real else "first_png", result, markdown, out, summary=summary,
                          command="PYTHONPATH=. python3 benchmarks/bench_first_png.py "
                                  f"{'--text real ' if real else ''}--workdir DIR --out benchmarks/results")


if __name__ == "__main__":
    main()
