"""The 8-bit attention kernels' operands made where q, k and v are produced, Pallas Mosaic GPU (sm_90).

In a transformer whose attention applies a per-head RMSNorm and RoPE to q and k (FLUX), the
unfused path writes the normed, rotated q and k to HBM in bf16, and `attention.quantize_qkv` then
reads them again (K twice: its mean over the sequence, then its codes) to write the codes. Here the
projections' output is read where the GEMM left it (a fused q/k/v projection is passed whole, with
column offsets: no slice of it is copied) and two launches of one kernel make the int8 operands:

  1. "sums": per block of `block_kv` tokens and head, RMSNorm + RoPE of k, its column sums
     (float32), and v's per-channel max |v|: a pass over k and v writing 1/64 of their bytes.
     XLA adds the blocks' sums up: K's mean (a reduction over the whole sequence cannot live in a
     pass that writes K's codes, since each block's codes need it first).
  2. "codes": per block and head, RMSNorm + RoPE of q and k again (recomputing them costs ALU
     only: rereading a bf16 copy would cost HBM), Q's int8 codes per token (scale with the softmax
     scale and log2 e folded in), K - mean, K's int8 codes with one scale per block.
V needs no norm: its fp8 codes per channel (scale from pass 1's max) and the transposed, key-
permuted layout the PV wgmma wants are one XLA fusion reading v from the projections
(`attention.v_operands`). HBM traffic per attention call: q read once, k and v twice, 8-bit codes
written once (B=1, S=4608, 24 x 128 heads: ~184 MB, against >= ~325 MB for XLA's norm + RoPE +
`quantize_qkv`; benchmarks/notes/attention.md, v4).

Layout of the work: one warpgroup per program, grid (heads, blocks, batch); a 64-token tile of a
head is a (64, D / 2) uint32 array in the WGMMA register layout, loaded straight from HBM, each word
a bf16 pair (2c, 2c + 1): RoPE rotates exactly such pairs, so the even and odd halves of a word
(a bf16 is a float32's high half: a shift and a mask) are the two operands of every rotation and
no value moves between threads. Row reductions (the norm's mean square, Q's absmax) stay within a
quad of threads; K's block absmax and the column sums cross warps (Mosaic's reduction scratch).
Codes go out two to a 16-bit word (the pair's even code in the low byte): the tensor keeps k's
channel order.

Numerics are the unfused path's operation for operation (bf16 roundings after the norm and after
RoPE included, the same scale formulas and divisions, `attention.quantize_qkv`'s padding); the
float32 sums (the norm's mean square, K's mean) run in another order, which can move a bf16
rounding of the norm or of RoPE by one unit and K's mean by float32 rounding (the tests' bounds,
`attention_quantize_reference.py`). Streams: a joint sequence made of several runs of tokens with
their own projections and norm weights (FLUX's [text, image]) is one call; each run but the last
must fill whole blocks of `block_kv` tokens (FLUX: 512 or 256 text tokens), the last is zero-padded
to whole blocks (a copy, only when the total is ragged).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.attention import (INT8_MAX, LOG2E, SCALE_FLOOR, AttentionConfig, QuantizedQKV, default_config,
                                      padded_length, v_operands)

TILE = 64  # tokens of one register tile: a warpgroup's WGMMA-layout rows
_TILE_LAYOUT = plgpu.Layout.WGMMA
_PER_COLUMN = plgpu.Layout.WGMMA.reduce(0)  # a vector with one value per column of a tile
_PER_ROW = plgpu.Layout.WGMMA.reduce(1)
Phase = Literal["sums", "codes"]


class Projection(NamedTuple):
    """One of q, k, v: the heads' features are columns [column, column + H * D) of `array`
    (B, S, C) bf16, head h's at column + h * D (a fused projection's output is passed whole)."""
    array: jax.Array
    column: int


class Stream(NamedTuple):
    """A run of tokens with its own projections and RMSNorm weights (FLUX: the text tokens, then
    the image tokens)."""
    q: Projection
    k: Projection
    v: Projection
    q_weight: jax.Array  # (D,) RMSNorm weight of q's heads
    k_weight: jax.Array  # (D,) of k's


class _Source(NamedTuple):
    """Where a stream's q, k or v tiles come from: input `ref` (a uint32 word view), first word
    column (head 0)."""
    ref: int
    word: int


class _StreamPlan(NamedTuple):
    first_block: int
    blocks: int
    q: _Source
    k: _Source
    v: _Source


class _Plan(NamedTuple):
    """Everything static about a call."""
    streams: tuple[_StreamPlan, ...]
    sources: int  # input arrays (distinct)
    seq: int  # real tokens
    block: int  # block_kv: tokens per program and per K scale
    words: int  # D / 2
    eps: float
    qk_scale: float  # softmax scale * log2 e, folded into Q's scales
    v_max: bool  # pass 1 also takes v's per-channel max (fp8 PV)


def fits(stream_lengths: Sequence[int], config: AttentionConfig) -> bool:
    """Whether streams of these lengths can share one call: every run but the last fills whole
    blocks of `config.block_kv` tokens."""
    return all(n % config.block_kv == 0 for n in stream_lengths[:-1])


def _words(x: jax.Array) -> jax.Array:
    """(B, S, C) bf16 -> (B, S, C / 2) uint32, word c = the pair (2c, 2c + 1), 2c in the low half
    (a bitcast, no copy)."""
    return lax.bitcast_convert_type(x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2), jnp.uint32)


def _unpack(words: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint32 bf16 pairs -> float32 (even, odd): a bf16 is the high half of its float32."""
    return (lax.bitcast_convert_type(words << 16, jnp.float32),
            lax.bitcast_convert_type(words & np.uint32(0xFFFF0000), jnp.float32))


