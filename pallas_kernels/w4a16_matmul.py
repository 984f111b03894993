"""W4A16 GEMM on Hopper (sm_90): bf16 activations x packed int4 weights -> bf16, weight-only int4.

    y (M, N) = x (M, K) . (unpack(w_packed) (N, K) * s_w)^T (+ bias)

For FLUX's AdaLN modulation (M = a few rows) and T5's linears. At small M the layer is memory
bound on the weight, so the kernel reads the packed weight (K/2 bytes a row, a quarter of bf16's)
and its scales straight from HBM and converts them in registers; no bf16 copy of the weight is
ever written.

Structure (Pallas Mosaic GPU, warp-specialised, after jax's `hopper_mixed_type_matmul_mgpu.py`):
  * a memory warpgroup streams the activation tile (tile_m, tile_k) bf16 and the packed weight
    tile (2 * tile_n, tile_k / 2) uint8 into a `max_concurrent_steps`-deep stage ring by TMA;
  * two compute warpgroups each own tile_n weight rows: they convert their packed rows to bf16 in
    registers (`pallas_kernels.int4_unpack`, target "bf16_wgmma_k32") and issue
    `wgmma(acc (tile_n, tile_m), w_bf16, x_smem.T)`: the weights are wgmma's A operand (its M
    side is 64 rows), the tokens its N side, which can be as narrow as 8, so a handful of tokens
    costs no padded tensor-core work. The unpack hands wgmma its K axis permuted within every 32
    columns (`permute_k32`); the wrapper permutes x's columns alike (a gather of static columns
    that fuses with the pad of x's rows), which leaves the product unchanged and saves two warp
    shuffles per 8 weights. Each step waits for its wgmma (A lives in registers the next unpack
    reuses); the two compute warpgroups overlap each other.
  * scales: per output channel, applied in float32 to the sum in the epilogue (with the bias);
    per group (`scale_group` g, tile_k = g), each step's product is multiplied by its group's
    scales before it is added.
  * output: each warpgroup stores its (tile_n, tile_m) tile straight from registers into an
    (N, M) array; the finishing XLA pass (below) transposes it.
  * schedule, a persistent grid of one program per SM, each program one pipeline: whole tiles
    while every SM has one (data-parallel rounds: tile p + r * programs), then "stream-K" over the
    remaining tiles: their (tile, K step) pairs, tile after tile, cut into equal runs, one per
    program. A program sums each tile's steps; a tile it holds whole goes through the epilogue, a
    tail tile shared with the neighbouring runs goes to its part of a float32 workspace laid out
    as the tail's rows of the output (part j: the tile's j-th run), and one elementwise XLA pass
    adds the parts of the shared tiles (a static count per tile), finishes them and transposes the
    output: no gather, and only the tail's rows of the workspace are read (at M = 64, N = 18432:
    12 of 144 tiles, where stream-K over all of them shared almost every tile). Every SM streams
    the same number of weight bytes whatever the tile count, which at small M (where N / 128
    tiles may be 48 or 72 for 132 SMs) is what sets the time.
  Every step's product goes to a fresh accumulator (the per-group scales need that anyway, and at
  small M it is a few registers) and is added to a float32 sum carried by the pipeline.

Measured on the H200 (benchmarks/results/w4a16_matmul.md, benchmarks/notes/w4a16_matmul.md):
faster than the XLA bf16 GEMM up to M = 64, slower beyond; the notes say where the time goes and
what to try next.

Accuracy: the weights enter the tensor cores as their exact int4 codes and the scales multiply the
float32 accumulator, so the kernel is at least as accurate as the XLA reference
(`convrot_jax.linear.int4_weight_only_linear`, which rounds code * scale to bf16 first).

M need not be a multiple of tile_m: the wrapper pads the activation rows. N must be a multiple
of 2 * tile_n and K of tile_k; the FLUX and T5 shapes are. `interpret=True` runs the kernel on the
CPU (Mosaic GPU interpret mode); there the unpack uses jnp ops and wgmma's A operand is staged
through shared memory (interpret mode's wgmma takes no register operand), so the GPU tests are the
ones that check the register routines.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.int4_unpack import check_packed_operands, check_weight_operands, permute_k32, unpack_tile
from pallas_kernels.smem import swizzle_transforms
from pallas_kernels.tile_schedule import sm_count
from pallas_kernels.w4a16_matmul_config import W4A16MatmulConfig, config_for


class _Plan(NamedTuple):
    """The kernel's static choices for one call (`_plan`)."""

    config: W4A16MatmulConfig
    tiles: tuple[int, int]  # (m tiles, n tiles) of 2 * tile_n rows
    k_steps: int
    programs: int
    grouped: bool  # per-group scales: every step is one scale group (tile_k == scale_group)
    interpret: bool
    full_rounds: int  # whole tiles each program runs first (tile p + r * programs in round r)
    run: int  # then the (tile, K step) pairs of the tail tiles each program runs (stream-K)

    @property
    def acc_shape(self) -> tuple[int, int]:
        return (self.config.tile_n, self.config.tile_m)

    @property
    def first_tail(self) -> int:
        """The first tile of the stream-K tail (tiles in `_tile_coords` order)."""
        return self.full_rounds * self.programs

    @property
    def tail_steps(self) -> int:
        return (math.prod(self.tiles) - self.first_tail) * self.k_steps

    @property
    def steps(self) -> int:
        """Each program's pipeline steps: its whole tiles' and its tail run's."""
        return self.full_rounds * self.k_steps + self.run

    @property
    def first_tail_n(self) -> int:
        """The first n tile holding a tail tile: the workspace covers n tiles from there on."""
        return self.first_tail // self.tiles[0]


