"""The exact attention's bf16 q, k, v made where they are produced, Pallas Mosaic GPU (sm_90)
(`project_qkv`).

In a transformer whose attention applies a per-head RMSNorm and RoPE to q and k (FLUX), the
unfused path runs XLA fusions for each stream's norms, the [text, image] concatenations and RoPE
(q and k through HBM twice). Here one launch reads the projections where the GEMMs left them (a
fused q/k/v projection is passed whole, with column offsets: no slice of it is copied): per block
of `BF16_BLOCK` tokens and head, RMSNorm + RoPE of q and k, and v as it is, each written in bf16
straight into the joint (B, S_0 + S_1 + ..., H, D) layout the attention takes: q, k and v read
once and written once. Nothing is padded: a ragged last stream's last tile is moved back to end
at its last token, overlapping the tile before it (those rows are written twice, with the same
values). The tiles go through shared memory: a program issues the TMA copies of all its q, k and
v tiles at once (one barrier each, so the loads overlap one another and the first tiles'
arithmetic), normalizes and rotates q and k in place (shared memory -> WGMMA registers -> shared
memory), and TMA-copies each tile into its (rows, D) box of the (B, S, H, D) outputs; v never
enters registers. Shared memory: 3 x `BF16_BLOCK` x D bf16, 96 KiB at D = 128 (two programs per
SM). TMA copies whole (8, 64) tiles of the arrays (`stageable`): a call whose streams are not
multiples of 8 tokens, or whose columns are not multiples of 64, moves its tiles register-direct
instead (measured at ~1.5 TB/s: 4 bytes a thread an access, synchronous;
benchmarks/notes/fusions.md).

The 8-bit kernels' operands are not made here: a producer that also wrote their codes (two
launches: K's column sums, then the codes) was slower than XLA's norm + RoPE + `quantize_qkv` at
every measured shape and was removed (benchmarks/notes/attention.md, v8). What the "int8"
attention needs before its codes can be: `qk_rotation` also multiplies q and k after RoPE by a
grouped Hadamard, one wgmma a group of features on the tile staged in shared memory (a (G, G) bf16
matrix, 8 KiB at G = 64, beside the tiles), in place of a cuBLAS pass over each in HBM (the
model's "int8" attention, `convrot_jax.ops.attention_from_projections`; benchmarks/notes/attention.md
v20). Writing q's int8 codes and per-token scales here as well (q never in HBM as bf16) was
measured slower than XLA's codes (`quantize_qkv`) and was removed (benchmarks/notes/attention.md,
v22).

Layout of the work: one warpgroup per program, grid (heads, blocks, batch); a 64-token tile of a
head is a (64, D) array in the WGMMA register layout: each thread's register holds a pair of
adjacent features (2c, 2c + 1), which is exactly a RoPE pair, so the rotation needs no data from
another thread. It is written in Mosaic GPU directly (`_rotate_pairs`: each register's pair times
the register of a table holding (cos, sin) of that pair at the same place, the table's tile
loaded straight from HBM); interpret mode does the same with jnp ops. The norm's mean square is a
row reduction within a quad of threads.

Numerics are the unfused path's operation for operation (bf16 roundings after the norm and after
RoPE included); the norm's float32 mean square runs in another order, which can move a bf16
rounding of the norm or of RoPE by one unit (the tests' bounds,
`attention_producer_reference.py`). Streams: a joint sequence made of several runs of tokens with
their own projections and norm weights (FLUX's [text, image]) is one call; each run but the last
must fill whole blocks of `BF16_BLOCK` tokens (FLUX: 512 or 256 text tokens).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

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

from pallas_kernels.smem import swizzle_transforms

TILE = 64  # tokens of one register tile: a warpgroup's WGMMA-layout rows
_TILE_LAYOUT = plgpu.Layout.WGMMA
_PER_COLUMN = plgpu.Layout.WGMMA.reduce(0)  # a vector with one value per column of a tile
BF16_BLOCK = 128  # tokens per program by default (two register tiles)


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
    tokens: int
    q: _Source
    k: _Source
    v: _Source


class _Plan(NamedTuple):
    """Everything static about a call."""
    streams: tuple[_StreamPlan, ...]
    sources: int  # input arrays (distinct)
    seq: int  # tokens of the joint sequence
    block: int  # tokens per program
    head_dim: int
    eps: float
    interpret: bool
    staged: bool  # tiles move through shared memory by TMA (`stageable`), else register-direct
    rotation_group: int  # q and k rotated in groups of this many features after RoPE (0: not rotated)


def project_fits(stream_lengths: Sequence[int], block: int = BF16_BLOCK) -> bool:
    """Whether `project_qkv` takes streams of these lengths: every run but the last fills whole
    blocks, and the last holds at least one tile (its last tile ends at its last token)."""
    return all(n % block == 0 for n in stream_lengths[:-1]) and stream_lengths[-1] >= TILE


def stageable(streams: Sequence[Stream]) -> bool:
    """Whether the tiles can go through shared memory by TMA: Mosaic copies a tile of
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


