"""Random-weight FLUX transformers for benchmarks, made straight on the default device (and
diffusers' PyTorch twin of the same shape, for the peer rows).

The model is built abstractly (`nnx.eval_shape`) and every parameter is then drawn by one small
jitted N(0, 0.02²) generator per shape with the fast `unsafe_rbg` PRNG: seconds for FLUX.1-dev's
12B parameters, where the jitted NNX constructor (threefry, truncated normals) takes minutes.
Values only need to be realistic in scale for timing and quantization-error figures.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flux_flax import FluxConfig, abstract_transformer


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)


def random_transformer(config: FluxConfig, *, seed: int = 0, dtype=jnp.bfloat16) -> nnx.Module:
    """A FluxTransformer2DModel with N(0, 0.02²) weights, made on the default device."""
    graphdef, abstract_state = nnx.split(abstract_transformer(config, dtype=dtype))
    leaves, treedef = jax.tree.flatten(abstract_state)
    keys = jax.random.split(jax.random.key(seed, impl="unsafe_rbg"), len(leaves))
    state = jax.tree.unflatten(treedef, [_normal(k, tuple(x.shape), x.dtype) for k, x in zip(keys, leaves)])
    return nnx.merge(graphdef, state)


def torch_transformer(config: FluxConfig, device: str):
    """diffusers' FluxTransformer2DModel of `config`'s shape in bf16 with diffusers' own random
    initialisation, made on `device` (seconds on a GPU), in eval mode without gradients."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = FluxTransformer2DModel(
                patch_size=1, in_channels=config.in_channels, num_layers=config.num_layers,
                num_single_layers=config.num_single_layers, attention_head_dim=config.attention_head_dim,
                num_attention_heads=config.num_attention_heads, joint_attention_dim=config.joint_attention_dim,
                pooled_projection_dim=config.pooled_projection_dim, guidance_embeds=config.guidance_embeds,
                axes_dims_rope=tuple(config.axes_dims_rope))
        finally:
            torch.set_default_dtype(torch.float32)
    return model.eval().requires_grad_(False)
