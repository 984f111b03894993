"""`convrot-convert SRC OUT [--part transformer|text_encoder_2]`: one part of FLUX.1 in safetensors
-> a ConvRot 4-bit (or bf16) Orbax checkpoint: the transformer (W4A4), or the T5 text encoder (W4A16).

Arguments are checked before jax loads (usage errors: exit 2); a refused or failed conversion
exits 1 with one line; Ctrl-C or SIGTERM removes the partial output and exits 130 or 143.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import SimpleNamespace

from flux_flax.command_line import (
    UsageError,
    add_compilation_cache_options,
    enable_compilation_cache,
    package_version,
    read_text_file,
    report_to_stderr,
    run,
)
from flux_flax.paths import user_path

FORMATS: tuple[str, ...] = ("auto", "diffusers", "bfl")
HADAMARDS: tuple[str, ...] = ("regular", "sylvester")
PARTS: tuple[str, ...] = ("transformer", "text_encoder_2")  # flux_flax.checkpoint.PARTS, without importing jax


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convrot-convert",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=(
            "Convert one part of FLUX.1 into a ConvRot int4 Orbax checkpoint, one tensor at a time: the "
            "transformer (a diffusers transformer folder, a diffusers pipeline root, or a black-forest-labs "
            "single .safetensors file) or, with --part text_encoder_2, the T5 text encoder (a pipeline root, or "
            "its text_encoder_2/ folder). `convrot-flux generate --checkpoint` takes either (repeat it for both)."
        ),
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    p.add_argument("src", help="pipeline root, or the part's folder (or a black-forest-labs .safetensors transformer)")
    p.add_argument("out", help="output checkpoint folder (written atomically; never the source or a folder holding it)")
    p.add_argument("--part", choices=PARTS, default="transformer",
                   help="which model: the transformer (W4A4 by default) or the T5 encoder text_encoder_2 (W4A16)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="source layout (transformer only)")
    p.add_argument("--group-size", type=int, default=256, help="Hadamard rotation group size (a power of 4 for regular)")
    p.add_argument("--hadamard", choices=HADAMARDS, default="regular", help="rotation kind")
    p.add_argument("--scale-group", type=int, default=None, metavar="N",
                   help="weight scales per N input features (default: one per output channel)")
    p.add_argument("--policy", default="default", metavar="default|FILE",
                   help="layer policy: 'default' (the part's, docs/design.md) or a UTF-8 JSON file of [regex, treatment] rules")
    p.add_argument("--no-quantize", action="store_true", help="write a bf16 checkpoint (no quantization)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a convrot-jax checkpoint")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert tensors holding NaN or Inf anyway")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_compilation_cache_options(p)
    return p


def _validate(args: argparse.Namespace) -> SimpleNamespace:
    src = user_path(args.src)
    if not src.exists():
        raise UsageError(f"source {src} does not exist")
    if args.group_size < 1:
        raise UsageError(f"--group-size must be positive, got {args.group_size}")
    if args.scale_group is not None and args.scale_group < 1:
        raise UsageError(f"--scale-group must be positive, got {args.scale_group}")
    if args.part != "transformer" and args.format != "auto":
        raise UsageError(f"--format {args.format} is a transformer layout; --part {args.part} reads transformers' layout")
    policy_text = None if args.policy == "default" else read_text_file(args.policy, "policy file")
    return SimpleNamespace(**{**vars(args), "src": src, "out": user_path(args.out), "policy_text": policy_text})


def _convert(request: SimpleNamespace) -> None:
    enable_compilation_cache(request.compile_cache)
    from convrot_jax import QuantPolicy
    from convert.convert import convert_checkpoint

    policy = None if request.policy_text is None else QuantPolicy.from_json(request.policy_text, source=request.policy)
    summary = convert_checkpoint(
        request.src,
        request.out,
        part=request.part,
        format=request.format,
        group_size=request.group_size,
        hadamard=request.hadamard,
        scale_group=request.scale_group,
        policy=policy,
        quantize=not request.no_quantize,
        overwrite=request.overwrite,
        progress=not request.quiet,
        allow_nonfinite=request.allow_nonfinite,
    )
    print(summary)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the converter; returns the exit status (0 ok, 1 refused or failed, 2 usage error,
    130/143 interrupted: nothing is left at OUT then)."""
    parser = _parser()
    args = parser.parse_args(argv)
    report_to_stderr("convrot-convert")
    return run("convrot-convert", parser, args, _validate, _convert,
               interrupted=f"interrupted; nothing was written to {user_path(args.out)}")


if __name__ == "__main__":
    sys.exit(main())
