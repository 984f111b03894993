"""Fused grouped regular-Hadamard rotation + per-token symmetric int4 quantization (Pallas, GPU).

One pass: each program loads a block of whole rows of x (M, K) once (viewed as (M, K/n, n),
n = group_size), optionally applies a prologue (LayerNorm without affine + AdaLN modulation, or
tanh-GELU), rotates every group, reduces the per-row absmax, and writes int4 codes (int8, or
packed two a byte) and float32 per-row scales. The rotated row stays in registers between the
absmax and the quantization, so HBM sees x once and the codes once.

Bit-identity with `convrot_jax.quant.quantize_activation_reference` (no prologue):
- the rotation is the reference butterfly (`convrot_jax.hadamard`): the same 4-point stage
  (`_regular_stage`, imported, not copied), the same stage order (outermost digit first), the
  same final power-of-two multiply. The first `split_levels` levels run elementwise between
  separately loaded slices of each group; each remaining level splits the leading base-4 digit
  off a tensor and joins its 4 results as the trailing digit (order natural again at the end);
- scale = max(absmax * float32(1/7), 1e-10) as in the reference; 1 / scale is IEEE
  `div.rn.f32` and v * (1 / scale) an explicit `mul.rn.f32` followed by `cvt.rni` (round half
  to even) in inline PTX: Triton's `/` is the approximate `div.full.f32`, it has no round
  primitive, and a plain multiply may be contracted into an FMA, which changes the rounding;
- a row holding NaN/Inf gets a NaN scale and zero codes, as in the reference.
With a prologue the codes cannot be bit-identical (reductions in another order, rsqrt, tanh):
tests allow a code to move by one step on at most 0.1% of entries, scales to rtol 2e-5, against
`rotate_quantize_reference` (jnp prologue in float32, then the reference quantizer).

Measured (H100, 2026-11-24, M=4608, same run as an XLA copy and the XLA reference; full table
in benchmarks/results/rotate_quantize.md, notes in benchmarks/notes/rotate_quantize.md):
| K | this kernel (4 warps, swap_halves) | XLA reference | device copy |
| 3072 | 569 GB/s (0.24 of copy, 3.6x XLA) | 158 | 2379 |
| 12288 | 441 GB/s (0.17 of copy, 2.5x XLA) | 174 | 2586 |
| 15360 | 495 GB/s (0.19 of copy, 2.9x XLA; 254 with the former 16 warps) | 173 | 2665 |
Short of the targets (0.7 of copy, 5x XLA): the kernel is bound by register shuffles, not by
HBM. Compiled for sm_90 (TTGIR/PTX; benchmarks/notes/rotate_quantize.md), Triton makes the splits
that separate a level's digit free (it converts the loaded tile once so the split bits sit in
registers), but every join that puts a level's four results back together costs a layout
conversion (shared-memory round trip + barrier), ~3 per level: ~20 conversions and ~90 PTX
instructions per element and thread on a 4-group tile, where the arithmetic needs ~20. The
matmul rotation (bf16 x ±1 256x256 in Triton `dot`, fp32 accumulate) was 6-12x slower
(tiny per-tile matmuls) and cannot promise bit-identity (the hardware picks the accumulation
order): removed. split_levels=2 (16 slices loaded per group, two shuffled levels instead of four)
is bit-identical but 3x slower at K=3072 (180 vs 527 GB/s) and compiles for minutes at K=15360.

Backend: Pallas Triton, written first (Triton's row-kernel model expresses the split/join
butterfly directly, and it interprets on the CPU). `convrot_jax.ops` now calls the Mosaic GPU
kernel `pallas_kernels.rotate_quantize_sm90` instead: same bits, explicit data placement, 0.74-0.90
of a device copy at M >= 4608 (2.2-5.9x this kernel), and its prologues are faster too (at
M = 4608, LN+modulation 62 against 94 us, GELU 117 against 536). Nothing in the library calls this
kernel any more; it stays as the measured baseline of benchmarks/bench_rotate_quantize.py and
the subject of benchmarks/rotate_quantize_ir.py. Risk: the Pallas Triton backend is deprecated
since jax 0.11.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from convrot_jax.hadamard import check_group_size
from pallas_kernels.rounding import regular_stage as _regular_stage
from convrot_jax.quant import (
    INT4_MAX,
    SCALE_FLOOR,
    pack_int4,
    quantize_activation_reference,
)

Prologue = Literal["none", "layernorm", "gelu_tanh"]
PROLOGUES: tuple[str, ...] = ("none", "layernorm", "gelu_tanh")
LAYERNORM_EPS = 1e-6


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclasses.dataclass(frozen=True)
class RotateQuantizeConfig:
    """Block configuration.

    block_rows: rows per program (power of 2). With a modulation it is lowered to divide the
      tokens per image, so that one program's rows share one image's shift/scale.
    groups_per_tile: rotation groups per register tile (power of 2); a row is held as tiles of
      at most this many groups (K / group_size split into powers of 2).
    split_levels: outer butterfly levels resolved by loading the 4^split_levels slices of each
      group as separate tensors (their stages are then elementwise, no register shuffles); the
      remaining levels shuffle inside a tensor (split/join). Capped at log4(group_size).
    swap_halves: (split_levels 0 only) hold each group as a (hi, lo) matrix, hi = 4^(levels // 2):
      transpose it, run the outer levels on the now trailing hi axis, transpose back, run the
      inner levels on lo, each level splitting a digit of a short trailing axis (16 columns at
      n = 256). Same stage order: bit-identical. Triton emits as many layout conversions as
      without it (63 at K=3072, benchmarks/rotate_quantize_ir.py) but fewer shared-memory
      accesses (207 against 246), and it measured faster where it matters. The default: H100,
      M=4608, same run, 4 warps: K=15360 521 GB/s (414 without), K=3072 547 (563 without).
    num_warps: Triton warps per program. 4 at every K: at K=15360 (H100, M=4608, 4-group tiles)
      4 warps ran at 439 GB/s, 16 at 247 (8 warps with 16-group tiles: 293). Each butterfly
      level's layout conversion synchronises all of a program's warps: fewer warps, cheaper
      barriers. K=3072 used 4 warps before.
    """

    block_rows: int = 1
    groups_per_tile: int = 4
    split_levels: int = 0
    swap_halves: bool = True
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        if not (_is_pow2(self.block_rows) and _is_pow2(self.groups_per_tile)):
            raise ValueError(f"block_rows and groups_per_tile must be powers of 2, got {self}")
        if not _is_pow2(self.num_warps):
            raise ValueError(f"num_warps must be a power of 2, got {self.num_warps}")
        if self.split_levels < 0:
            raise ValueError(f"split_levels must be >= 0, got {self.split_levels}")
        if self.swap_halves and self.split_levels:
            raise ValueError(f"swap_halves (the default) needs split_levels=0: pass swap_halves=False, got {self}")


def apply_prologue(
    x: jax.Array, prologue: Prologue = "none", shift: jax.Array | None = None, scale: jax.Array | None = None
) -> jax.Array:
    """The prologue in jnp, float32: x (M, K) -> (M, K). shift/scale (B, K) modulate image b's
    M / B consecutive rows: LayerNorm(x) * (1 + scale) + shift."""
    xf = x.astype(jnp.float32)
    if prologue == "gelu_tanh":
        return jax.nn.gelu(xf, approximate=True)
    if prologue == "none":
        return xf
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + np.float32(LAYERNORM_EPS))
    if shift is None:
        return y
    b = shift.shape[0]
    y = y.reshape(b, -1, y.shape[-1])
    y = y * (1 + scale.astype(jnp.float32)[:, None]) + shift.astype(jnp.float32)[:, None]
    return y.reshape(xf.shape)


def check_inputs(x: jax.Array, group_size: int, prologue: str, shift, scale) -> bool:
    """Validates a rotate-quantize call (shared by both kernels); returns whether the LayerNorm
    is modulated. Errors name the argument and shape at fault."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (tokens, features), got shape {x.shape}")
    if x.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}")
    m, k = x.shape
    check_group_size(group_size, "regular")
    if k % group_size:
        raise ValueError(f"x's last axis ({k}, shape {x.shape}) must be a multiple of group_size ({group_size})")
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {PROLOGUES}, got {prologue!r}")
    modulated = shift is not None or scale is not None
    if modulated:
        if prologue != "layernorm" or shift is None or scale is None:
            raise ValueError("shift and scale go together, with prologue='layernorm'")
        if shift.shape != scale.shape or shift.ndim != 2 or shift.shape[1] != k or m % shift.shape[0]:
            raise ValueError(
                f"shift {shift.shape} and scale {scale.shape} must both be (B, {k}) with B dividing "
                f"the {m} rows of x {x.shape}"
            )
    return modulated


