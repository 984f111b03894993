"""The ConvRot reference (convrot_jax): Hadamard matrices, rotation, int4 quantization and packing,
the W4A4 / W4A16 linears, the NNX layers, the policy, and bad inputs."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convrot_jax as cj
from convrot_jax.quant import sqnr_db
from convrot_jax.synthetic import outlier_activations

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- an independent NumPy ConvRot
H4 = np.array([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], np.float64)


def np_regular_dense(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(h, H4)
    return h / math.sqrt(n)


def np_butterfly_f32(x: np.ndarray, n: int) -> np.ndarray:
    """Regular Hadamard on groups of n along the last axis, float32, the documented op order."""
    x = x.astype(np.float32).reshape(*x.shape[:-1], -1, n)
    levels = round(math.log(n, 4))
    for level in range(levels):
        y = x.reshape(*x.shape[:-1], 4**level, 4, n // 4 ** (level + 1))
        x0, x1, x2, x3 = (y[..., i, :] for i in range(4))
        a, b, c, d = x0 + x1, x0 - x1, x2 + x3, x2 - x3
        x = np.stack([a + d, a - d, b + c, c - b], axis=-2).reshape(*x.shape)
    x = x * np.float32(1 / math.sqrt(n))
    return x.reshape(*x.shape[:-2], -1)


def np_int4(v: np.ndarray):
    absmax = np.abs(v).max(-1, keepdims=True)
    scale = np.maximum(absmax * np.float32(1 / 7), np.float32(1e-10)).astype(np.float32)
    codes = np.clip(np.rint(v * (np.float32(1) / scale)), -7, 7).astype(np.int8)
    return codes, scale[..., 0]


def np_pack(codes: np.ndarray) -> np.ndarray:
    u = codes.astype(np.uint8) & 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


# ---------------------------------------------------------------- Hadamard and rotation
@pytest.mark.parametrize("n", [4, 16, 64, 256, 1024])
def test_regular_hadamard_properties(n):
    h = np.asarray(cj.regular_hadamard(n), np.float64)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(np.abs(h.sum(0)) * math.sqrt(n), math.sqrt(n), rtol=1e-6)
    np.testing.assert_allclose(np.abs(h.sum(1)) * math.sqrt(n), math.sqrt(n), rtol=1e-6)
    np.testing.assert_allclose(np.abs(h) * math.sqrt(n), 1.0, rtol=1e-6)
    np.testing.assert_allclose(h, np_regular_dense(n), atol=1e-7)


@pytest.mark.parametrize("n", [2, 8, 32, 256])
def test_sylvester_hadamard_properties(n):
    h = np.asarray(cj.sylvester_hadamard(n), np.float64)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(h[0] * math.sqrt(n), 1.0, rtol=1e-6)  # QuaRot's all-ones row


@pytest.mark.parametrize("hadamard,n", [("regular", 4), ("regular", 64), ("regular", 256), ("regular", 1024),
                                        ("sylvester", 2), ("sylvester", 128), ("sylvester", 256)])
@pytest.mark.parametrize("method, dtype", [("butterfly", jnp.float32), ("matmul", jnp.float32),
                                           ("matmul", jnp.bfloat16)])
def test_rotate_matches_dense_grouped_matmul(hadamard, n, method, dtype):
    """Each method against float64: each output sums n terms +-x_i / sqrt(n) in float32 (a bf16 x
    by the matmul: n exact products +-x_i summed in float32, then one rounding of the scale), so
    it is off by at most n float32 ulps (2^-24) of the sum of the terms' magnitudes."""
    x = np.asarray(jnp.asarray(RNG.standard_normal((3, 5, 4 * n)), dtype).astype(jnp.float32))
    h = np.asarray(cj.regular_hadamard(n) if hadamard == "regular" else cj.sylvester_hadamard(n), np.float64)
    groups = x.astype(np.float64).reshape(3, 5, 4, n)
    ref = (groups @ h).reshape(3, 5, 4 * n)
    bound = n * 2.0**-24 * (np.abs(groups) @ np.abs(h)).reshape(3, 5, 4 * n)
    got = np.asarray(cj.rotate(jnp.asarray(x, dtype), group_size=n, hadamard=hadamard, method=method), np.float64)
    assert np.all(np.abs(got - ref) <= bound)


def test_rotate_method_is_checked():
    with pytest.raises(ValueError, match="rotation method must be 'butterfly' or 'matmul', got 'fft'"):
        cj.rotate(jnp.ones((2, 256)), method="fft")


