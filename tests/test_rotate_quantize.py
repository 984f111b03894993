"""The fused rotate+quantize kernel (`pallas_kernels.rotate_quantize`) against its XLA reference.

CPU: Mosaic GPU interpret mode on small shapes (codes and scales bit-identical without a
prologue); the reference itself against convrot_jax's activation quantizer, bit for bit.
GPU (`gpu` marker, Hopper): the compiled kernel on FLUX shapes, the reference computed on the
CPU backend so that the comparison does not depend on XLA:GPU's arithmetic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convrot_jax import ops
from convrot_jax.quant import pack_int4, quantize_activation_reference
import pallas_kernels.rotate_quantize
from pallas_kernels.rotate_quantize import FAST_TANH_ERROR, RotateQuantizeConfig, plan, rotate_quantize
from pallas_kernels.rotate_quantize_reference import rotate_quantize_reference

# The op's implementations, run on the CPU: one suite checks both.
IMPLEMENTATIONS = pytest.mark.parametrize(
    "implementation", [rotate_quantize_reference, functools.partial(rotate_quantize, interpret=True)],
    ids=["reference", "kernel"])
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


@pytest.mark.parametrize("k,group_size,dtype,packed", [(1024, 256, jnp.bfloat16, False), (512, 64, jnp.float32, True)])
@IMPLEMENTATIONS
def test_matches_convrot_quantizer(implementation, k, group_size, dtype, packed):
    """The op is convrot_jax's activation quantizer (+ packing), bit for bit, edge rows included."""
    x = _inputs(5, k, dtype)
    codes, scales = quantize_activation_reference(x, group_size=group_size)
    want = jax.tree.map(np.asarray, (pack_int4(codes) if packed else codes, scales))
    _assert_exact(implementation(x, group_size=group_size, packed=packed), want)