def _rotate_groups(tile_ref, rotation_smem, group: int, d: int) -> None:
    """tile (TILE, d) in shared memory -> each group of `group` features times the (group, group)
    matrix in `rotation_smem`, in place: one wgmma a group (bf16 operands, float32 sums), every
    group's product read before any is written back, rounded to bf16."""
    groups = d // group

    def products(*accs):
        for g, acc in enumerate(accs):
            plgpu.wgmma(acc, tile_ref.at[:, pl.ds(g * group, group)], rotation_smem)
        return [acc[...] for acc in accs]

    rotated = pl.run_scoped(products, *[plgpu.ACC((TILE, group), jnp.float32) for _ in range(groups)])
    for g, x in enumerate(rotated):
        tile_ref.at[:, pl.ds(g * group, group)][...] = x.astype(jnp.bfloat16)


def _kernel(*refs, plan: _Plan):
    """One program: block `block` of one head and batch row, from the stream holding it (module
    docstring)."""
    sources, refs = refs[:plan.sources], refs[plan.sources:]
    weights_ref, table_ref, *refs = refs
    if plan.rotation_group:
        rotation_ref, *refs = refs
    head, block, batch = lax.axis_index("heads"), lax.axis_index("blocks"), lax.axis_index("batch")
    tiles, d = plan.block // TILE, plan.head_dim
    first_row = block * plan.block  # in the joint sequence

    def tile_ref(source: _Source, local_row):  # the (TILE, D) block of head `head` at the stream's row
        return sources[source.ref].at[batch, pl.ds(local_row, TILE), pl.ds(source.column + head * d, d)]

    def tile(source: _Source, local_row) -> jax.Array:
        return plgpu.load(tile_ref(source, local_row), layout=_TILE_LAYOUT, optimized=False)

    def table(row) -> jax.Array:  # the tile of joint rows [row, row + TILE)
        return plgpu.load(table_ref.at[pl.ds(row, TILE)], layout=_TILE_LAYOUT, optimized=False)

    def run(i: int, s: _StreamPlan):
        start = s.first_block * plan.block  # the stream's first row in the joint sequence
        # a tile normed and rotated (rope: its rows' table); j: 0 q, 1 k
        normed = lambda j, x, rope: _norm_rope(
            x, plgpu.load(weights_ref.at[i, j], layout=_PER_COLUMN, optimized=False), rope, plan)
        rows = [first_row + t * TILE for t in range(tiles)]
        if s.tokens % plan.block:  # a ragged last stream: its tiles end at its last token,
            rows = [jnp.minimum(row, start + s.tokens - TILE) for row in rows]  # overlapping the one before
        out = lambda j, row: refs[j].at[batch, pl.ds(row, TILE), head]  # (same values where tiles overlap)
        if not plan.staged:  # register-direct: tiles TMA cannot copy (`stageable`)
            for row in rows:
                rope = table(row)
                out(0, row)[...] = normed(0, tile(s.q, row - start), rope).astype(jnp.bfloat16)
                out(1, row)[...] = normed(1, tile(s.k, row - start), rope).astype(jnp.bfloat16)
                out(2, row)[...] = tile(s.v, row - start)
            return
        staged, barriers, *extra = refs[3:]  # (3, tiles, TILE, D): the block's q, k, v tiles; a TMA barrier
        # each (and one for the rotation's matrix); then the rotation's matrix, if used
        rotation_smem = extra[0] if plan.rotation_group else None
        for t, row in enumerate(rows):  # every copy in flight before the first tile is used
            for j, source in enumerate((s.q, s.k, s.v)):
                plgpu.copy_gmem_to_smem(tile_ref(source, row - start), staged.at[j, t], barriers.at[j * tiles + t])
        if plan.rotation_group:  # waited on before the first rotation: it overlaps the first tiles' norm
            plgpu.copy_gmem_to_smem(rotation_ref, rotation_smem, barriers.at[3 * tiles])
        for t, row in enumerate(rows):
            rope = table(row)
            for j in range(2):  # q, k: normed and rotated in place
                plgpu.barrier_wait(barriers.at[j * tiles + t])
                x = plgpu.load(staged.at[j, t], layout=_TILE_LAYOUT)
                staged.at[j, t][...] = normed(j, x, rope).astype(jnp.bfloat16)
            plgpu.commit_smem()  # every thread's stores before the copies out (and the wgmmas) read them
            if plan.rotation_group:
                if t == 0:
                    plgpu.barrier_wait(barriers.at[3 * tiles])
                for j in range(2):
                    _rotate_groups(staged.at[j, t], rotation_smem, plan.rotation_group, d)
                plgpu.commit_smem()
            plgpu.barrier_wait(barriers.at[2 * tiles + t])
            for j in range(3):
                plgpu.copy_smem_to_gmem(staged.at[j, t], out(j, row))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the copies out have read shared memory

    for i, s in enumerate(plan.streams):
        pl.when((block >= s.first_block) & (block < s.first_block + s.blocks))(functools.partial(run, i, s))