def test_rotate_bitwise_equals_numpy_butterfly():
    x = (RNG.standard_normal((7, 3072)) * np.exp(RNG.uniform(-8, 8, (7, 3072)))).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(cj.rotate(jnp.asarray(x))), np_butterfly_f32(x, 256))


def test_rotation_invariance():
    x = RNG.standard_normal((16, 1024)).astype(np.float32)
    w = RNG.standard_normal((48, 1024)).astype(np.float32)
    for hadamard in ("regular", "sylvester"):
        xr = cj.rotate(jnp.asarray(x), hadamard=hadamard)
        wr = cj.rotate(jnp.asarray(w), hadamard=hadamard)
        np.testing.assert_allclose(np.asarray(xr @ wr.T), x.astype(np.float64) @ w.T.astype(np.float64),
                                   rtol=0, atol=2e-5 * np.abs(x @ w.T).max())


# ---------------------------------------------------------------- quantization and packing
def test_pack_unpack_all_nibbles():
    codes = np.array(np.meshgrid(np.arange(-8, 8), np.arange(-8, 8))).reshape(2, -1).T.reshape(1, -1)
    codes = codes.astype(np.int8)  # every (even, odd) pair of the 16 values
    packed = np.asarray(cj.pack_int4(jnp.asarray(codes)))
    np.testing.assert_array_equal(packed, np_pack(codes))
    np.testing.assert_array_equal(packed[0, :16] & 0xF, np.arange(-8, 8).astype(np.uint8) & 0xF)
    np.testing.assert_array_equal(np.asarray(cj.unpack_int4(jnp.asarray(packed))), codes)


@pytest.mark.parametrize("scale_group", [None, 64])
def test_quantize_weight_matches_numpy(scale_group):
    w = (RNG.standard_normal((96, 512)) * 0.05).astype(np.float32)
    w[3] = 0.0
    qw = cj.quantize_weight(jnp.asarray(w), scale_group=scale_group)
    rot = np_butterfly_f32(w, 256)
    if scale_group is None:
        codes, scales = np_int4(rot)
    else:
        codes, scales = np_int4(rot.reshape(96, -1, scale_group))
        codes = codes.reshape(96, 512)
    np.testing.assert_array_equal(np.asarray(qw.packed), np_pack(codes))
    np.testing.assert_array_equal(np.asarray(qw.scales), scales)
    assert qw.packed.dtype == jnp.uint8 and qw.packed.shape == (96, 256)
    assert qw.scales.dtype == jnp.float32 and qw.shape == (96, 512)
    # Dequantization goes back to the original basis within half a step per rotated element.
    deq = np.asarray(cj.dequantize_weight(qw))
    step = np.asarray(qw.scales_per_column()).max()
    assert np.abs(deq - w).max() <= 0.5 * step * math.sqrt(256) + 1e-6
    np.testing.assert_array_equal(deq[3], 0.0)


def test_quantize_activation_matches_numpy():
    x = (RNG.standard_normal((2, 9, 768)) * 3).astype(np.float32)
    codes, scales = cj.quantize_activation(jnp.asarray(x), implementation="xla")
    ref_codes, ref_scales = np_int4(np_butterfly_f32(x, 256))
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    np.testing.assert_array_equal(np.asarray(scales), ref_scales)
    assert codes.dtype == jnp.int8 and scales.shape == (2, 9)
    assert np.abs(np.asarray(codes)).max() == 7


# ---------------------------------------------------------------- the linears
def int4_bound(x_rot: np.ndarray, w_rot: np.ndarray) -> np.ndarray:
    """Per-output bound on |x W^T - deq(q_x) deq(q_w)^T| for per-token / per-channel int4.

    With a = x R, b = W R (R orthogonal, so a b^T = x W^T), rounding errors |da_k| <= s_a / 2 and
    |db_k| <= s_b / 2 (s = absmax / 7 of the row), and |a_k| <= 7 s_a, |b_k| <= 7 s_b:
    |a·b - â·b̂| <= sum_k |da_k||b_k| + |â_k||db_k| <= K (s_a/2 · 7 s_b + 7.5 s_a · s_b/2) = 7.25 K s_a s_b.
    """
    sa = np.abs(x_rot).max(1) / 7
    sb = np.abs(w_rot).max(1) / 7
    return 7.25 * x_rot.shape[1] * sa[:, None] * sb[None, :]


