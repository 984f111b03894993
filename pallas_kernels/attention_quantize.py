"""The attention's operands made where q, k and v are produced, Pallas Mosaic GPU (sm_90): the 8-bit
kernels' codes (`quantize_projections`) or the exact attention's bf16 q, k, v (`project_qkv`).

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

The bf16 mode, for the exact (cuDNN) attention: one launch of the same kernel, phase "bf16": per
block of `BF16_BLOCK` tokens and head, RMSNorm + RoPE of q and k (the same `_norm_rope`) and v as
it is, each written in bf16 straight into the joint (B, S_0 + S_1 + ..., H, D) layout the
attention takes: q, k and v read once and written once, where the unfused path runs XLA fusions
for each stream's norms, the [text, image] concatenations and RoPE (q and k through HBM twice).
Nothing is padded: a ragged last stream's last tile is moved back to end at its last token,
overlapping the tile before it (those rows are written twice, with the same values). The tiles go
through shared memory: a program issues the TMA copies of all its q, k and v tiles at once (one
barrier each, so the loads overlap one another and the first tiles' arithmetic), normalizes and
rotates q and k in place (shared memory -> WGMMA registers -> shared memory), and TMA-copies each
tile into its (rows, D) box of the (B, S, H, D) outputs; v never enters registers. Shared memory:
3 x `BF16_BLOCK` x D bf16, 96 KiB at D = 128 (two programs per SM). TMA copies whole (8, 64)
tiles of the arrays (`_stageable`): a call whose streams are not multiples of 8 tokens, or whose
columns are not multiples of 64, moves its tiles register-direct instead, as the 8-bit phases do
(measured at ~1.5 TB/s: 4 bytes a thread an access, synchronous; benchmarks/notes/fusions.md).

Layout of the work: one warpgroup per program, grid (heads, blocks, batch); a 64-token tile of a
head is a (64, D) array in the WGMMA register layout, loaded as bf16 (the 8-bit phases straight
from HBM, the bf16 mode from shared memory): each thread's register holds a pair of adjacent
features (2c, 2c + 1), which is exactly a RoPE pair, so the rotation needs no data from another
thread. It is written in Mosaic GPU directly (`_rotate_pairs`: each register's pair times the
register of a table holding (cos, sin) of that pair at the same place, the table's tile loaded
straight from HBM); interpret mode does the same with jnp ops. Row reductions (the norm's
mean square, Q's absmax) stay within a quad of threads; K's block absmax and the column sums cross
warps (Mosaic's reduction scratch). Codes go out in k's channel order.

Numerics are the unfused path's operation for operation (bf16 roundings after the norm and after
RoPE included, the same scale formulas and divisions, `attention.quantize_qkv`'s padding); the
float32 sums (the norm's mean square, K's mean) run in another order, which can move a bf16
rounding of the norm or of RoPE by one unit and K's mean by float32 rounding (the tests' bounds,
`attention_quantize_reference.py`). Streams: a joint sequence made of several runs of tokens with
their own projections and norm weights (FLUX's [text, image]) is one call; each run but the last
must fill whole blocks of `block_kv` tokens (FLUX: 512 or 256 text tokens), the last is zero-padded
to whole blocks in the 8-bit modes (a copy, only when the total is ragged).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.experimental.mosaic.gpu as mgpu
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jaxlib.mlir.dialects import arith

from pallas_kernels.attention import (INT8_MAX, LOG2E, SCALE_FLOOR, AttentionConfig, QuantizedQKV, default_config,
                                      padded_length, v_operands)
from pallas_kernels.smem import swizzle_transforms

TILE = 64  # tokens of one register tile: a warpgroup's WGMMA-layout rows
_TILE_LAYOUT = plgpu.Layout.WGMMA
_PER_COLUMN = plgpu.Layout.WGMMA.reduce(0)  # a vector with one value per column of a tile
_PER_ROW = plgpu.Layout.WGMMA.reduce(1)
BF16_BLOCK = 128  # tokens per program of the bf16 mode (two register tiles)
Phase = Literal["sums", "codes", "bf16"]


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
    """Where a stream's q, k or v tiles come from: input `ref`, first column (head 0)."""
    ref: int
    column: int


