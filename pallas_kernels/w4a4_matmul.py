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
    - "registers": the unpacked int8 weights stay in registers as wgmma's A operand,
      `wgmma(acc (tile_n, tile_m), w8, x_smem.T)`, and the epilogue stores the (N, M)
      accumulator transposed into the output tile (stmatrix .trans). No int8 staging in shared
      memory. Each step waits for its wgmma before the next unpack: wgmma reads A's registers
      asynchronously, and a version that unpacked step k+1 while step k ran (A kept alive by a
      loop-carried optimization barrier) gave wrong sums on the H100. The two compute
      warpgroups still overlap each other's unpack and MMA.
    - "smem": the int8 tile goes to a double-buffered shared-memory slot (stmatrix) and
      `wgmma(acc (tile_m, tile_n), x_smem, w8_smem.T)` keeps one step in flight, so the unpack of
      step k+1 overlaps the MMA of step k. Per-group scales and few-tile shapes use it.
    The weight is never unpacked through HBM.
  * epilogue: acc (int32) -> f32 * s_x * s_w (+ bias) (`dequantize`) -> out dtype, through
    shared memory and TMA. With FLUX's gated residual (gate=, residual=): (* gate) (+ residual,
    `add_residual`) before the one rounding; the residual's epilogue tiles are TMA-loaded into
    the output staging (a slot per epilogue tile) when the tile's main loop starts, so the
    epilogue finds them there and writes each output tile over its residual tile. With a LoRA
    branch (lora_h = (x A^T) * s (M, r) and lora_up = B (N, r), bf16): + h B^T before the gate,
    bf16 wgmmas accumulating onto the dequantized float32 tile, rank chunk by chunk
    (`lora_chunk` columns, the first loaded while the main loop runs): the CTA's h tile in one
    slot both warpgroups read (the first compute warpgroup loads it once both are done with the
    previous chunk), each warpgroup's B tile in its own; a CTA tile multiplies only the chunks
    its B rows' nonzero blocks reach (`lora_ranges`: a fused layer's members carry their own LoRAs).
  * schedule (`pallas_kernels.tile_schedule`): a persistent grid of one program per SM walks the
    output tiles in planar-snake order. In the registers form a program's pipelines chain: the
    memory warpgroup streams the next tile's first stages while the compute warpgroups run this
    tile's epilogue. The last, partial wave of tiles is split along K over the SMs it would leave
    idle; those K pieces write int32 partial sums to a workspace, and two small XLA ops add them
    (exact) and dequantize them into place (`_add_split_tiles`).
Per-group weight scales (`scale_group` g along K): the kernel takes tile_k = g and folds each
group's int32 partial product into an f32 accumulator with its scale (one wgmma wait per group).
Profiles see the named scopes "mainloop" (a pipeline step), "unpack" and "epilogue".

M need not be a multiple of the tile: the wrapper pads the activation rows (a copy of M x K bytes,
only when M is not a multiple of tile_m) and slices the output. With a gate (B, N) it pads each
image's M / B rows to whole tiles instead, so that a tile reads one gate row (FLUX's token counts
are whole tiles: no copy). N must be a multiple of
2 * tile_n and K of tile_k; the FLUX shapes are.

Where it runs: NVIDIA Hopper (sm_90) only; `convrot_jax.ops.w4a4_linear(implementation="auto")`
uses it there and the XLA reference (`pallas_kernels.w4a4_matmul_reference`) elsewhere.
`interpret=True` runs the kernel on the CPU through Mosaic GPU interpret mode (with XLA's
concurrency-optimized CPU scheduler off: see tests/conftest.py); there the nibble unpack is done
with jnp ops instead of the register-level `inline_mgpu` routine (which interpret mode cannot
run), and the registers form stages its A operand through shared memory and transposes its output
tile before a plain store (interpret mode's wgmma takes no register operand and cannot store
through a transposed view), so the GPU tests are the ones that check those routines.

Configs and the shipped tuning table: `pallas_kernels.w4a4_matmul_config`. Measurements:
benchmarks/results/w4a4_matmul.md; notes: benchmarks/notes/w4a4_matmul.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.int4_unpack import check_packed_operands, check_weight_operands, unpack_tile
from pallas_kernels.smem import swizzle_transforms
from pallas_kernels.tile_schedule import TileSchedule, add_pieces, sm_count, tile_coords, tile_schedule
from pallas_kernels.w4a4_matmul_config import W4A4MatmulConfig, config_for
from pallas_kernels.w4a4_matmul_reference import check_gated_residual, check_lora_operands

# A LoRA's B (N, r) is zero outside these rectangles: (row start, row end, rank start, rank end).
LoRABlocks = tuple[tuple[int, int, int, int], ...]


class _Plan(NamedTuple):
    """The kernel's static choices for one call (everything but the refs and program ids)."""

    config: W4A4MatmulConfig
    schedule: TileSchedule
    tiles: tuple[int, int]  # (m tiles, n tiles) of 2 * tile_n columns
    k_steps: int
    grouped: bool  # per-group weight scales: every step is one scale group (tile_k == scale_group)
    int32_out: bool  # the test-only variant (`w4a4_matmul_int32`): raw int32 sums, no dequantize
    interpret: bool
    tiles_per_image: int  # gated residual: m tiles of one image (each image's rows are whole tiles)

    @property
    def in_regs(self) -> bool:
        return self.config.weight_operand == "registers"

    @property
    def acc_shape(self) -> tuple[int, int]:
        return _acc_shape(self.config)

    @property
    def m_dim(self) -> int:
        """The accumulator axis of the M (tokens) dimension; the other one is N's."""
        return 1 if self.in_regs else 0

    @property
    def n_dim(self) -> int:
        return 0 if self.in_regs else 1

    @property
    def out_nm(self) -> bool:
        return _int32_output_transposed(self.config, self.int32_out)

    @property
    def chained(self) -> bool:
        """The registers form waits for every step's wgmma, so its pipeline can release a stage as
        soon as the step is done, and then consecutive tiles' pipelines chain (`pipeline_state`):
        the memory warpgroup loads the next tile's first stages while this tile's epilogue runs.
        The smem form reads a stage one step later (delay_release=1), which chaining does not
        allow. Chaining needs every pipeline to be whole rings of stages (`tile_schedule` makes K
        pieces so)."""
        return self.in_regs and not self.grouped and self.k_steps % self.config.max_concurrent_steps == 0