def test_w4a4_linear_within_int4_bound():
    x = RNG.standard_normal((33, 1024)).astype(np.float32)
    w = (RNG.standard_normal((80, 1024)) * 0.02).astype(np.float32)
    b = RNG.standard_normal(80).astype(np.float32)
    qw = cj.quantize_weight(jnp.asarray(w))
    y = np.asarray(cj.w4a4_linear(jnp.asarray(x), qw, jnp.asarray(b), implementation="xla"), np.float64)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    bound = int4_bound(np_butterfly_f32(x, 256), np_butterfly_f32(w, 256))
    err = np.abs(y - ref)
    assert (err <= bound * 1.0001 + 1e-5).all()
    assert err.max() > 0  # it really is quantized
    assert sqnr_db(ref - b, y - b) > 10  # and the bound is far from the typical error


def test_w4a4_linear_matches_explicit_integer_path():
    """The layer equals: quantize x, int32 GEMM of the codes, times both scales, plus bias."""
    x = RNG.standard_normal((5, 512)).astype(np.float32)
    w = RNG.standard_normal((64, 512)).astype(np.float32)
    qw = cj.quantize_weight(jnp.asarray(w))
    b = RNG.standard_normal(64).astype(np.float32)
    xc, xs = np_int4(np_butterfly_f32(x, 256))
    wc, ws = np_int4(np_butterfly_f32(w, 256))
    acc = xc.astype(np.int64) @ wc.T.astype(np.int64)
    ref = (acc.astype(np.float32) * xs[:, None] * ws[None, :] + b).astype(np.float32)
    y = np.asarray(cj.w4a4_linear(jnp.asarray(x), qw, jnp.asarray(b), implementation="xla"))
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_w4a4_linear_gated_residual():
    """residual + gate[b] * (layer + bias) per image b, float32 (one rounding), against the explicit
    integer path in NumPy; the NNX layer computes the same."""
    x = RNG.standard_normal((3, 5, 512)).astype(np.float32)
    w = RNG.standard_normal((64, 512)).astype(np.float32)
    b = RNG.standard_normal(64).astype(np.float32)
    gate = RNG.standard_normal((3, 64)).astype(np.float32)
    residual = RNG.standard_normal((3, 5, 64)).astype(np.float32)
    xc, xs = np_int4(np_butterfly_f32(x.reshape(15, 512), 256))
    wc, ws = np_int4(np_butterfly_f32(w, 256))
    linear = (xc.astype(np.int64) @ wc.T.astype(np.int64)) * xs[:, None].astype(np.float64) * ws[None, :] + b
    ref = residual + gate[:, None, :] * linear.reshape(3, 5, 64)
    qw = cj.quantize_weight(jnp.asarray(w))
    kwargs = dict(residual=jnp.asarray(residual), gate=jnp.asarray(gate))
    y = np.asarray(cj.w4a4_linear(jnp.asarray(x), qw, jnp.asarray(b), **kwargs, implementation="xla"))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    layer = cj.ConvDense4bit(qw, jnp.asarray(b), implementation="xla")
    np.testing.assert_array_equal(np.asarray(layer(jnp.asarray(x), **kwargs)), y)


def test_gated_residual_bad_operands_are_named():
    qw = cj.quantize_weight(jnp.ones((64, 256)))
    x, res, gate = jnp.ones((2, 3, 256)), jnp.ones((2, 3, 64)), jnp.ones((2, 64))
    with pytest.raises(ValueError, match="needs both gate and residual, got only residual"):
        cj.w4a4_linear(x, qw, residual=res)
    with pytest.raises(ValueError, match=r"gate \(3, 64\) must be \(B, N\) = \(2, 64\)"):
        cj.w4a4_linear(x, qw, residual=res, gate=jnp.ones((3, 64)))
    with pytest.raises(ValueError, match=r"residual \(2, 3\) must be the output's shape \(2, 3, 64\)"):
        cj.w4a4_linear(x, qw, residual=res[..., 0], gate=gate)
    with pytest.raises(ValueError, match="residual dtype bfloat16 must be the output dtype float32"):
        cj.w4a4_linear(x, qw, residual=res.astype(jnp.bfloat16), gate=gate)


@pytest.mark.gpu
def test_gpu_gated_residual_pallas_matches_xla():
    """The Pallas path (rotate-quantize kernel, GEMM with the gated residual in its epilogue) against
    the XLA reference, 2 images of 300 tokens: the codes are bit-identical, so the outputs differ
    at most by the final bf16 rounding of a differently ordered float32 epilogue."""
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (2, 300, 3072), jnp.bfloat16)
    qw = cj.quantize_weight(jax.random.normal(k[1], (3072, 3072)) * 0.02)
    b = jax.random.normal(k[2], (3072,), jnp.bfloat16)
    kwargs = dict(residual=jax.random.normal(k[3], (2, 300, 3072), jnp.bfloat16),
                  gate=jax.random.normal(k[4], (2, 3072), jnp.bfloat16))
    y = np.asarray(cj.w4a4_linear(x, qw, b, **kwargs, implementation="pallas"), np.float64)
    ref = np.asarray(cj.w4a4_linear(x, qw, b, **kwargs, implementation="xla"), np.float64)
    # One bf16 ulp, plus a few float32 ulps of the summed terms (an FMA may contract a cancelling sum).
    f64 = lambda a: np.abs(np.asarray(a, np.float64))  # noqa: E731
    linear = f64(cj.w4a4_linear(x, qw, b, implementation="xla")) * 1.01 + f64(b)
    terms = f64(kwargs["residual"]) + f64(kwargs["gate"])[:, None, :] * linear
    assert np.all(np.abs(y - ref) <= np.abs(ref) * 2.0**-7 + terms * 2.0**-20)
    assert np.mean(y == ref) >= 0.99


