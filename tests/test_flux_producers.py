"""Producers quantized where they are made (convrot_jax.prologue, flux_flax.producers): the op's
XLA path against an independent NumPy composition, the model with its producers fused against
the unfused one, and (`gpu`) the kernel path against the XLA one at FLUX shapes."""

import flux_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convrot_jax as cj
from convrot_jax import GeluTanh, LayerNormModulation
from convrot_jax.prologue import apply_prologue
from flux_flax import (
    FluxConfig,
    FluxTransformer2DModel,
    fuse_gated_residuals,
    fuse_producers,
    fuse_projections,
    quantize_model,
)

RNG = np.random.default_rng(0)
SMALL = FluxConfig.small(num_layers=1, num_single_layers=1)


def np_producer(x: np.ndarray, prologue) -> np.ndarray:
    """The producers in float64 NumPy, x (B, S, K)."""
    x = x.astype(np.float64)
    if isinstance(prologue, LayerNormModulation):
        mean = x.mean(-1, keepdims=True)
        y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
        shift, scale = (np.asarray(v, np.float64)[:, None] for v in (prologue.shift, prologue.scale))
        return y * (1 + scale) + shift
    g = x[..., prologue.start:]
    g = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    return np.concatenate([x[..., :prologue.start], g], axis=-1)


def _quantized_layer(k: int, n: int):
    w = (RNG.standard_normal((n, k)) * 0.05).astype(np.float32)
    return cj.quantize_weight(jnp.asarray(w)), RNG.standard_normal(n).astype(np.float32)


@pytest.mark.parametrize("prologue", [
    LayerNormModulation(jnp.asarray(RNG.normal(0, 0.5, (3, 512)), jnp.float32),
                        jnp.asarray(RNG.normal(0, 0.5, (3, 512)), jnp.float32)),
    GeluTanh(256)])
def test_xla_layer_on_the_producer_output(prologue):
    """w4a4_linear(x, prologue=p) is the W4A4 layer on p(x): against the layer on an independent
    float64 p(x) (rounded to float32), codes can differ only where a value sits within float32
    rounding of a code boundary; each such code moves an output by at most one activation step
    times one weight code: s_x * 7 s_w. Two such codes per row are allowed; a wrong image, a
    missing normalisation or GELU moves outputs by far more."""
    qw, b = _quantized_layer(512, 64)
    x = (RNG.standard_t(4, (3, 5, 512)) * 3 + 1).astype(np.float32)
    got = np.asarray(cj.w4a4_linear(jnp.asarray(x), qw, jnp.asarray(b), prologue=prologue, implementation="xla"))
    y = np_producer(x, prologue).astype(np.float32)
    want = np.asarray(cj.w4a4_linear(jnp.asarray(y), qw, jnp.asarray(b), implementation="xla"))
    _, s_x = cj.quantize_activation(jnp.asarray(y), implementation="xla")
    step = np.asarray(s_x)[..., None] * 7 * np.asarray(qw.scales)
    assert np.all(np.abs(got - want) <= 2 * step + 1e-5 * np.abs(want)), np.max(np.abs(got - want) / step)


def test_xla_gelu_tail_is_the_concatenation():
    """GeluTanh with a tail (x's features, then GELU of the tail's from tail_from on) is the layer
    on the concatenation, exactly: the same float32 ops on the same values."""
    qw, b = _quantized_layer(768, 64)
    x = jnp.asarray(RNG.standard_t(4, (3, 5, 256)) * 3, jnp.float32)
    tail = jnp.asarray(RNG.standard_t(4, (3, 5, 1024)) * 3, jnp.float32)
    got = cj.w4a4_linear(x, qw, jnp.asarray(b), prologue=GeluTanh(256, tail=tail, tail_from=512), implementation="xla")
    want = cj.w4a4_linear(jnp.concatenate([x, tail[..., 512:]], -1), qw, jnp.asarray(b), prologue=GeluTanh(256),
                          implementation="xla")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("prologue,match", [
    (LayerNormModulation(jnp.zeros((2, 512)), jnp.zeros((2, 512))), r"\(3, 512\) for x \(3, 5, 512\)"),
    (LayerNormModulation(jnp.zeros((3, 256)), jnp.zeros((3, 256))), r"\(3, 512\)"),
    (GeluTanh(512), "outside x's 512 features"),
    (GeluTanh(100), "start 100 must be a multiple of the layer's group size 256"),
    (GeluTanh(256, tail=jnp.zeros((3, 5, 512)), tail_from=256), "needs start = x's 512 features"),
    (GeluTanh(512, tail=jnp.zeros((3, 4, 512)), tail_from=256), r"leading shape \(3, 5\)"),
    (GeluTanh(512, tail=jnp.zeros((3, 5, 512)), tail_from=128), "must be multiples of the layer's group size 256"),
])
def test_bad_prologue_is_named(prologue, match):
    qw, _ = _quantized_layer(512, 64)
    with pytest.raises(ValueError, match=match):
        cj.w4a4_linear(jnp.ones((3, 5, 512)), qw, prologue=prologue, implementation="xla")


