"""W4A4 GEMM on Hopper (sm_90): int8 activation codes x packed int4 weights -> dequantized output.

    y (M, N) = (q_x (M, K) . unpack(q_w) (N, K)^T) * s_x[:, None] * s_w[None, :] (+ bias)

with exact int32 accumulation on the int8 tensor cores (`wgmma` s8 x s8 -> s32; Hopper has no
int4 tensor cores) and the scales and bias applied in the epilogue, so the only HBM traffic is
the int8 activations, the packed weights (K/2 bytes a row), the scales and the output.

Structure (Pallas Mosaic GPU, warp-specialised, after jax's `hopper_matmul_mgpu.py`):
  * a memory warpgroup streams the activation tile (tile_m, tile_k) int8 and the packed weight
    tile (2 * tile_n, tile_k / 2) uint8 into a `max_concurrent_steps`-deep ring of shared-memory
    stages by TMA;
  * two compute warpgroups, each owning tile_n output columns, each unpacking its own packed
    weight rows in registers (low nibble = even k, docs/design.md §4; the register layouts line up so
    that the packed bytes a thread holds become the codes it holds after the unpack). Two forms
    (`W4A4MatmulConfig.weight_operand`):
    - "registers" (the shipped form from M = 512): the unpacked int8 weights stay in registers as
      wgmma's A operand, `wgmma(acc (tile_n, tile_m), w8, x_smem.T)`, and the epilogue stores the
      (N, M) accumulator transposed into the output tile (stmatrix .trans). No int8 staging in
      shared memory, which the smem form is bound by. Each step waits for its wgmma before the
      next unpack: wgmma reads A's registers asynchronously, and a version that unpacked step k+1
      while step k ran (A kept alive by a loop-carried optimization barrier) gave wrong sums on
      the H100. The two compute warpgroups still overlap each other's unpack and MMA.
    - "smem": the int8 tile goes to a double-buffered shared-memory slot (stmatrix) and
      `wgmma(acc (tile_m, tile_n), x_smem, w8_smem.T)` keeps one step in flight, so the unpack of
      step k+1 overlaps the MMA of step k. Per-group scales and few-tile shapes use it.
    The weight is never unpacked through HBM.
  * epilogue: acc (int32) -> f32 * s_x * s_w (+ bias) -> out dtype, through shared memory and TMA.
  * schedule (`TileSchedule`): a persistent grid of one program per SM walks the output tiles in
    planar-snake order. In the registers form a program's pipelines chain: the memory warpgroup
    streams the next tile's first stages while the compute warpgroups run this tile's epilogue.
    The last, partial wave of tiles is split along K over the SMs it would leave idle; those K
    pieces write int32 partial sums to a workspace, and two small XLA ops add them (exact) and
    dequantize them into place. (H100, M = 4608, K = 12288, N = 3072: 1.57x bf16 before, 1.81x
    with both, 1.91x with the snake's band width 8 as well.)
Per-group weight scales (`scale_group` g along K): the kernel takes tile_k = g and folds each
group's int32 partial product into an f32 accumulator with its scale (one wgmma wait per group:
slower than per-channel, which is the default quantization).

M need not be a multiple of the tile: the wrapper pads the activation rows (a copy of M x K bytes,
only when M is not a multiple of tile_m) and slices the output. N must be a multiple of
2 * tile_n and K of tile_k; the FLUX shapes are.

Where it runs: NVIDIA Hopper (sm_90) only. `convrot_jax.ops.w4a4_linear(implementation="auto")`
uses it on sm_90 and the XLA reference elsewhere (Ampere/Ada int4 `mma` paths are not built: we
cannot test them). `interpret=True` runs the kernel on the CPU through Mosaic GPU interpret mode
(with XLA's concurrency-optimized CPU scheduler off: see tests/conftest.py); there the nibble
unpack is done with jnp ops instead of the register-level `inline_mgpu` routine (which interpret
mode cannot run), and the registers form stages its A operand through shared
memory and transposes its output tile before a plain store (interpret mode's wgmma takes no
register operand and cannot store through a transposed view), so the GPU tests are the ones that
check those routines.

Configs: `config_for(m, n, k)` picks a tuned tile config from `w4a4_matmul_configs.json`
(measured on an H100, benchmarks/results/w4a4_matmul.md); any config can be passed explicitly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

from convrot_jax.linear import dequantized_matmul_reference
from convrot_jax.quant import QuantizedWeight

_CONFIG_FILE = pathlib.Path(__file__).with_name("w4a4_matmul_configs.json")


@dataclasses.dataclass(frozen=True)
class W4A4MatmulConfig:
    """Block sizes. The CTA computes a (tile_m, 2 * tile_n) output tile, one tile_n-wide half per
    compute warpgroup; K advances tile_k codes (tile_k / 2 packed bytes) a pipeline step."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    max_concurrent_steps: int = 4
    epi_tile_m: int = 64
    epi_tile_n: int = 64
    grid_minor_dim: str = "n"  # which output-tile index varies fastest: "m" or "n"
    grid_tile_width: int = 1  # planar-snake band width of the persistent tile order
    # "smem": unpacked weights go through a shared-memory slot, wgmma(x_smem, w8_smem.T), acc (M, N).
    # "registers": unpacked weights stay in registers as wgmma's A operand, wgmma(w8, x_smem.T), acc
    # (N, M), stored transposed into the output tile (stmatrix .trans).
    weight_operand: str = "smem"
    # Split the tiles of the last, partial wave along K over the SMs the wave leaves idle
    # (`tile_schedule`); their int32 partial sums are added and dequantized after the kernel.
    split_tail: bool = True

    def __post_init__(self):
        if self.tile_m % 64 or self.tile_n % 64 or self.tile_k % 64:
            raise ValueError(f"tile_m, tile_n, tile_k must be multiples of 64: {self}")
        if self.tile_m % self.epi_tile_m or self.tile_n % self.epi_tile_n:
            raise ValueError(f"epilogue tiles must divide the output tile: {self}")
        if self.grid_minor_dim not in ("m", "n"):
            raise ValueError(f"grid_minor_dim must be 'm' or 'n': {self}")
        if self.weight_operand not in ("smem", "registers"):
            raise ValueError(f"weight_operand must be 'smem' or 'registers': {self}")