def rotate_quantize_reference(
    x: jax.Array,
    *,
    group_size: int = 256,
    packed: bool = False,
    prologue: Prologue = "none",
    shift: jax.Array | None = None,
    scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The XLA composition the kernel is tested against: prologue, then the reference quantizer."""
    codes, scales = quantize_activation_reference(apply_prologue(x, prologue, shift, scale), group_size=group_size)
    return (pack_int4(codes) if packed else codes), scales


# --- exact float32 arithmetic inside the kernel -------------------------------------------------


def _div_rn(a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
    """IEEE float32 a / b (Triton's `/` is the approximate div.full.f32)."""
    if interpret:
        return a / b
    [q] = plgpu.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[a, b],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )
    return q


def _round_codes(v: jax.Array, inv: jax.Array, interpret: bool) -> jax.Array:
    """clip(round_half_even(v * inv), -7, 7) as int32, the product rounded on its own (no FMA)."""
    if interpret:
        q = jnp.round(v * inv).astype(jnp.int32)
    else:
        [q] = plgpu.elementwise_inline_asm(
            "{ .reg .f32 t; mul.rn.f32 t, $1, $2; cvt.rni.s32.f32 $0, t; }",
            args=[v, inv],
            constraints="=r,r,r",
            pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.int32)],
        )
    return jnp.clip(q, -INT4_MAX, INT4_MAX)


