"""Counts the passes over HBM of the attention's producer, from compiled HLO (no GPU needed).

Unfused: from a FLUX double block's q/k/v projection outputs (text and image, bf16), the model's
XLA ops (per-head QK RMSNorm, the streams joined, RoPE) then `attention.quantize_qkv`, compiled
by XLA:CPU. Fused: `attention_quantize.quantize_projections`: its two Mosaic GPU launches are
counted from the CUDA lowering (StableHLO custom calls), and the XLA ops around them (V's codes and
layout, the reductions of the kernels' per-block sums and maxima, the RoPE tables' even columns)
are compiled by XLA:CPU on their own. For every top-level fusion: its kind, the bytes of its
operands and of its result (what it reads and writes if nothing stays in cache). XLA:GPU fuses
differently from XLA:CPU (it can also merge sibling reductions), so the unfused counts are what
one compiler does, not a law; the fused path's XLA part is small either way.

--mode bf16: the cuDNN attention's bf16 q, k, v instead: unfused, the model's XLA ops alone
(`projections_reference`); fused, `attention_quantize.project_qkv`'s one launch and its XLA part
(the RoPE table, the norm weights).

    PYTHONPATH=. python tools/attention_producer_hlo.py [--batch 1] [--image 4096] [--mode sage8|bf16]
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import attention_quantize, tile_schedule
from pallas_kernels.attention import default_config, padded_length, quantize_qkv, v_operands
from pallas_kernels.attention_quantize import Projection, Stream
from pallas_kernels.attention_quantize_reference import projections_reference

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
    p.add_argument("--mode", choices=["sage8", "bf16"], default="sage8")
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
        q, k, v = projections_reference(streams(text, image, w), cos, sin, heads=HEADS, eps=1e-6)
        return (q, k, v) if args.mode == "bf16" else quantize_qkv(q, k, v, config=default_config("sage8"))

    report("unfused (XLA:CPU)", fusions(jax.jit(unfused).trace(*shapes).lower().compile().as_text()))

    tile_schedule.sm_count = lambda interpret: 132
    if args.mode == "bf16":
        fused = lambda *a: attention_quantize.project_qkv(streams(*a[:3]), *a[3:], heads=HEADS, eps=1e-6)
        lowered = jax.jit(fused).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
        print(f"fused: {lowered.count('stablehlo.custom_call @mosaic_gpu')} Mosaic GPU launch (reads q, k, v: "
              f"{3 * b * seq * HEADS * D * 2 / 1e6:.1f} MB, writes them: as much) and the XLA ops below")
        report("fused, its XLA part (XLA:CPU)", fusions(jax.jit(
            lambda w, cos, sin: (attention_quantize.rope_table(cos, sin), w.astype(jnp.float32))).trace(
            *shapes[2:]).lower().compile().as_text()))
        return
    fused = lambda *a: attention_quantize.quantize_projections(streams(*a[:3]), *a[3:], heads=HEADS, eps=1e-6)
    lowered = jax.jit(fused).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
    names = sorted(set(re.findall(r"attention_quantize_(?:sums|codes)", lowered)))
    print(f"fused: {lowered.count('stablehlo.custom_call @mosaic_gpu')} Mosaic GPU launches ({', '.join(names)}) "
          "and the XLA ops below")

    pad = padded_length(seq, default_config("sage8")) - seq
    blocks = (seq + pad) // 128

    def around(text, image, cos, sin, ksum, vmax):  # the XLA ops of quantize_projections besides the kernels
        table = jnp.pad(attention_quantize.rope_table(cos, sin), ((0, pad), (0, 0)))
        mean = ksum.sum(axis=2) / np.float32(seq)
        v = jnp.concatenate([x[..., 2 * HEADS * D:] for x in (text, image)], axis=1).reshape(b, seq, HEADS, D)
        return table, mean, v_operands(v, seq + pad, True, vmax.max(axis=2))

    per_block = jax.ShapeDtypeStruct((b, HEADS, blocks, D), jnp.float32)
    report("fused, its XLA part (XLA:CPU)", fusions(jax.jit(around).trace(
        shapes[0], shapes[1], shapes[3], shapes[4], per_block, per_block).lower().compile().as_text()))


if __name__ == "__main__":
    main()
