"""The fused rotate+quantize kernel against the XLA reference.

CPU: Pallas interpret mode on small shapes (codes and scales bit-identical without a prologue).
GPU (`gpu` marker, Hopper): the compiled kernel on FLUX shapes, the reference computed on the
CPU backend so that the comparison does not depend on XLA:GPU's arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convrot_jax import ops
from pallas_kernels.rotate_quantize import (
    RotateQuantizeConfig,
    rotate_quantize,
    rotate_quantize_reference,
)
from pallas_kernels.rotate_quantize_sm90 import (
    RotateQuantizeSm90Config,
    plan,
    rotate_quantize_sm90,
)

ON_CPU = jax.devices()[0].platform == "cpu"
BOTH_KERNELS = pytest.mark.parametrize("kernel", [rotate_quantize, rotate_quantize_sm90], ids=["triton", "sm90"])
# A prologue changes the float arithmetic (reduction order, rsqrt, tanh): codes may move by one
# step where a value sits on a rounding boundary. The allowed fraction is far above what such
# ties produce (~1e-5) and far below what any real bug produces.
MAX_OFF_BY_ONE = 1e-3


def _inputs(m: int, k: int, dtype, seed: int = 0) -> jnp.ndarray:
    """Heavy-tailed rows plus the edge cases: a zero row, a huge outlier, NaN and Inf rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, size=(m, k)).astype(np.float32) * rng.uniform(0.01, 30, size=(m, 1))
    x[0] = 0.0
    if m > 1:
        x[1, k // 3] = 3e4
    if m > 3:
        x[2, 7] = np.nan
        x[3, k - 1] = -np.inf
    return jnp.asarray(x, dtype)


def _reference(x, **kw):
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        args = {k: jax.device_put(v, cpu) if isinstance(v, jax.Array) else v for k, v in kw.items()}
        return jax.tree.map(np.asarray, rotate_quantize_reference(jax.device_put(x, cpu), **args))


def _assert_exact(got, want):
    np.testing.assert_array_equal(np.asarray(got[0]), want[0])
    np.testing.assert_array_equal(np.asarray(got[1]), want[1])  # NaN scales compare equal


def _assert_close(got, want, packed: bool = False):
    """Codes within one step on a tiny fraction of entries; scales to float32 rounding."""
    codes, want_codes = np.asarray(got[0]), want[0]
    if packed:
        codes, want_codes = _unpack(codes), _unpack(want_codes)
    diff = np.abs(codes.astype(np.int32) - want_codes.astype(np.int32))
    assert diff.max() <= 1, diff.max()
    assert np.mean(diff > 0) <= MAX_OFF_BY_ONE, np.mean(diff > 0)
    np.testing.assert_allclose(np.asarray(got[1]), want[1], rtol=2e-5)


def _unpack(p: np.ndarray) -> np.ndarray:
    lo = (p & 0xF).astype(np.int8)
    hi = (p >> 4).astype(np.int8)
    c = np.stack([lo, hi], -1).reshape(p.shape[0], -1)
    return np.where(c > 7, c - 16, c)


def _modulation(b: int, k: int, dtype, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(0, 0.5, (b, k)), dtype), jnp.asarray(rng.normal(0, 0.5, (b, k)), dtype))


# --- CPU, interpret mode ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m,k,group_size,dtype,packed,block_rows,split_levels",
    [
        (5, 3072, 256, jnp.bfloat16, False, 2, 0),  # M not a multiple of the block
        (5, 1536, 256, jnp.bfloat16, True, 2, 2),
        (6, 768, 256, jnp.float32, True, 4, 1),
        (4, 256, 64, jnp.float32, False, 1, 1),
        (5, 2048, 1024, jnp.bfloat16, True, 2, 2),
        (3, 512, 64, jnp.float32, False, 1, 2),  # one shuffled level, on 4 columns
    ],
)
def test_interpret_bit_identical(m, k, group_size, dtype, packed, block_rows, split_levels):
    x = _inputs(m, k, dtype)
    cfg = RotateQuantizeConfig(block_rows=block_rows, groups_per_tile=2, split_levels=split_levels, swap_halves=False)
    got = rotate_quantize(x, group_size=group_size, packed=packed, config=cfg, interpret=True)
    want = _reference(x, group_size=group_size, packed=packed)
    assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
    _assert_exact(got, want)
    if m > 3:  # the NaN row really is the edge case
        assert np.isnan(want[1][2]) and not want[0][2].any()