def _bf16(x: jax.Array) -> jax.Array:
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def _columns(v: jax.Array, like: jax.Array) -> jax.Array:
    return lax.broadcast_in_dim(v, like.shape, [1])


def _rows(v: jax.Array, like: jax.Array) -> jax.Array:
    return lax.broadcast_in_dim(v, like.shape, [0])


def _norm_rope(words: jax.Array, weight: tuple[jax.Array, jax.Array], cos: jax.Array, sin: jax.Array,
               plan: _Plan) -> tuple[jax.Array, jax.Array]:
    """A tile's bf16 pairs -> RoPE(RMSNorm(x)) as float32 (even, odd), each rounded to bf16 after
    the norm and after RoPE, as the unfused model rounds them:
    n = bf16(x * rsqrt(mean(x^2) + eps) * w); (even, odd) -> bf16(n_e cos - n_o sin, n_o cos + n_e sin)."""
    e, o = _unpack(words)
    mean_square = ((e * e).sum(axis=1) + (o * o).sum(axis=1)) / np.float32(2 * plan.words)
    r = _rows(lax.rsqrt(mean_square + np.float32(plan.eps)), e)
    n_e, n_o = _bf16(e * r * _columns(weight[0], e)), _bf16(o * r * _columns(weight[1], o))
    return _bf16(n_e * cos + (-n_o) * sin), _bf16(n_o * cos + n_e * sin)


def _codes_word(e: jax.Array, o: jax.Array, scale: jax.Array) -> jax.Array:
    """int8 codes clip(round(x / scale)) of a pair, as one int16 (even code in the low byte)."""
    code = lambda x: jnp.clip(jnp.round(x / scale), -INT8_MAX, INT8_MAX).astype(jnp.int32)
    return ((code(e) & 0xFF) | (code(o) << 8)).astype(jnp.int16)


