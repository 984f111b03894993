"""The Flax FLUX transformer against diffusers: whole model through real safetensors in every
layout, float32, max|diff| / max|ref| within the float32 bound of the model's reductions
(`flux_fixtures.model_tolerance`)."""

import flux_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_flax.safetensors_io import open_checkpoint
from flux_flax import FluxConfig, FluxTransformer2DModel, load_transformer

TOKENS = 3 * 5 + 7  # image tokens (height 3 x width 5) + text tokens, as `reference` makes them


def tol(config: FluxConfig) -> float:
    return flux_fixtures.model_tolerance(config, TOKENS)

CONFIGS = {
    "dev_like": FluxConfig.tiny(guidance_embeds=True),
    "schnell_like": FluxConfig.tiny(guidance_embeds=False),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
    """(config, torch model, inputs, expected output, diffusers dir) per config."""
    config = CONFIGS[request.param]
    torch_model = flux_fixtures.diffusers_transformer(config, seed=1)
    inputs = flux_fixtures.flux_inputs(config, batch=2, height=3, width=5, text_len=7)
    expected = flux_fixtures.run_diffusers(torch_model, inputs)
    directory = flux_fixtures.save_diffusers(torch_model, tmp_path_factory.mktemp(request.param) / "transformer")
    return config, torch_model, inputs, expected, directory


def run(model: FluxTransformer2DModel, inputs: dict) -> np.ndarray:
    return np.asarray(model(**{k: jnp.asarray(v) for k, v in inputs.items()}), np.float32)


def test_diffusers_dir_matches_diffusers(reference):
    config, _, inputs, expected, directory = reference
    model = load_transformer(directory, dtype=jnp.float32)
    assert model.config == config
    out = run(model, inputs)
    assert out.shape == expected.shape == (2, 15, config.in_channels)
    assert flux_fixtures.relative_error(out, expected) <= tol(config)


def test_jitted_forward_matches_diffusers(reference):
    config, _, inputs, expected, directory = reference
    model = load_transformer(directory, dtype=jnp.float32)
    forward = jax.jit(lambda m, kw: m(**kw))
    out = np.asarray(forward(model, {k: jnp.asarray(v) for k, v in inputs.items()}))
    assert flux_fixtures.relative_error(out, expected) <= tol(config)


@pytest.mark.parametrize("prefix", [False, True])
def test_bfl_single_file_matches_diffusers(reference, tmp_path, prefix):
    config, torch_model, inputs, expected, _ = reference
    file = flux_fixtures.save_bfl(torch_model, tmp_path / "flux1-tiny.safetensors", prefix=prefix)
    # head size 16 is not FLUX.1's, so the RoPE axes cannot be inferred: the config is given.
    model = load_transformer(file, dtype=jnp.float32, config=config)
    assert flux_fixtures.relative_error(run(model, inputs), expected) <= tol(config)


def test_sharded_dir_and_pipeline_root(reference, tmp_path):
    config, torch_model, inputs, expected, _ = reference
    sharded = flux_fixtures.save_diffusers(torch_model, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    with open_checkpoint(sharded) as checkpoint:
        assert checkpoint.files == sorted(sharded.glob("*.safetensors"))
    root = flux_fixtures.save_pipeline_root(torch_model, tmp_path / "pipeline")
    for path in (sharded, root):
        model = load_transformer(path, dtype=jnp.float32)
        assert flux_fixtures.relative_error(run(model, inputs), expected) <= tol(config)


def test_bf16_load_is_close(reference):
    """The production dtype: weights and activations in bf16 (8 mantissa bits, ~0.4% per op)
    stay within 5% of the float32 reference on the tiny model."""
    _, _, inputs, expected, directory = reference
    model = load_transformer(directory)
    out = model(**{k: jnp.asarray(v) for k, v in inputs.items()})
    assert out.dtype == jnp.bfloat16
    assert model.x_embedder.kernel.dtype == jnp.bfloat16
    assert flux_fixtures.relative_error(np.asarray(out, np.float32), expected) <= 5e-2


def test_guidance_matches_the_config(reference):
    """A dev-like model (guidance embedding) refuses a call without guidance; a schnell-like one
    runs without it and matches diffusers."""
    config, _, inputs, expected, directory = reference
    model = load_transformer(directory, dtype=jnp.float32)
    no_guidance = {k: v for k, v in inputs.items() if k != "guidance"}
    if config.guidance_embeds:
        with pytest.raises(ValueError, match="guidance"):
            run(model, no_guidance)
    else:
        assert flux_fixtures.relative_error(run(model, no_guidance), expected) <= tol(config)


def test_scalar_timestep_and_guidance_broadcast(reference):
    config, _, inputs, _, directory = reference
    model = load_transformer(directory, dtype=jnp.float32)
    same = {**inputs, "timestep": np.full(2, inputs["timestep"][0], np.float32)}
    scalar = {**inputs, "timestep": inputs["timestep"][0]}
    if config.guidance_embeds:
        same["guidance"] = np.full(2, inputs["guidance"][0], np.float32)
        scalar["guidance"] = inputs["guidance"][0]
    np.testing.assert_array_equal(run(model, scalar), run(model, same))