class _Refs(NamedTuple):
    """The kernel's operands, outputs and scratch."""

    x: object  # int8 (M, K) activation codes, gmem
    w: object  # uint8 (N, K / 2) packed weights, gmem
    sx: object  # float32 (M,) gmem
    sw: object  # float32 (N,), or (K / g, N) per group, gmem
    bias: object | None  # float32 (N,) gmem
    gate: object | None  # float32 (B, N) gmem: the gated residual's per-image gates
    res: object | None  # (M, N) gmem, the output's dtype: the gated residual's residual
    h: object | None  # bf16 (M, rank) gmem: the LoRA down-projection ((x A^T) * s)
    up: object | None  # bf16 (N, rank) gmem: the LoRA up-projection B
    lora_ranges: object | None  # int32 (2 * N / (2 * tile_n),) gmem: each CTA N tile's [first, end) rank chunk
    out: object  # (M, N), or (N, M) for the registers form's int32 variant, gmem
    ws: object | None  # int32 split-tile workspace (splits, tail tiles, 2, *acc_shape), gmem
    w8: object | None  # int8 (2, 2, tile_n, tile_k) unpacked-weight slots, smem (smem form)
    out_smem: object  # (2, slots, *epilogue tile) output staging (with a residual: its tiles too), smem
    res_barriers: object | None  # (2 * slots,) the residual tiles' TMA barriers, warpgroup-major
    lora_h: object | None  # (tile_m, lora_chunk) a chunk of the CTA's h tile, smem, read by both warpgroups
    lora_up: object | None  # (2, tile_n, lora_chunk) a warpgroup's chunk of its B tile, smem
    lora_barriers: object | None  # (3,) their TMA barriers: 0: h, 1 + warpgroup: B
    h_consumed: object | None  # (1,) both warpgroups' arrivals once their MMA has read the h slot


class _Tile(NamedTuple):
    """One warpgroup's part of the output tile in flight."""

    mi: jax.Array  # m tile index
    m0: jax.Array  # first row: mi * tile_m
    n0: jax.Array  # first column of the CTA tile (2 * tile_n wide)
    wg: jax.Array  # compute warpgroup
    wg_n0: jax.Array  # its first column: n0 + wg * tile_n


def dequantize(acc: jax.Array, x_scales: Callable[[], jax.Array], w_scales: Callable[[], jax.Array] | None,
               bias: Callable[[], jax.Array] | None, gate: Callable[[], jax.Array] | None = None,
               lora: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """The epilogue's arithmetic, float32: acc * s_x * s_w (+ bias) (+ h B^T) (* gate), in this
    order (the reference's; the gated residual then adds its residual to this, `add_residual`).
    Each operand is a function returning it broadcast to acc's shape, called right before its use
    (in the kernel, that is where it is loaded); `lora` maps the sum so far to it plus the LoRA
    up-projection h B^T (accumulated onto it in float32). w_scales None: already applied
    (per-group scales fold them in the main loop); bias, gate, lora None: none."""
    acc = acc * x_scales()
    if w_scales is not None:
        acc = acc * w_scales()
    if bias is not None:
        acc = acc + bias()
    if lora is not None:
        acc = lora(acc)
    if gate is not None:
        acc = acc * gate()
    return acc


def add_residual(y: jax.Array, residual: jax.Array) -> jax.Array:
    """The gated residual's last step, float32: residual + gate * (linear + bias), the gated
    product `y` coming from `dequantize`; the only rounding (to the output dtype) follows."""
    return residual.astype(jnp.float32) + y


def _acc_shape(config: W4A4MatmulConfig) -> tuple[int, int]:
    """A compute warpgroup's accumulator: (N, M) in the registers form (the weights are wgmma's
    A operand), (M, N) in the smem form."""
    tm, tn = config.tile_m, config.tile_n
    return (tn, tm) if config.weight_operand == "registers" else (tm, tn)


def _int32_output_transposed(config: W4A4MatmulConfig, int32_out: bool) -> bool:
    """The registers form writes its raw int32 accumulator as an (N, M) array (Mosaic has no
    transposed 32-bit shared-memory store); the wrapper transposes it (the test-only variant)."""
    return config.weight_operand == "registers" and int32_out


def _tile_coords(lin: jax.Array, tiles: tuple[int, int], config: W4A4MatmulConfig) -> tuple[jax.Array, jax.Array]:
    """(m tile, n tile) of the `lin`-th output tile in the config's planar-snake order."""
    return tile_coords(lin, tiles, config.grid_minor_dim, config.grid_tile_width)


def _pipeline(plan: _Plan, body, compute_context, steps: int, state=None):
    """The warp-specialised pipeline over `steps` K steps: the memory warpgroup streams the
    activation and packed weight tiles into the stage ring, the two compute warpgroups run `body`
    on each step inside `compute_context`."""
    cfg = plan.config
    tm, tk = cfg.tile_m, cfg.tile_k
    delay_release = 0 if plan.in_regs or plan.grouped else 1
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(steps,),
        memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=swizzle_transforms(tk),
                            delay_release=delay_release),
            plgpu.BlockSpec((2 * cfg.tile_n, tk // 2), lambda kk: (0, kk), transforms=swizzle_transforms(tk // 2),
                            delay_release=delay_release),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=cfg.max_concurrent_steps,
        compute_context=compute_context,
        pipeline_state=state if plan.chained else None,
    )