def test_per_group_scales_sum_groups():
    x = RNG.standard_normal((6, 512)).astype(np.float32)
    w = RNG.standard_normal((32, 512)).astype(np.float32)
    qw = cj.quantize_weight(jnp.asarray(w), scale_group=128)
    xc, xs = np_int4(np_butterfly_f32(x, 256))
    wc, ws = np_int4(np_butterfly_f32(w, 256).reshape(32, 4, 128))
    wc = wc.reshape(32, 512)
    ref = sum((xc[:, j * 128:(j + 1) * 128].astype(np.int64) @ wc[:, j * 128:(j + 1) * 128].T).astype(np.float64)
              * ws[None, :, j] for j in range(4)) * xs[:, None]
    y = np.asarray(cj.w4a4_linear(jnp.asarray(x), qw, implementation="xla"))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _layer_sqnr(x, w, **settings):
    y = cj.w4a4_linear(x, cj.quantize_weight(w, **settings), implementation="xla")
    return sqnr_db(x @ w.T, y)


@pytest.fixture(scope="module")
def flux_weight():
    return jax.random.normal(jax.random.PRNGKey(1), (512, 3072)) * 0.02  # K = 3072, FLUX hidden


@pytest.mark.slow
def test_convrot_beats_naive_on_channel_outliers(flux_weight):
    x = outlier_activations(jax.random.PRNGKey(2), 256, 3072, token_outliers=False)
    naive = _layer_sqnr(x, flux_weight, hadamard="none")
    convrot = _layer_sqnr(x, flux_weight, hadamard="regular")
    assert convrot > naive + 3.0, (convrot, naive)  # measured: 13.1 vs 7.4 dB


def test_regular_beats_sylvester_on_token_outliers(flux_weight):
    x = outlier_activations(jax.random.PRNGKey(3), 256, 3072, channel_outliers=False)
    sylvester = _layer_sqnr(x, flux_weight, hadamard="sylvester")
    regular = _layer_sqnr(x, flux_weight, hadamard="regular")
    assert regular > sylvester + 3.0, (regular, sylvester)  # measured: 14.2 vs 7.3 dB


def test_weight_only_linear_close_to_float():
    x = RNG.standard_normal((4, 3, 512)).astype(np.float32)
    w = (RNG.standard_normal((64, 512)) * 0.02).astype(np.float32)
    qw = cj.quantize_weight(jnp.asarray(w), scale_group=64)
    y = cj.int4_weight_only_linear(jnp.asarray(x), qw)
    ref = x @ w.T
    np.testing.assert_allclose(np.asarray(y), x @ np.asarray(cj.dequantize_weight(qw)).T, rtol=1e-4, atol=1e-4)
    assert sqnr_db(ref, y) > 15
    assert y.shape == (4, 3, 64) and y.dtype == jnp.float32


# ---------------------------------------------------------------- NNX layers
def test_conv_dense_from_linear_under_jit_bf16():
    w = jnp.asarray(RNG.standard_normal((256, 768)) * 0.02, jnp.float32)
    b = jnp.asarray(RNG.standard_normal(256), jnp.float32)
    layer = cj.ConvDense4bit.from_linear(w, b)
    x = jnp.asarray(RNG.standard_normal((2, 11, 768)), jnp.bfloat16)
    y = jax.jit(lambda m, x: m(x))(layer, x)
    assert y.shape == (2, 11, 256) and y.dtype == jnp.bfloat16
    # Same graph under jit (eager and jit may round the epilogue differently: XLA fuses FMAs).
    ref = jax.jit(lambda x: cj.w4a4_linear(x, cj.quantize_weight(w), b.astype(jnp.bfloat16), implementation="xla"))(x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))
    exact = x.astype(jnp.float32) @ w.T + b
    assert sqnr_db(exact, y) > 10
    # The layer's weight round-trips: packed codes and scales are those of quantize_weight.
    np.testing.assert_array_equal(np.asarray(layer.qweight.packed), np.asarray(cj.quantize_weight(w).packed))


