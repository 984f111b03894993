"""`convrot-flux`: text-to-image from the command line.

    convrot-flux generate --model DIR [--checkpoint CKPT ...] --prompt "..." [--prompts-file F]
                          [--steps N] [--guidance G] [--size 1024x1024] [--seed S] [--batch B] [--out DIR]
                          [--text-backend {jax,torch}] [--attention IMPL] [--lora FILE[:SCALE] ...]
                          [--devices N [--parallel {data,sequence}] [--sequence-devices K]]
                          [--distributed [--coordinator HOST:PORT --num-processes P --process-id I]]
    convrot-flux demo     [--prompt "..."] [--steps 4] [--size 256x256] [--seed S] [--out DIR]

Every argument is checked before jax, flax or torch load, so a usage error is answered at once
(exit 2); a failure while loading or generating exits 1 with one line (NaN output included).
The text encoders run in JAX by default: torch is imported only with --text-backend torch.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

from flux_flax.command_line import (
    UsageError,
    add_compilation_cache_options,
    enable_compilation_cache,
    package_version,
    read_text_file,
    run,
)
from flux_flax.paths import check_output_dir, user_path
from flux_flax.settings import ATTENTION_CHOICES, GenerationSettings, check_image_size

DEFAULT_DEV_STEPS, DEFAULT_SCHNELL_STEPS = 28, 4
MAX_T5_TOKENS = 512


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" -> (height, width), both positive multiples of 16."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size must look like 1024x768 (width x height), got {text!r}") from None
    check_image_size(height, width)
    return height, width


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """--prompt values, then the non-blank lines of --prompts-file (UTF-8); refuses an empty list."""
    out = list(prompts or [])
    if prompts_file is not None:
        text = read_text_file(prompts_file, "prompts file")
        out += [line.strip() for line in text.splitlines() if line.strip()]
    if not out:
        raise UsageError("no prompts: give --prompt \"...\" or a --prompts-file with one prompt per line")
    return out


def parse_lora(text: str) -> tuple[Path, float]:
    """"FILE[:SCALE]" -> (the existing file, resolved; the scale, default 1). What follows the
    last ':' is the scale when it is a number, else part of the file name."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    if not math.isfinite(scale):
        raise UsageError(f"--lora {text!r}: the scale must be a finite number, got {scale}")
    resolved = user_path(path)
    if not resolved.is_file():
        raise UsageError(f"--lora file {resolved} does not exist")
    return resolved, scale


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convrot-flux", description="FLUX.1 text-to-image in JAX (bf16 or ConvRot W4A4).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    gen = sub.add_parser("generate", formatter_class=fmt,
                         help="prompt(s) in, PNG(s) out, from a local diffusers-format FLUX folder")
    gen.add_argument("--model", required=True, help="diffusers-format FLUX folder (tokenizer/, text_encoder/, ..., vae/)")
    gen.add_argument("--checkpoint", action="append",
                     help="a convrot-convert checkpoint replacing the folder's part it holds: the transformer (W4A4) "
                          "or the T5 encoder text_encoder_2 (W4A16, JAX text backend); repeat for both")
    gen.add_argument("--no-verify", action="store_true",
                     help="skip checking the checkpoint's files against their recorded SHA-256 digests "
                          "(the array files' presence and sizes are still checked)")
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    gen.add_argument("--prompts-file", help="a UTF-8 text file with one prompt per line")
    gen.add_argument("--steps", type=int,
                     help=f"denoising steps (default: {DEFAULT_DEV_STEPS} for dev, {DEFAULT_SCHNELL_STEPS} for schnell)")
    gen.add_argument("--guidance", type=float, default=3.5, help="guidance scale (dev only)")
    gen.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT, multiples of 16")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    gen.add_argument("--batch", type=int, default=1, help="images sampled together")
    gen.add_argument("--devices", type=int, default=1,
                     help="sample on this many devices (data parallel: a batch not dividing by it is padded)")
    gen.add_argument("--parallel", choices=("data", "sequence"), default="data",
                     help="split the batch over the devices, or each image's tokens (Ulysses attention; the "
                          "model's heads must divide by the devices)")
    gen.add_argument("--sequence-devices", type=int,
                     help="with --parallel sequence: devices per image (a divisor of --devices; the rest split "
                          "the batch); default: all")
    gen.add_argument("--distributed", action="store_true",
                     help="several hosts: run this same command on each; jax.distributed.initialize() joins them "
                          "(SLURM, Open MPI and Kubernetes launches are detected, else give the next three), "
                          "--devices counts every host's devices, process 0 writes the PNGs")
    gen.add_argument("--coordinator", help="with --distributed: HOST:PORT that process 0 listens on")
    gen.add_argument("--num-processes", type=int, help="with --distributed: the number of processes")
    gen.add_argument("--process-id", type=int, help="with --distributed: this process's index, 0 to num-processes - 1")
    gen.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                     help="a LoRA safetensors file (diffusers or kohya naming) and its scale (default 1); repeat for "
                          "several, which add up")
    gen.add_argument("--out", default="outputs", help="output folder (existing PNGs are never overwritten)")
    gen.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                     help="dtype of the transformer, the VAE and the text encoders")
    gen.add_argument("--max-sequence-length", type=int, help="T5 tokens (default: 512 for dev, 256 for schnell)")
    gen.add_argument("--text-backend", choices=("jax", "torch"), default="jax",
                     help="run the text encoders (CLIP, T5) in JAX, or in PyTorch through transformers")
    gen.add_argument("--text-device", default="cpu", help="torch device for the text encoders (cpu, cuda); torch backend only")
    gen.add_argument("--cache-dir", help="cache prompt embeddings in this folder (default: no cache)")
    gen.add_argument("--attention", metavar="{" + ",".join(ATTENTION_CHOICES) + "}",
                     help="attention implementation (default: exact, cudnn on a GPU, xla otherwise); the Pallas "
                          "kernels (Hopper): mosaic_bf16, sage8 (int8 QK^T + fp8 PV), sage8_fp8 (fp8 QK^T + PV), "
                          "sage_qk8 (int8 QK^T + bf16 PV), int8 (rotated q/k, int8 QK^T + PV)")
    add_compilation_cache_options(gen)

    demo = sub.add_parser("demo", formatter_class=fmt,
                          help="offline demo: a small random FLUX, bf16 vs ConvRot W4A4, on the CPU")
    demo.add_argument("--prompt", default="a photo of a cat sitting on a red chair next to the window", help="the prompt")
    demo.add_argument("--steps", type=int, default=4, help="denoising steps")
    demo.add_argument("--size", default="256x256", help="WIDTHxHEIGHT, multiples of 16")
    demo.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    demo.add_argument("--out", default="demo_out", help="output folder")
    add_compilation_cache_options(demo)
    return parser