@pytest.mark.parametrize(
    "k,group_size,dtype,packed",
    [(3072, 256, jnp.bfloat16, False), (512, 64, jnp.float32, True), (2048, 1024, jnp.bfloat16, False),
     (64, 16, jnp.float32, False)],
)
def test_interpret_swap_halves_bit_identical(k, group_size, dtype, packed):
    """The transposed-halves butterfly (the default) keeps the reference's stage order: same codes,
    same scales."""
    x = _inputs(5, k, dtype)
    cfg = RotateQuantizeConfig(block_rows=2, groups_per_tile=2)
    assert cfg.swap_halves
    _assert_exact(rotate_quantize(x, group_size=group_size, packed=packed, config=cfg, interpret=True),
                  _reference(x, group_size=group_size, packed=packed))


def test_interpret_layernorm_modulation():
    m, k, b = 8, 512, 2
    x = _inputs(m, k, jnp.bfloat16)[4:].repeat(2, axis=0)  # finite rows only
    shift, scale = _modulation(b, k, jnp.bfloat16)
    cfg = RotateQuantizeConfig(block_rows=8, split_levels=2, swap_halves=False)
    got = rotate_quantize(x, prologue="layernorm", shift=shift, scale=scale, config=cfg, interpret=True)
    _assert_close(got, _reference(x, prologue="layernorm", shift=shift, scale=scale))


def test_interpret_gelu_packed():
    x = _inputs(4, 1024, jnp.float32)[:, :]
    got = rotate_quantize(x, prologue="gelu_tanh", packed=True, interpret=True)
    _assert_close(got, _reference(x, prologue="gelu_tanh", packed=True), packed=True)


@pytest.mark.parametrize(
    "shape,kw,match",
    [
        ((4, 300), {}, r"\(4, 300\).*multiple of group_size"),
        ((2, 3, 256), {}, r"2-D.*\(2, 3, 256\)"),
        ((4, 256), {"group_size": 128}, "power of 4"),
        ((4, 256), {"prologue": "rmsnorm"}, "prologue"),
        ((4, 256), {"shift": jnp.zeros((3, 256)), "scale": jnp.zeros((3, 256)), "prologue": "layernorm"}, r"\(3, 256\)"),
        ((4, 256), {"shift": jnp.zeros((1, 256))}, "go together"),
    ],
)
def test_bad_input_is_named(shape, kw, match):
    with pytest.raises(ValueError, match=match):
        rotate_quantize(jnp.ones(shape, jnp.bfloat16), interpret=True, **kw)


# --- CPU, interpret mode: the Mosaic GPU kernel ----------------------------------------------------


@pytest.mark.parametrize(
    "m,k,group_size,dtype,packed,config",
    [
        (5, 3072, 256, jnp.bfloat16, False, RotateQuantizeSm90Config()),  # 2-row blocks, the last one half out
        (5, 3072, 256, jnp.bfloat16, False, RotateQuantizeSm90Config(keep=False)),  # two passes over the rows
        (5, 512, 256, jnp.float32, True, RotateQuantizeSm90Config(keep=False)),  # 8-row blocks, 3 rows out
        (5, 9216, 256, jnp.bfloat16, False, RotateQuantizeSm90Config()),  # 36 groups + 4 zero groups, one pass
        (9, 256, 256, jnp.bfloat16, False, RotateQuantizeSm90Config()),  # K = one group: 8-row blocks
        (4, 9216, 256, jnp.bfloat16, True, RotateQuantizeSm90Config(keep=False)),  # padded, two passes
        (6, 3072, 256, jnp.float32, True, RotateQuantizeSm90Config()),
        (4, 3072, 256, jnp.bfloat16, False, RotateQuantizeSm90Config(rows=4, chunk_mult=3)),  # one 12-group chunk
        (9, 512, 64, jnp.bfloat16, True, RotateQuantizeSm90Config()),  # (hi, lo) = (4, 16): 8 rows x 2 groups
        (5, 2048, 1024, jnp.bfloat16, False, RotateQuantizeSm90Config()),  # (16, 64)
    ],
)
def test_sm90_interpret_bit_identical(m, k, group_size, dtype, packed, config):
    x = _inputs(m, k, dtype)
    got = rotate_quantize_sm90(x, group_size=group_size, packed=packed, config=config, interpret=True)
    want = _reference(x, group_size=group_size, packed=packed)
    assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
    _assert_exact(got, want)
    assert np.isnan(want[1][2]) and np.isnan(want[1][3]) and not want[0][2:4].any()