def _mma(plan: _Plan, refs: _Refs, wg: jax.Array, acc_ref, kk: jax.Array, x_smem, w_smem) -> None:
    """Unpacks this warpgroup's weight rows of step kk and issues the step's wgmma."""
    tn = plan.config.tile_n
    w_half = w_smem.at[pl.ds(wg * tn, tn)]
    slot = kk % 2
    if plan.in_regs and not plan.interpret:
        with jax.named_scope("unpack"):
            w8 = unpack_tile(w_half, "int8_wgmma")
        plgpu.wgmma(acc_ref, w8, x_smem.T)
        return
    with jax.named_scope("unpack"):
        refs.w8[wg, slot] = unpack_tile(w_half, "int8_upcast4x", interpret=plan.interpret)
    plgpu.commit_smem()
    if plan.in_regs:
        plgpu.wgmma(acc_ref, refs.w8.at[wg, slot], x_smem.T)
    else:
        plgpu.wgmma(acc_ref, x_smem, refs.w8.at[wg, slot].T)


def _out_slots(config: W4A4MatmulConfig, residual: bool) -> int:
    """Shared-memory slots a compute warpgroup stages its output tiles in: two in flight; with a
    residual one per epilogue tile (each lands its residual tile, then its output)."""
    tiles = (config.tile_m * config.tile_n) // (config.epi_tile_m * config.epi_tile_n)
    return tiles if residual else min(2, tiles)