def _existing_dir(path: str, what: str) -> Path:
    resolved = user_path(path)
    if not resolved.is_dir():
        raise UsageError(f"{what} {resolved} does not exist" if not resolved.exists() else f"{what} {resolved} is not a folder")
    return resolved


def _validate_generate(args: argparse.Namespace) -> SimpleNamespace:
    prompts = read_prompts(args.prompt, args.prompts_file)
    height, width = parse_size(args.size)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    # The step count may still depend on the model (dev or schnell): checked with a stand-in here.
    GenerationSettings(height, width, args.steps or DEFAULT_DEV_STEPS, args.guidance, args.seed + len(prompts) - 1)
    if args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    if args.devices < 1:
        raise UsageError(f"--devices must be at least 1, got {args.devices}")
    if args.attention is not None and args.attention not in ATTENTION_CHOICES:
        raise UsageError(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, got {args.attention!r}")
    if args.sequence_devices is not None:
        if args.parallel != "sequence":
            raise UsageError("--sequence-devices needs --parallel sequence")
        if args.sequence_devices < 1 or args.devices % args.sequence_devices:
            raise UsageError(f"--sequence-devices must divide --devices ({args.devices}), got {args.sequence_devices}")
    cluster = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
               "--process-id": args.process_id}
    given = [name for name, value in cluster.items() if value is not None]
    if given and not args.distributed:
        raise UsageError(f"{', '.join(given)} needs --distributed")
    if args.num_processes is not None and args.num_processes < 1:
        raise UsageError(f"--num-processes must be at least 1, got {args.num_processes}")
    if args.process_id is not None and (args.process_id < 0 or args.process_id >= (args.num_processes or math.inf)):
        raise UsageError(f"--process-id must be in [0, --num-processes), got {args.process_id}")
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= MAX_T5_TOKENS:
        raise UsageError(f"--max-sequence-length must be in [1, {MAX_T5_TOKENS}], got {args.max_sequence_length}")
    return SimpleNamespace(
        prompts=prompts, height=height, width=width, steps=args.steps, guidance=args.guidance, seed=args.seed,
        batch=args.batch, devices=args.devices, parallel=args.parallel, sequence_devices=args.sequence_devices,
        distributed=args.distributed, coordinator=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id, dtype=args.dtype, max_sequence_length=args.max_sequence_length,
        text_device=args.text_device, text_backend=args.text_backend, attention=args.attention,
        model=_existing_dir(args.model, "model folder"),
        checkpoints=[_existing_dir(path, "checkpoint") for path in args.checkpoint or ()],
        verify=not args.no_verify,
        loras=[parse_lora(text) for text in args.lora or ()],
        out=check_output_dir(args.out, "--out"),
        cache_dir=None if args.cache_dir is None else check_output_dir(args.cache_dir, "--cache-dir"),
        compile_cache=None if args.compile_cache is None else check_output_dir(args.compile_cache, "--compile-cache"),
    )