def outer_stages(parts: list[jax.Array], levels: int) -> list[jax.Array]:
    """4^levels same-shape tensors, part p = the slice of every group at base-4 digits p (most
    significant first) -> the reference's first `levels` stages, elementwise between tensors."""
    for level in range(levels):
        stride = 4 ** (levels - 1 - level)
        out = list(parts)
        for base in range(len(parts)):
            if (base // stride) % 4 == 0:
                idx = [base + j * stride for j in range(4)]
                for i, y in zip(idx, _regular_stage(*(parts[i] for i in idx))):
                    out[i] = y
        parts = out
    return parts


def _inner_stages(v: jax.Array, levels: int) -> jax.Array:
    """(..., w) float32, w = 4^levels -> the stages over the digits inside w, most significant
    first. Each stage splits the leading digit off and joins its 4 results as the trailing digit,
    so after all stages the order is natural again."""
    shape, w = v.shape, v.shape[-1]
    rows = v.size // w
    v = v.reshape(rows, w)
    for _ in range(levels):
        parts = jnp.split(v.reshape(rows, 4, w // 4), 4, axis=1)
        y0, y1, y2, y3 = _regular_stage(*(q.reshape(rows, w // 4) for q in parts))
        # index 4 * i + j holds y_j[i]
        v = jnp.stack([jnp.stack([y0, y2], axis=-1), jnp.stack([y1, y3], axis=-1)], axis=-1)
        v = v.reshape(rows, w)
    return v.reshape(shape)


def _swapped_stages(v: jax.Array, levels: int) -> jax.Array:
    """(..., n) float32, n = 4^levels -> the same stages as `_inner_stages(v, levels)`, on the
    group viewed as (hi, lo): the outer levels (hi's digits) on the transposed view, then the
    inner levels (lo's digits)."""
    hi = 4 ** (levels // 2)
    lo = v.shape[-1] // hi
    v = v.reshape(*v.shape[:-1], hi, lo)
    v = jnp.swapaxes(_inner_stages(jnp.swapaxes(v, -1, -2), levels // 2), -1, -2)
    return _inner_stages(v, levels - levels // 2).reshape(*v.shape[:-2], hi * lo)


def _pow2_tiles(total: int, cap: int) -> list[tuple[int, int]]:
    """[0, total) as (start, size) tiles, sizes powers of 2 <= cap, largest first."""
    tiles, start = [], 0
    while start < total:
        size = min(cap, 1 << ((total - start).bit_length() - 1))
        tiles.append((start, size))
        start += size
    return tiles


# --- the kernel ----------------------------------------------------------------------------------


def _kernel(*refs, m, n, split, swap, tiles, block_rows, prologue, modulated, packed, tokens_per_image, interpret):
    """Refs are 3-D views (rows, groups, n). Values live as tiles x parts: tile (g0, g) holds
    groups [g0, g0 + g); part p holds columns [p * w, (p + 1) * w) of each group, w = n / 4^split."""
    x_ref, *refs = refs
    if modulated:
        shift_ref, scale_ref, *refs = refs
    codes_ref, scales_ref = refs
    levels = check_group_size(n, "regular")
    nparts = 4**split
    w = n // nparts
    k = sum(g for _, g in tiles) * n

    pid = pl.program_id(0)
    rows = pid * block_rows + jnp.arange(block_rows)
    valid = rows < m
    mask = valid[:, None, None]

    def at(g0, g, p, width=w):
        return (slice(None), pl.ds(g0, g), pl.ds(p * width, width))

    xs = [
        [plgpu.load(x_ref.at[at(g0, g, p)], mask=mask, other=0).astype(jnp.float32) for p in range(nparts)]
        for g0, g in tiles
    ]

    def row_sum(v):
        return jnp.sum(jnp.sum(v, axis=2), axis=1)

    if prologue == "gelu_tanh":
        xs = [[jax.nn.gelu(v, approximate=True) for v in t] for t in xs]
    elif prologue == "layernorm":
        mean = sum(row_sum(v) for t in xs for v in t) / np.float32(k)
        xs = [[v - mean[:, None, None] for v in t] for t in xs]
        var = sum(row_sum(v * v) for t in xs for v in t) / np.float32(k)
        rstd = jax.lax.rsqrt(var + np.float32(LAYERNORM_EPS))[:, None, None]
        xs = [[v * rstd for v in t] for t in xs]
        if modulated:
            image = (pid * block_rows) // tokens_per_image

            def mod(ref, g0, g, p):
                return ref[pl.ds(image, 1), pl.ds(g0, g), pl.ds(p * w, w)].astype(jnp.float32)

            xs = [
                [v * (1 + mod(scale_ref, g0, g, p)) + mod(shift_ref, g0, g, p) for p, v in enumerate(t)]
                for (g0, g), t in zip(tiles, xs)
            ]

    unit = np.float32(1 / math.sqrt(n))
    if swap:
        vs = [[_swapped_stages(v, levels) * unit for v in t] for t in xs]
    else:
        vs = [[_inner_stages(v, levels - split) * unit for v in outer_stages(t, split)] for t in xs]

    flat = [v for t in vs for v in t]
    absmax = functools.reduce(jnp.maximum, [jnp.max(jnp.max(jnp.abs(v), axis=2), axis=1) for v in flat])
    nonfinite = functools.reduce(
        jnp.maximum, [jnp.max(jnp.max(jnp.where(jnp.isfinite(v), 0.0, 1.0), axis=2), axis=1) for v in flat]
    )
    bad = nonfinite > 0
    scale = jnp.maximum(absmax * np.float32(1 / INT4_MAX), np.float32(SCALE_FLOOR))
    inv = _div_rn(jnp.ones_like(scale), scale, interpret)
    plgpu.store(scales_ref, jnp.where(bad, np.float32(np.nan), scale), mask=valid)

    for (g0, g), t in zip(tiles, vs):
        inv_t = jnp.broadcast_to(inv[:, None, None], (block_rows, g, w))
        for p, v in enumerate(t):
            q = jnp.where(bad[:, None, None], 0, _round_codes(v, inv_t, interpret))
            if packed:
                even, odd = jnp.split(q.reshape(block_rows, g, w // 2, 2), 2, axis=-1)
                byte = ((even & 0xF) | ((odd & 0xF) << 4)).reshape(block_rows, g, w // 2)
                plgpu.store(codes_ref.at[at(g0, g, p, w // 2)], byte.astype(jnp.uint8), mask=mask)
            else:
                plgpu.store(codes_ref.at[at(g0, g, p)], q.astype(jnp.int8), mask=mask)


# Jitted with the settings static: every call at the same shapes in a model shares one traced and
# lowered kernel. Without it, FLUX.1-dev's W4A4 step lowered ~300 copies of each (64 s, 54 MB of
# StableHLO) and compiled for > 200 s; with it, 4 s, 4.5 MB, and the step compiles in 45 s.
@functools.partial(jax.jit, static_argnames=("group_size", "packed", "prologue", "config", "interpret"))
def rotate_quantize(
    x: jax.Array,
    *,
    group_size: int = 256,
    packed: bool = False,
    prologue: Prologue = "none",
    shift: jax.Array | None = None,
    scale: jax.Array | None = None,
    config: RotateQuantizeConfig | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """x (M, K) bf16/f32 -> (codes, scales): int8 (M, K) in [-7, 7] (or packed uint8 (M, K/2),
    low nibble = even k) and float32 (M,) per-row scales, as `rotate_quantize_reference`.

    prologue: "none"; "layernorm" (no affine, eps 1e-6), modulated as LN(x) * (1 + scale) + shift
    when shift and scale (B, K) are given, image b owning rows [b * M/B, (b + 1) * M/B); or
    "gelu_tanh". interpret: run in Pallas interpret mode (CPU tests).
    """
    config = config or RotateQuantizeConfig()
    modulated = check_inputs(x, group_size, prologue, shift, scale)
    m, k = x.shape
    levels = check_group_size(group_size, "regular")

    n, groups = group_size, k // group_size
    split = min(config.split_levels, levels)
    block_rows = config.block_rows
    tokens_per_image = m // shift.shape[0] if modulated else m
    if modulated:
        block_rows = math.gcd(block_rows, tokens_per_image)

    view = lambda a: a.reshape(a.shape[0], groups, n)
    inputs = [view(x)]
    in_specs = [pl.BlockSpec((block_rows, groups, n), lambda i: (i, 0, 0))]
    if modulated:
        inputs += [view(shift), view(scale)]
        in_specs += [pl.BlockSpec((shift.shape[0], groups, n), lambda i: (0, 0, 0))] * 2
    width = n // 2 if packed else n
    kernel = functools.partial(
        _kernel,
        m=m,
        n=n,
        split=split,
        swap=config.swap_halves and levels > 1,
        tiles=tuple(_pow2_tiles(groups, config.groups_per_tile)),
        block_rows=block_rows,
        prologue=prologue,
        modulated=modulated,
        packed=packed,
        tokens_per_image=tokens_per_image,
        interpret=interpret,
    )
    codes, scales = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_rows),),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((block_rows, groups, width), lambda i: (i, 0, 0)),
            pl.BlockSpec((block_rows,), lambda i: (i,)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((m, groups, width), jnp.uint8 if packed else jnp.int8),
            jax.ShapeDtypeStruct((m,), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="rotate_quantize",
    )(*inputs)
    return codes.reshape(m, groups * width), scales