def _plan(config: W4A16MatmulConfig, tiles: tuple[int, int], k_steps: int, grouped: bool, interpret: bool,
          sms: int) -> _Plan:
    """Whole tiles while every SM has one (data-parallel rounds), then the remaining tiles' (tile,
    K step) pairs cut into equal runs, one per SM (stream-K): every SM streams the same number of
    weight bytes, and only the tail tiles can be shared between programs."""
    full_rounds, tail = divmod(math.prod(tiles), sms)
    run = -(-tail * k_steps // sms)
    programs = sms if full_rounds else -(-tail * k_steps // run)
    return _Plan(config, tiles, k_steps, programs, grouped, interpret, full_rounds, run)


class _Refs(NamedTuple):
    x: object  # bf16 (M, K) activations, K permuted by `permute_k32`, gmem
    w: object  # uint8 (N, K / 2) packed weights, gmem
    sw: object  # float32 (N,), or (K / g, N) per group, gmem
    bias: object | None  # (N,) in the caller's float dtype, gmem
    out: object  # (N, M) gmem
    ws: object  # float32 (parts, the tail's rows, M): shared tiles' partial sums, part j from the j-th run, gmem
    a_smem: object | None  # bf16 (2, tile_n, tile_k) wgmma A staging, smem (interpret mode only)


def _pipeline(plan: _Plan, body, compute_context, steps: int, x_map, w_map):
    cfg = plan.config
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(steps,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((tm, tk), x_map, transforms=swizzle_transforms(tk, 2)),
            plgpu.BlockSpec((2 * tn, tk // 2), w_map, transforms=swizzle_transforms(tk // 2)),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
    )


def _step_product(plan: _Plan, refs: _Refs, wg: jax.Array, x_smem, w_smem, rows, group) -> jax.Array:
    """This warpgroup's float32 (tile_n, tile_m) product of the step: its weight rows converted to
    bf16 in registers, one wgmma into a fresh accumulator (waited for: A's registers are reused by
    the next step's unpack), times the step's group scales with per-group scales."""
    tn = plan.config.tile_n
    with jax.named_scope("unpack"):
        a = unpack_tile(w_smem.at[pl.ds(wg * tn, tn)], "bf16_wgmma_k32", interpret=plan.interpret)
    if plan.interpret:
        refs.a_smem[wg] = a
        plgpu.commit_smem()
        a = refs.a_smem.at[wg]

    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(plan.acc_shape, jnp.float32))
    def part(acc_ref):
        plgpu.wgmma(acc_ref, a, x_smem.T)
        return acc_ref[...]

    if plan.grouped:
        sw = plgpu.load(refs.sw.at[group, rows], optimized=False)
        part = part * lax.broadcast_in_dim(sw, plan.acc_shape, (0,))
    return part


def _epilogue(plan: _Plan, refs: _Refs, rows, m0, acc: jax.Array) -> None:
    """A finished float32 (tile_n, tile_m) sum: scaled (per channel), biased, cast, stored."""
    shape = plan.acc_shape

    def along_n(ref):
        return lax.broadcast_in_dim(plgpu.load(ref.at[rows], optimized=False).astype(jnp.float32), shape, (0,))

    with jax.named_scope("epilogue"):
        if not plan.grouped:
            acc = acc * along_n(refs.sw)
        if refs.bias is not None:
            acc = acc + along_n(refs.bias)
        refs.out.at[rows, pl.ds(m0, plan.config.tile_m)][...] = acc.astype(refs.out.dtype)


def _tile_coords(plan: _Plan, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(m tile, n tile) of tile t: tiles in n-major, m-minor order (the m tiles of one weight
    block run back to back, so its second read finds it in L2)."""
    return t % plan.tiles[0], t // plan.tiles[0]


def _program_step(plan: _Plan, program: jax.Array, s: jax.Array):
    """Program `program`'s step s: (tile, K step, g, valid). The first full_rounds * k_steps steps
    run its whole tiles; the rest its tail run, pairs g in [program R, (program + 1) R) of the
    tail's (tile, K step) sequence (R = `plan.run`; g = -1 in the whole tiles). Steps past the
    tail's end (part of the last run, all of the runs of programs after it) reload the last pair
    and are not valid."""
    dp = plan.full_rounds * plan.k_steps
    in_tail = s >= dp
    g = program * plan.run + s - dp
    g_c = jnp.clip(g, 0, max(plan.tail_steps - 1, 0))
    tile = jnp.where(in_tail, plan.first_tail + g_c // plan.k_steps, program + (s // plan.k_steps) * plan.programs)
    kk = jnp.where(in_tail, g_c % plan.k_steps, s % plan.k_steps)
    return tile, kk, jnp.where(in_tail, g, -1), jnp.logical_or(jnp.logical_not(in_tail), g < plan.tail_steps)


def _run_program(plan: _Plan, refs: _Refs, allocs) -> None:
    """One pipeline over the program's steps (`_program_step`), summing each tile's steps; a tile
    it holds whole goes through the epilogue, a tail tile shared with its neighbours goes to its
    workspace part (this program's place among the runs that share it) for `_finish`."""
    cfg = plan.config
    tm, tn = cfg.tile_m, cfg.tile_n
    wg = lax.axis_index("wg")
    program = lax.axis_index("sm")
    g0 = program * plan.run

    def x_map(s):
        tile, kk, _, _ = _program_step(plan, program, s)
        return _tile_coords(plan, tile)[0], kk

    def w_map(s):
        tile, kk, _, _ = _program_step(plan, program, s)
        return _tile_coords(plan, tile)[1], kk

    def body(idxs, x_smem, w_smem, acc):
        (s,) = idxs
        tile, kk, g, valid = _program_step(plan, program, s)
        mi, ni = _tile_coords(plan, tile)
        rows = pl.ds(ni * (2 * tn) + wg * tn, tn)
        with jax.named_scope("mainloop"):
            acc = acc + _step_product(plan, refs, wg, x_smem, w_smem, rows, kk)
        tile_end = kk == plan.k_steps - 1
        run_end = s == plan.steps - 1
        began_here = jnp.logical_or(g < 0, g - kk >= g0)  # a whole tile, or a tail tile begun in this run

        @pl.when(jnp.logical_and(jnp.logical_or(tile_end, run_end), valid))
        def _emit():
            whole = jnp.logical_and(began_here, tile_end)

            @pl.when(whole)
            def _finished():
                _epilogue(plan, refs, rows, mi * tm, acc)

            @pl.when(jnp.logical_not(whole))
            def _shared():
                part = program - (g - kk) // plan.run  # the run where the tile began is part 0
                ws_rows = pl.ds((ni - plan.first_tail_n) * (2 * tn) + wg * tn, tn)
                refs.ws.at[part, ws_rows, pl.ds(mi * tm, tm)][...] = acc

        return acc * jnp.where(jnp.logical_or(tile_end, run_end), 0.0, 1.0).astype(jnp.float32)

    def compute_context(eval_pipeline):
        eval_pipeline(jnp.zeros(plan.acc_shape, jnp.float32))

    _pipeline(plan, body, compute_context, plan.steps, x_map, w_map)(refs.x, refs.w, allocations=allocs)


def _kernel(x_gmem, w_gmem, sw_gmem, bias_gmem, out_gmem, ws_gmem, *, plan: _Plan) -> None:
    cfg = plan.config
    ignore = lambda *_, **__: None  # allocations do not depend on the bodies
    first_blocks = lambda s: (0, s)  # noqa: E731  (neither do the index maps)

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=_pipeline(plan, ignore, ignore, plan.steps, first_blocks, first_blocks).get_allocations(
            x_gmem, w_gmem),
        a_smem=plgpu.SMEM((2, cfg.tile_n, cfg.tile_k), jnp.bfloat16, transforms=swizzle_transforms(cfg.tile_k, 2))
        if plan.interpret else None,
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, a_smem):
        refs = _Refs(x_gmem, w_gmem, sw_gmem, bias_gmem, out_gmem, ws_gmem, a_smem)
        _run_program(plan, refs, pipeline_allocs)


def _check_operands(x, w_packed, w_scales, bias, scale_group) -> None:
    """Raises ValueError naming the operand and shape at fault."""
    _, k, n = check_packed_operands("x", x, jnp.bfloat16, w_packed)
    check_weight_operands(k, n, w_scales, scale_group, bias)


def _shared_parts(plan: _Plan) -> np.ndarray:
    """(n tiles from `first_tail_n` on, m tiles): how many runs share each output tile (0: one
    program holds it whole)."""
    t = np.arange(math.prod(plan.tiles) - plan.first_tail)
    first, last = t * plan.k_steps // max(plan.run, 1), ((t + 1) * plan.k_steps - 1) // max(plan.run, 1)
    whole_before = np.zeros(plan.first_tail % plan.tiles[0], int)  # the first tail n tile's whole tiles
    parts = np.concatenate([whole_before, np.where(first == last, 0, last - first + 1)])
    return parts.reshape(-1, plan.tiles[0])


def _finish(y, ws, w_scales, bias, plan: _Plan, parts: np.ndarray, m: int) -> jax.Array:
    """The (M, N) output from the kernel's (N, M_pad) one: the tail's shared tiles (`parts`, the
    plan's `_shared_parts`) are the sums of their workspace parts in run order, scaled and biased
    as the epilogue does; the rest is the kernel's. One XLA pass (the parts' sum, the select, the
    join, the transpose and the slice fuse into one loop) that reads only the tail's rows of the
    workspace."""
    if parts.any():
        tiles_m, cta_n, tm = plan.tiles[0], 2 * plan.config.tile_n, plan.config.tile_m
        r0 = plan.first_tail_n * cta_n

        def tiled(a):  # (..., R, M_pad) -> (..., R / cta_n, cta_n, m tiles, tile_m)
            return a.reshape(*a.shape[:-2], a.shape[-2] // cta_n, cta_n, tiles_m, tm)

        def along_n(v):
            return v[r0:].astype(jnp.float32).reshape(-1, cta_n, 1, 1)

        count = jnp.asarray(parts[:, None, :, None].astype(np.int32))
        acc = sum(jnp.where(j < count, tiled(ws[j]), 0.0) for j in range(ws.shape[0]))
        if not plan.grouped:
            acc = acc * along_n(w_scales)
        if bias is not None:
            acc = acc + along_n(bias)
        tail = jnp.where(count > 0, acc.astype(y.dtype), tiled(y[r0:])).reshape(y[r0:].shape)
        y = jnp.concatenate([y[:r0], tail]) if r0 else tail
    return y.T[:m]


# Jitted with the settings static: every call at the same shapes shares one traced kernel.
@functools.partial(jax.jit, static_argnames=("scale_group", "out_dtype", "config", "interpret"))
def w4a16_matmul(
    x: jax.Array,
    w_packed: jax.Array,
    w_scales: jax.Array,
    bias: jax.Array | None = None,
    *,
    scale_group: int | None = None,
    out_dtype: jnp.dtype = jnp.bfloat16,
    config: W4A16MatmulConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """(M, N) = x . (unpack(w_packed) * w_scales)^T (+ bias), float32 accumulation.

    x: bfloat16 (M, K) (for ConvRot, already rotated); w_packed: uint8 (N, K/2), low nibble =
    even k; w_scales: float32 (N,), or (N, K / scale_group) with `scale_group` (a multiple of 64);
    bias: (N,) or None. config: default `config_for(M, N, K, scale_group)`. interpret: Mosaic GPU
    interpret mode (CPU tests).
    """
    _check_operands(x, w_packed, w_scales, bias, scale_group)
    m, k = x.shape
    n = w_packed.shape[0]
    if m == 0:
        return jnp.zeros((0, n), out_dtype)
    cfg = config or config_for(m, n, k, scale_group)
    if scale_group is not None and cfg.tile_k != scale_group:
        raise ValueError(f"per-group scales need tile_k == scale_group ({scale_group}), got {cfg}")
    if n % (2 * cfg.tile_n) or k % cfg.tile_k:
        raise ValueError(f"N={n} must be a multiple of {2 * cfg.tile_n} and K={k} of {cfg.tile_k} for {cfg}")

    m_pad = -(-m // cfg.tile_m) * cfg.tile_m
    x = permute_k32(x)
    if m_pad != m:
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
    # Per-group scales go in as (K / g, N) so that a group's row of N scales is contiguous.
    sw = w_scales.astype(jnp.float32) if scale_group is None else w_scales.astype(jnp.float32).T

    plan = _plan(cfg, (m_pad // cfg.tile_m, n // (2 * cfg.tile_n)), k // cfg.tile_k, scale_group is not None,
                 interpret, sm_count(interpret))
    parts = _shared_parts(plan)  # the workspace covers the tail's n tiles (one unused tile if there is no tail)
    out_types = (jax.ShapeDtypeStruct((n, m_pad), out_dtype),
                 jax.ShapeDtypeStruct((max(1, int(parts.max(initial=0))), max(1, parts.shape[0]) * 2 * cfg.tile_n,
                                       m_pad), jnp.float32))
    operands = [x, w_packed, sw] + ([] if bias is None else [bias])  # bias: float32 where it is read

    def kernel(x_ref, w_ref, sw_ref, *rest):
        bias_ref, (out_ref, ws_ref) = (rest[0], rest[1:]) if bias is not None else (None, rest)
        _kernel(x_ref, w_ref, sw_ref, bias_ref, out_ref, ws_ref, plan=plan)

    f = plgpu.kernel(
        kernel,
        out_type=out_types,
        grid=(plan.programs,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    y, ws = f(*operands)
    return _finish(y, ws, sw, bias, plan, parts, m)