def _epilogue_tiles(plan: _Plan) -> list[tuple[slice, slice]]:
    """A warpgroup's output tile as epilogue tiles, in store order: (rows, columns) of each."""
    cfg = plan.config
    em, en = cfg.epi_tile_m, cfg.epi_tile_n
    return [(slice(ei * em, (ei + 1) * em), slice(ej * en, (ej + 1) * en))
            for ei in range(cfg.tile_m // em) for ej in range(cfg.tile_n // en)]


def _prefetch_residual(plan: _Plan, refs: _Refs, tile: _Tile) -> None:
    """Before a tile's main loop: TMA loads of the residual's epilogue tiles into the output
    staging slots, one a tile, so that the epilogue finds them there (once the previous tile's
    stores have read those slots)."""
    if refs.res is None:
        return
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for j, (rows, cols) in enumerate(_epilogue_tiles(plan)):
        gm = pl.ds(tile.m0 + rows.start, rows.stop - rows.start)
        gn = pl.ds(tile.wg_n0 + cols.start, cols.stop - cols.start)
        plgpu.copy_gmem_to_smem(refs.res.at[gm, gn], refs.out_smem.at[tile.wg, j],
                                refs.res_barriers.at[tile.wg * refs.out_smem.shape[1] + j])


def _lora_chunks(plan: _Plan, refs: _Refs, tile: _Tile) -> tuple[jax.Array, jax.Array]:
    """[first, end) of the rank chunks the CTA tile's B rows' nonzero blocks reach (`lora_ranges`):
    a fused layer's members carry their own LoRAs, so each N tile skips the others' chunks."""
    t = 2 * (tile.n0 // (2 * plan.config.tile_n))
    return refs.lora_ranges[t], refs.lora_ranges[t + 1]


def _prefetch_lora(plan: _Plan, refs: _Refs, tile: _Tile) -> None:
    """Before a tile's main loop: its first LoRA rank chunk."""
    if refs.h is None:
        return
    first, end = _lora_chunks(plan, refs, tile)

    @pl.when(first < end)
    def _():
        _load_lora_chunk(plan, refs, tile, first)


def _residual_tile(plan: _Plan, refs: _Refs, tile: _Tile, j: int) -> jax.Array:
    """Epilogue tile j's residual (prefetched into its slot) in the accumulator's orientation."""
    plgpu.barrier_wait(refs.res_barriers.at[tile.wg * refs.out_smem.shape[1] + j])
    smem = refs.out_smem.at[tile.wg, j]
    if not plan.in_regs:
        return smem[...]
    # The registers form's accumulator is (N, M): a transposing load (ldmatrix .trans); interpret
    # mode cannot load through a .T view.
    return smem[...].T if plan.interpret else smem.T[...]


def _load_lora_chunk(plan: _Plan, refs: _Refs, tile: _Tile, j: jax.Array) -> None:
    """TMA loads of rank chunk j: this warpgroup's B rows into its slot; the CTA's h rows into the
    shared slot, by the first compute warpgroup once both have read the previous chunk there."""
    c = plan.config.lora_chunk
    ranks = pl.ds(pl.multiple_of(j * c, c), c)

    @pl.when(tile.wg == 0)
    def _():
        plgpu.barrier_wait(refs.h_consumed.at[0])
        plgpu.copy_gmem_to_smem(refs.h.at[pl.ds(tile.m0, plan.config.tile_m), ranks], refs.lora_h,
                                refs.lora_barriers.at[0])

    plgpu.copy_gmem_to_smem(refs.up.at[pl.ds(tile.wg_n0, plan.config.tile_n), ranks], refs.lora_up.at[tile.wg],
                            refs.lora_barriers.at[1 + tile.wg])


def _add_lora(plan: _Plan, refs: _Refs, tile: _Tile, y: jax.Array) -> jax.Array:
    """y + h_tile B_tile^T, float32: bf16 wgmmas accumulating onto y (in registers, no second
    accumulator), one per rank chunk of the tile (`_lora_chunks`; the first prefetched, each later
    one loaded once the previous MMA has read the slots)."""
    h_slot, up_slot = refs.lora_h, refs.lora_up.at[tile.wg]
    first, end = _lora_chunks(plan, refs, tile)

    def mma(acc_ref):
        @pl.loop(first, end)
        def _chunk(j):
            @pl.when(j > first)
            def _():
                _load_lora_chunk(plan, refs, tile, j)

            plgpu.barrier_wait(refs.lora_barriers.at[0])
            plgpu.barrier_wait(refs.lora_barriers.at[1 + tile.wg])
            if plan.in_regs:  # acc (N, M) = B (tile_n, r) . h^T
                plgpu.wgmma(acc_ref, up_slot, h_slot.T)
            else:  # acc (M, N) = h (tile_m, r) . B^T
                plgpu.wgmma(acc_ref, h_slot, up_slot.T)
            plgpu.wgmma_wait(0)  # the slots are read: the next chunk may overwrite them
            plgpu.barrier_arrive(refs.h_consumed.at[0])

    if plan.interpret:  # interpret mode has no run_state: a fresh accumulator, added
        return y + pl.run_scoped(lambda acc_ref: (mma(acc_ref), acc_ref[...])[1], plgpu.ACC(y.shape, jnp.float32))
    return pl.run_state(mma)(plgpu.ACC.init(y))


def _store_tile(plan: _Plan, refs: _Refs, tile: _Tile, values: jax.Array) -> None:
    """Writes one warpgroup's finished accumulator (`acc_shape`) to its columns of the output,
    epilogue tile by epilogue tile through shared memory and TMA (two slots in flight), adding the
    gated residual's residual (`add_residual`) before the cast when there is one (then each
    epilogue tile's slot holds its residual tile, replaced by its output)."""
    cfg = plan.config
    tm = cfg.tile_m
    tiles = _epilogue_tiles(plan)
    slots = refs.out_smem.shape[1]
    wg, out_smem = tile.wg, refs.out_smem
    if refs.res is None:  # the whole tile rounded at once: half the registers live while storing
        values = values.astype(refs.out.dtype)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for j, (rows, cols) in enumerate(tiles):
        part = values[cols, rows] if plan.in_regs else values[rows, cols]
        if refs.res is not None:
            part = add_residual(part, _residual_tile(plan, refs, tile, j))
        part = part.astype(refs.out.dtype)
        slot = j % slots
        plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
        gm = pl.ds(tile.mi * tm + rows.start, rows.stop - rows.start)
        gn = pl.ds(tile.wg_n0 + cols.start, cols.stop - cols.start)
        if plan.out_nm or not plan.in_regs:
            out_smem[wg, slot] = part
        elif plan.interpret:  # interpret mode cannot store through a .T view
            out_smem[wg, slot] = part.T
        else:  # the registers form: transposing store (stmatrix .trans)
            out_smem.at[wg, slot].T[...] = part
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], refs.out.at[gn, gm] if plan.out_nm else refs.out.at[gm, gn])


def _epilogue(plan: _Plan, refs: _Refs, tile: _Tile, acc: jax.Array) -> None:
    """float32 acc (`acc_shape`) -> `dequantize` with this tile's scales, bias, LoRA term and
    gate -> the output (+ residual)."""
    shape = plan.acc_shape
    columns = pl.ds(tile.wg_n0, plan.config.tile_n)

    def along(ref, at, dim: int) -> Callable[[], jax.Array]:
        # bias and gate arrive in their own dtype (a bf16 model's): converted here, exactly, instead
        # of by one more XLA kernel per call.
        return lambda: lax.broadcast_in_dim(plgpu.load(ref.at[at], optimized=False).astype(jnp.float32),
                                            shape, (dim,))

    with jax.named_scope("epilogue"):
        # Each image's rows are whole tiles (`_call`), so one gate row serves the whole tile.
        image = tile.mi // plan.tiles_per_image
        y = dequantize(acc, along(refs.sx, pl.ds(tile.m0, plan.config.tile_m), plan.m_dim),
                       None if plan.grouped else along(refs.sw, columns, plan.n_dim),
                       None if refs.bias is None else along(refs.bias, columns, plan.n_dim),
                       None if refs.gate is None else along(refs.gate.at[image], columns, plan.n_dim),
                       None if refs.h is None else functools.partial(_add_lora, plan, refs, tile))
        _store_tile(plan, refs, tile, y)


def _per_channel_step(plan: _Plan, refs: _Refs, wg: jax.Array):
    """The pipeline body of per-channel scales: each step's wgmma accumulates into acc_ref."""

    def body(idxs, x_smem, w_smem, acc_ref):
        (kk,) = idxs
        with jax.named_scope("mainloop"):
            _mma(plan, refs, wg, acc_ref, kk, x_smem, w_smem)
            # The registers form's A operand lives in registers that the next unpack may reuse:
            # wait for this step's wgmma (its stage is released right after). The smem form
            # keeps one in flight.
            plgpu.wgmma_wait(0 if plan.in_regs else 1)
        return acc_ref

    return body


def _per_group_step(plan: _Plan, refs: _Refs, wg: jax.Array, columns):
    """The pipeline body of per-group scales: each step (one scale group) computes its int32
    partial product and adds it, times the group's weight scales, to the f32 accumulator."""
    shape = plan.acc_shape

    def body(idxs, x_smem, w_smem, facc):
        (kk,) = idxs
        with jax.named_scope("mainloop"):

            @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(shape, jnp.int32))
            def part(acc_ref):
                _mma(plan, refs, wg, acc_ref, kk, x_smem, w_smem)
                return acc_ref[...]

            sw = plgpu.load(refs.sw.at[kk, columns], optimized=False)
            return facc + part.astype(jnp.float32) * lax.broadcast_in_dim(sw, shape, (plan.n_dim,))

    return body