def _kernel(*refs, plan: _Plan, phase: Phase):
    """One program: KV block `block` of one head and batch row, from the stream holding it; phase
    "sums" or "codes" (module docstring)."""
    sources, refs = refs[:plan.sources], refs[plan.sources:]
    weights_ref, cos_ref, sin_ref, *refs = refs
    head, block, batch = lax.axis_index("heads"), lax.axis_index("blocks"), lax.axis_index("batch")
    tiles = plan.block // TILE
    first_row = block * plan.block  # in the joint sequence

    def tile(source: _Source, local_row) -> jax.Array:
        cols = pl.ds(source.word + head * plan.words, plan.words)
        return plgpu.load(sources[source.ref].at[batch, pl.ds(local_row, TILE), cols], layout=_TILE_LAYOUT,
                          optimized=False)

    def table(ref, t: int) -> jax.Array:
        return plgpu.load(ref.at[pl.ds(first_row + t * TILE, TILE)], layout=_TILE_LAYOUT, optimized=False)

    def weight(i: int, which: int) -> tuple[jax.Array, jax.Array]:
        return tuple(plgpu.load(weights_ref.at[i, 2 * which + j], layout=_PER_COLUMN, optimized=False)
                     for j in range(2))

    def real_rows(like: jax.Array, t: int) -> jax.Array:
        rows = plgpu.broadcasted_iota(jnp.int32, like.shape, 0, layout=_TILE_LAYOUT)
        return rows + (first_row + t * TILE) < plan.seq

    def run(i: int, s: _StreamPlan):
        local = (block - s.first_block) * plan.block
        tables = lambda t: (table(cos_ref, t), table(sin_ref, t))  # loaded tile by tile: registers
        k_rows = lambda t, cos_sin: _norm_rope(tile(s.k, local + t * TILE), weight(i, 1), *cos_sin, plan)
        if phase == "sums":  # K's column sums and V's column max |v| of the block
            ksum_ref, *vmax_ref = refs
            total = functools.reduce(lambda acc, t: [a + x for a, x in zip(acc, k_rows(t, tables(t)))],
                                     range(1, tiles), k_rows(0, tables(0)))
            for j in range(2):
                ksum_ref.at[batch, head, block, j][...] = total[j].sum(axis=0)
            if plan.v_max:
                top = functools.reduce(lambda acc, t: [jnp.maximum(a, jnp.abs(x)) for a, x in zip(
                    acc, _unpack(tile(s.v, local + t * TILE)))], range(tiles), [0.0, 0.0])
                for j in range(2):
                    vmax_ref[0].at[batch, head, block, j][...] = top[j].max(axis=0)
            return

        mean_ref, q_codes_ref, q_scale_ref, k_codes_ref, k_scale_ref = refs
        mean = [plgpu.load(mean_ref.at[batch, head, j], layout=_PER_COLUMN, optimized=False) for j in range(2)]
        centred = []
        for t in range(tiles):  # Q's codes per token; K - mean kept for the block's scale
            rows, cos_sin = pl.ds(first_row + t * TILE, TILE), tables(t)
            e, o = _norm_rope(tile(s.q, local + t * TILE), weight(i, 0), *cos_sin, plan)
            scale = jnp.maximum(jnp.maximum(jnp.abs(e), jnp.abs(o)).max(axis=1) * np.float32(1 / INT8_MAX),
                                np.float32(SCALE_FLOOR))
            q_codes_ref.at[batch, rows, head][...] = _codes_word(e, o, _rows(scale, e))
            real = plgpu.broadcasted_iota(jnp.int32, (TILE,), 0, layout=_PER_ROW) + (first_row + t * TILE) < plan.seq
            q_scale_ref.at[batch, head, rows][...] = jnp.where(real, scale * np.float32(plan.qk_scale), 0.0)
            centred.append([jnp.where(real_rows(x, t), x - _columns(m, x), 0.0)
                            for x, m in zip(k_rows(t, cos_sin), mean)])
        top = functools.reduce(jnp.maximum, [jnp.abs(x) for kt in centred for x in kt])
        scale = jnp.maximum(top.max(axis=1).max(axis=0) * np.float32(1 / INT8_MAX), np.float32(SCALE_FLOOR))
        for t, (e, o) in enumerate(centred):  # K's codes, one scale per block
            k_codes_ref.at[batch, pl.ds(first_row + t * TILE, TILE), head][...] = _codes_word(e, o, scale)
        k_scale_ref[batch, head, block] = scale

    for i, s in enumerate(plan.streams):
        pl.when((block >= s.first_block) & (block < s.first_block + s.blocks))(functools.partial(run, i, s))