class _StreamPlan(NamedTuple):
    first_block: int
    blocks: int
    tokens: int  # rows of its arrays as passed (the 8-bit modes: the last stream's zero-padded)
    q: _Source
    k: _Source
    v: _Source


class _Plan(NamedTuple):
    """Everything static about a call."""
    streams: tuple[_StreamPlan, ...]
    sources: int  # input arrays (distinct)
    seq: int  # real tokens
    block: int  # tokens per program (the 8-bit modes: block_kv, tokens per K scale)
    head_dim: int
    eps: float
    qk_scale: float | None  # softmax scale * log2 e, folded into Q's scales (phase "codes")
    v_max: bool  # phase "sums" also takes v's per-channel max (fp8 PV)
    interpret: bool
    staged: bool = False  # phase "bf16" moves its tiles through shared memory by TMA (`_stageable`)


def fits(stream_lengths: Sequence[int], block: int) -> bool:
    """Whether streams of these lengths can share one call of the 8-bit modes with `block` (the
    config's block_kv) tokens per program: every run but the last fills whole blocks."""
    return all(n % block == 0 for n in stream_lengths[:-1])


def project_fits(stream_lengths: Sequence[int], block: int = BF16_BLOCK) -> bool:
    """Whether `project_qkv` takes streams of these lengths: every run but the last fills whole
    blocks, and the last holds at least one tile (its last tile ends at its last token)."""
    return fits(stream_lengths, block) and stream_lengths[-1] >= TILE


def _stageable(streams: Sequence[Stream]) -> bool:
    """Whether the bf16 mode's tiles can go through shared memory by TMA: Mosaic copies a tile of
    the (8, 64)-tiled shared-memory layout as whole (8, 64) tiles of the array it is cut from, so
    every stream's tokens must be a multiple of 8 (its arrays' rows, the joint output's, the first
    row of a moved-back last tile) and every projection's column and width a multiple of 64.
    FLUX: yes whenever the image tokens are (1024², 1360x768, 1920x1088); not at 1008² (63²)."""
    return all(s.q.array.shape[1] % 8 == 0 and all(p.column % 64 == 0 and p.array.shape[-1] % 64 == 0
                                                   for p in (s.q, s.k, s.v)) for s in streams)


def _bf16(x: jax.Array) -> jax.Array:
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def _columns(v: jax.Array, like: jax.Array) -> jax.Array:
    return lax.broadcast_in_dim(v, like.shape, [1])


def _rows(v: jax.Array, like: jax.Array) -> jax.Array:
    return lax.broadcast_in_dim(v, like.shape, [0])


def rope_table(cos: jax.Array, sin: jax.Array) -> jax.Array:
    """(S, D) cos and sin, each angle repeated for its pair -> (S, D) float32 holding (cos, sin)
    of pair c at (2c, 2c + 1): where a tile's pair sits, its angle sits in the table's tile."""
    even = jnp.arange(cos.shape[-1]) % 2 == 0
    return jnp.where(even, cos.astype(jnp.float32), sin.astype(jnp.float32))