def _run_tile(plan: _Plan, refs: _Refs, allocs, wg: jax.Array, lin: jax.Array, state, piece=None) -> None:
    """Computes output tile `lin` (planar-snake order), or K piece `piece` of it into the
    workspace, as one pipeline over its K steps."""
    cfg = plan.config
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    mi, ni = _tile_coords(lin, plan.tiles, cfg)
    tile = _Tile(mi, mi * tm, ni * (2 * tn), wg, ni * (2 * tn) + wg * tn)

    if not plan.grouped:
        body = _per_channel_step(plan, refs, wg)

        def compute_context(eval_pipeline):
            if piece is None:
                _prefetch_residual(plan, refs, tile)
                _prefetch_lora(plan, refs, tile)

            @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(plan.acc_shape, jnp.int32))
            def _acc_scope(acc_ref):
                eval_pipeline(acc_ref)
                acc = acc_ref[...]
                if piece is not None:  # a K piece of a split tile: its int32 partial sum
                    refs.ws.at[piece, lin - plan.schedule.first_tail, wg][...] = acc
                elif plan.int32_out:
                    _store_tile(plan, refs, tile, acc)
                else:
                    _epilogue(plan, refs, tile, acc.astype(jnp.float32))

    else:
        body = _per_group_step(plan, refs, wg, pl.ds(tile.wg_n0, tn))

        def compute_context(eval_pipeline):
            _prefetch_residual(plan, refs, tile)
            _prefetch_lora(plan, refs, tile)
            facc = eval_pipeline(jnp.zeros(plan.acc_shape, jnp.float32))
            _epilogue(plan, refs, tile, facc)

    steps = plan.k_steps if piece is None else plan.k_steps // plan.schedule.splits
    piece_codes = pl.ds(0 if piece is None else pl.multiple_of(piece * steps * tk, steps * tk), steps * tk)
    piece_bytes = pl.ds(0 if piece is None else pl.multiple_of(piece * steps * tk // 2, steps * tk // 2),
                        steps * tk // 2)
    _pipeline(plan, body, compute_context, steps, state)(
        refs.x.at[pl.ds(tile.m0, tm), piece_codes], refs.w.at[pl.ds(tile.n0, 2 * tn), piece_bytes],
        allocations=allocs,
    )


def _run_program(plan: _Plan, refs: _Refs, allocs) -> None:
    """This program's tiles (`TileSchedule`): its full rounds, then its tail unit, if any."""
    wg = lax.axis_index("wg")
    program = lax.axis_index("sm")
    schedule = plan.schedule
    # A program's first pipeline fills the stage ring, the next ones continue it, and the
    # memory warpgroup ends by waiting for the last ring's release, as a STOP pipeline would
    # (whether a program runs one pipeline or more is only known at run time).
    start, steady = plgpu.PipelinePipeline.START, plgpu.PipelinePipeline.STEADY
    if refs.h is not None:  # the shared h slot starts free: each h load waits for both arrivals
        @pl.when(wg < 2)
        def _free():
            plgpu.barrier_arrive(refs.h_consumed.at[0])

    if schedule.full_rounds:
        _run_tile(plan, refs, allocs, wg, program, start)

        @pl.loop(1, schedule.full_rounds)
        def _round(r):
            _run_tile(plan, refs, allocs, wg, program + r * schedule.programs, steady)

    if schedule.units:
        @pl.when(program < schedule.units)
        def _tail():
            tile = schedule.first_tail + program % schedule.tail_tiles
            piece = program // schedule.tail_tiles if schedule.splits > 1 else None
            _run_tile(plan, refs, allocs, wg, tile, steady if schedule.full_rounds else start, piece)

    if refs.h is not None:  # the last chunk's arrivals: every phase of h_consumed waited for
        @pl.when(wg == 0)
        def _drain():
            plgpu.barrier_wait(refs.h_consumed.at[0])

    if plan.chained:
        @pl.when(wg == 2)  # the memory warpgroup (the pipeline's last thread)
        def _quiesce():
            [consumed] = allocs["flat_consumed_barrier_refs"]
            for slot in range(plan.config.max_concurrent_steps):
                plgpu.barrier_wait(consumed.at[slot])


def _kernel(x_gmem, w_gmem, sx_gmem, sw_gmem, bias_gmem, gate_gmem, res_gmem, h_gmem, up_gmem, ranges_gmem, out_gmem,
            ws_gmem, *, plan: _Plan) -> None:
    """Allocates the pipeline's stage ring and the shared-memory scratch, then runs the program."""
    cfg = plan.config
    tn, tk = cfg.tile_n, cfg.tile_k
    epi_m, epi_n = cfg.epi_tile_m, cfg.epi_tile_n
    out_tile = (epi_n, epi_m) if plan.out_nm else (epi_m, epi_n)
    out_slots = _out_slots(cfg, res_gmem is not None)
    out_transforms = swizzle_transforms(out_tile[1], jnp.dtype(out_gmem.dtype).itemsize)
    ignore = lambda *_, **__: None  # allocations do not depend on the bodies
    lora = h_gmem is not None
    lora_transforms = swizzle_transforms(cfg.lora_chunk, 2)

    @functools.partial(
        pl.run_scoped,
        pipeline_allocs=_pipeline(plan, ignore, ignore, plan.k_steps).get_allocations(x_gmem, w_gmem),
        # Interpret mode's wgmma takes no register operand: there the registers form stages the
        # unpacked weights through shared memory too (same orientation, same epilogue).
        w8_smem=None if plan.in_regs and not plan.interpret else plgpu.SMEM(
            (2, 2, tn, tk), jnp.int8, transforms=swizzle_transforms(tk)),
        out_smem=plgpu.SMEM((2, out_slots, *out_tile), out_gmem.dtype, transforms=out_transforms),
        res_barriers=None if res_gmem is None else plgpu.Barrier(num_barriers=2 * out_slots),
        lora_h=plgpu.SMEM((cfg.tile_m, cfg.lora_chunk), jnp.bfloat16, transforms=lora_transforms) if lora else None,
        lora_up=plgpu.SMEM((2, tn, cfg.lora_chunk), jnp.bfloat16, transforms=lora_transforms) if lora else None,
        lora_barriers=plgpu.Barrier(num_barriers=3) if lora else None,
        h_consumed=plgpu.Barrier(num_arrivals=2, num_barriers=1) if lora else None,
        collective_axes="wg",
    )
    def _scope(pipeline_allocs, w8_smem, out_smem, res_barriers, lora_h, lora_up, lora_barriers, h_consumed):
        refs = _Refs(x_gmem, w_gmem, sx_gmem, sw_gmem, bias_gmem, gate_gmem, res_gmem, h_gmem, up_gmem, ranges_gmem,
                     out_gmem, ws_gmem, w8_smem, out_smem, res_barriers, lora_h, lora_up, lora_barriers, h_consumed)
        _run_program(plan, refs, pipeline_allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _check_operands(x_codes, x_scales, w_packed, w_scales, bias, scale_group, gate=None, residual=None,
                    out_dtype=None, lora_h=None, lora_up=None, lora_blocks=None) -> None:
    """Raises ValueError naming the operand and shape at fault."""
    m, k, n = check_packed_operands("x_codes", x_codes, jnp.int8, w_packed)
    if x_scales.shape != (m,):
        raise ValueError(f"x_scales {x_scales.shape} must be (M,) = ({m},)")
    check_weight_operands(k, n, w_scales, scale_group, bias)
    check_gated_residual((m, n), gate, residual, out_dtype)
    check_lora_operands(m, n, lora_h, lora_up)
    if lora_blocks is not None:
        if lora_up is None:
            raise ValueError("lora_blocks given without a LoRA branch (lora_h, lora_up)")
        check_lora_blocks(lora_blocks, lora_up.shape)


# The shared memory a CTA may use on Hopper (227 KiB), less room for the barriers.
_SMEM_BYTES = 227 * 1024 - 1024


def _stages_that_fit(cfg: W4A4MatmulConfig, out_itemsize: int, residual: bool, lora: bool) -> W4A4MatmulConfig:
    """`cfg` with its pipeline shortened, one stage at a time, until the stage ring, the smem
    form's unpacked-weight slots, the output staging (with a residual a slot per epilogue tile,
    `_out_slots`) and the LoRA chunk slots fit in shared memory. The shipped configs fit at full
    depth without a LoRA."""
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    stage = tm * tk + 2 * tn * tk // 2
    staging = 2 * _out_slots(cfg, residual) * cfg.epi_tile_m * cfg.epi_tile_n * out_itemsize  # both warpgroups
    lora_slots = (tm + 2 * tn) * cfg.lora_chunk * 2 if lora else 0  # bf16: the shared h slot, a B slot each
    fixed = (2 * 2 * tn * tk if cfg.weight_operand == "smem" else 0) + staging + lora_slots
    stages = cfg.max_concurrent_steps
    while stages > 2 and fixed + stages * stage > _SMEM_BYTES:
        stages -= 1
    return dataclasses.replace(cfg, max_concurrent_steps=stages)


def _pad_images(a: jax.Array, images: int, rows: int) -> jax.Array:
    """(images * r, ...) -> (images * rows, ...): each image's r rows padded with zeros to `rows`."""
    per = a.shape[0] // images
    if per == rows:
        return a
    a = a.reshape(images, per, *a.shape[1:])
    return jnp.pad(a, ((0, 0), (0, rows - per)) + ((0, 0),) * (a.ndim - 2)).reshape(images * rows, *a.shape[2:])


def _unpad_images(a: jax.Array, images: int, rows: int) -> jax.Array:
    """`_pad_images` undone: (images * padded, ...) -> (images * rows, ...)."""
    padded = a.shape[0] // images
    if padded == rows:
        return a
    return a.reshape(images, padded, *a.shape[1:])[:, :rows].reshape(images * rows, *a.shape[1:])


def _call(x_codes, x_scales, w_packed, w_scales, bias, gate, residual, lora_h, lora_up, *, scale_group, out_dtype,
          config, int32_out, interpret, lora_blocks=None) -> jax.Array:
    """Pads each image's rows to whole tiles (all of M as one image without a gate) and the LoRA
    rank to whole chunks, plans the schedule, runs the kernel and finishes the split tiles."""
    m, k = x_codes.shape
    n = w_packed.shape[0]
    cfg = config or config_for(m, n, k, scale_group)
    if scale_group is not None and cfg.tile_k != scale_group:
        raise ValueError(f"per-group scales need tile_k == scale_group ({scale_group}), got {cfg}")
    if n % (2 * cfg.tile_n) or k % cfg.tile_k:
        raise ValueError(f"N={n} must be a multiple of {2 * cfg.tile_n} and K={k} of {cfg.tile_k} for {cfg}")

    if int32_out:  # int32 output staging is twice the bf16 one: one stage less fits in smem.
        cfg = dataclasses.replace(cfg, max_concurrent_steps=min(cfg.max_concurrent_steps, 3))
    lora = lora_h is not None
    if residual is not None or lora:  # a staging slot per epilogue tile; the LoRA chunk slots
        cfg = _stages_that_fit(cfg, jnp.dtype(out_dtype).itemsize, residual is not None, lora)
    # The gated residual: row r belongs to image r // (M / B). Padding each image to whole tiles
    # gives every tile one image (one gate row); FLUX's token counts are whole tiles already.
    images = 1 if gate is None else gate.shape[0]
    tokens = m // images
    tiles_per_image = -(-tokens // cfg.tile_m)
    m_pad = images * tiles_per_image * cfg.tile_m
    x_codes = _pad_images(x_codes, images, tiles_per_image * cfg.tile_m)
    x_scales = _pad_images(x_scales, images, tiles_per_image * cfg.tile_m)
    out_t = jnp.int32 if int32_out else out_dtype
    # Per-group scales go in as (K / g, N) so that a group's row of N scales is contiguous.
    sw = w_scales.astype(jnp.float32) if scale_group is None else w_scales.astype(jnp.float32).T
    sx = x_scales.astype(jnp.float32)
    b = None if int32_out else bias
    g = gate
    res = None if residual is None else _pad_images(residual, images, tiles_per_image * cfg.tile_m)
    # LoRA: zero rank columns up to whole chunks (exact: they add zero products).
    lora_rank = 0 if not lora else -(-lora_h.shape[1] // cfg.lora_chunk) * cfg.lora_chunk
    h = up = ranges = None
    if lora:
        h = jnp.pad(_pad_images(lora_h, images, tiles_per_image * cfg.tile_m),
                    ((0, 0), (0, lora_rank - lora_h.shape[1])))
        up = jnp.pad(lora_up, ((0, 0), (0, lora_rank - lora_up.shape[1])))
        ranges = jnp.asarray(lora_ranges(lora_blocks, n, lora_rank, 2 * cfg.tile_n, cfg.lora_chunk))
    operands = [x_codes, w_packed, sx, sw, b, g, res, h, up, ranges]
    present = [a is not None for a in operands]

    out_nm = _int32_output_transposed(cfg, int32_out)
    tiles = (m_pad // cfg.tile_m, n // (2 * cfg.tile_n))
    schedule = tile_schedule(math.prod(tiles), k // cfg.tile_k, sm_count(interpret), cfg.max_concurrent_steps,
                             cfg.split_tail and scale_group is None)
    out_types = [jax.ShapeDtypeStruct((n, m_pad) if out_nm else (m_pad, n), out_t)]
    if schedule.splits > 1:
        out_types.append(jax.ShapeDtypeStruct((schedule.splits, schedule.tail_tiles, 2, *_acc_shape(cfg)), jnp.int32))
    plan = _Plan(cfg, schedule, tiles, k // cfg.tile_k, scale_group is not None, int32_out, interpret,
                 tiles_per_image)

    def kernel(*refs):
        it = iter(refs)
        ins = [next(it) if p else None for p in present]
        out, ws = next(it), next(it, None)
        _kernel(*ins, out, ws, plan=plan)

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
    y, *ws = f(*[a for a in operands if a is not None])
    if ws:
        y = _add_split_tiles(y, ws[0], sx, sw, b, g, res, h, up, config=cfg, schedule=schedule, tiles=tiles,
                             tiles_per_image=tiles_per_image, out_nm=out_nm, int32_out=int32_out)
    y = y.T if out_nm else y
    return _unpad_images(y, images, tokens)


def lora_ranges(blocks: LoRABlocks | None, n: int, rank: int, tile_n: int, chunk: int) -> np.ndarray:
    """int32 (2 * n / tile_n,): for each tile_n rows of B (n, rank), the [first, end) of the rank
    chunks (`chunk` columns) that B's nonzero rectangles `blocks` ((row start, row end, rank start,
    rank end), None: B dense) reach in those rows ([0, 0): none). A fused layer's members that
    carry their own LoRAs have a block-diagonal B (`convrot_jax.lora.LowRank.blocks`), so each CTA
    tile multiplies only its member's chunks. Computed from the static layout, not from B's
    values: a constant of the compiled step, no launch."""
    blocks = ((0, n, 0, rank),) if blocks is None else blocks
    ranges = np.zeros((n // tile_n, 2), np.int32)
    for t in range(n // tile_n):
        lo, hi = t * tile_n, (t + 1) * tile_n
        reach = [(c // chunk, -(-d // chunk)) for a, b, c, d in blocks if a < hi and lo < b and c < d]
        if reach:
            ranges[t] = min(f for f, _ in reach), max(e for _, e in reach)
    return ranges.reshape(-1)


def check_lora_blocks(blocks: LoRABlocks, up_shape: tuple[int, int]) -> None:
    """Raises ValueError unless every block is a rectangle inside B of shape `up_shape` (N, r)."""
    n, r = up_shape
    for block in blocks:
        if len(block) != 4 or not (0 <= block[0] <= block[1] <= n and 0 <= block[2] <= block[3] <= r):
            raise ValueError(f"LoRA block {block} must be (row start, row end, rank start, rank end) inside B "
                             f"{tuple(up_shape)}")


def _add_split_tiles(y, ws, x_scales, w_scales, bias, gate, residual, lora_h, lora_up, *, config: W4A4MatmulConfig,
                     schedule: TileSchedule, tiles: tuple[int, int], tiles_per_image: int, out_nm: bool,
                     int32_out: bool) -> jax.Array:
    """Finishes the tail tiles that the kernel computed as K pieces (`TileSchedule`): adds the
    pieces' int32 partial sums (exact), dequantizes them with the kernel epilogue's `dequantize`
    (LoRA term included: a float32 product of the tiles' h rows and B rows) and `add_residual`
    (the int32 variant: not at all) and writes them into y with one scatter."""
    tm, cta_n = config.tile_m, 2 * config.tile_n
    acc = add_pieces(ws)  # (tail, warpgroup, *acc_shape)
    order = (0, 3, 1, 2) if config.weight_operand == "registers" else (0, 2, 1, 3)
    acc = acc.transpose(order).reshape(schedule.tail_tiles, tm, cta_n)
    lin = schedule.first_tail + jnp.arange(schedule.tail_tiles, dtype=jnp.int32)
    mi, ni = jax.vmap(lambda i: _tile_coords(i, tiles, config))(lin)
    if int32_out:
        vals = acc
    else:
        def columns(v: jax.Array, rows: jax.Array | int = 0) -> jax.Array:
            """Each tail tile's columns of the (R, N) per-column rows `v` (row `rows` of them)."""
            return v.reshape(v.shape[0], -1, cta_n)[rows, ni][:, None, :]

        def lora(v: jax.Array) -> jax.Array:
            h = lora_h.reshape(-1, tm, lora_h.shape[1])[mi]  # (tail, tm, r)
            up = lora_up.reshape(-1, cta_n, lora_up.shape[1])[ni]  # (tail, cta_n, r)
            return v + jnp.einsum("tmr,tnr->tmn", h, up, preferred_element_type=jnp.float32)

        vals = dequantize(acc.astype(jnp.float32), lambda: x_scales.reshape(-1, tm)[mi][:, :, None],
                          lambda: columns(w_scales[None]), None if bias is None else lambda: columns(bias[None]),
                          None if gate is None else lambda: columns(gate, mi // tiles_per_image),
                          None if lora_h is None else lora)
        if residual is not None:
            vals = add_residual(vals, residual.reshape(tiles[0], tm, tiles[1], cta_n)[mi, :, ni])
        vals = vals.astype(y.dtype)
    starts = jnp.stack([mi * tm, ni * cta_n], axis=1)
    if out_nm:
        vals, starts = vals.transpose(0, 2, 1), starts[:, ::-1]
    dnums = lax.ScatterDimensionNumbers(update_window_dims=(1, 2), inserted_window_dims=(),
                                        scatter_dims_to_operand_dims=(0, 1))
    return lax.scatter(y, starts, vals, dnums, indices_are_sorted=False, unique_indices=True,
                       mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


# Jitted with the settings static: every call at the same shapes in a model shares one traced and
# lowered kernel. Without it, FLUX.1-dev's W4A4 step lowered ~300 copies of each and compiled for
# minutes.
@functools.partial(jax.jit, static_argnames=("lora_blocks", "scale_group", "out_dtype", "config", "interpret"))
def w4a4_matmul(
    x_codes: jax.Array,
    x_scales: jax.Array,
    w_packed: jax.Array,
    w_scales: jax.Array,
    bias: jax.Array | None = None,
    *,
    gate: jax.Array | None = None,
    residual: jax.Array | None = None,
    lora_h: jax.Array | None = None,
    lora_up: jax.Array | None = None,
    lora_blocks: LoRABlocks | None = None,
    scale_group: int | None = None,
    out_dtype: jnp.dtype = jnp.bfloat16,
    config: W4A4MatmulConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """(M, N) = (x_codes . unpack(w_packed)^T) * x_scales[:, None] * w_scales (+ bias)
    (+ lora_h . lora_up^T), or with the gated residual residual + gate[m // (M / B)] * (that), in
    float32 with one rounding.

    x_codes: int8 (M, K) in [-8, 7]; x_scales: float32 (M,); w_packed: uint8 (N, K/2), low
    nibble = even k; w_scales: float32 (N,), or (N, K / scale_group) with `scale_group`; bias:
    (N,) or None. gate (B, N) and residual (M, N) in out_dtype, both or neither: the rows are B
    images of M / B tokens, row m takes gate row m // (M / B) (FLUX's gated residual after its
    output projections and MLPs); the epilogue applies them (TMA-loading the residual tiles while
    the main loop runs), so no elementwise pass follows. lora_h (M, r) and lora_up (N, r), bf16,
    both or neither: a LoRA branch's down-projection ((x A^T) * s, made where x is) and its B; the
    epilogue adds their product (bf16 wgmmas, float32 accumulation onto the dequantized sum)
    before the gate. lora_blocks (static): rectangles (row start, row end, rank start, rank end)
    outside which B is zero (a fused layer's members with their own LoRAs), so each tile
    multiplies only the rank chunks its rows reach; None: B dense. B must be zero outside them:
    the kernel skips what they leave out. config: default `config_for(M, N, K, scale_group)`.
    interpret: Mosaic GPU interpret mode (CPU tests).
    """
    _check_operands(x_codes, x_scales, w_packed, w_scales, bias, scale_group, gate, residual, out_dtype, lora_h,
                    lora_up, lora_blocks)
    return _call(x_codes, x_scales, w_packed, w_scales, bias, gate, residual, lora_h, lora_up,
                 scale_group=scale_group, out_dtype=out_dtype, config=config, int32_out=False, interpret=interpret,
                 lora_blocks=lora_blocks)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def w4a4_matmul_int32(
    x_codes: jax.Array, w_packed: jax.Array, *, config: W4A4MatmulConfig | None = None, interpret: bool = False
) -> jax.Array:
    """For exactness tests: the kernel's raw int32 accumulator (M, N) = x_codes . unpack(w_packed)^T,
    per-channel layout, same tiles and schedule as `w4a4_matmul` (at most 3 stages: the int32
    output staging takes more shared memory), no dequantization."""
    m, n = x_codes.shape[0], w_packed.shape[0]
    x_scales, w_scales = jnp.ones((m,), jnp.float32), jnp.ones((n,), jnp.float32)  # unused by this variant
    _check_operands(x_codes, x_scales, w_packed, w_scales, None, None)
    return _call(x_codes, x_scales, w_packed, w_scales, None, None, None, None, None, scale_group=None,
                 out_dtype=jnp.int32,
                 config=config, int32_out=True, interpret=interpret)