@pytest.fixture(scope="module")
def small_bf16():
    model = FluxTransformer2DModel(SMALL, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    inputs = {k: jnp.asarray(v) for k, v in flux_fixtures.flux_inputs(SMALL, height=8, width=12, text_len=32).items()}
    return model, inputs


def test_bf16_model_ignores_the_switch(small_bf16):
    """Float layers always take the XLA producer: fusing changes nothing, bit for bit."""
    model, inputs = small_bf16
    forward = jax.jit(lambda m, kw: m(**kw))
    fused = fuse_projections(nnx.clone(model))
    expected = np.asarray(forward(fused, inputs), np.float32)
    got = forward(fuse_producers(fused, ["layernorm", "gelu"]), inputs)
    np.testing.assert_array_equal(np.asarray(got, np.float32), expected)


@pytest.mark.slow
def test_fused_w4a4_model(small_bf16):
    """W4A4 (XLA reference) with every producer fused: the layers quantize the producers' float32
    output instead of the unfused model's bf16 one, which carries up to three bf16 roundings
    (LayerNorm, times 1 + scale, plus shift), |d| <= 3 * 2^-9 |v|. A code moves (by one step s)
    only where a value lies within |d| of a code boundary: for |v| <= absmax = 7 s, in expectation
    a fraction <= 3 * 7 * 2^-9 of the codes, a squared error <= 21 * 2^-9 s^2 per code against the
    s^2 / 12 of int4 rounding itself: <= 0.49 of the quantization noise's energy, 0.70 of its norm
    (layer by layer, and so through the blocks). So fused and unfused differ by less than 0.7 of
    what the unfused model differs from the bf16 one (measured: 0.56), and the fused model meets
    the W4A4 bound of tests/test_flux_quantize.py."""
    from test_flux_quantize import W4A4_REL_ERROR_BOUND

    model, inputs = small_bf16
    forward = jax.jit(lambda m, kw: m(**kw))
    reference = np.asarray(forward(model, inputs), np.float32)
    unfused = fuse_projections(quantize_model(nnx.clone(model), implementation="xla"))
    base = np.asarray(forward(unfused, inputs), np.float32)
    fused = fuse_producers(nnx.clone(unfused), ["layernorm", "gelu"])
    assert all(block.fused_producers == {"layernorm", "gelu"}
               for block in (*fused.transformer_blocks, *fused.single_transformer_blocks))
    out = np.asarray(forward(fused, inputs), np.float32)
    noise = np.linalg.norm(base - reference)
    assert 0 < np.linalg.norm(out - base) <= 0.7 * noise, (np.linalg.norm(out - base), noise)
    assert np.linalg.norm(out - reference) / np.linalg.norm(reference) <= W4A4_REL_ERROR_BOUND
    only_gelu = np.asarray(forward(fuse_producers(nnx.clone(unfused), ["gelu"]), inputs), np.float32)
    assert not np.array_equal(only_gelu, base) and not np.array_equal(only_gelu, out)
    # With the gated residuals in the GEMM epilogues too (one rounding of the residual stream
    # instead of three, produce_linear passing both to the same layer): still the W4A4 bound.
    both = np.asarray(forward(fuse_gated_residuals(nnx.clone(fused)), inputs), np.float32)
    assert not np.array_equal(both, out)
    assert np.linalg.norm(both - reference) / np.linalg.norm(reference) <= W4A4_REL_ERROR_BOUND


def test_unknown_kind_is_named():
    model = nnx.eval_shape(lambda: FluxTransformer2DModel(FluxConfig.tiny(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"among \['gelu', 'layernorm'\], got \['rmsnorm'\]"):
        fuse_producers(model, ["rmsnorm"])


# --- GPU (Hopper): the fused kernel against the XLA path ---------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,prologue", [
    (4608, 3072, 9216, "layernorm"), (2 * 1536, 3072, 3072, "layernorm"),
    (4608, 12288, 3072, "gelu"), (4608, 15360, 3072, "gelu_from"), (4608, 15360, 3072, "gelu_tail")])
def test_gpu_pallas_layer_matches_xla(m, k, n, prologue):
    """Codes of the two paths differ by one step on <= 0.1% of entries (tests/test_rotate_quantize.py),
    i.e. <= 1 + K / 1000 codes a row, each moving an output by <= s_x * 7 s_w; scales agree to
    float32 rounding; the output is bf16 (one rounding each)."""
    qw, b = _quantized_layer(k, n)
    b = jnp.asarray(b, jnp.bfloat16)
    if prologue == "layernorm":
        images = m // 1536 if m == 2 * 1536 else 1
        p = LayerNormModulation(*(jnp.asarray(RNG.normal(0, 0.5, (images, k)), jnp.bfloat16) for _ in range(2)))
    else:
        p = GeluTanh(3072 if prologue == "gelu_from" else 0)
    images = p.shift.shape[0] if prologue == "layernorm" else 1
    x = jnp.asarray(RNG.standard_t(4, (images, m // images, k)) * 3, jnp.bfloat16)
    if prologue == "gelu_tail":  # FLUX's single blocks: x's MLP part lies in a wider array (the fused projection's)
        wide = jnp.concatenate([jnp.zeros((images, m // images, 6144), x.dtype), x], axis=-1)
        x, p = x[..., :3072], GeluTanh(3072, tail=wide, tail_from=9216)
    got = np.asarray(cj.w4a4_linear(x, qw, b, prologue=p, implementation="pallas"), np.float32)
    want = np.asarray(cj.w4a4_linear(x, qw, b, prologue=p, implementation="xla"), np.float32)
    _, s_x = cj.quantize_activation(apply_prologue(x, p), implementation="xla")
    step = np.asarray(s_x)[..., None] * 7 * np.asarray(qw.scales)
    bf16 = 2.0**-8 * (np.abs(want) + np.abs(got))
    assert np.all(np.abs(got - want) <= (1 + k // 1000) * step + bf16)
