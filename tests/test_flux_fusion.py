"""Fused projections: `ConvDense4bit.concatenate` / `Dense4bitWeightOnly.concatenate` and
`flux_flax.fuse_projections` against the unfused layers and models; the gated residuals in the
W4A4 GEMM epilogue (`flux_flax.fuse_gated_residuals`) against the model without them."""

import flux_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convrot_jax import ConvDense4bit, Dense4bitWeightOnly, QuantPolicy
from flux_flax.policy import flux_default_policy
import convrot_jax.linear
from flux_flax import FluxConfig, FluxTransformer2DModel, fuse_gated_residuals, fuse_projections, quantize_model

SMALL = FluxConfig.small(num_layers=1, num_single_layers=1)


def random_layer(cls, seed: int, out_features: int, *, in_features: int = 256, bias: bool = True, **kwargs):
    k = jax.random.split(jax.random.key(seed), 2)
    weight = jax.random.normal(k[0], (out_features, in_features)) * 0.05
    b = jax.random.normal(k[1], (out_features,)) if bias else None
    return cls.from_linear(weight, b, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("scale_group", [None, 64])
@pytest.mark.parametrize("cls", [ConvDense4bit, Dense4bitWeightOnly])
def test_concatenate_is_exact(cls, scale_group):
    """The fused layer's output is the separate outputs concatenated, bit for bit: same codes,
    same per-row scales, same integer GEMM entries; a missing bias becomes zeros."""
    kwargs = dict(scale_group=scale_group, **({"implementation": "xla"} if cls is ConvDense4bit else {}))
    layers = [random_layer(cls, 0, 128, **kwargs), random_layer(cls, 1, 64, bias=False, **kwargs),
              random_layer(cls, 2, 256, **kwargs)]
    fused = cls.concatenate(layers)
    assert type(fused) is cls and fused.out_features == 448 and fused.in_features == 256
    assert fused.bias[...].dtype == jnp.bfloat16 and not np.any(np.asarray(fused.bias[...][128:192], np.float32))
    x = jax.random.normal(jax.random.key(3), (2, 5, 256), jnp.bfloat16)
    expected = jnp.concatenate([layer(x) for layer in layers], axis=-1)
    np.testing.assert_array_equal(np.asarray(fused(x), np.float32), np.asarray(expected, np.float32))


def test_concatenate_without_biases():
    fused = ConvDense4bit.concatenate([random_layer(ConvDense4bit, i, 64, bias=False) for i in range(2)])
    assert fused.bias is None


@pytest.mark.parametrize("other, mismatch", [
    (dict(in_features=512), "in_features"),
    (dict(group_size=64), "group_size"),
    (dict(hadamard="sylvester"), "hadamard"),
    (dict(scale_group=128), "scale_group"),
    (dict(implementation="pallas"), "implementation"),
])
def test_concatenate_refuses_mismatched_settings(other, mismatch):
    with pytest.raises(ValueError, match=f"cannot concatenate layers with different {mismatch}"):
        ConvDense4bit.concatenate([random_layer(ConvDense4bit, 0, 64), random_layer(ConvDense4bit, 1, 64, **other)])


def test_concatenate_refuses_other_types():
    with pytest.raises(TypeError, match="ConvDense4bit layers"):
        ConvDense4bit.concatenate([random_layer(ConvDense4bit, 0, 64), random_layer(Dense4bitWeightOnly, 1, 64)])
    with pytest.raises(TypeError):
        ConvDense4bit.concatenate([])


def fused_paths(model) -> set[str]:
    names = {"to_qkv", "to_added_qkv", "to_qkv_mlp"}
    return {".".join(map(str, p)) for p, node in nnx.iter_graph(model) if p and p[-1] in names and node is not None}


def test_fused_float_model_matches_unfused():
    """float32 tiny model: the same output within float rounding (bit for bit on XLA:CPU; a GPU
    GEMM may sum a wider N in another order), through diffusers' method name."""
    config = FluxConfig.tiny()
    model = FluxTransformer2DModel(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    inputs = {k: jnp.asarray(v) for k, v in flux_fixtures.flux_inputs(config).items()}
    forward = jax.jit(lambda m, kw: m(**kw))
    expected = forward(model, inputs)
    fused = nnx.clone(model).fuse_qkv_projections()
    assert fused_paths(fused) == {"transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.attn.to_added_qkv",
                                  "single_transformer_blocks.0.to_qkv_mlp"}
    block, single = fused.transformer_blocks[0], fused.single_transformer_blocks[0]
    assert block.attn.to_q is None and block.attn.add_v_proj is None
    assert single.proj_mlp is None and single.attn.to_q is None and single.attn.to_qkv is None
    assert single.to_qkv_mlp.kernel.shape == (32, 3 * 32 + 128)
    np.testing.assert_array_equal(single.to_qkv_mlp.bias[...][96:], model.single_transformer_blocks[0].proj_mlp.bias[...])
    tokens = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
    assert flux_fixtures.relative_error(forward(fused, inputs), expected) <= flux_fixtures.model_tolerance(config, tokens)


@pytest.fixture(scope="module")
def small_bf16():
    model = FluxTransformer2DModel(SMALL, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    inputs = {k: jnp.asarray(v) for k, v in flux_fixtures.flux_inputs(SMALL, height=4, width=6, text_len=8).items()}
    return model, inputs


@pytest.mark.slow
def test_fused_w4a4_model_is_bit_exact(small_bf16):
    """W4A4 (XLA reference): the fused layers hold the very codes and scales of the separate ones,
    each token's activation is quantized once from the same input, the int32 GEMM is exact, and
    the dequantizing epilogue is elementwise, so the output is the unfused one bit for bit."""
    model, inputs = small_bf16
    quantized = quantize_model(nnx.clone(model), implementation="xla")
    forward = jax.jit(lambda m, kw: m(**kw))
    expected = np.asarray(forward(quantized, inputs), np.float32)
    fused = fuse_projections(nnx.clone(quantized))
    assert len(fused_paths(fused)) == 3
    assert isinstance(fused.single_transformer_blocks[0].to_qkv_mlp, ConvDense4bit)
    assert fused.single_transformer_blocks[0].to_qkv_mlp.packed.shape == (7 * 256, 128)
    np.testing.assert_array_equal(np.asarray(forward(fused, inputs), np.float32), expected)

    # Fusing again changes nothing; fusing before quantizing gives the same layers (the policy
    # names the fused projections too).
    graphdef, state = nnx.split(fused)
    again = fuse_projections(fused)
    assert nnx.graphdef(again) == graphdef
    jax.tree.map(np.testing.assert_array_equal, nnx.state(again), state)
    fused_first = quantize_model(fuse_projections(nnx.clone(model)), implementation="xla")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(fused_first), state)


@pytest.mark.slow
def test_mixed_types_stay_unfused(small_bf16):
    """A policy keeping proj_mlp and the text stream's q in bf16: those sets stay unfused, and the
    single block fuses just its q, k, v into attn.to_qkv. The output is unchanged."""
    model, inputs = small_bf16
    base = flux_default_policy()
    policy = QuantPolicy(rules=((r".*(proj_mlp|add_q_proj)", "bf16"), *base.rules), default=base.default)
    quantized = quantize_model(nnx.clone(model), policy, implementation="xla")
    forward = jax.jit(lambda m, kw: m(**kw))
    expected = np.asarray(forward(quantized, inputs), np.float32)
    fused = fuse_projections(quantized)
    assert fused_paths(fused) == {"transformer_blocks.0.attn.to_qkv", "single_transformer_blocks.0.attn.to_qkv"}
    assert isinstance(fused.single_transformer_blocks[0].proj_mlp, nnx.Linear)
    np.testing.assert_array_equal(np.asarray(forward(fused, inputs), np.float32), expected)


def test_abstract_fused_model():
    """Fusion works under nnx.eval_shape (no arrays), e.g. to describe a fused quantized model."""
    model = nnx.eval_shape(lambda: fuse_projections(quantize_model(FluxTransformer2DModel(SMALL, rngs=nnx.Rngs(0)))))
    to_qkv = model.transformer_blocks[0].attn.to_qkv
    assert isinstance(to_qkv.packed.get_value(), jax.ShapeDtypeStruct)
    assert to_qkv.packed.shape == (3 * 256, 128) and to_qkv.scales.shape == (3 * 256,)
    assert to_qkv.bias.shape == (3 * 256,)


def test_settings_mismatch_names_the_layer(small_bf16):
    model, _ = small_bf16
    quantized = quantize_model(nnx.clone(model), implementation="xla")
    quantized.transformer_blocks[0].attn.to_k.implementation = "auto"
    with pytest.raises(ValueError, match=r"cannot fuse transformer_blocks\.0\.attn\.to_qkv: .*implementation"):
        fuse_projections(quantized)


def test_gated_residuals_in_the_epilogue_match_unfused(monkeypatch):
    """W4A4 layers (XLA reference) in a float32 model, 2 images: with the five gated residuals of
    a block pair (to_out, to_add_out, ff, ff_context, proj_out) fused into the W4A4 linears, the
    output is the unfused one within float32 rounding (`model_tolerance`): in float32 both compute
    residual + gate * (linear + bias) from the same codes; a quantizer code could flip only on an
    input within a few ulps of a rounding boundary, which these few thousand values do not reach.
    A wrong gate, residual, image or layer at any site is off by O(1). Switching back restores
    the unfused graph bit for bit."""
    model = FluxTransformer2DModel(SMALL, dtype=jnp.float32, rngs=nnx.Rngs(0))
    quantized = fuse_projections(quantize_model(model, implementation="xla"))
    inputs = {k: jnp.asarray(v) for k, v in flux_fixtures.flux_inputs(SMALL, height=4, width=6, text_len=8).items()}
    forward = jax.jit(lambda m, kw: m(**kw))
    expected = np.asarray(forward(quantized, inputs))

    fused_sites = []
    reference = convrot_jax.linear.gated_residual_reference
    monkeypatch.setattr(convrot_jax.linear, "gated_residual_reference",
                        lambda y, gate, residual: fused_sites.append(y.shape) or reference(y, gate, residual))
    fused = fuse_gated_residuals(nnx.clone(quantized))
    out = np.asarray(forward(fused, inputs))
    assert len(fused_sites) == 5  # traced once: every site takes the fused path
    tokens = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
    assert flux_fixtures.relative_error(out, expected) <= flux_fixtures.model_tolerance(SMALL, tokens)

    unfused = fuse_gated_residuals(fused, enabled=False)
    assert not unfused.transformer_blocks[0].fuse_epilogue and not unfused.single_transformer_blocks[0].fuse_epilogue
    np.testing.assert_array_equal(np.asarray(forward(unfused, inputs)), expected)
