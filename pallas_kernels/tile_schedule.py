"""How the W4A4 GEMM's persistent grid covers its output tiles: which tile each program runs, in
which order, and how the last, partial wave is split along K. Static Python, plus the
planar-snake tile order (jnp, so that the kernel and the XLA split-tile finish share it) and the
XLA sum of a K split's pieces (also `lora_down`'s)."""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu


def sm_count(interpret: bool) -> int:
    """The SMs a persistent grid spreads over. Interpret mode takes 4, so that the CPU tests also
    exercise several units of work per program (and the GEMM's split tail)."""
    return 4 if interpret else jax.devices()[0].core_count


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
    """The schedule of `tiles` output tiles of `k_steps` pipeline steps on `sms` SMs. With
    `split`, the tail tiles are split into the most K pieces that fit on the SMs with every piece
    a whole number of pipeline rings (`stages` steps), which chained pipelines need."""
    full_rounds, tail = divmod(tiles, sms)
    splits = 1
    if split and tail:
        splits = next((s for s in range(sms // tail, 1, -1) if k_steps % s == 0 and (k_steps // s) % stages == 0), 1)
    programs = sms if full_rounds else tail * splits
    return TileSchedule(programs, full_rounds, tail, splits)


def tile_coords(lin: jax.Array, tiles: tuple[int, int], minor_dim: str, band_width: int) -> tuple[jax.Array, jax.Array]:
    """(m tile, n tile) of the `lin`-th output tile of a (m_tiles, n_tiles) grid in planar-snake
    order: the grid is cut into bands `band_width` tiles wide along `minor_dim` ("m" or "n"); the
    order runs through the bands one after the other, each along the other dimension (a band's
    width at each step), in alternating directions."""
    return plgpu.planar_snake(lin, tiles, 1 if minor_dim == "n" else 0, band_width)


def add_pieces(pieces: jax.Array) -> jax.Array:
    """The sum over the leading axis of a K split's partial sums (pieces, ...), added one by one
    rather than by a reduce: XLA's GPU fusion keeps a reduce apart from the elementwise ops after
    it (304 launches for 228 `lora_down` calls), while adds can fuse with them. (The GEMM's split
    tiles still take two launches: XLA transposes their pieces in a fusion of its own before the
    scatter; H200 trace, benchmarks/notes/fusions.md.)"""
    return functools.reduce(operator.add, [pieces[i] for i in range(pieces.shape[0])])
