"""Loading a FLUX.1 transformer from safetensors (diffusers or black-forest-labs layout) into the
NNX model, built abstractly and filled one tensor at a time: no random 12B model is ever made."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from flux_flax.safetensors_io import FluxCheckpoint, open_checkpoint
from flux_flax.config import FluxConfig
from flux_flax.layers import Dtype
from flux_flax.transformer import FluxTransformer2DModel, param_paths


def diffusers_key(param_path: str) -> tuple[str, bool]:
    """An NNX parameter path -> (diffusers state-dict key, whether to transpose):
    "x_embedder.kernel" -> ("x_embedder.weight", True); biases and norm weights map as they are."""
    module, _, name = param_path.rpartition(".")
    if name == "kernel":
        return f"{module}.weight", True
    return param_path, False


def expected_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """{diffusers key: PyTorch-layout shape} of a (possibly abstract) float model's parameters."""
    out = {}
    for path, var in param_paths(model):
        key, transpose = diffusers_key(path)
        out[key] = tuple(reversed(var.shape)) if transpose else tuple(var.shape)
    return out


def load_weights(model: nnx.Module, checkpoint: FluxCheckpoint) -> None:
    """Validates `checkpoint` against `model` (keys and shapes; raises flux_flax.errors' exceptions
    naming the keys) and fills every parameter in place, cast to the parameter's dtype. `model`
    may be abstract (from `nnx.eval_shape`)."""
    checkpoint.validate(expected_shapes(model))
    for path, var in param_paths(model):
        key, transpose = diffusers_key(path)
        tensor = checkpoint.read(key)
        var.set_value((tensor.T if transpose else tensor).astype(var.dtype))


def abstract_transformer(config: FluxConfig, *, dtype: Dtype = jnp.bfloat16,
                         attention_impl: str | None = None) -> FluxTransformer2DModel:
    """The model with `jax.ShapeDtypeStruct`s for weights: shapes only, no memory."""
    return nnx.eval_shape(lambda: FluxTransformer2DModel(config, dtype=dtype, attention_impl=attention_impl,
                                                         rngs=nnx.Rngs(0)))


def load_transformer(path: str | Path, *, dtype: Dtype = jnp.bfloat16, config: FluxConfig | None = None,
                     attention_impl: str | None = None) -> FluxTransformer2DModel:
    """Loads a FLUX.1 transformer: a diffusers transformer directory (config.json + one or
    sharded safetensors), a diffusers pipeline root (its transformer/), or a black-forest-labs
    single file. `config` defaults to the checkpoint's config.json, or one inferred from tensor
    shapes (bfl files). Weights are cast to `dtype`."""
    with open_checkpoint(path) as checkpoint:
        if config is None:
            config = FluxConfig.from_diffusers_config(checkpoint.diffusers_config())
        model = abstract_transformer(config, dtype=dtype, attention_impl=attention_impl)
        load_weights(model, checkpoint)
    return model