@pytest.mark.parametrize(
    "m,k,b,config",
    [(8, 512, 2, RotateQuantizeSm90Config()),  # 4-row blocks, one image each
     (8, 3072, 2, RotateQuantizeSm90Config()),  # 2-row blocks, one pass
     (4, 9216, 1, RotateQuantizeSm90Config(keep=False))],  # padded row: the zero groups stay zero
)
def test_sm90_interpret_layernorm_modulation(m, k, b, config):
    x = _inputs(2 * m, k, jnp.bfloat16)[m:]  # finite rows only
    shift, scale = _modulation(b, k, jnp.bfloat16)
    got = rotate_quantize_sm90(x, prologue="layernorm", shift=shift, scale=scale, config=config, interpret=True)
    _assert_close(got, _reference(x, prologue="layernorm", shift=shift, scale=scale))


def test_sm90_interpret_layernorm_and_gelu():
    x = _inputs(8, 3072, jnp.float32)[4:]
    _assert_close(rotate_quantize_sm90(x, prologue="layernorm", interpret=True), _reference(x, prologue="layernorm"))
    got = rotate_quantize_sm90(x, prologue="gelu_tanh", packed=True, interpret=True)
    _assert_close(got, _reference(x, prologue="gelu_tanh", packed=True), packed=True)


def test_sm90_modulation_blocks_must_not_straddle_images():
    x = jnp.ones((6, 3072), jnp.bfloat16)
    with pytest.raises(ValueError, match="straddle images of 3 rows"):
        rotate_quantize_sm90(x, prologue="layernorm", shift=jnp.zeros((2, 3072)), scale=jnp.zeros((2, 3072)),
                             interpret=True)


@pytest.mark.parametrize(
    "k,n,config,rows_chunk_held",
    [(3072, 256, RotateQuantizeSm90Config(), (2, 4, 12)),  # padding 12 groups to 16 would cost 1/3
     (12288, 256, RotateQuantizeSm90Config(), (1, 8, 48)),
     (15360, 256, RotateQuantizeSm90Config(), (1, 8, 64)),  # 60 groups + 4 zero groups
     (15360, 256, RotateQuantizeSm90Config(chunk_mult=2), (1, 16, 64)),
     (15360, 256, RotateQuantizeSm90Config(rows=2), (2, 4, 60)),
     (15360, 256, RotateQuantizeSm90Config(rows=4, chunk_mult=5), (4, 20, 60)),
     (256, 256, RotateQuantizeSm90Config(), (8, 1, 1)), (3072, 64, RotateQuantizeSm90Config(), (2, 16, 48))],
)
def test_sm90_plan_fills_the_warpgroup(k, n, config, rows_chunk_held):
    assert plan(k, n, config) == rows_chunk_held


