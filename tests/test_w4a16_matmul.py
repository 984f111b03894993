"""The W4A16 GEMM kernel (`pallas_kernels.w4a16_matmul`) vs its XLA reference, and the
`convrot_jax.ops.w4a16_linear` entry point.

CPU: Mosaic GPU interpret mode at small shapes (several K steps, several N tiles, M not a multiple
of the tile, a persistent grid of 4 programs, runs holding whole tiles and runs sharing them, zero rows).
Interpret mode cannot run the register-level unpack (`inline_mgpu`), so there it unpacks with jnp
ops; the `gpu` tests run the real kernel at the FLUX modulation and T5 shapes on a Hopper GPU.

Tolerance (derived, `_assert_close`): kernel and reference both sum x * code in float32 and
apply the scales to the sums; they differ in summation order (at most 2 K float32 ulps of the sum
of |terms|, the usual bound for a K-term sum computed in two orders, K + 2 with scale and bias)
and then each rounds to bf16 once (half a bf16 ulp each, 2^-8 of the value).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convrot_jax.linear import int4_weight_only_linear
from convrot_jax.ops import w4a16_linear
from convrot_jax.quant import quantize_weight
from pallas_kernels.int4_unpack import permute_k32, unpack_tile
from pallas_kernels.rounding import pack_int4
from pallas_kernels.w4a16_matmul import w4a16_matmul
from pallas_kernels.w4a16_matmul_config import W4A16MatmulConfig, config_for
from pallas_kernels.w4a16_matmul_reference import w4a16_matmul_reference

# FLUX.1 AdaLN modulation (K = 3072 -> N = 6, 3 or 2 x 3072) and T5-XXL (K x N) linears.
MODULATION_N = (6 * 3072, 3 * 3072, 2 * 3072)
T5_KN = ((4096, 4096), (4096, 10240), (10240, 4096))


def _operands(seed: int, m: int, n: int, k: int, scale_group: int | None = None, zero_rows: bool = False):
    """Random bf16 activations, codes over the quantizer's range -7..7, positive scales of varied
    magnitude, a bias. zero_rows: the first activation row and the first weight row are zero."""
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (m, k), jnp.float32).astype(jnp.bfloat16)
    codes = jax.random.randint(ks[1], (n, k), -7, 8, jnp.int8)
    if zero_rows:
        x, codes = x.at[0].set(0), codes.at[0].set(0)
    sw_shape = (n,) if scale_group is None else (n, k // scale_group)
    scales = jnp.exp(jax.random.normal(ks[2], sw_shape, jnp.float32)) * 0.01
    bias = jax.random.normal(ks[3], (n,), jnp.float32)
    return x, codes, scales, bias


def _assert_close(y, x, codes, scales, bias, scale_group) -> None:
    """y equals the reference up to summation order and the final bf16 rounding (module doc)."""
    k = x.shape[1]
    ref = w4a16_matmul_reference(x, pack_int4(codes), scales, bias, scale_group=scale_group, out_dtype=jnp.float32)
    terms = w4a16_matmul_reference(jnp.abs(x), pack_int4(jnp.abs(codes)), scales,
                                   None if bias is None else jnp.abs(bias), scale_group=scale_group,
                                   out_dtype=jnp.float32)
    assert y.shape == ref.shape and y.dtype == jnp.bfloat16
    y64, r64 = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(y64))
    tol = 2.0**-8 * (np.abs(r64) + np.abs(y64)) + 2 * (k + 2) * 2.0**-24 * np.asarray(terms, np.float64)
    bad = np.abs(y64 - r64) > tol
    assert not bad.any(), f"{bad.sum()} elements off, first at {np.argwhere(bad)[0]}: {y64[bad][0]} vs {r64[bad][0]}"


def _check(m, n, k, *, bias=True, scale_group=None, config=None, interpret, seed=0, zero_rows=False,
           bias_dtype=jnp.float32):
    x, codes, scales, b = _operands(seed, m, n, k, scale_group, zero_rows)
    b = b.astype(bias_dtype) if bias else None
    y = w4a16_matmul(x, pack_int4(codes), scales, b, scale_group=scale_group, config=config, interpret=interpret)
    _assert_close(y, x, codes, scales, b, scale_group)
    if zero_rows:  # a zero weight row gives exactly its bias, a zero token exactly the bias row
        expect = np.zeros(m) if b is None else np.full(m, np.asarray(b[0].astype(jnp.bfloat16), np.float32))
        np.testing.assert_array_equal(np.asarray(y[:, 0], np.float32), expect)
        expect = np.zeros(n) if b is None else np.asarray(b.astype(jnp.bfloat16), np.float32)
        np.testing.assert_array_equal(np.asarray(y[0], np.float32), expect)


# --- CPU: the pieces -------------------------------------------------------------------------

def test_permute_k32_is_an_involution_within_32_columns():
    a = jnp.arange(2 * 96).reshape(2, 96)
    p = permute_k32(a)
    np.testing.assert_array_equal(permute_k32(p), a)
    np.testing.assert_array_equal(permute_k32(a, gather=False), p)  # the in-kernel form: the same order
    assert sorted(np.asarray(p[0, :32]).tolist()) == list(range(32))  # stays within its 32 columns
    assert int(p[0, 2]) == 8 and int(p[0, 8]) == 2  # (j, q) = (0, 1) <-> (1, 0)


def test_interpret_unpack_is_the_permuted_codes():
    codes = jax.random.randint(jax.random.key(0), (64, 64), -8, 8, jnp.int8)
    got = unpack_tile(pack_int4(codes), "bf16_wgmma_k32", interpret=True)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(permute_k32(codes), np.float32))


def test_reference_matches_float64():
    x, codes, scales, b = _operands(1, 5, 64, 256, scale_group=64)
    y = w4a16_matmul_reference(x, pack_int4(codes), scales, b, scale_group=64, out_dtype=jnp.float32)
    x64, c64, s64 = np.asarray(x, np.float64), np.asarray(codes, np.float64), np.asarray(scales, np.float64)
    exact = sum((x64[:, j * 64:(j + 1) * 64] @ c64[:, j * 64:(j + 1) * 64].T) * s64[None, :, j] for j in range(4))
    np.testing.assert_allclose(np.asarray(y), exact + np.asarray(b, np.float64), rtol=1e-5, atol=1e-6)


def test_default_config_follows_m():
    assert config_for(1, 18432, 3072).tile_m == 8
    assert config_for(28, 18432, 3072).tile_m == 32
    assert config_for(512, 4096, 4096).tile_m == 128
    assert config_for(4, 18432, 3072, scale_group=128).tile_k == 128
    for m in (1, 64, 112, 512):
        cfg = config_for(m, 4096, 4096)
        assert cfg.max_concurrent_steps * cfg.stage_bytes <= 192 * 1024


# --- CPU, interpret mode: the kernel against the reference -------------------------------------

@pytest.mark.parametrize("m, tile_m", [(5, 8), (19, 16)])
def test_interpret_tiles_shared_along_k(m, tile_m):
    """N = 256, K = 512: two tiles of 4 K steps on 4 programs, runs of 2 steps: every tile is
    shared by two runs and finished from the workspace."""
    cfg = W4A16MatmulConfig(tile_m=tile_m, tile_n=64, tile_k=128, max_concurrent_steps=2)
    _check(m, 256, 512, bias=m == 5, config=cfg, interpret=True, seed=m, zero_rows=True)


def test_interpret_tile_shared_by_four_runs():
    """N = 128, K = 512, tile_k = 64: one tile of 8 K steps on 4 programs, runs of 2 steps: the
    tile's four parts are added in the finish (and a bf16 bias, as the model's, read as is)."""
    cfg = W4A16MatmulConfig(tile_m=8, tile_n=64, tile_k=64, max_concurrent_steps=2)
    _check(6, 128, 512, config=cfg, interpret=True, seed=6, zero_rows=True, bias_dtype=jnp.bfloat16)


def test_shared_parts_follow_the_runs():
    """The table (n tiles from the tail's first on, m tiles) of how many runs share each tile,
    tiles in n-major order: whole tiles while every program has one, then the tail in runs."""
    from pallas_kernels.w4a16_matmul import _plan, _shared_parts

    def parts(tiles, k_steps, sms):
        return _shared_parts(_plan(W4A16MatmulConfig(), tiles, k_steps, False, True, sms)).tolist()

    assert parts((1, 2), 6, 4) == [[2], [2]]  # no whole round: runs of 3 over two 6-step tiles
    assert parts((2, 1), 6, 3) == [[2, 2]]  # runs of 4
    assert parts((1, 1), 8, 4) == [[4]]  # runs of 2 over one 8-step tile
    assert parts((1, 4), 2, 4) == []  # one whole round, no tail
    assert parts((2, 5), 1, 3) == [[0, 0]]  # 9 whole tiles, the tenth (1 step) held by one run
    assert parts((3, 3), 4, 4) == [[0, 0, 4]]  # 8 whole tiles; the ninth in runs of 1, beside two whole ones


def test_interpret_whole_and_shared_tiles():
    """N = 640, K = 128, M = 12: ten tiles of 2 steps over two m tiles on 4 programs: two rounds
    of whole tiles (epilogue in the kernel), then the last two tiles in runs of 1 (each shared by
    two, finished from the workspace)."""
    cfg = W4A16MatmulConfig(tile_m=8, tile_n=64, tile_k=64, max_concurrent_steps=2)
    _check(12, 640, 128, config=cfg, interpret=True, seed=3)


def test_interpret_tail_beside_whole_tiles_of_its_n_tile():
    """N = 384, K = 512, M = 20: nine tiles (3 x 3) of 4 steps on 4 programs: two whole rounds,
    then the ninth tile in runs of 1 (four parts), in the same n tile as two whole ones, which the
    finish keeps as the kernel wrote them."""
    cfg = W4A16MatmulConfig(tile_m=8, tile_n=64, tile_k=128, max_concurrent_steps=2)
    _check(20, 384, 512, config=cfg, interpret=True, seed=9, bias_dtype=jnp.bfloat16)


def test_interpret_whole_tiles_only():
    """N = 512, K = 256: four tiles of 2 steps on 4 programs: every run holds one whole tile."""
    cfg = W4A16MatmulConfig(tile_m=8, tile_n=64, tile_k=128, max_concurrent_steps=2)
    _check(3, 512, 256, bias=False, config=cfg, interpret=True, seed=4)


def test_interpret_per_group():
    cfg = W4A16MatmulConfig(tile_m=8, tile_n=64, tile_k=64, max_concurrent_steps=2)
    _check(3, 128, 256, scale_group=64, config=cfg, interpret=True, seed=5, zero_rows=True)


def test_zero_tokens():
    x, codes, scales, b = _operands(0, 1, 128, 256)
    y = w4a16_matmul(x[:0], pack_int4(codes), scales, b, interpret=True)
    assert y.shape == (0, 128) and y.dtype == jnp.bfloat16


def test_bad_operands_raise():
    x, codes, scales, b = _operands(0, 4, 128, 256)
    w = pack_int4(codes)
    with pytest.raises(ValueError, match=r"x \(M, K\) \(4, 128\) and w_packed \(N, K/2\) \(128, 128\) do not match"):
        w4a16_matmul(x[:, :128], w, scales, interpret=True)
    with pytest.raises(ValueError, match="need bfloat16 x and uint8 w_packed, got float32 and uint8"):
        w4a16_matmul(x.astype(jnp.float32), w, scales, interpret=True)
    with pytest.raises(ValueError, match="w_scales"):
        w4a16_matmul(x, w, scales[:64], interpret=True)
    with pytest.raises(ValueError, match="multiple of 64"):
        w4a16_matmul(x, w, jnp.ones((128, 8)), scale_group=32, interpret=True)
    with pytest.raises(ValueError, match="bias"):
        w4a16_matmul(x, w, scales, b[:3], interpret=True)
    with pytest.raises(ValueError, match="N=128 must be a multiple of 256"):
        w4a16_matmul(x, w, scales, config=W4A16MatmulConfig(tile_n=128), interpret=True)


# --- CPU: the op entry point --------------------------------------------------------------------

def test_w4a16_linear_xla_is_the_reference():
    qw = quantize_weight(jax.random.normal(jax.random.key(0), (128, 256)) * 0.05)
    x = jax.random.normal(jax.random.key(1), (2, 3, 256), jnp.bfloat16)
    y = w4a16_linear(x, qw, implementation="xla")
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(int4_weight_only_linear(x, qw), np.float32))
    assert w4a16_linear(x, qw).shape == (2, 3, 128)  # "auto" on the CPU: the reference


def test_w4a16_kernel_refusals():
    """What makes w4a16_linear keep the XLA reference under "auto" (and raise under "pallas")."""
    from convrot_jax.ops import _w4a16_kernel_refusal
    from convrot_jax.quant import QuantizedWeight

    def qw(n, k, scale_group=None):
        scales = jnp.ones((n,) if scale_group is None else (n, k // scale_group))
        return QuantizedWeight(jnp.zeros((n, k // 2), jnp.uint8), scales, scale_group=scale_group)

    x = jnp.ones((2, 3072), jnp.bfloat16)
    assert _w4a16_kernel_refusal(x, qw(18432, 3072)) is None
    assert _w4a16_kernel_refusal(x, qw(18432, 3072, 128)) is None
    assert "bfloat16" in _w4a16_kernel_refusal(x.astype(jnp.float32), qw(18432, 3072))
    assert "scale_group" in _w4a16_kernel_refusal(x, qw(18432, 3072, 96))
    assert "out_features" in _w4a16_kernel_refusal(x, qw(3000, 3072))


def test_w4a16_linear_pallas_needs_hopper():
    qw = quantize_weight(jax.random.normal(jax.random.key(0), (128, 256)))
    with pytest.raises((RuntimeError, ValueError)):
        w4a16_linear(jnp.ones((1, 256), jnp.bfloat16), qw, implementation="pallas")


# --- GPU: the real kernel at the FLUX and T5 shapes ---------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("m, n", [(1, 18432), (4, 6144), (28, 9216), (64, 18432), (112, 9216)])
def test_gpu_modulation(m, n):
    _check(m, n, 3072, bias=m != 4, interpret=False, seed=m + n, zero_rows=m > 1,
           bias_dtype=jnp.bfloat16 if m % 2 else jnp.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", [(4096, 10240), (10240, 4096)])
def test_gpu_t5(k, n):
    _check(512, n, k, interpret=False, seed=k + n)


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k, g", [(4, 18432, 3072, 128), (512, 4096, 4096, 64)])
def test_gpu_per_group(m, n, k, g):
    _check(m, n, k, scale_group=g, interpret=False, seed=g)


@pytest.mark.gpu
def test_gpu_w4a16_linear_matches_xla_layer():
    """The layer through the kernel against the XLA layer, which rounds code * scale to bf16
    before its dot: equal up to that rounding (2^-9 relative on each weight), x's rotation (the
    kernel's layer multiplies by H's signs on the tensor cores, the XLA layer runs the butterfly:
    up to 512 float32 ulps apart, a float32 ulp each per add for adds that may truncate, then each
    rounded to bf16, so the two x_rot differ by at most 2^-8 relative), the two float32 summation
    orders (2 (K + 2) float32 ulps), all bounded through the sum of |x_rot| |w|, and the output
    roundings."""
    qw = quantize_weight(jax.random.normal(jax.random.key(0), (18432, 3072)) * 0.02)
    x = jax.random.normal(jax.random.key(1), (2, 3072), jnp.bfloat16)
    y = np.asarray(w4a16_linear(x, qw, implementation="pallas"), np.float64)
    ref = np.asarray(w4a16_linear(x, qw, implementation="xla"), np.float64)
    from convrot_jax.hadamard import rotate

    x_rot = np.abs(np.asarray(rotate(x, group_size=qw.group_size).astype(jnp.bfloat16), np.float64))
    w_abs = np.abs(np.asarray(qw.codes(), np.float64)) * np.asarray(qw.scales, np.float64)[:, None]
    tol = 2.0**-8 * (np.abs(ref) + np.abs(y)) + (2.0**-9 + 2.0**-8 + (2 * (3072 + 2) + 512) * 2.0**-24) * (
        x_rot @ w_abs.T)
    assert np.all(np.abs(y - ref) <= tol)
