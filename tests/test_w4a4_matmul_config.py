"""The W4A4 GEMM's configs and the shipped tuning table (`pallas_kernels.w4a4_matmul_config`)."""

from __future__ import annotations

import pytest

from pallas_kernels.shapes import FLUX_LINEAR_SHAPES
from pallas_kernels.w4a4_matmul_config import W4A4MatmulConfig, config_for


@pytest.mark.parametrize("k,n", list(FLUX_LINEAR_SHAPES.values()))
@pytest.mark.parametrize("m", [1, 512, 4608])
def test_config_table_covers_flux_shapes(m, k, n):
    cfg = config_for(m, n, k)
    assert n % (2 * cfg.tile_n) == 0 and k % cfg.tile_k == 0, (m, n, k, cfg)


def test_config_choices():
    grouped = config_for(4608, 12288, 3072, scale_group=64)
    assert (grouped.tile_k, grouped.weight_operand) == (64, "smem")
    assert config_for(4608, 3072, 15360).weight_operand == "registers"


@pytest.mark.parametrize("kw,match", [({"weight_operand": "tmem"}, "weight_operand"),
                                      ({"tile_m": 96}, "multiples of 64"),
                                      ({"epi_tile_n": 48}, "epilogue tiles"),
                                      ({"grid_minor_dim": "k"}, "grid_minor_dim")])
def test_bad_config_is_named(kw, match):
    with pytest.raises(ValueError, match=match):
        W4A4MatmulConfig(**kw)