@pytest.mark.parametrize(
    "shape,kw,match",
    [
        ((4, 300), {}, r"\(4, 300\).*multiple of group_size"),
        ((2, 3, 256), {}, r"2-D.*\(2, 3, 256\)"),
        ((4, 256), {"group_size": 128}, "power of 4"),
        ((4, 256), {"prologue": "rmsnorm"}, "prologue"),
        ((4, 256), {"shift": jnp.zeros((3, 256)), "scale": jnp.zeros((3, 256)), "prologue": "layernorm"}, r"\(3, 256\)"),
        ((4, 256), {"shift": jnp.zeros((1, 256))}, "go together"),
        ((4, 256), {"dtype": jnp.float16}, "bfloat16 or float32"),
        ((4, 512), {"prologue": "gelu_tanh", "gelu_from": 100}, r"gelu_from=100.*\(4, 512\)"),
        ((4, 512), {"prologue": "gelu_tanh", "gelu_from": 512}, "gelu_from=512"),
        ((4, 512), {"prologue": "layernorm", "gelu_from": 256}, "gelu_from=256 needs prologue='gelu_tanh'"),
    ],
)
@IMPLEMENTATIONS
def test_bad_input_is_named(implementation, shape, kw, match):
    kw = dict(kw)
    dtype = kw.pop("dtype", jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        implementation(jnp.ones(shape, dtype), **kw)


# --- CPU, interpret mode: the kernel -----------------------------------------------------------------


@pytest.mark.parametrize(
    "m,k,group_size,dtype,packed,config",
    [
        (5, 3072, 256, jnp.bfloat16, False, RotateQuantizeConfig()),  # 2-row blocks, the last one half out
        (5, 3072, 256, jnp.bfloat16, False, RotateQuantizeConfig(keep=False)),  # two passes over the rows
        (5, 512, 256, jnp.float32, True, RotateQuantizeConfig(keep=False)),  # 8-row blocks, 3 rows out
        (5, 9216, 256, jnp.bfloat16, False, RotateQuantizeConfig()),  # 36 groups + 4 zero groups, one pass
        (9, 256, 256, jnp.bfloat16, False, RotateQuantizeConfig()),  # K = one group: 8-row blocks
        (4, 9216, 256, jnp.bfloat16, True, RotateQuantizeConfig(keep=False)),  # padded, two passes
        (6, 3072, 256, jnp.float32, True, RotateQuantizeConfig()),
        (4, 3072, 256, jnp.bfloat16, False, RotateQuantizeConfig(rows=4, chunk_mult=3)),  # one 12-group chunk
        (9, 512, 64, jnp.bfloat16, True, RotateQuantizeConfig()),  # (hi, lo) = (4, 16): 8 rows x 2 groups
        (5, 2048, 1024, jnp.bfloat16, False, RotateQuantizeConfig()),  # (16, 64)
    ],
)
@pytest.mark.slow
def test_interpret_bit_identical(m, k, group_size, dtype, packed, config):
    x = _inputs(m, k, dtype)
    got = rotate_quantize(x, group_size=group_size, packed=packed, config=config, interpret=True)
    want = _reference(x, group_size=group_size, packed=packed)
    assert got[0].shape == want[0].shape and got[0].dtype == want[0].dtype
    _assert_exact(got, want)
    assert np.isnan(want[1][2]) and np.isnan(want[1][3]) and not want[0][2:4].any()


# Interpret mode spreads a persistent grid over 4 "SMs" (pallas_kernels.tile_schedule.sm_count).
@pytest.mark.parametrize(
    "m,k,b,config",
    [(8, 512, 2, RotateQuantizeConfig()),  # 4-row blocks, one image each, one block per program
     (8, 3072, 2, RotateQuantizeConfig()),  # 2-row blocks, one pass, the rows held in registers
     (8, 3072, 2, RotateQuantizeConfig(hold_input=False)),  # the three sweeps each from shared memory
     (8, 3072, 2, RotateQuantizeConfig(pack_modulation=False)),  # shift and scale loaded apart
     (4, 9216, 1, RotateQuantizeConfig(keep=False)),  # padded row: the zero groups stay zero
     (36, 512, 3, RotateQuantizeConfig(programs_per_sm=1)),  # 9 blocks on 4 programs: runs of 3, 2, 2, 2 blocks
     (12, 3072, 3, RotateQuantizeConfig(programs_per_sm=1, keep=False)),  # 6 blocks: runs cross images
     (12, 512, 3, RotateQuantizeConfig(persistent=False)),  # one program per block
     (9, 512, 3, RotateQuantizeConfig(programs_per_sm=1)),  # 4-row blocks straddle 3-row images; 1 row out
     (10, 3072, 2, RotateQuantizeConfig(programs_per_sm=1))],  # 5-row images: blocks 2 straddles
)
@pytest.mark.slow
def test_interpret_layernorm_modulation(m, k, b, config):
    """Each image's rows get its own shift and scale (a wrong image mapping moves most codes)."""
    x = _inputs(2 * m, k, jnp.bfloat16)[m:]  # finite rows only
    shift, scale = _modulation(b, k, jnp.bfloat16)
    got = rotate_quantize(x, prologue="layernorm", shift=shift, scale=scale, config=config, interpret=True)
    _assert_close(got, _reference(x, prologue="layernorm", shift=shift, scale=scale))


@pytest.mark.parametrize("packed,config", [(False, RotateQuantizeConfig()),  # chunk loop unrolled
                                           (True, RotateQuantizeConfig(keep=False))])  # chunk loop traced
@pytest.mark.slow
def test_interpret_gelu_from(packed, config):
    """GELU on the columns from group 3 on only: 4-row blocks of 2-group chunks, 5 rows (the last
    block 3 rows out), one chunk straddling the boundary."""
    x = _inputs(10, 1536, jnp.bfloat16)[5:]
    got = rotate_quantize(x, prologue="gelu_tanh", gelu_from=768, packed=packed, config=config, interpret=True)
    _assert_close(got, _reference(x, prologue="gelu_tanh", gelu_from=768, packed=packed), packed=packed)


@pytest.mark.parametrize("prologue,gelu_from", [("none", 0), ("gelu_tanh", 768)])
def test_interpret_tail_is_the_concatenation(prologue, gelu_from):
    """A row made of x's columns and the tail's from `tail_from` on quantizes exactly as their
    concatenation (same kernel, same arithmetic): 3 groups of x, then groups 2..4 of the tail, 5
    rows in 4-row blocks (the last block 3 rows out); the GELU starting where the tail does."""
    x = _inputs(10, 768, jnp.bfloat16)[5:]
    tail = _inputs(10, 1280, jnp.bfloat16, seed=1)[5:]
    got = rotate_quantize(x, tail=tail, tail_from=512, prologue=prologue, gelu_from=gelu_from, interpret=True)
    want = rotate_quantize(jnp.concatenate([x, tail[:, 512:]], axis=1), prologue=prologue, gelu_from=gelu_from,
                           interpret=True)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize("tail_shape,tail_from,match", [((5, 512), 0, "dtype"), ((4, 512), 0, "M = 5 rows"),
                                                         ((5, 512), 128, "multiples of group_size"),
                                                         ((5, 512), 512, "inside the tail")])
def test_tail_mismatch_is_named(tail_shape, tail_from, match):
    dtype = jnp.float32 if match == "dtype" else jnp.bfloat16
    with pytest.raises(ValueError, match=match):
        rotate_quantize(jnp.ones((5, 256), jnp.bfloat16), tail=jnp.ones(tail_shape, dtype), tail_from=tail_from,
                        interpret=True)


@pytest.mark.slow
def test_interpret_layernorm_and_gelu():
    x = _inputs(8, 3072, jnp.float32)[4:]
    _assert_close(rotate_quantize(x, prologue="layernorm", interpret=True), _reference(x, prologue="layernorm"))
    got = rotate_quantize(x, prologue="gelu_tanh", packed=True, interpret=True)
    _assert_close(got, _reference(x, prologue="gelu_tanh", packed=True), packed=True)




@pytest.mark.parametrize(
    "k,n,config,rows_chunk_held",
    [(3072, 256, RotateQuantizeConfig(), (2, 4, 12)),  # padding 12 groups to 16 would cost 1/3
     (12288, 256, RotateQuantizeConfig(), (1, 8, 48)),
     (15360, 256, RotateQuantizeConfig(), (1, 8, 64)),  # 60 groups + 4 zero groups
     (15360, 256, RotateQuantizeConfig(chunk_mult=2), (1, 16, 64)),
     (15360, 256, RotateQuantizeConfig(rows=2), (2, 4, 60)),
     (15360, 256, RotateQuantizeConfig(rows=4, chunk_mult=5), (4, 20, 60)),
     (256, 256, RotateQuantizeConfig(), (8, 1, 1)), (3072, 64, RotateQuantizeConfig(), (2, 16, 48))],
)
def test_plan_fills_the_warpgroup(k, n, config, rows_chunk_held):
    assert plan(k, n, config) == rows_chunk_held


@pytest.mark.parametrize(
    "shape,kw,match",
    [
        ((4, 256), {"group_size": 16, "packed": True}, "too small.*packed"),
        ((4, 3072), {"config": RotateQuantizeConfig(rows=1)}, "rows=1 cannot tile K=3072"),
        ((4, 3072), {"config": RotateQuantizeConfig(chunk_mult=2)}, "chunk_mult=2"),
        ((4, 15360), {"config": RotateQuantizeConfig(rows=4, chunk_mult=3)}, "shared memory at K=15360"),
    ],
)
def test_kernel_bad_config_is_named(shape, kw, match):
    with pytest.raises(ValueError, match=match):
        rotate_quantize(jnp.ones(shape, jnp.bfloat16), interpret=True, **kw)


@pytest.mark.parametrize("fast_tanh", [False, True])
def test_fast_tanh_lowers_to_the_approximate_instruction(monkeypatch, fast_tanh):
    """At ff.net.2's shape (4608 x 12288, GELU), traced for CUDA (an H200's 132 SMs): the GELU's
    tanh is the one-instruction `tanh.approx.f32` with `fast_tanh` and only then."""
    monkeypatch.setattr(pallas_kernels.rotate_quantize, "sm_count", lambda interpret: 4 if interpret else 132)
    config = RotateQuantizeConfig(fast_tanh=fast_tanh)
    f = lambda x: rotate_quantize(x, prologue="gelu_tanh", config=config)
    text = jax.jit(f).trace(jax.ShapeDtypeStruct((4608, 12288), jnp.bfloat16)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and ("tanh.approx.f32" in text) == fast_tanh


# --- GPU (Hopper) ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("k", [3072, 12288, 15360])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_bit_identical(k, dtype, packed):
    x = _inputs(1027, k, dtype, seed=k + 1)
    _assert_exact(rotate_quantize(x, packed=packed), _reference(x, packed=packed))


@pytest.mark.gpu
@pytest.mark.parametrize("k,config", [(3072, RotateQuantizeConfig(keep=False)),
                                      (12288, RotateQuantizeConfig(chunk_mult=2)),
                                      (15360, RotateQuantizeConfig(rows=2)),
                                      (15360, RotateQuantizeConfig(keep=False))])
def test_gpu_configs(k, config):
    x = _inputs(1001, k, jnp.bfloat16, seed=k + 2)
    _assert_exact(rotate_quantize(x, config=config), _reference(x))


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [64, 1024])
def test_gpu_group_sizes(group_size):
    x = _inputs(515, 3072, jnp.bfloat16, seed=group_size + 1)
    _assert_exact(rotate_quantize(x, group_size=group_size), _reference(x, group_size=group_size))

@pytest.mark.gpu
@pytest.mark.parametrize("m,k,b,config", [(4608, 3072, 1, None), (1536, 3072, 1, None), (2 * 1536, 3072, 2, None),
                                          (3 * 512, 3072, 3, RotateQuantizeConfig(persistent=False)),
                                          (4608, 3072, 1, RotateQuantizeConfig(pack_modulation=False)),
                                          (2 * 512, 15360, 2, None)])
def test_gpu_layernorm_modulation(m, k, b, config):
    x = _inputs(4 + m, k, jnp.bfloat16, seed=k)[4:]
    shift, scale = _modulation(b, k, jnp.bfloat16)
    got = rotate_quantize(x, prologue="layernorm", shift=shift, scale=scale, config=config)
    _assert_close(got, _reference(x, prologue="layernorm", shift=shift, scale=scale))


@pytest.mark.gpu
@pytest.mark.parametrize("k,gelu_from", [(12288, 0), (15360, 3072)])
def test_gpu_gelu(k, gelu_from):
    """With libdevice's tanhf (`fast_tanh=False`), the reference's tanh."""
    x = _inputs(1031, k, jnp.bfloat16)[4:]
    got = rotate_quantize(x, prologue="gelu_tanh", gelu_from=gelu_from, config=RotateQuantizeConfig(fast_tanh=False))
    _assert_close(got, _reference(x, prologue="gelu_tanh", gelu_from=gelu_from))


@pytest.mark.gpu
@pytest.mark.parametrize("k,gelu_from", [(12288, 0), (15360, 3072)])
def test_gpu_gelu_fast_tanh(k, gelu_from):
    """The default `fast_tanh` moves GELU(x) = x (1 + tanh z) / 2 by at most |x| E / 2 (E the tanh's relative
    error; |tanh| <= 1), so a rotated value (each group's +-1/sqrt(n) sums) by at most d = the
    group's sum of those / sqrt(n), and a row's scale (absmax / 7) by at most max d / 7. Where
    2 max d / scale < 1 for every row (asserted: the bound is that tight here), y / scale moves
    by less than one level: every code within one of the exact-tanh reference's, every scale
    within max d / 7 of it."""
    n = 256
    x = _inputs(1031, k, jnp.bfloat16)[4:]
    assert RotateQuantizeConfig().fast_tanh
    got = rotate_quantize(x, prologue="gelu_tanh", gelu_from=gelu_from)
    codes, scales = _reference(x, prologue="gelu_tanh", gelu_from=gelu_from)
    moved = np.abs(np.asarray(x, np.float64)) * (FAST_TANH_ERROR / 2)
    moved[:, :gelu_from] = 0.0
    d = moved.reshape(moved.shape[0], -1, n).sum(axis=-1) / np.sqrt(n)  # per row and group
    d_max = d.max(axis=1)
    s = scales.astype(np.float64)  # (M,): one scale per row
    assert np.all(s > 0) and np.all(2 * d_max / s < 1)
    diff = np.abs(np.asarray(got[0], np.int32) - codes.astype(np.int32))
    assert diff.max() <= 1
    assert np.all(np.abs(np.asarray(got[1], np.float64) - s) <= d_max / 7 + 2e-5 * s)


@pytest.mark.gpu
def test_gpu_tail():
    """FLUX.1-dev's single-block proj_out input: the attention output, then GELU of the fused
    projection's MLP part (its columns from 3 x 3072 on), as their concatenation."""
    x = _inputs(4608, 3072, jnp.bfloat16, seed=2)
    tail = _inputs(4608, 21504, jnp.bfloat16, seed=3)
    got = rotate_quantize(x, tail=tail, tail_from=9216, prologue="gelu_tanh", gelu_from=3072)
    want = rotate_quantize(jnp.concatenate([x, tail[:, 9216:]], axis=1), prologue="gelu_tanh", gelu_from=3072)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["pallas", "auto"])
def test_gpu_ops_entry_point(implementation):
    x = _inputs(2 * 300, 3072, jnp.bfloat16).reshape(2, 300, 3072)
    got = ops.quantize_activation(x, implementation=implementation)
    want = _reference(x.reshape(600, 3072))
    np.testing.assert_array_equal(np.asarray(got[0]).reshape(600, 3072), want[0])
    np.testing.assert_array_equal(np.asarray(got[1]).reshape(600), want[1])


def test_repeated_calls_share_one_traced_kernel():
    """A model calls the kernel hundreds of times at a few shapes: each shape must be traced (and
    so lowered and compiled) once, not once per call (FLUX's step took > 200 s to compile)."""
    x = jnp.zeros((8, 256), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda x: (rotate_quantize(x, interpret=True), rotate_quantize(x + 1, interpret=True)))(x)
    calls = [e for e in jaxpr.eqns if e.primitive.name in ("jit", "pjit")]
    assert len(calls) == 2 and calls[0].params["jaxpr"] is calls[1].params["jaxpr"]
