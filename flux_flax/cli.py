"""`convrot-flux`: text-to-image from the command line.

    convrot-flux generate --model DIR [--checkpoint CKPT] --prompt "..." [--prompts-file F]
                          [--steps N] [--guidance G] [--size 1024x1024] [--seed S] [--batch B] [--out DIR]
    convrot-flux demo     [--prompt "..."] [--steps 4] [--size 256x256] [--seed S] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from flux_flax import sampling


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" -> (height, width), both positive multiples of 16."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like 1024x768 (width x height), got {text!r}") from None
    sampling.check_image_size(height, width)
    return height, width


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """--prompt values, then the non-blank lines of --prompts-file; refuses an empty list."""
    out = list(prompts or [])
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist")
        out += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not out:
        raise ValueError("no prompts: give --prompt \"...\" or a --prompts-file with one prompt per line")
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convrot-flux", description="FLUX.1 text-to-image in JAX (bf16 or ConvRot W4A4).")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="prompt(s) in, PNG(s) out, from a local diffusers-format FLUX folder")
    gen.add_argument("--model", required=True, help="diffusers-format FLUX folder (tokenizer/, text_encoder/, ..., vae/)")
    gen.add_argument("--checkpoint", help="a convrot-convert Orbax checkpoint (W4A4) to use instead of transformer/")
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    gen.add_argument("--prompts-file", help="a text file with one prompt per line")
    gen.add_argument("--steps", type=int, help="denoising steps (default: 28 for dev, 4 for schnell)")
    gen.add_argument("--guidance", type=float, default=3.5, help="guidance scale (dev only; default 3.5)")
    gen.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT, multiples of 16 (default 1024x1024)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    gen.add_argument("--batch", type=int, default=1, help="images sampled together (default 1)")
    gen.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    gen.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="transformer/VAE dtype")
    gen.add_argument("--max-sequence-length", type=int, help="T5 tokens (default 512 for dev, 256 for schnell)")
    gen.add_argument("--text-device", default="cpu", help="torch device for the text encoders (cpu, cuda)")
    gen.add_argument("--cache-dir", help="cache prompt embeddings here")

    demo = sub.add_parser("demo", help="offline demo: a small random FLUX, bf16 vs ConvRot W4A4, on the CPU")
    demo.add_argument("--prompt", default="a photo of a cat sitting on a red chair next to the window")
    demo.add_argument("--steps", type=int, default=4)
    demo.add_argument("--size", default="256x256", help="WIDTHxHEIGHT, multiples of 16 (default 256x256)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    return parser


def _generate(args: argparse.Namespace) -> None:
    import jax.numpy as jnp
    import torch

    from flux_flax.pipeline import FluxPipeline, GenerationSettings

    prompts = read_prompts(args.prompt, args.prompts_file)  # cheap checks before loading anything
    height, width = parse_size(args.size)
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    dtype = {"bfloat16": (jnp.bfloat16, torch.bfloat16), "float32": (jnp.float32, torch.float32)}[args.dtype]
    pipe = FluxPipeline.from_pretrained(
        args.model, checkpoint=args.checkpoint, dtype=dtype[0], text_dtype=dtype[1], text_device=args.text_device,
        max_sequence_length=args.max_sequence_length, cache_dir=args.cache_dir,
    )
    steps = args.steps or (28 if pipe.config.guidance_embeds else 4)
    settings = GenerationSettings(height, width, steps, args.guidance, args.seed)
    start = time.perf_counter()
    metadata = {"model": str(Path(args.model).resolve()), "checkpoint": str(args.checkpoint or "none (bf16)")}
    paths = pipe.generate_pngs(prompts, settings, args.out, batch_size=args.batch, metadata=metadata)
    elapsed = time.perf_counter() - start
    for path in paths:
        print(path)
    print(f"{len(paths)} image(s) in {elapsed:.1f} s (compilation included)", file=sys.stderr)


def _demo(args: argparse.Namespace) -> None:
    from flux_flax.demo import run_demo
    from flux_flax.pipeline import GenerationSettings

    height, width = parse_size(args.size)
    settings = GenerationSettings(height, width, args.steps, 3.5, args.seed)
    report = run_demo(args.out, prompt=args.prompt, settings=settings)
    print("\n".join(report.lines()))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"generate": _generate, "demo": _demo}[args.command](args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"convrot-flux {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