def _generate(request: SimpleNamespace) -> None:
    enable_compilation_cache(request.compile_cache)
    import jax
    import jax.numpy as jnp

    from flux_flax.pipeline import FluxPipeline

    start = time.perf_counter()
    if request.distributed:
        jax.distributed.initialize(request.coordinator, request.num_processes, request.process_id)
    pipe = FluxPipeline.from_pretrained(
        request.model, checkpoint=request.checkpoints, verify=request.verify, dtype=getattr(jnp, request.dtype),
        text_backend=request.text_backend, text_dtype=request.dtype, text_device=request.text_device,
        max_sequence_length=request.max_sequence_length, cache_dir=request.cache_dir, devices=request.devices,
        attention=request.attention,
        parallel=request.parallel, sequence_devices=request.sequence_devices,
    )
    for path, scale in request.loras:
        pipe.load_lora(path, scale)
    default_steps = DEFAULT_DEV_STEPS if pipe.config.guidance_embeds else DEFAULT_SCHNELL_STEPS
    settings = GenerationSettings(request.height, request.width, request.steps or default_steps, request.guidance,
                                  request.seed)
    for part, source in pipe.sources.items():
        print(f"{part}: {source}", file=sys.stderr)
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    from flux_flax.layers import attention_implementation

    metadata = {"model": str(request.model), "checkpoint": str(pipe.checkpoints.get("transformer", "none (bf16)")),
                "text_encoder_2": pipe.sources["text_encoder_2"],
                "attention": attention_implementation(getattr(jnp, request.dtype), request.attention)}
    paths = pipe.generate_pngs(request.prompts, settings, request.out, batch_size=request.batch, metadata=metadata)
    elapsed = time.perf_counter() - start
    for path in paths:
        print(path)
    print(f"{len(paths)} image(s) in {elapsed:.1f} s (loading and compilation included)", file=sys.stderr)


def _validate_demo(args: argparse.Namespace) -> SimpleNamespace:
    height, width = parse_size(args.size)
    settings = GenerationSettings(height, width, args.steps, 3.5, args.seed)
    return SimpleNamespace(
        prompt=args.prompt, settings=settings, out=check_output_dir(args.out, "--out"),
        compile_cache=None if args.compile_cache is None else check_output_dir(args.compile_cache, "--compile-cache"),
    )


def _demo(request: SimpleNamespace) -> None:
    enable_compilation_cache(request.compile_cache)
    from flux_flax.demo import run_demo

    report = run_demo(request.out, prompt=request.prompt, settings=request.settings)
    print("\n".join(report.lines()))


COMMANDS = {"generate": (_validate_generate, _generate), "demo": (_validate_demo, _demo)}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `convrot-flux`; returns the exit status (0 ok, 1 failure, 2 usage error, 130/143 interrupted)."""
    parser = _parser()
    args = parser.parse_args(argv)
    validate, execute = COMMANDS[args.command]
    return run(f"convrot-flux {args.command}", parser, args, validate, execute)


if __name__ == "__main__":
    sys.exit(main())
