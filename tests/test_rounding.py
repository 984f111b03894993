"""The int4 recipe the kernels share with convrot_jax (`pallas_kernels.rounding`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from convrot_jax.hadamard import check_group_size, regular_hadamard
from pallas_kernels.rounding import (
    SCALE_FLOOR,
    int4_scale,
    pack_int4,
    regular_levels,
    regular_rotate,
    symmetric_int4,
    unpack_int4,
)


@pytest.mark.parametrize("n,levels", [(4, 1), (16, 2), (256, 4), (1024, 5)])
def test_regular_levels(n, levels):
    assert regular_levels(n) == levels == check_group_size(n, "regular")


@pytest.mark.parametrize("n", [1, 2, 8, 128, 255, 256.0])
def test_regular_levels_rejects(n):
    with pytest.raises(ValueError, match="power of 4"):
        regular_levels(n)


@pytest.mark.parametrize("n", [4, 16, 256])
def test_regular_rotate_is_the_hadamard_matrix(n):
    x = np.random.default_rng(n).normal(size=(3, 2, n)).astype(np.float32)
    want = x.astype(np.float64) @ np.asarray(regular_hadamard(n), np.float64)
    np.testing.assert_allclose(np.asarray(regular_rotate(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_symmetric_int4_rows():
    """One row each: ordinary, all zero (floor scale, zero codes), NaN and Inf (NaN scale, zero
    codes); the largest magnitude maps to +-7."""
    v = jnp.asarray([[0.5, -3.5, 1.0, 0.6], [0.0] * 4, [1.0, np.nan, 2.0, 3.0], [1.0, 2.0, -np.inf, 0.0]],
                    jnp.float32)
    codes, scales = symmetric_int4(v)
    assert codes.dtype == jnp.int8 and scales.shape == (4,)
    np.testing.assert_array_equal(np.asarray(codes[0]), [1, -7, 2, 1])  # scale 0.5
    assert float(scales[0]) == float(int4_scale(jnp.float32(3.5)))
    assert float(scales[1]) == np.float32(SCALE_FLOOR) and not np.asarray(codes[1]).any()
    assert np.isnan(np.asarray(scales[2:])).all() and not np.asarray(codes[2:]).any()


def test_pack_roundtrip():
    codes = jnp.asarray(np.arange(-8, 8, dtype=np.int8).reshape(2, 8))
    packed = pack_int4(codes)
    assert packed.dtype == jnp.uint8 and packed.shape == (2, 4)
    assert int(packed[0, 0]) == (-8 & 0xF) | ((-7 & 0xF) << 4)  # low nibble = even k
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed)), np.asarray(codes))