# Jitted with the plan static, as the other kernels are: every call of a model with the same plan
# (the 38 single blocks, the 19 double blocks) shares one traced and lowered kernel. Without it
# each of the step's 57 calls lowered its own (the step with the q/k/v producer compiled in 140 s
# on the H200, against 50 s without the producer).
@functools.partial(jax.jit, static_argnames=("plan", "batch", "heads"))
def _launch(plan: _Plan, inputs: Sequence[jax.Array], batch: int, heads: int):
    blocks = sum(s.blocks for s in plan.streams)
    d = plan.head_dim
    scratch = []
    if plan.staged:  # the block's q, k, v tiles in shared memory (module docstring), a TMA barrier each
        tiles = plan.block // TILE
        scratch = [plgpu.SMEM((3, tiles, TILE, d), jnp.bfloat16, transforms=swizzle_transforms(d, 2)),
                   plgpu.Barrier(num_barriers=3 * tiles + bool(plan.rotation_group))]
        if plan.rotation_group:  # the rotation's (group, group) matrix
            g = plan.rotation_group
            scratch.append(plgpu.SMEM((g, g), jnp.bfloat16, transforms=swizzle_transforms(g, 2)))
    return plgpu.kernel(
        functools.partial(_kernel, plan=plan),
        out_type=(jax.ShapeDtypeStruct((batch, plan.seq, heads, d), jnp.bfloat16),) * 3,
        scratch_types=scratch,
        grid=(heads, blocks, batch),
        grid_names=("heads", "blocks", "batch"),
        kernel_name="attention_producer",
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
    if block % TILE or not project_fits(lengths, block):
        raise ValueError(f"streams of {lengths} tokens, {block} tokens a program: the block must be a multiple of "
                         f"{TILE}, every stream but the last a multiple of the block, the last at least {TILE} "
                         "tokens")
    if cos.shape != (sum(lengths), d) or sin.shape != cos.shape:
        raise ValueError(f"RoPE tables cos {cos.shape}, sin {sin.shape} must be ({sum(lengths)}, {d})")
    return d


def project_qkv(streams: Sequence[Stream], cos: jax.Array, sin: jax.Array, *, heads: int, eps: float,
                block: int = BF16_BLOCK, qk_rotation: jax.Array | None = None, interpret: bool = False
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The exact attention's bf16 operands of the joint sequence [stream 0, stream 1, ...], each
    (B, S, H, D) as cuDNN takes them: q and k RMSNorm-ed per head (each stream's weights) and
    rotated by RoPE (cos, sin: (S, D) float32 tables, each angle repeated for its pair of adjacent
    features), v as projected; one launch reading the projections where the GEMMs left them,
    `block` tokens of one head a program. The unfused model's q, k, v
    (`attention_producer_reference.projections_reference`) up to the rounding the module docstring
    names. Nothing is padded or copied: a ragged last stream's last tile ends at its last token,
    overlapping the tile before (`project_fits`).

    qk_rotation (G, G), G a multiple of 64 dividing D: then q and k after RoPE are also multiplied,
    each group of G features, by it (x_g @ qk_rotation; bf16 operands, float32 sums, rounded to
    bf16: one wgmma a group on the tile in shared memory), as the 8-bit attention's grouped
    Hadamard wants them (an orthogonal map leaves q k^T as it is). The matrix is rounded to bf16:
    exact for the regular Hadamard of 64 (entries +-1/8), not for a normalised one of 128. Needs
    the staged path (`stageable`)."""
    d = _check(streams, cos, sin, heads, block)
    group = 0
    if qk_rotation is not None:
        group = qk_rotation.shape[0]
        if qk_rotation.shape != (group, group) or group % 64 or d % group:
            raise ValueError(f"qk_rotation must be (G, G) with G a multiple of 64 dividing the head dim {d}, "
                             f"got {qk_rotation.shape}")
        if not stageable(streams):
            raise ValueError("qk_rotation runs on tiles staged in shared memory: every stream's tokens must be a "
                             "multiple of 8 and every projection's column and width a multiple of 64, got "
                             f"{[(s.q.array.shape, s.q.column, s.k.column, s.v.column) for s in streams]}")
    arrays: list[jax.Array] = []  # the distinct inputs (a fused projection serves q, k and v)

    def source(p: Projection) -> _Source:
        for i, x in enumerate(arrays):
            if x is p.array:
                return _Source(i, p.column)
        arrays.append(p.array)
        return _Source(len(arrays) - 1, p.column)

    plans, first = [], 0
    for s in streams:
        tokens = s.q.array.shape[1]
        blocks = -(-tokens // block)
        plans.append(_StreamPlan(first, blocks, tokens, source(s.q), source(s.k), source(s.v)))
        first += blocks
    plan = _Plan(tuple(plans), len(arrays), sum(p.tokens for p in plans), block, d, float(eps), interpret,
                 stageable(streams), group)
    weights = jnp.stack([jnp.stack([s.q_weight, s.k_weight]) for s in streams]).astype(jnp.float32)  # (streams, 2, D)
    rotation = [] if qk_rotation is None else [qk_rotation.astype(jnp.bfloat16)]
    return _launch(plan, [*arrays, weights, rope_table(cos, sin), *rotation], streams[0].q.array.shape[0], heads)