def _rotate_pairs(n: jax.Array, table: jax.Array, interpret: bool) -> jax.Array:
    """(n_2c, n_2c+1) -> (n_2c cos - n_2c+1 sin, n_2c+1 cos + n_2c sin) per pair c, (cos, sin) =
    table's (2c, 2c + 1): the model's x * cos + rotate_half(x) * sin, float32, the same products
    and sums."""
    if interpret:
        rows, d = n.shape
        x, t = n.reshape(rows, d // 2, 2), table.reshape(rows, d // 2, 2)
        a, b, c, s = x[..., 0], x[..., 1], t[..., 0], t[..., 1]
        return jnp.stack([a * c + (-b) * s, b * c + a * s], axis=-1).reshape(rows, d)

    @plgpu.inline_mgpu(arg_types=(_TILE_LAYOUT, _TILE_LAYOUT),
                       return_type=plgpu.ShapeDtypeStruct(n.shape, jnp.float32, layout=_TILE_LAYOUT))
    def rotate(_, x, t):
        out = np.empty(x.registers.shape, dtype=object)
        if ir.VectorType(x.registers.flat[0].type).shape != [2]:
            raise AssertionError(f"a register must hold one pair: {x.registers.flat[0].type}")
        for idx in np.ndindex(x.registers.shape):  # each register: one pair (2c, 2c + 1), vector<2xf32>
            a, b = (mgpu_utils.vector_slice(x.registers[idx], slice(i, i + 1)) for i in range(2))
            c, s = (mgpu_utils.vector_slice(t.registers[idx], slice(i, i + 1)) for i in range(2))
            out[idx] = mgpu_utils.vector_concat([
                arith.addf(arith.mulf(a, c), arith.mulf(arith.negf(b), s)),
                arith.addf(arith.mulf(b, c), arith.mulf(a, s))])
        return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

    return rotate(n, table)


def _norm_rope(x: jax.Array, weight: jax.Array, table: jax.Array, plan: _Plan) -> jax.Array:
    """A bf16 tile (64, D) -> RoPE(RMSNorm(x)) in float32, rounded to bf16 after the norm and
    after RoPE as the unfused model rounds them: n = bf16(x * rsqrt(mean(x^2) + eps) * w), then
    bf16(rotated n)."""
    x = x.astype(jnp.float32)
    mean_square = (x * x).sum(axis=1) / np.float32(plan.head_dim)
    n = _bf16(x * _rows(lax.rsqrt(mean_square + np.float32(plan.eps)), x) * _columns(weight, x))
    return _bf16(_rotate_pairs(n, table, plan.interpret))


def _codes(x: jax.Array, scale: jax.Array) -> jax.Array:
    """int8 codes clip(round(x / scale)), as `attention.quantize_qkv` makes them."""
    return jnp.clip(jnp.round(x / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)


def _kernel(*refs, plan: _Plan, phase: Phase):
    """One program: block `block` of one head and batch row, from the stream holding it; phase
    "sums", "codes" or "bf16" (module docstring)."""
    sources, refs = refs[:plan.sources], refs[plan.sources:]
    weights_ref, table_ref, *refs = refs
    head, block, batch = lax.axis_index("heads"), lax.axis_index("blocks"), lax.axis_index("batch")
    tiles, d = plan.block // TILE, plan.head_dim
    first_row = block * plan.block  # in the joint sequence

    def tile_ref(source: _Source, local_row):  # the (TILE, D) block of head `head` at the stream's row
        return sources[source.ref].at[batch, pl.ds(local_row, TILE), pl.ds(source.column + head * d, d)]

    def tile(source: _Source, local_row) -> jax.Array:
        return plgpu.load(tile_ref(source, local_row), layout=_TILE_LAYOUT, optimized=False)

    def table(row) -> jax.Array:  # the tile of joint rows [row, row + TILE)
        return plgpu.load(table_ref.at[pl.ds(row, TILE)], layout=_TILE_LAYOUT, optimized=False)

    def vector(ref) -> jax.Array:
        return plgpu.load(ref, layout=_PER_COLUMN, optimized=False)

    def real_rows(like: jax.Array, t: int) -> jax.Array:
        rows = plgpu.broadcasted_iota(jnp.int32, like.shape, 0, layout=_TILE_LAYOUT)
        return rows + (first_row + t * TILE) < plan.seq

    def run(i: int, s: _StreamPlan):
        start = s.first_block * plan.block  # the stream's first row in the joint sequence
        # the tile of joint rows [row, row + TILE), normed and rotated (rope: table(row)); j: 0 q, 1 k
        normed = lambda j, x, rope: _norm_rope(x, vector(weights_ref.at[i, j]), rope, plan)
        q_rows = lambda row, rope: normed(0, tile(s.q, row - start), rope)
        k_rows = lambda row, rope: normed(1, tile(s.k, row - start), rope)
        row_of = lambda t: first_row + t * TILE
        if phase == "bf16":  # q and k normed and rotated, v as it is, each into the joint (B, S, H, D) layout
            rows = [row_of(t) for t in range(tiles)]
            if s.tokens % plan.block:  # a ragged last stream (unpadded): its tiles end at its last token,
                rows = [jnp.minimum(row, start + s.tokens - TILE) for row in rows]  # overlapping the one before
            out = lambda j, row: refs[j].at[batch, pl.ds(row, TILE), head]  # (same values where tiles overlap)
            if not plan.staged:  # register-direct: tiles TMA cannot copy (`_stageable`)
                for row in rows:
                    rope = table(row)
                    out(0, row)[...] = q_rows(row, rope).astype(jnp.bfloat16)
                    out(1, row)[...] = k_rows(row, rope).astype(jnp.bfloat16)
                    out(2, row)[...] = tile(s.v, row - start)
                return
            staged, barriers = refs[3:]  # (3, tiles, TILE, D): the block's q, k, v tiles; a TMA barrier each
            for t, row in enumerate(rows):  # every copy in flight before the first tile is used
                for j, source in enumerate((s.q, s.k, s.v)):
                    plgpu.copy_gmem_to_smem(tile_ref(source, row - start), staged.at[j, t], barriers.at[j * tiles + t])
            for t, row in enumerate(rows):
                rope = table(row)
                for j in range(2):  # q, k: normed and rotated in place
                    plgpu.barrier_wait(barriers.at[j * tiles + t])
                    x = plgpu.load(staged.at[j, t], layout=_TILE_LAYOUT)
                    staged.at[j, t][...] = normed(j, x, rope).astype(jnp.bfloat16)
                plgpu.commit_smem()  # every thread's stores before the copies out read them
                plgpu.barrier_wait(barriers.at[2 * tiles + t])
                for j in range(3):
                    plgpu.copy_smem_to_gmem(staged.at[j, t], out(j, row))
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the copies out have read shared memory
            return
        if phase == "sums":  # K's column sums and V's column max |v| of the block
            ksum_ref, *vmax_ref = refs
            total = functools.reduce(lambda acc, t: acc + k_rows(row_of(t), table(row_of(t))), range(1, tiles),
                                     k_rows(row_of(0), table(row_of(0))))
            ksum_ref.at[batch, head, block][...] = total.sum(axis=0)
            if plan.v_max:
                top = functools.reduce(lambda acc, t: jnp.maximum(acc, jnp.abs(
                    tile(s.v, row_of(t) - start).astype(jnp.float32))), range(tiles), 0.0)
                vmax_ref[0].at[batch, head, block][...] = top.max(axis=0)
            return

        mean_ref, q_codes_ref, q_scale_ref, k_codes_ref, k_scale_ref = refs
        mean = vector(mean_ref.at[batch, head])
        centre = lambda k, t: jnp.where(real_rows(k, t), k - _columns(mean, k), 0.0)  # padded keys: 0
        k_tiles, top = [], None
        for t in range(tiles):  # Q's codes per token; K kept (bf16, exact: 32 registers a tile) for the block's scale
            rows, rope = pl.ds(row_of(t), TILE), table(row_of(t))  # the table loaded tile by tile: registers
            q = q_rows(row_of(t), rope)
            scale = jnp.maximum(jnp.abs(q).max(axis=1) * np.float32(1 / INT8_MAX), np.float32(SCALE_FLOOR))
            q_codes_ref.at[batch, rows, head][...] = _codes(q, _rows(scale, q))
            real = plgpu.broadcasted_iota(jnp.int32, (TILE,), 0, layout=_PER_ROW) + (first_row + t * TILE) < plan.seq
            q_scale_ref.at[batch, head, rows][...] = jnp.where(real, scale * np.float32(plan.qk_scale), 0.0)
            k = k_rows(row_of(t), rope)
            k_tiles.append(k.astype(jnp.bfloat16))
            top = jnp.abs(centre(k, t)) if top is None else jnp.maximum(top, jnp.abs(centre(k, t)))
        scale = jnp.maximum(top.max(axis=1).max(axis=0) * np.float32(1 / INT8_MAX), np.float32(SCALE_FLOOR))
        for t, k in enumerate(k_tiles):  # K's codes, one scale per block
            k_codes_ref.at[batch, pl.ds(first_row + t * TILE, TILE), head][...] = _codes(
                centre(k.astype(jnp.float32), t), scale)
        k_scale_ref[batch, head, block] = scale

    for i, s in enumerate(plan.streams):
        pl.when((block >= s.first_block) & (block < s.first_block + s.blocks))(functools.partial(run, i, s))


# Jitted with the plan static, as the other kernels are: every call of a model with the same plan
# (the 38 single blocks, the 19 double blocks) shares one traced and lowered kernel. Without it
# each of the step's 57 calls lowered its own (the step with the q/k/v producer compiled in 140 s
# on the H200, against 50 s without the producer).
@functools.partial(jax.jit, static_argnames=("phase", "plan", "batch", "heads"))
def _launch(phase: Phase, plan: _Plan, inputs: Sequence[jax.Array], batch: int, heads: int):
    blocks = sum(s.blocks for s in plan.streams)
    seq_pad, d = blocks * plan.block, plan.head_dim
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    if phase == "sums":
        out_type = (f32(batch, heads, blocks, d),) * (2 if plan.v_max else 1)
    elif phase == "bf16":
        out_type = (jax.ShapeDtypeStruct((batch, plan.seq, heads, d), jnp.bfloat16),) * 3
    else:
        codes = jax.ShapeDtypeStruct((batch, seq_pad, heads, d), jnp.int8)
        out_type = (codes, f32(batch, heads, seq_pad), codes, f32(batch, heads, blocks))
    scratch = []
    if plan.staged:  # the block's q, k, v tiles in shared memory (module docstring), a TMA barrier each
        tiles = plan.block // TILE
        scratch = [plgpu.SMEM((3, tiles, TILE, d), jnp.bfloat16, transforms=swizzle_transforms(d, 2)),
                   plgpu.Barrier(num_barriers=3 * tiles)]
    return plgpu.kernel(
        functools.partial(_kernel, plan=plan, phase=phase),
        out_type=out_type,
        scratch_types=scratch,
        grid=(heads, blocks, batch),
        grid_names=("heads", "blocks", "batch"),
        kernel_name=f"attention_quantize_{phase}",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=plgpu.InterpretGPUParams() if plan.interpret else None,
    )(*inputs)


def _check(streams: Sequence[Stream], cos: jax.Array, sin: jax.Array, heads: int, block: int) -> int:
    """The head dim of valid streams; raises naming the stream and tensor at fault."""
    if not streams:
        raise ValueError("the attention producer needs at least one stream")
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
            if p.column % 2 or x.shape[-1] % 2 or p.column < 0 or x.shape[-1] - p.column < heads * d:
                raise ValueError(f"stream {i} {name}: columns [{p.column}, {p.column + heads * d}) of its {x.shape} "
                                 "array: they must fit, and the column and the width be even (the kernel loads "
                                 "a pair of bf16, 4 bytes, at a time)")
    lengths = [s.q.array.shape[1] for s in streams]
    if block % TILE or not fits(lengths, block):
        raise ValueError(f"streams of {lengths} tokens, {block} tokens a program: the block must be a multiple of "
                         f"{TILE} and every stream but the last a multiple of the block")
    if cos.shape != (sum(lengths), d) or sin.shape != cos.shape:
        raise ValueError(f"RoPE tables cos {cos.shape}, sin {sin.shape} must be ({sum(lengths)}, {d})")
    return d


def _prepare(streams: Sequence[Stream], cos: jax.Array, sin: jax.Array, *, heads: int, eps: float, block: int,
             padded: Callable[[int], int], interpret: bool) -> tuple[_Plan, list[jax.Array]]:
    """The plan of a call (without the 8-bit phases' options) and its inputs, shared by both
    modes: the distinct projection arrays (the last stream's zero-padded when `padded(S)` exceeds
    the joint sequence's S), the norm weights (streams, 2, D) float32, the RoPE table padded
    alike."""
    d = _check(streams, cos, sin, heads, block)
    lengths = [s.q.array.shape[1] for s in streams]
    seq = sum(lengths)
    pad = padded(seq) - seq

    arrays: list[tuple[jax.Array, bool, jax.Array]] = []  # distinct inputs: (given, padded, as passed)

    def source(p: Projection, last: bool) -> _Source:
        grows = last and pad > 0
        for i, (x, was_padded, _) in enumerate(arrays):
            if x is p.array and was_padded == grows:
                return _Source(i, p.column)
        arrays.append((p.array, grows, jnp.pad(p.array, ((0, 0), (0, pad), (0, 0))) if grows else p.array))
        return _Source(len(arrays) - 1, p.column)

    plans, first = [], 0
    for i, s in enumerate(streams):
        last = i == len(streams) - 1
        tokens = lengths[i] + (pad if last else 0)
        blocks = -(-tokens // block)
        plans.append(_StreamPlan(first, blocks, tokens, source(s.q, last), source(s.k, last), source(s.v, last)))
        first += blocks
    plan = _Plan(tuple(plans), len(arrays), seq, block, d, float(eps), None, False, interpret)
    weights = jnp.stack([jnp.stack([s.q_weight, s.k_weight]) for s in streams]).astype(jnp.float32)  # (streams, 2, D)
    table = jnp.pad(rope_table(cos, sin), ((0, pad), (0, 0)))
    return plan, [x for _, _, x in arrays] + [weights, table]


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
    plan, inputs = _prepare(streams, cos, sin, heads=heads, eps=eps, block=config.block_kv,
                            padded=functools.partial(padded_length, config=config), interpret=interpret)
    d = plan.head_dim
    plan = plan._replace(qk_scale=(1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale) * LOG2E,
                         v_max=pv_fp8)
    batch, seq = streams[0].q.array.shape[0], plan.seq
    seq_pad = padded_length(seq, config)

    sums = _launch("sums", plan, inputs, batch, heads)
    mean = sums[0].sum(axis=2) / np.float32(seq)  # (B, H, D)
    q_codes, q_scale, k_codes, k_scale = _launch("codes", plan, [*inputs, mean], batch, heads)

    v = jnp.concatenate([s.v.array[..., s.v.column:s.v.column + heads * d] for s in streams], axis=1)
    v_t_codes, v_scale, v_bf16 = v_operands(v.reshape(batch, seq, heads, d), seq_pad, pv_fp8,
                                            sums[1].max(axis=2) if pv_fp8 else None)
    return QuantizedQKV(q_codes=q_codes, q_scale=q_scale, k_codes=k_codes, k_scale=k_scale,
                        v_t_codes=v_t_codes, v_scale=v_scale, v_bf16=v_bf16)


def project_qkv(streams: Sequence[Stream], cos: jax.Array, sin: jax.Array, *, heads: int, eps: float,
                block: int = BF16_BLOCK, interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The exact attention's bf16 operands of the joint sequence [stream 0, stream 1, ...], each
    (B, S, H, D) as cuDNN takes them: q and k RMSNorm-ed per head (each stream's weights) and
    rotated by RoPE (cos, sin as `quantize_projections`'), v as projected; one launch ("bf16")
    reading the projections where the GEMMs left them, `block` tokens of one head a program. The
    unfused model's q, k, v (`attention_quantize_reference.projections_reference`) up to the
    rounding the module docstring names. Nothing is padded or copied: a ragged last stream's last
    tile ends at its last token, overlapping the tile before (`project_fits`)."""
    lengths = [s.q.array.shape[1] for s in streams]
    if streams and lengths[-1] < TILE:
        raise ValueError(f"streams of {lengths} tokens: the last must hold at least {TILE} tokens")
    plan, inputs = _prepare(streams, cos, sin, heads=heads, eps=eps, block=block, padded=lambda seq: seq,
                            interpret=interpret)
    plan = plan._replace(staged=_stageable(streams))
    return _launch("bf16", plan, inputs, streams[0].q.array.shape[0], heads)