def test_weight_only_layer_and_abstract_build():
    w = jnp.asarray(RNG.standard_normal((64, 256)), jnp.float32)
    layer = cj.Dense4bitWeightOnly.from_linear(w, scale_group=64)
    y = layer(jnp.ones((3, 256), jnp.bfloat16))
    assert y.shape == (3, 64) and y.dtype == jnp.bfloat16
    from flax import nnx
    abstract = nnx.eval_shape(lambda: cj.ConvDense4bit.from_linear(jnp.zeros((512, 1024))))
    assert abstract.packed.shape == (512, 512) and abstract.scales.shape == (512,)


# ---------------------------------------------------------------- policy
def test_policy_round_trips_through_json(tmp_path):
    policy = cj.QuantPolicy(rules=((r"blocks\.\d+\.mlp", "w4a4"), (r"head", "w4a16")), default="bf16")
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy.to_dict()))
    assert cj.QuantPolicy.from_file(path) == policy
    assert policy.treatment("blocks.3.mlp") == "w4a4" and policy.treatment("blocks.3.attn") == "bf16"


def test_policy_file_errors_name_the_file(tmp_path):
    path = tmp_path / "policy.json"
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ValueError, match="policy.json.*not UTF-8"):
        cj.QuantPolicy.from_file(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="policy.json"):
        cj.QuantPolicy.from_file(path)


# ---------------------------------------------------------------- bad input
def test_group_size_must_divide_features():
    with pytest.raises(ValueError, match=r"\(1000\).*\(256\)"):
        cj.rotate(jnp.ones((2, 1000)))
    with pytest.raises(ValueError, match=r"\(1000\).*\(256\)"):
        cj.quantize_weight(jnp.ones((4, 1000)))


@pytest.mark.parametrize("n", [0, 2, 8, 128, 255, 512])
def test_regular_size_must_be_power_of_four(n):
    with pytest.raises(ValueError, match="power of 4"):
        cj.regular_hadamard(n)
    with pytest.raises(ValueError, match="power of 4"):
        cj.rotate(jnp.ones((1, 1024)), group_size=n)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="hadamard must be one of"):
        cj.rotate(jnp.ones((1, 256)), hadamard="walsh")
    with pytest.raises(ValueError, match=r"scale_group \(96\).*\(256\)"):
        cj.quantize_weight(jnp.ones((4, 256)), scale_group=96)
    qw = cj.quantize_weight(jnp.ones((4, 256)))
    with pytest.raises(ValueError, match=r"\(3, 512\).*in_features 256"):
        cj.w4a4_linear(jnp.ones((3, 512)), qw)
    with pytest.raises(ValueError, match=r"bias shape \(5,\)"):
        cj.w4a4_linear(jnp.ones((3, 256)), qw, jnp.ones(5))
    with pytest.raises(ValueError, match="implementation must be one of"):
        cj.w4a4_linear(jnp.ones((3, 256)), qw, implementation="cuda")
    with pytest.raises(ValueError, match="treatment must be one of"):
        cj.QuantPolicy(rules=((r"proj_out", "int2"),))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_pallas_refused_off_hopper():
    with pytest.raises(RuntimeError, match="Hopper"):
        cj.w4a4_linear(jnp.ones((3, 256)), cj.quantize_weight(jnp.ones((4, 256))), implementation="pallas")


def test_zero_rows_give_zeros_not_nan():
    w = RNG.standard_normal((16, 256)).astype(np.float32)
    w[2] = 0
    x = RNG.standard_normal((4, 256)).astype(np.float32)
    x[1] = 0
    y = np.asarray(cj.w4a4_linear(jnp.asarray(x), cj.quantize_weight(jnp.asarray(w)), implementation="xla"))
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[1], 0.0)
    np.testing.assert_array_equal(y[:, 2], 0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_activation_poisons_only_its_row(bad):
    x = RNG.standard_normal((4, 256)).astype(np.float32)
    x[2, 7] = bad
    qw = cj.quantize_weight(jnp.asarray(RNG.standard_normal((8, 256)), jnp.float32))
    codes, scales = cj.quantize_activation(jnp.asarray(x), implementation="xla")
    assert np.isnan(np.asarray(scales)[2]) and (np.asarray(codes)[2] == 0).all()
    y = np.asarray(cj.w4a4_linear(jnp.asarray(x), qw, implementation="xla"))
    assert np.isnan(y[2]).all()
    assert np.isfinite(np.delete(y, 2, axis=0)).all()
