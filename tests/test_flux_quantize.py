"""quantize_model on the small config: the policy's layer choice, abstract use under
nnx.eval_shape, and the W4A4 model's output error against its own bf16 output."""

import flux_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convrot_jax import ConvDense4bit, Dense4bitWeightOnly, QuantPolicy
from flux_flax.policy import flux_default_policy
from flux_flax import FluxConfig, FluxTransformer2DModel, fuse_gated_residuals, linear_paths, quantize_model

CONFIG = FluxConfig.small(num_layers=1, num_single_layers=1)

# Measured (CPU, XLA reference path): ||y_w4a4 - y_bf16|| / ||y_bf16|| = 0.156 for seed 0 (0.131-0.156
# over seeds 0-3; the Sylvester Hadamard gave 0.179-0.207 on the same models). Why ~0.15: each
# int4 quantizer (per-token activations, per-channel weights, 15 levels up to the row's absmax)
# adds noise of about (absmax / 7) / sqrt(12) ~ 0.12-0.14 of a Gaussian row's RMS, so one W4A4
# layer is off by ~0.2 of its output; the residual stream carries the unquantized embeddings and
# averages the layers' independent errors, which leaves ~0.15 at the output. The bound leaves
# room for a reordered float sum in a faster kernel.
W4A4_REL_ERROR_BOUND = 0.2


def paths_by_type(model) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.Linear, ConvDense4bit, Dense4bitWeightOnly)):
            out.setdefault(type(node).__name__, set()).add(".".join(map(str, path)))
    return out


def test_policy_decides_each_layer():
    policy = flux_default_policy()
    model = nnx.eval_shape(lambda: FluxTransformer2DModel(CONFIG, rngs=nnx.Rngs(0)))
    expected = {p: policy.treatment(p) for p, _ in linear_paths(model)}
    kinds = paths_by_type(nnx.eval_shape(lambda: quantize_model(FluxTransformer2DModel(CONFIG, rngs=nnx.Rngs(0)), policy)))
    assert kinds["ConvDense4bit"] == {p for p, t in expected.items() if t == "w4a4"}
    assert kinds["Dense4bitWeightOnly"] == {p for p, t in expected.items() if t == "w4a16"}
    assert kinds["Linear"] == {p for p, t in expected.items() if t == "bf16"}
    assert "single_transformer_blocks.0.proj_out" in kinds["ConvDense4bit"]  # K = 1280
    assert {"x_embedder", "proj_out", "context_embedder"} <= kinds["Linear"]
    assert "norm_out.linear" in kinds["Dense4bitWeightOnly"]
    # double block: 8 attention + 4 MLP linears; single block: q, k, v, proj_mlp, proj_out.
    assert len(kinds["ConvDense4bit"]) == 12 + 5
    # AdaLN: norm1, norm1_context, the single block's norm, norm_out.
    assert len(kinds["Dense4bitWeightOnly"]) == 4


def test_abstract_quantized_model():
    """What the converter restores into: built and quantized under nnx.eval_shape, no arrays."""
    model = nnx.eval_shape(lambda: quantize_model(FluxTransformer2DModel(CONFIG, rngs=nnx.Rngs(0))))
    to_q = model.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, ConvDense4bit)
    assert isinstance(to_q.packed.get_value(), jax.ShapeDtypeStruct)
    assert to_q.packed.shape == (256, 128) and to_q.packed.dtype == jnp.uint8
    assert model.single_transformer_blocks[0].proj_out.packed.shape == (256, 640)
    assert isinstance(model.norm_out.linear, Dense4bitWeightOnly)


@pytest.mark.slow
@pytest.mark.parametrize("gated_residuals", [False, True], ids=["unfused", "epilogue"])
def test_w4a4_output_error_is_bounded(gated_residuals):
    """Also with the gated residuals in the W4A4 epilogues: one bf16 rounding instead of three
    moves the output by ~2^-8 of the residual stream, far inside the quantization bound."""
    model = FluxTransformer2DModel(CONFIG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    inputs = {k: jnp.asarray(v) for k, v in flux_fixtures.flux_inputs(CONFIG, height=8, width=12, text_len=32).items()}
    forward = jax.jit(lambda m, kw: m(**kw))
    reference = np.asarray(forward(model, inputs), np.float32)
    quantized = fuse_gated_residuals(quantize_model(nnx.clone(model)), enabled=gated_residuals)
    out = forward(quantized, inputs)
    assert out.dtype == jnp.bfloat16 and out.shape == reference.shape
    out = np.asarray(out, np.float32)
    assert np.all(np.isfinite(out))
    rel = np.linalg.norm(out - reference) / np.linalg.norm(reference)
    assert 0.02 < rel <= W4A4_REL_ERROR_BOUND, rel  # quantization really happened, and stayed bounded


def test_group_size_must_divide_k():
    with pytest.raises(ValueError, match=r"cannot quantize norm_out\.linear \(kernel \(32, 64\)\).*group size"):
        nnx.eval_shape(lambda: quantize_model(FluxTransformer2DModel(FluxConfig.tiny(), rngs=nnx.Rngs(0))))


# The FLUX preset (docs/design.md, "Layer policy").
@pytest.mark.parametrize("path,treatment", [
    ("transformer_blocks.0.attn.to_q", "w4a4"),
    ("transformer_blocks.18.attn.to_out.0", "w4a4"),
    ("transformer_blocks.3.attn.add_v_proj", "w4a4"),
    ("transformer_blocks.3.attn.to_add_out", "w4a4"),
    ("transformer_blocks.1.ff.net.0.proj", "w4a4"),
    ("transformer_blocks.1.ff_context.net.2", "w4a4"),
    ("single_transformer_blocks.37.attn.to_k", "w4a4"),
    ("single_transformer_blocks.0.proj_mlp", "w4a4"),
    ("single_transformer_blocks.0.proj_out", "w4a4"),
    ("transformer_blocks.0.norm1.linear", "w4a16"),
    ("transformer_blocks.0.norm1_context.linear", "w4a16"),
    ("single_transformer_blocks.5.norm.linear", "w4a16"),
    ("norm_out.linear", "w4a16"),
    ("x_embedder", "bf16"),
    ("context_embedder", "bf16"),
    ("time_text_embed.timestep_embedder.linear_1", "bf16"),
    ("proj_out", "bf16"),
])
def test_flux_default_policy(path, treatment):
    assert flux_default_policy().treatment(path) == treatment