@pytest.mark.parametrize(
    "shape,kw,match",
    [
        ((4, 300), {}, r"\(4, 300\).*multiple of group_size"),
        ((4, 256), {"group_size": 128}, "power of 4"),
        ((4, 256), {"group_size": 16, "packed": True}, "too small.*packed"),
        ((4, 3072), {"config": RotateQuantizeSm90Config(rows=1)}, "rows=1 cannot tile K=3072"),
        ((4, 3072), {"config": RotateQuantizeSm90Config(chunk_mult=2)}, "chunk_mult=2"),
        ((4, 256), {"dtype": jnp.float16}, "bfloat16 or float32"),
        ((4, 15360), {"config": RotateQuantizeSm90Config(rows=4, chunk_mult=3)}, "shared memory at K=15360"),
    ],
)
def test_sm90_bad_input_is_named(shape, kw, match):
    dtype = kw.pop("dtype", jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        rotate_quantize_sm90(jnp.ones(shape, dtype), interpret=True, **kw)


# --- GPU (Hopper) ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("k", [3072, 12288, 15360])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_sm90_bit_identical(k, dtype, packed):
    x = _inputs(1027, k, dtype, seed=k + 1)
    _assert_exact(rotate_quantize_sm90(x, packed=packed), _reference(x, packed=packed))


@pytest.mark.gpu
@pytest.mark.parametrize("k,config", [(3072, RotateQuantizeSm90Config(keep=False)),
                                      (12288, RotateQuantizeSm90Config(chunk_mult=2)),
                                      (15360, RotateQuantizeSm90Config(rows=2)),
                                      (15360, RotateQuantizeSm90Config(keep=False))])
def test_gpu_sm90_configs(k, config):
    x = _inputs(1001, k, jnp.bfloat16, seed=k + 2)
    _assert_exact(rotate_quantize_sm90(x, config=config), _reference(x))


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [64, 1024])
def test_gpu_sm90_group_sizes(group_size):
    x = _inputs(515, 3072, jnp.bfloat16, seed=group_size + 1)
    _assert_exact(rotate_quantize_sm90(x, group_size=group_size), _reference(x, group_size=group_size))



@pytest.mark.gpu
@pytest.mark.parametrize("k", [3072, 12288, 15360])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_bit_identical(k, dtype, packed):
    x = _inputs(1027, k, dtype, seed=k)
    _assert_exact(rotate_quantize(x, packed=packed), _reference(x, packed=packed))


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [64, 1024])
def test_gpu_group_sizes(group_size):
    x = _inputs(515, 3072, jnp.bfloat16, seed=group_size)
    _assert_exact(rotate_quantize(x, group_size=group_size), _reference(x, group_size=group_size))


@pytest.mark.gpu
@pytest.mark.parametrize("block_rows,split_levels,swap_halves", [(1, 0, False), (2, 2, False), (1, 3, False),
                                                                 (1, 0, True)])
def test_gpu_block_configs(block_rows, split_levels, swap_halves):
    x = _inputs(1001, 12288, jnp.bfloat16, seed=block_rows)
    cfg = RotateQuantizeConfig(block_rows=block_rows, split_levels=split_levels, swap_halves=swap_halves)
    got = rotate_quantize(x, config=cfg)
    _assert_exact(got, _reference(x))


@pytest.mark.gpu
@pytest.mark.parametrize("k,b", [(3072, 1), (3072, 2), (15360, 2)])
@BOTH_KERNELS
def test_gpu_layernorm_modulation(k, b, kernel):
    x = _inputs(4 + 512 * b, k, jnp.bfloat16, seed=k)[4:]
    shift, scale = _modulation(b, k, jnp.bfloat16)
    got = kernel(x, prologue="layernorm", shift=shift, scale=scale)
    _assert_close(got, _reference(x, prologue="layernorm", shift=shift, scale=scale))


@pytest.mark.gpu
@BOTH_KERNELS
def test_gpu_gelu(kernel):
    x = _inputs(516, 12288, jnp.bfloat16)[4:]
    _assert_close(kernel(x, prologue="gelu_tanh"), _reference(x, prologue="gelu_tanh"))


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["pallas", "auto"])
def test_gpu_ops_entry_point(implementation):
    x = _inputs(2 * 300, 3072, jnp.bfloat16).reshape(2, 300, 3072)
    got = ops.quantize_activation(x, implementation=implementation)
    want = _reference(x.reshape(600, 3072))
    np.testing.assert_array_equal(np.asarray(got[0]).reshape(600, 3072), want[0])
    np.testing.assert_array_equal(np.asarray(got[1]).reshape(600), want[1])


@BOTH_KERNELS
def test_repeated_calls_share_one_traced_kernel(kernel):
    """A model calls the kernel hundreds of times at a few shapes: each shape must be traced (and
    so lowered and compiled) once, not once per call (FLUX's step took > 200 s to compile)."""
    x = jnp.zeros((8, 256), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x: (kernel(x, interpret=True), kernel(x + 1, interpret=True)))(x)
    calls = [e for e in jaxpr.eqns if e.primitive.name in ("jit", "pjit")]
    assert len(calls) == 2 and calls[0].params["jaxpr"] is calls[1].params["jaxpr"]