def _load_config_table() -> list[dict]:
    if not _CONFIG_FILE.exists():
        return []
    return json.loads(_CONFIG_FILE.read_text())["configs"]


def config_for(m: int, n: int, k: int, scale_group: int | None = None) -> W4A4MatmulConfig:
    """The shipped config for this problem: the table row with the largest `min_m` <= m whose
    (n, k) match, else a row with n = k = null (any shape), else the default. Per-group scales
    take the smem form with tile_k = scale_group and tile_m = 64 (room for the second, f32
    accumulator)."""
    best = None
    for row in _load_config_table():
        if row["min_m"] > m or (row["n"], row["k"]) not in ((n, k), (None, None)):
            continue
        key = (row["n"] is not None, row["min_m"])
        if best is None or key > best[0]:
            best = (key, row)
    cfg = W4A4MatmulConfig(**best[1]["config"]) if best else W4A4MatmulConfig()
    if scale_group is not None:  # the smem form, as verified on the GPU; 64 x 256 CTA tiles by default
        tile_n = cfg.tile_n if cfg.weight_operand == "smem" else 128
        cfg = dataclasses.replace(cfg, tile_m=64, tile_n=tile_n, tile_k=scale_group, epi_tile_m=64, weight_operand="smem")
    return cfg


def _swizzle_transforms(minor_elems: int, itemsize: int = 1) -> tuple:
    """Shared-memory tiling + the widest swizzle for rows of `minor_elems` elements."""
    swizzle = plgpu.find_swizzle(minor_elems * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _unpack_tile_gpu(packed: jax.Array, *, for_registers: bool = False) -> jax.Array:
    """uint8 (R, C/2) packed codes (a shared-memory ref) -> int8 (R, C) codes, register-local.

    Source and result layouts have the same register structure with columns scaled by 2: a
    thread's vector of packed bytes holds exactly the codes that the result layout gives it in the
    same register slot. So the unpack reinterprets the bits as int4 (LLVM orders vector<Nxi4> from
    the low nibble up, which is our even-k-low format) and uses Mosaic's int4 -> int8 conversion
    (prmt/lop3 sign extension).
      for_registers=False: WGMMA_8BIT (4 bytes a thread, ldmatrix) -> WGMMA_UPCAST_4X (8 codes),
        stored to shared memory with 8-byte stores;
      for_registers=True: WGMMA (2 bytes a thread) -> WGMMA_8BIT (4 codes), wgmma's A layout."""
    import jax.experimental.mosaic.gpu as mgpu
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    rows, half = packed.shape
    if for_registers:
        src_layout, dst_layout, dst_mgpu, nibbles = (
            plgpu.Layout.WGMMA, plgpu.Layout.WGMMA_8BIT, mgpu.WGMMA_LAYOUT_8BIT, 4)
    else:
        src_layout, dst_layout, dst_mgpu, nibbles = (
            plgpu.Layout.WGMMA_8BIT, plgpu.Layout.WGMMA_UPCAST_4X, mgpu.WGMMA_LAYOUT_UPCAST_4X, 8)

    @plgpu.inline_mgpu(
        arg_types=(src_layout,),
        return_type=plgpu.ShapeDtypeStruct((rows, 2 * half), jnp.int8, layout=dst_layout),
    )
    def unpack(_, src):
        i4_vec = ir.VectorType.get((nibbles,), ir.IntegerType.get_signless(4))
        regs = np.empty_like(src.registers)
        for idx, reg in np.ndenumerate(src.registers):
            regs[idx] = mgpu_utils.bitcast(reg, i4_vec)
        as_i4 = mgpu.FragmentedArray(_registers=regs, _layout=dst_mgpu, _is_signed=True)
        if as_i4.shape != (rows, 2 * half):
            raise AssertionError(f"register layouts do not line up: {as_i4.shape} vs {(rows, 2 * half)}")
        return as_i4.astype(ir.IntegerType.get_signless(8), is_signed=True)

    return unpack(plgpu.load(packed, layout=src_layout))


def _acc_shape(config: W4A4MatmulConfig) -> tuple[int, int]:
    """A compute warpgroup's accumulator: (N, M) in the registers form (the weights are wgmma's
    A operand), (M, N) in the smem form."""
    tm, tn = config.tile_m, config.tile_n
    return (tn, tm) if config.weight_operand == "registers" else (tm, tn)


def _tile_coords(lin: jax.Array, tiles: tuple[int, int], config: W4A4MatmulConfig) -> tuple[jax.Array, jax.Array]:
    """(m tile, n tile) of the `lin`-th output tile in the kernel's planar-snake order."""
    minor = 1 if config.grid_minor_dim == "n" else 0
    return plgpu.planar_snake(lin, tiles, minor, config.grid_tile_width)


def _raw_output_transposed(config: W4A4MatmulConfig, raw: bool) -> bool:
    """The registers form writes its raw int32 accumulator as an (N, M) array (Mosaic has no
    transposed 32-bit shared-memory store); the wrapper transposes it (a test-only path)."""
    return config.weight_operand == "registers" and raw


def _unpack_tile_interpret(packed, *, for_registers: bool = False) -> jax.Array:
    del for_registers
    p = packed[...].astype(jnp.int8)
    low = lax.shift_right_arithmetic(lax.shift_left(p, jnp.int8(4)), jnp.int8(4))
    high = lax.shift_right_arithmetic(p, jnp.int8(4))
    return jnp.stack([low, high], axis=-1).reshape(p.shape[0], 2 * p.shape[1])


@dataclasses.dataclass(frozen=True)
class TileSchedule:
    """How the persistent grid covers the (m_tiles x n_tiles) output tiles; all static.

    Program p first runs `full_rounds` whole tiles, p + r * programs in the planar-snake order.
    Then programs p < `units` run one tail unit each: K piece p // tail_tiles (of `splits`) of
    tail tile `first_tail + p % tail_tiles`. With splits == 1 a unit is a whole tile; with
    splits > 1 it writes its int32 partial sum to a workspace that the wrapper adds up and
    dequantizes, so the last, partial wave of tiles keeps `units` SMs busy for 1 / splits of
    a tile's time instead of `tail_tiles` SMs for all of it."""

    programs: int
    full_rounds: int
    tail_tiles: int
    splits: int

    @property
    def units(self) -> int:
        return self.tail_tiles * self.splits

    @property
    def first_tail(self) -> int:
        return self.full_rounds * self.programs


def tile_schedule(tiles: int, k_steps: int, sms: int, stages: int, split: bool) -> TileSchedule:
    """The split of the tail tiles: the most pieces that fit on the SMs with every piece a whole
    number of pipeline rings (`stages` steps), which chained pipelines need."""
    full_rounds, tail = divmod(tiles, sms)
    splits = 1
    if split and tail:
        splits = next((s for s in range(sms // tail, 1, -1) if k_steps % s == 0 and (k_steps // s) % stages == 0), 1)
    programs = sms if full_rounds else tail * splits
    return TileSchedule(programs, full_rounds, tail, splits)


def _kernel(x_gmem, w_gmem, sx_gmem, sw_gmem, bias_gmem, out_gmem, ws_gmem, *, config: W4A4MatmulConfig,
            schedule: TileSchedule, scale_group: int | None, raw: bool, interpret: bool):
    m, k = x_gmem.shape
    n = w_gmem.shape[0]
    tm, tn, tk = config.tile_m, config.tile_n, config.tile_k
    cta_n = 2 * tn
    m_iters, n_iters, k_iters = m // tm, n // cta_n, k // tk
    piece_steps = k_iters // schedule.splits
    out_dtype = out_gmem.dtype
    epi_m, epi_n = config.epi_tile_m, config.epi_tile_n
    num_out_slots = min(2, (tm * tn) // (epi_m * epi_n))
    out_bytes = jnp.dtype(out_dtype).itemsize
    unpack = _unpack_tile_interpret if interpret else _unpack_tile_gpu
    # Per-group scales: every step is one scale group (tile_k == scale_group).
    grouped = scale_group is not None
    in_regs = config.weight_operand == "registers"
    acc_shape = _acc_shape(config)
    m_dim, n_dim = (1, 0) if in_regs else (0, 1)  # acc axes of the M (tokens) and N (features)
    out_nm = _raw_output_transposed(config, raw)
    out_tile = (epi_n, epi_m) if out_nm else (epi_m, epi_n)
    # The registers form waits for every step's wgmma, so its pipeline can release a stage as
    # soon as the step is done, and then consecutive tiles' pipelines chain (`pipeline_state`):
    # the memory warpgroup loads the next tile's first stages while this tile's epilogue runs.
    # The smem form reads a stage one step later (delay_release=1), which chaining does not allow.
    # Chaining needs every pipeline to be whole rings of stages (`tile_schedule` makes K pieces so).
    chained = in_regs and not grouped and k_iters % config.max_concurrent_steps == 0
    delay_release = 0 if in_regs or grouped else 1

    def get_pipeline(body, compute_context, steps=k_iters, state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=_swizzle_transforms(tk),
                                delay_release=delay_release),
                plgpu.BlockSpec((cta_n, tk // 2), lambda kk: (0, kk), transforms=_swizzle_transforms(tk // 2),
                                delay_release=delay_release),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=config.max_concurrent_steps,
            compute_context=compute_context,
            pipeline_state=state if chained else None,
        )

    ignore = lambda *_, **__: None  # allocations do not depend on the bodies

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
        # Interpret mode's wgmma takes no register operand: there the registers form stages the
        # unpacked weights through shared memory too (same orientation, same epilogue).
        w8_smem=None if in_regs and not interpret else plgpu.SMEM(
            (2, 2, tn, tk), jnp.int8, transforms=_swizzle_transforms(tk)),
        out_smem=plgpu.SMEM((2, num_out_slots, *out_tile), out_dtype,
                            transforms=_swizzle_transforms(out_tile[1], out_bytes)),
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, w8_smem, out_smem):
        wg = lax.axis_index("wg")
        program = lax.axis_index("sm")

        def run_tile(lin, state, piece=None):
            """Computes output tile `lin` (planar-snake order), or K piece `piece` of it into the
            workspace, as one pipeline over its K steps."""
            mi, ni = _tile_coords(lin, (m_iters, n_iters), config)
            m_slice = pl.ds(mi * tm, tm)
            cta_n_slice = pl.ds(ni * cta_n, cta_n)
            wg_n0 = ni * cta_n + wg * tn
            wg_n_slice = pl.ds(wg_n0, tn)

            def epilogue(acc):
                """acc: float32 (or int32 when raw), `acc_shape`, for this warpgroup's columns."""
                if not raw:
                    sx = plgpu.load(sx_gmem.at[m_slice], optimized=False)
                    acc = acc * lax.broadcast_in_dim(sx, acc_shape, (m_dim,))
                    if not grouped:
                        sw = plgpu.load(sw_gmem.at[wg_n_slice], optimized=False)
                        acc = acc * lax.broadcast_in_dim(sw, acc_shape, (n_dim,))
                    if bias_gmem is not None:
                        b = plgpu.load(bias_gmem.at[wg_n_slice], optimized=False)
                        acc = acc + lax.broadcast_in_dim(b, acc_shape, (n_dim,))
                acc = acc.astype(out_dtype)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                for ei in range(tm // epi_m):
                    for ej in range(tn // epi_n):
                        slot = (ei * (tn // epi_n) + ej) % num_out_slots
                        plgpu.wait_smem_to_gmem(num_out_slots - 1, wait_read_only=True)
                        rows, cols = slice(ei * epi_m, (ei + 1) * epi_m), slice(ej * epi_n, (ej + 1) * epi_n)
                        gm, gn = pl.ds(mi * tm + ei * epi_m, epi_m), pl.ds(wg_n0 + ej * epi_n, epi_n)
                        if out_nm:
                            out_smem[wg, slot] = acc[cols, rows]
                        elif in_regs and interpret:  # interpret mode cannot store through a .T view
                            out_smem[wg, slot] = acc[cols, rows].T
                        elif in_regs:  # transposing store (stmatrix .trans)
                            out_smem.at[wg, slot].T[...] = acc[cols, rows]
                        else:
                            out_smem[wg, slot] = acc[rows, cols]
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out_gmem.at[gn, gm] if out_nm else out_gmem.at[gm, gn])

            def mma(acc_ref, kk, x_smem, w_smem):
                """Unpacks this warpgroup's weight rows and issues the step's wgmma."""
                w_half = w_smem.at[pl.ds(wg * tn, tn)]
                slot = kk % 2
                if in_regs and not interpret:
                    plgpu.wgmma(acc_ref, unpack(w_half, for_registers=True), x_smem.T)
                    return
                w8_smem[wg, slot] = unpack(w_half)
                plgpu.commit_smem()
                if in_regs:
                    plgpu.wgmma(acc_ref, w8_smem.at[wg, slot], x_smem.T)
                else:
                    plgpu.wgmma(acc_ref, x_smem, w8_smem.at[wg, slot].T)

            if not grouped:
                def compute_context(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(acc_shape, jnp.int32))
                    def _acc_scope(acc_ref):
                        eval_pipeline(acc_ref)
                        acc = acc_ref[...]
                        if piece is not None:  # a K piece of a split tile: its int32 partial sum
                            ws_gmem.at[piece, lin - schedule.first_tail, wg][...] = acc
                        else:
                            epilogue(acc if raw else acc.astype(jnp.float32))

                def body(idxs, x_smem, w_smem, acc_ref):
                    (kk,) = idxs
                    mma(acc_ref, kk, x_smem, w_smem)
                    # The registers form's A operand lives in registers that the next unpack may
                    # reuse: wait for this step's wgmma (its stage is released right after). The
                    # smem form keeps one in flight.
                    plgpu.wgmma_wait(0 if in_regs else 1)
                    return acc_ref

            else:
                def compute_context(eval_pipeline):
                    facc = eval_pipeline(jnp.zeros(acc_shape, jnp.float32))
                    epilogue(facc)

                def body(idxs, x_smem, w_smem, facc):
                    (kk,) = idxs

                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(acc_shape, jnp.int32))
                    def part(acc_ref):
                        mma(acc_ref, kk, x_smem, w_smem)
                        return acc_ref[...]

                    sw = plgpu.load(sw_gmem.at[kk, wg_n_slice], optimized=False)
                    return facc + part.astype(jnp.float32) * lax.broadcast_in_dim(sw, acc_shape, (n_dim,))

            steps = k_iters if piece is None else piece_steps
            piece_codes = pl.ds(0 if piece is None else pl.multiple_of(piece * steps * tk, steps * tk), steps * tk)
            piece_bytes = pl.ds(0 if piece is None else pl.multiple_of(piece * steps * tk // 2, steps * tk // 2),
                                steps * tk // 2)
            get_pipeline(body, compute_context, steps, state)(
                x_gmem.at[m_slice, piece_codes], w_gmem.at[cta_n_slice, piece_bytes],
                allocations=pipeline_allocs,
            )

        # A program's first pipeline fills the stage ring, the next ones continue it, and the
        # memory warpgroup ends by waiting for the last ring's release, as a STOP pipeline would
        # (whether a program runs one pipeline or more is only known at run time).
        start, steady = plgpu.PipelinePipeline.START, plgpu.PipelinePipeline.STEADY
        if schedule.full_rounds:
            run_tile(program, start)

            @pl.loop(1, schedule.full_rounds)
            def _round(r):
                run_tile(program + r * schedule.programs, steady)

        if schedule.units:
            @pl.when(program < schedule.units)
            def _tail():
                tile = schedule.first_tail + program % schedule.tail_tiles
                piece = program // schedule.tail_tiles if schedule.splits > 1 else None
                run_tile(tile, steady if schedule.full_rounds else start, piece)

        if chained:
            @pl.when(wg == 2)  # the memory warpgroup (the pipeline's last thread)
            def _quiesce():
                [consumed] = pipeline_allocs["flat_consumed_barrier_refs"]
                for slot in range(config.max_concurrent_steps):
                    plgpu.barrier_wait(consumed.at[slot])

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


# Jitted with the settings static: every call at the same shapes in a model shares one traced and
# lowered kernel. Without it, FLUX.1-dev's W4A4 step lowered ~300 copies of each (64 s, 54 MB of
# StableHLO) and compiled for > 200 s; with it, 4 s, 4.5 MB, and the step compiles in 45 s.
@functools.partial(jax.jit, static_argnames=("scale_group", "out_dtype", "config", "return_int32", "interpret"))
def w4a4_matmul(
    x_codes: jax.Array,
    x_scales: jax.Array,
    w_packed: jax.Array,
    w_scales: jax.Array,
    bias: jax.Array | None = None,
    *,
    scale_group: int | None = None,
    out_dtype: jnp.dtype = jnp.bfloat16,
    config: W4A4MatmulConfig | None = None,
    return_int32: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """(M, N) = (x_codes . unpack(w_packed)^T) * x_scales[:, None] * w_scales (+ bias).

    x_codes: int8 (M, K) in [-8, 7]; x_scales: float32 (M,); w_packed: uint8 (N, K/2), low
    nibble = even k; w_scales: float32 (N,), or (N, K / scale_group) with `scale_group`; bias:
    (N,) or None. `return_int32=True` returns the raw int32 accumulator (per-channel layout only;
    scales and bias ignored), for exactness tests.
    """
    if x_codes.ndim != 2 or w_packed.ndim != 2 or x_codes.shape[1] != 2 * w_packed.shape[1]:
        raise ValueError(f"x_codes (M, K) {x_codes.shape} and w_packed (N, K/2) {w_packed.shape} do not match")
    if x_codes.dtype != jnp.int8 or w_packed.dtype != jnp.uint8:
        raise ValueError(f"need int8 x_codes and uint8 w_packed, got {x_codes.dtype} and {w_packed.dtype}")
    m, k = x_codes.shape
    n = w_packed.shape[0]
    if x_scales.shape != (m,):
        raise ValueError(f"x_scales {x_scales.shape} must be (M,) = ({m},)")
    if scale_group is None:
        if w_scales.shape != (n,):
            raise ValueError(f"w_scales {w_scales.shape} must be (N,) = ({n},) without scale_group")
    else:
        if k % scale_group or w_scales.shape != (n, k // scale_group):
            raise ValueError(f"w_scales {w_scales.shape} must be (N, K / scale_group) = ({n}, {k}/{scale_group})")
        if scale_group % 64:
            raise ValueError(f"the kernel needs scale_group a multiple of 64, got {scale_group}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias {bias.shape} must be (N,) = ({n},)")
    if return_int32 and scale_group is not None:
        raise ValueError("return_int32 needs per-channel scales (scale_group=None)")
    cfg = config or config_for(m, n, k, scale_group)
    if scale_group is not None and cfg.tile_k != scale_group:
        raise ValueError(f"per-group scales need tile_k == scale_group ({scale_group}), got {cfg}")
    if n % (2 * cfg.tile_n) or k % cfg.tile_k:
        raise ValueError(f"N={n} must be a multiple of {2 * cfg.tile_n} and K={k} of {cfg.tile_k} for {cfg}")

    if return_int32:  # int32 output staging is twice the bf16 one: one stage less fits in smem.
        cfg = dataclasses.replace(cfg, max_concurrent_steps=min(cfg.max_concurrent_steps, 3))
    m_pad = -(-m // cfg.tile_m) * cfg.tile_m
    if m_pad != m:
        x_codes = jnp.pad(x_codes, ((0, m_pad - m), (0, 0)))
        x_scales = jnp.pad(x_scales, (0, m_pad - m))
    out_t = jnp.int32 if return_int32 else out_dtype
    # Per-group scales go in as (K / g, N) so that a group's row of N scales is contiguous.
    sw = w_scales.astype(jnp.float32) if scale_group is None else w_scales.astype(jnp.float32).T
    operands = [x_codes, w_packed, x_scales.astype(jnp.float32), sw]
    if bias is not None and not return_int32:
        operands.append(bias.astype(jnp.float32))

    out_nm = _raw_output_transposed(cfg, return_int32)
    tiles = (m_pad // cfg.tile_m, n // (2 * cfg.tile_n))
    schedule = tile_schedule(math.prod(tiles), k // cfg.tile_k, _sm_count(interpret), cfg.max_concurrent_steps,
                             cfg.split_tail and scale_group is None)
    out_types = [jax.ShapeDtypeStruct((n, m_pad) if out_nm else (m_pad, n), out_t)]
    if schedule.splits > 1:
        out_types.append(jax.ShapeDtypeStruct((schedule.splits, schedule.tail_tiles, 2, *_acc_shape(cfg)), jnp.int32))

    def kernel(x, w, sx, sw, *rest):
        b, (out, *ws) = rest[:len(operands) - 4], rest[len(operands) - 4:]
        _kernel(x, w, sx, sw, b[0] if b else None, out, ws[0] if ws else None, config=cfg, schedule=schedule,
                scale_group=scale_group, raw=return_int32, interpret=interpret)

    f = plgpu.kernel(
        kernel,
        out_type=tuple(out_types),
        grid=(schedule.programs,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    y, *ws = f(*operands)
    if ws:
        y = _add_split_tiles(y, ws[0], operands[2], sw, operands[4] if len(operands) > 4 else None,
                             config=cfg, schedule=schedule, tiles=tiles, out_nm=out_nm, raw=return_int32)
    y = y.T if out_nm else y
    return y[:m] if m_pad != m else y


def _sm_count(interpret: bool) -> int:
    """Persistent grid: at most one program per SM. Interpret mode takes 4, so that the CPU tests
    also exercise several tiles per program and the split tail."""
    return 4 if interpret else jax.devices()[0].core_count


def _add_split_tiles(y, ws, x_scales, w_scales, bias, *, config: W4A4MatmulConfig, schedule: TileSchedule,
                     tiles: tuple[int, int], out_nm: bool, raw: bool) -> jax.Array:
    """Finishes the tail tiles that the kernel computed as K pieces (`TileSchedule`): adds the
    pieces' int32 partial sums (exact), dequantizes them as the kernel's epilogue does (acc * s_x,
    * s_w, + bias, cast) and writes them into y with one scatter."""
    tm, cta_n = config.tile_m, 2 * config.tile_n
    acc = ws.sum(0, dtype=jnp.int32)  # (tail, warpgroup, *acc_shape)
    order = (0, 3, 1, 2) if config.weight_operand == "registers" else (0, 2, 1, 3)
    acc = acc.transpose(order).reshape(schedule.tail_tiles, tm, cta_n)
    lin = schedule.first_tail + jnp.arange(schedule.tail_tiles, dtype=jnp.int32)
    mi, ni = jax.vmap(lambda i: _tile_coords(i, tiles, config))(lin)
    if raw:
        vals = acc
    else:
        vals = acc.astype(jnp.float32) * x_scales.reshape(-1, tm)[mi][:, :, None]
        vals = vals * w_scales.reshape(-1, cta_n)[ni][:, None, :]
        if bias is not None:
            vals = vals + bias.reshape(-1, cta_n)[ni][:, None, :]
        vals = vals.astype(y.dtype)
    starts = jnp.stack([mi * tm, ni * cta_n], axis=1)
    if out_nm:
        vals, starts = vals.transpose(0, 2, 1), starts[:, ::-1]
    dnums = lax.ScatterDimensionNumbers(update_window_dims=(1, 2), inserted_window_dims=(),
                                        scatter_dims_to_operand_dims=(0, 1))
    return lax.scatter(y, starts, vals, dnums, indices_are_sorted=False, unique_indices=True,
                       mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def w4a4_matmul_reference(
    x_codes: jax.Array,
    x_scales: jax.Array,
    w_packed: jax.Array,
    w_scales: jax.Array,
    bias: jax.Array | None = None,
    *,
    scale_group: int | None = None,
    out_dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
    """The same function in XLA ops: `convrot_jax.linear.dequantized_matmul_reference` (unpack,
    int8 dot with int32 accumulation, scales in the kernel's order), then bias, then the cast."""
    qw = QuantizedWeight(w_packed, w_scales, scale_group=scale_group)
    y = dequantized_matmul_reference(x_codes, x_scales.astype(jnp.float32), qw)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)
