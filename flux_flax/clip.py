"""CLIP text encoder (FLUX's `text_encoder`, CLIP-L) in Flax NNX, mirroring transformers'
`CLIPTextModel` (models/clip/modeling_clip.py) module for module: every parameter's dotted path is
its transformers 5 state-dict key (files written by transformers 4 carry a `text_model.` prefix,
which the loader strips, as transformers does).

Learned position embeddings, pre-norm layers with a causal mask, the config's activation
(quick-GELU for CLIP-L), a final layer norm, and the pooled output taken at the EOS token exactly
as transformers takes it: with `eos_token_id == 2` (configs written before transformers PR
#24773, FLUX's included) the position of the largest input id, otherwise the first position of
`eos_token_id`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from flux_flax.layers import Dtype, linear
from flux_flax.t5 import activation


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' `CLIPTextConfig` the text model uses (same names and defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        activation(self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")

    @classmethod
    def from_dict(cls, config: Mapping) -> "CLIPTextConfig":
        """From a transformers config.json: a CLIPTextConfig's, or a full CLIPConfig's `text_config`."""
        if "text_config" in config and "hidden_size" not in config:
            config = config["text_config"]
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in fields and v is not None})


def _layer_norm(dim: int, eps: float, dtype: Dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # torch's LayerNorm: two-pass variance (not E[x^2] - E[x]^2), statistics in float32.
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=dtype, use_fast_variance=False, rngs=rngs)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(config.max_position_embeddings, config.hidden_size, dtype=dtype,
                                            param_dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[-1]
        max_length = self.position_embedding.num_embeddings
        if length > max_length:
            raise ValueError(f"sequence length {length} exceeds CLIP's max_position_embeddings {max_length}")
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))[None]


class CLIPAttention(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.k_proj = linear(dim, dim, dtype=dtype, rngs=rngs)
        self.v_proj = linear(dim, dim, dtype=dtype, rngs=rngs)
        self.q_proj = linear(dim, dim, dtype=dtype, rngs=rngs)
        self.out_proj = linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, hidden_states: jax.Array, mask: jax.Array) -> jax.Array:
        batch, length, _ = hidden_states.shape

        def heads(x):
            return x.reshape(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(hidden_states)), heads(self.k_proj(hidden_states)), heads(self.v_proj(hidden_states))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) * self.scale + mask
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        out = jnp.einsum("bhqk,bhkd->bqhd", weights, v).reshape(batch, length, -1)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.activation_fn = activation(config.hidden_act)
        self.fc1 = linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = linear(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)

    def __call__(self, hidden_states: jax.Array, mask: jax.Array) -> jax.Array:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), mask)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: Dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)])

    def __call__(self, hidden_states: jax.Array, mask: jax.Array) -> jax.Array:
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask)
        return hidden_states


class CLIPTextModel(nnx.Module):
    """`model(input_ids)` -> (last_hidden_state (B, L, hidden), pooler_output (B, hidden)), as
    transformers' `last_hidden_state` / `pooler_output`."""

    def __init__(self, config: CLIPTextConfig, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = _layer_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        hidden_states = self.embeddings(input_ids)
        length = input_ids.shape[-1]
        allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]  # (1, 1, q, k): causal
        if attention_mask is not None:  # (B, L) of 1 (attend) / 0 (padding)
            allowed = allowed & (attention_mask[:, None, None, :] > 0)
        mask = jnp.where(allowed, 0.0, jnp.finfo(hidden_states.dtype).min).astype(hidden_states.dtype)
        hidden_states = self.final_layer_norm(self.encoder(hidden_states, mask))
        ids = input_ids.astype(jnp.int32)
        if self.config.eos_token_id == 2:  # transformers' legacy rule: the largest id is the EOS
            eos_position = jnp.argmax(ids, axis=-1)
        else:  # the first EOS (padding may be EOS too)
            eos_position = jnp.argmax((ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(hidden_states, eos_position[:, None, None], axis=1)[:, 0]
        return hidden_states, pooled
