"""`convrot-convert SRC OUT`: FLUX.1 safetensors -> a ConvRot W4A4 (or bf16) Orbax checkpoint."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from convert.convert import FORMATS, convert_checkpoint
from convert.errors import CheckpointError
from convrot_jax import QuantPolicy
from convrot_jax.hadamard import HADAMARD_KINDS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convrot-convert",
        description=(
            "Convert a FLUX.1 transformer (a diffusers transformer folder, a diffusers pipeline root, or a "
            "black-forest-labs single .safetensors file) into a ConvRot int4 Orbax checkpoint, one tensor at "
            "a time."
        ),
    )
    p.add_argument("src", help="diffusers transformer folder, pipeline root, or black-forest-labs .safetensors file")
    p.add_argument("out", help="output checkpoint directory (written atomically)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="source layout (default: detect)")
    p.add_argument("--group-size", type=int, default=256, help="Hadamard rotation group size (default 256)")
    p.add_argument("--hadamard", choices=[k for k in HADAMARD_KINDS if k != "none"], default="regular")
    p.add_argument("--scale-group", type=int, default=None, metavar="N",
                   help="weight scales per N input features instead of per output channel")
    p.add_argument("--policy", default="default", metavar="default|FILE",
                   help="layer policy: 'default' (DESIGN.md §3) or a JSON file of [regex, treatment] rules")
    p.add_argument("--no-quantize", action="store_true", help="write a bf16 checkpoint (no quantization)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the converter; returns the exit status (0 ok, 1 bad input or failure)."""
    args = _parser().parse_args(argv)
    try:
        policy = QuantPolicy.flux_default() if args.policy == "default" else QuantPolicy.from_file(args.policy)
        summary = convert_checkpoint(
            args.src,
            args.out,
            format=args.format,
            group_size=args.group_size,
            hadamard=args.hadamard,
            scale_group=args.scale_group,
            policy=policy,
            quantize=not args.no_quantize,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (CheckpointError, ValueError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the exception's layout
        print(f"convrot-convert: error: {message}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
