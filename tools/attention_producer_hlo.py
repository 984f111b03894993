"""Counts the passes over HBM of the exact attention's q/k/v producer, from compiled HLO (no GPU needed).

Unfused: from a FLUX double block's q/k/v projection outputs (text and image, bf16), the model's
XLA ops (per-head QK RMSNorm, the streams joined, RoPE; `projections_reference`), compiled by
XLA:CPU. Fused: `attention_producer.project_qkv`'s one Mosaic GPU launch, counted from the CUDA
lowering (StableHLO custom calls), and its XLA part (the RoPE table, the norm weights) compiled by
XLA:CPU on its own. For every top-level fusion: its kind, the bytes of its operands and of its
result (what it reads and writes if nothing stays in cache). XLA:GPU fuses differently from
XLA:CPU (it can also merge sibling reductions), so the unfused counts are what one compiler does,
not a law.

    PYTHONPATH=. python tools/attention_producer_hlo.py [--batch 1] [--image 4096]
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import attention_producer, tile_schedule
from pallas_kernels.attention_producer import Projection, Stream
from pallas_kernels.attention_producer_reference import projections_reference

HEADS, D, TEXT = 24, 128, 512
_SHAPE = re.compile(r"\b(pred|[subf]\d+|bf16|f8e4m3fn)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2, "f8e4m3fn": 1}


def _nbytes(dtype: str, dims: str) -> int:
    size = int(np.prod([int(x) for x in dims.split(",") if x])) if dims else 1
    return size * _BYTES.get(dtype, int(re.sub(r"\D", "", dtype) or 8) // 8)


def fusions(hlo: str) -> list[tuple[str, int, int]]:
    """(kind, bytes read, bytes written) of each top-level fusion or custom call of ENTRY."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    size, out = {}, []
    for line in entry.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*?)\)", line)
        if not m:
            continue
        name, shape, op, operands = m.groups()
        size[name] = sum(_nbytes(*s) for s in _SHAPE.findall(shape))
        if op in ("fusion", "custom-call"):
            read = sum(size.get(o.strip().lstrip("%"), 0) for o in operands.split(","))
            kind = re.search(r"kind=(\w+)", line)
            out.append((kind.group(1) if kind else op, read, size[name]))
    return out


def report(title: str, rows: list[tuple[str, int, int]]) -> None:
    print(f"{title}: {len(rows)} fusions, operands {sum(r for _, r, _ in rows) / 1e6:.1f} MB (an upper bound on "
          f"reads: a fused slice reads part of one), written {sum(w for _, _, w in rows) / 1e6:.1f} MB")
    for kind, r, w in rows:
        print(f"  {kind:10s} operands {r / 1e6:8.2f} MB  result {w / 1e6:8.2f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--image", type=int, default=4096)
    args = p.parse_args()
    b, seq = args.batch, TEXT + args.image
    width = 3 * HEADS * D
    shapes = [jax.ShapeDtypeStruct((b, TEXT, width), jnp.bfloat16),
              jax.ShapeDtypeStruct((b, args.image, width), jnp.bfloat16),
              jax.ShapeDtypeStruct((4, D), jnp.bfloat16), *[jax.ShapeDtypeStruct((seq, D), jnp.float32)] * 2]

    def streams(text, image, w):
        return [Stream(*(Projection(x, i * HEADS * D) for i in range(3)), w[2 * j], w[2 * j + 1])
                for j, x in enumerate((text, image))]

    def unfused(text, image, w, cos, sin):
        return projections_reference(streams(text, image, w), cos, sin, heads=HEADS, eps=1e-6)

    report("unfused (XLA:CPU)", fusions(jax.jit(unfused).trace(*shapes).lower().compile().as_text()))

    tile_schedule.sm_count = lambda interpret: 132
    fused = lambda *a: attention_producer.project_qkv(streams(*a[:3]), *a[3:], heads=HEADS, eps=1e-6)
    lowered = jax.jit(fused).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    print(f"fused: {lowered.count('stablehlo.custom_call @mosaic_gpu')} Mosaic GPU launch (reads q, k, v: "
          f"{3 * b * seq * HEADS * D * 2 / 1e6:.1f} MB, writes them: as much) and the XLA ops below")
    report("fused, its XLA part (XLA:CPU)", fusions(jax.jit(
        lambda w, cos, sin: (attention_producer.rope_table(cos, sin), w.astype(jnp.float32))).trace(
        *shapes[2:]).lower().compile().as_text()))


if __name__ == "__main__":
    main()
