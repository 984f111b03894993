"""The W4A4 GEMM's tile schedule (`pallas_kernels.tile_schedule`), alone: pure Python and jnp."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.tile_schedule import TileSchedule, tile_coords, tile_schedule


def test_tile_schedule_splits_the_last_wave():
    # FLUX M = 4608, 256 x 128 CTA tiles, 4 stages, 132 SMs.
    assert tile_schedule(18 * 24, 96, 132, 4, True) == TileSchedule(132, 3, 36, 3)  # N = 3072, K = 12288
    assert tile_schedule(18 * 24, 120, 132, 4, True) == TileSchedule(132, 3, 36, 3)  # K = 15360
    assert tile_schedule(18 * 96, 24, 132, 4, True) == TileSchedule(132, 13, 12, 6)  # N = 12288, K = 3072
    assert tile_schedule(18 * 72, 24, 132, 4, True) == TileSchedule(132, 9, 108, 1)  # no room to split
    assert tile_schedule(24, 24, 132, 4, True) == TileSchedule(72, 0, 24, 3)  # fewer tiles than SMs
    assert tile_schedule(18 * 24, 96, 132, 4, False) == TileSchedule(132, 3, 36, 1)


def test_tile_schedule_invariants():
    for tiles in range(1, 600, 7):
        for k_steps in (3, 4, 24, 96, 120):
            sched = tile_schedule(tiles, k_steps, 132, 4, True)
            assert sched.units <= sched.programs <= 132
            assert sched.first_tail + sched.tail_tiles == tiles
            assert sched.splits == 1 or (k_steps % sched.splits == 0 and (k_steps // sched.splits) % 4 == 0)


@pytest.mark.parametrize("tiles", [(1, 1), (3, 5), (18, 24), (7, 2)])
@pytest.mark.parametrize("minor_dim,band_width", [("n", 1), ("m", 1), ("n", 8), ("m", 3)])
def test_tile_coords_visit_every_tile_once(tiles, minor_dim, band_width):
    """The planar-snake order is a permutation of the grid; with bands one tile wide, consecutive
    tiles are neighbours (the snake never jumps) and the first band is the first minor index."""
    lin = jnp.arange(tiles[0] * tiles[1], dtype=jnp.int32)
    mi, ni = jax.vmap(lambda i: tile_coords(i, tiles, minor_dim, band_width))(lin)
    mi, ni = np.asarray(mi), np.asarray(ni)
    assert sorted(zip(mi.tolist(), ni.tolist())) == [(m, n) for m in range(tiles[0]) for n in range(tiles[1])]
    if band_width == 1:
        assert np.all(np.abs(np.diff(mi)) + np.abs(np.diff(ni)) == 1)
        minor, other = (ni, mi) if minor_dim == "n" else (mi, ni)
        length = tiles[0] if minor_dim == "n" else tiles[1]
        assert not minor[:length].any() and np.array_equal(other[:length], np.arange(length))