def _launch(phase: Phase, plan: _Plan, inputs: Sequence[jax.Array], batch: int, heads: int, interpret: bool):
    blocks = sum(s.blocks for s in plan.streams)
    seq_pad = blocks * plan.block
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    per_block = f32(batch, heads, blocks, 2, plan.words)
    if phase == "sums":
        out_type = (per_block, per_block) if plan.v_max else (per_block,)
    else:
        codes = jax.ShapeDtypeStruct((batch, seq_pad, heads, plan.words), jnp.int16)
        out_type = (codes, f32(batch, heads, seq_pad), codes, f32(batch, heads, blocks))
    return plgpu.kernel(
        functools.partial(_kernel, plan=plan, phase=phase),
        out_type=out_type,
        grid=(heads, blocks, batch),
        grid_names=("heads", "blocks", "batch"),
        kernel_name=f"attention_quantize_{phase}",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(*inputs)


def _check(streams: Sequence[Stream], cos: jax.Array, sin: jax.Array, heads: int, config: AttentionConfig) -> int:
    """The head dim of valid streams; raises naming the stream and tensor at fault."""
    if not streams:
        raise ValueError("quantize_projections needs at least one stream")
    d = streams[0].q_weight.shape[-1]
    batch = streams[0].q.array.shape[0]
    if d % 64:
        raise ValueError(f"head dim must be a multiple of 64, got q_weight {streams[0].q_weight.shape}")
    for i, s in enumerate(streams):
        if s.q_weight.shape != (d,) or s.k_weight.shape != (d,):
            raise ValueError(f"stream {i}: q_weight {s.q_weight.shape} and k_weight {s.k_weight.shape} must be ({d},)")
        length = s.q.array.shape[1]
        for name, p in zip("qkv", (s.q, s.k, s.v)):
            x = p.array
            if x.ndim != 3 or x.dtype != jnp.bfloat16 or x.shape[:2] != (batch, length):
                raise ValueError(f"stream {i} {name}: want a bfloat16 (B={batch}, S={length}, C) array, got "
                                 f"{x.dtype} {x.shape}")
            if p.column % 4 or x.shape[-1] % 4 or p.column < 0 or x.shape[-1] - p.column < heads * d:
                raise ValueError(f"stream {i} {name}: columns [{p.column}, {p.column + heads * d}) of its {x.shape} "
                                 "array: they must fit, and the column and the width be multiples of 4 (the "
                                 "kernel loads 8 bytes, 4 bf16, at a time)")
    lengths = [s.q.array.shape[1] for s in streams]
    if not fits(lengths, config):
        raise ValueError(f"streams of {lengths} tokens: every stream but the last must be a multiple of "
                         f"block_kv={config.block_kv} tokens")
    if cos.shape != (sum(lengths), d) or sin.shape != cos.shape:
        raise ValueError(f"RoPE tables cos {cos.shape}, sin {sin.shape} must be ({sum(lengths)}, {d})")
    return d


def quantize_projections(streams: Sequence[Stream], cos: jax.Array, sin: jax.Array, *, heads: int, eps: float,
                         config: AttentionConfig | None = None, pv_fp8: bool = True,
                         softmax_scale: float | None = None, interpret: bool = False) -> QuantizedQKV:
    """The 8-bit kernels' operands (`attention.QuantizedQKV`, int8 Q/K codes) of the joint
    sequence [stream 0, stream 1, ...]: q and k RMSNorm-ed per head (each stream's weights) and
    rotated by RoPE (cos, sin: (S, D) float32 tables, each angle repeated for its pair of
    adjacent features), K's mean over the sequence removed; V fp8 per channel ("sage8",
    `pv_fp8`) or bf16 ("sage_qk8"). The same operands, up to the rounding the module docstring
    names, as `attention.quantize_qkv` on the unfused model's q, k, v
    (`attention_quantize_reference.projections_reference`)."""
    config = config or default_config("sage8" if pv_fp8 else "sage_qk8")
    d = _check(streams, cos, sin, heads, config)
    batch = streams[0].q.array.shape[0]
    lengths = [s.q.array.shape[1] for s in streams]
    seq = sum(lengths)
    seq_pad = padded_length(seq, config)
    pad = seq_pad - seq

    arrays: list[tuple[jax.Array, bool, jax.Array]] = []  # distinct inputs and their word views

    def source(p: Projection, last: bool) -> _Source:
        for i, (x, padded, _) in enumerate(arrays):
            if x is p.array and padded == (last and pad > 0):
                return _Source(i, p.column // 2)
        x = jnp.pad(p.array, ((0, 0), (0, pad), (0, 0))) if last and pad else p.array
        arrays.append((p.array, last and pad > 0, _words(x)))
        return _Source(len(arrays) - 1, p.column // 2)

    plans, first = [], 0
    for i, s in enumerate(streams):
        last = i == len(streams) - 1
        blocks = (lengths[i] + (pad if last else 0)) // config.block_kv
        plans.append(_StreamPlan(first, blocks, source(s.q, last), source(s.k, last), source(s.v, last)))
        first += blocks
    plan = _Plan(tuple(plans), len(arrays), seq, config.block_kv, d // 2, float(eps),
                 (1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale) * LOG2E, pv_fp8)
    weights = jnp.stack([jnp.stack([w.astype(jnp.float32)[j::2] for w in (s.q_weight, s.k_weight) for j in range(2)])
                         for s in streams])  # (streams, 4, D / 2): q even, q odd, k even, k odd
    tables = [jnp.pad(t.astype(jnp.float32)[:, 0::2], ((0, pad), (0, 0))) for t in (cos, sin)]
    inputs = [w for _, _, w in arrays] + [weights, *tables]

    interleave = lambda x: jnp.moveaxis(x, -2, -1).reshape(*x.shape[:-2], d)  # (..., 2, D / 2) -> (..., D)
    sums = _launch("sums", plan, inputs, batch, heads, interpret)
    mean = sums[0].sum(axis=2) / np.float32(seq)  # (B, H, 2, D / 2)
    q_codes, q_scale, k_codes, k_scale = _launch("codes", plan, [*inputs, mean], batch, heads, interpret)
    as_int8 = lambda c: lax.bitcast_convert_type(c, jnp.int8).reshape(batch, seq_pad, heads, d)

    v = jnp.concatenate([s.v.array[..., s.v.column:s.v.column + heads * d] for s in streams], axis=1)
    v = v.reshape(batch, seq, heads, d)
    v_t_codes, v_scale, v_bf16 = v_operands(v, seq_pad, pv_fp8, interleave(sums[1].max(axis=2)) if pv_fp8 else None)
    return QuantizedQKV(q_codes=as_int8(q_codes), q_scale=q_scale, k_codes=as_int8(k_codes), k_scale=k_scale,
                        v_t_codes=v_t_codes, v_scale=v_scale, v_bf16=v_bf16)
