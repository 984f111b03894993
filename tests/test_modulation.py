"""AdaLN modulation computed once per generation (`FluxTransformer2DModel.modulation`,
`sampling.steps_modulation`) against computing it inside each step: bit for bit on XLA:CPU at
these widths (where its GEMMs sum each row in the same order for every M), for float32 and bf16
models, with and without a guidance embedding, float and quantized (W4A16 modulation layers, W4A4
elsewhere, fused projections); and the loop body without the modulation's GEMMs."""

import flux_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flux_flax import FluxConfig, FluxTransformer2DModel, fuse_projections, quantize_model, sampling

CONFIGS = {"dev_like": FluxConfig.tiny(guidance_embeds=True), "schnell_like": FluxConfig.tiny(guidance_embeds=False)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SMALL = FluxConfig.small(num_layers=1, num_single_layers=1)


def tiny_model(config_name: str, dtype_name: str) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(CONFIGS[config_name], dtype=DTYPES[dtype_name], rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def quantized_small() -> FluxTransformer2DModel:
    """bf16 small model, default policy (modulation layers W4A16, group 256), fused projections."""
    model = FluxTransformer2DModel(SMALL, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    return fuse_projections(quantize_model(model, implementation="xla"))


def inputs_for(config: FluxConfig, batch: int, seed: int = 0) -> dict:
    return {k: jnp.asarray(v) for k, v in flux_fixtures.flux_inputs(config, batch=batch, seed=seed).items()}


@jax.jit
def plain_forward(model, inputs):
    return model(**inputs)


@jax.jit
def forward_with(model, inputs, modulation):
    return model(**inputs, modulation=modulation)


@jax.jit
def stacked_modulation(model, timestep, pooled, guidance):
    return model.modulation(timestep, pooled, guidance)


def check_precomputed_forward(model: FluxTransformer2DModel, batch: int = 2, steps: int = 3) -> None:
    """For `steps` timesteps: the modulation of all steps' rows at once (M = steps x batch), row
    block i fed to the forward, equals the plain forward at timestep i bit for bit."""
    config = model.config
    inputs = inputs_for(config, batch)
    timesteps = jnp.asarray(np.linspace(0.9, 0.2, steps), jnp.float32)
    guidance = inputs.get("guidance")
    modulation = stacked_modulation(model, jnp.repeat(timesteps, batch),
                                    jnp.tile(inputs["pooled_projections"], (steps, 1)),
                                    None if guidance is None else jnp.tile(guidance, steps))
    assert modulation.norm_out.shape == (steps * batch, 2 * config.inner_dim)
    assert modulation.transformer_blocks[0][1].shape == (steps * batch, 6 * config.inner_dim)
    for i, t in enumerate(timesteps):
        step_inputs = {**inputs, "timestep": jnp.full((batch,), t)}
        rows = jax.tree.map(lambda m: m[i * batch:(i + 1) * batch], modulation)
        expected = plain_forward(model, step_inputs)
        np.testing.assert_array_equal(np.asarray(forward_with(model, step_inputs, rows), np.float32),
                                      np.asarray(expected, np.float32))
    # The precomputed modulation is what the step uses: another one changes the output.
    other = jax.tree.map(lambda m: m[:batch], modulation)
    last = {**inputs, "timestep": jnp.full((batch,), timesteps[-1])}
    assert not np.array_equal(np.asarray(forward_with(model, last, other), np.float32),
                              np.asarray(plain_forward(model, last), np.float32))


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_precomputed_modulation_matches_plain_forward(config_name, dtype_name):
    check_precomputed_forward(tiny_model(config_name, dtype_name))


@pytest.mark.slow
def test_precomputed_modulation_of_a_quantized_fused_model(quantized_small):
    assert type(quantized_small.transformer_blocks[0].norm1.linear).__name__ == "Dense4bitWeightOnly"
    check_precomputed_forward(quantized_small)


# XLA:CPU may keep the bf16 values inside a fusion in float32 (`xla_allow_excess_precision`), and
# the two denoise loops fuse the ops around the modulation differently, so with it their last bits can
# differ (measured: both at batch 1, the quantized one at batch 2): rounding that
# depends on XLA's fusion, not on the precompute, which with it off is exact.
NO_EXCESS_PRECISION = {"xla_allow_excess_precision": False}


def run_denoise(model: FluxTransformer2DModel, batch: int, steps: int, precompute: bool) -> np.ndarray:
    config = model.config
    inputs = inputs_for(config, batch, seed=1)
    sigmas = jnp.asarray(sampling.flux_sigmas(steps, inputs["hidden_states"].shape[1]))
    denoise = jax.jit(lambda m, kw: sampling.denoise(
        m, kw["hidden_states"], kw["encoder_hidden_states"].astype(m.dtype), kw["pooled_projections"].astype(m.dtype),
        kw["img_ids"], kw["txt_ids"], sigmas, kw.get("guidance"), precompute_modulation=precompute),
        compiler_options=NO_EXCESS_PRECISION if model.dtype == jnp.bfloat16 else None)
    return np.asarray(denoise(model, inputs))


def check_denoise(model: FluxTransformer2DModel, batch: int, steps: int = 3) -> None:
    expected = run_denoise(model, batch, steps, precompute=False)
    np.testing.assert_array_equal(run_denoise(model, batch, steps, precompute=True), expected)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_denoise_with_precomputed_modulation_is_bit_exact(dtype_name, config_name, batch):
    """Batch 1 included: the per-step modulation is then a matrix-vector product (M = 1), the
    precomputed one a GEMM with M = steps. bf16 without excess precision (`NO_EXCESS_PRECISION`)."""
    check_denoise(tiny_model(config_name, dtype_name), batch)


@pytest.mark.slow
def test_bf16_denoise_of_a_quantized_fused_model_is_bit_exact(quantized_small):
    check_denoise(quantized_small, 1, steps=2)


def dot_count(jaxpr) -> int:
    """dot_general equations in a jaxpr and every jaxpr nested in it (jit, loops, custom calls)."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "dot_general"
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    count += dot_count(sub)
    return count


def loop_body_dots(model: FluxTransformer2DModel, precompute: bool) -> int:
    config = model.config
    inputs = inputs_for(config, 1)
    sigmas = jnp.asarray(sampling.flux_sigmas(2, inputs["hidden_states"].shape[1]))
    jaxpr = jax.make_jaxpr(lambda kw: sampling.denoise(
        model, kw["hidden_states"], kw["encoder_hidden_states"], kw["pooled_projections"], kw["img_ids"],
        kw["txt_ids"], sigmas, kw.get("guidance"), precompute_modulation=precompute))(inputs)
    [loop] = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"]  # fori_loop, static bounds
    return dot_count(loop.params["jaxpr"].jaxpr)


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_step_runs_no_modulation_or_time_embedding(config_name):
    """The loop body loses exactly the modulation layers (norm1, norm1_context, norm, norm_out)
    and the time/text embedding's linears (2 each for time, guidance, pooled text)."""
    model = tiny_model(config_name, "float32")
    embedding_linears = 2 * (2 + CONFIGS[config_name].guidance_embeds)
    assert loop_body_dots(model, False) - loop_body_dots(model, True) == 4 + embedding_linears
