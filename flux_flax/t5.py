"""T5 encoder (FLUX's `text_encoder_2`, T5-XXL v1.1) in Flax NNX, mirroring transformers'
`T5EncoderModel` (models/t5/modeling_t5.py) module for module: every parameter's dotted path is
its transformers state-dict key (nnx.Linear `kernel` = `weight.T`, nnx.Embed `embedding` =
`weight`), so loading is a key map (`flux_flax.text_loading`).

What T5 does differently from most transformers, all mirrored here: the layer norm is an RMSNorm
without mean whose variance is computed in float32 (`T5LayerNorm`); QK^T is not scaled; one
relative-position bias (bidirectional buckets, from the first block's `relative_attention_bias`)
is added to every layer's scores; the FFN of v1.1 is gated (`gated-gelu`: gelu_new, the tanh
approximation); `shared` is the token embedding, and `encoder.embed_tokens` is the same module;
as transformers' `_keep_in_fp32_modules = ["wo"]`, the FFN output projections stay float32 when
the model is built in float16, whose range (65504) T5 v1.1's FFN outputs exceed. Not in bfloat16
(transformers neither): it has float32's 8 exponent bits, so the same values fit, rounded to
bf16's 8-bit mantissa like every other layer's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flux_flax.layers import Dtype, linear

# transformers' ACT2FN entries that text encoders use.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str):
    """transformers' `ACT2FN[name]` for the activations listed in `ACTIVATIONS`."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported (known: {', '.join(sorted(ACTIVATIONS))})")
    return ACTIVATIONS[name]


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The fields of transformers' `T5Config` the encoder uses (same names and defaults)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self):
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not 'ACT' or 'gated-ACT'")
        activation(self.dense_act_fn)

    @property
    def is_gated_act(self) -> bool:
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        # As T5Config: "gated-gelu" means gelu_new (the tanh approximation), for backward compatibility.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    def to_dict(self) -> dict:
        """JSON-ready dict of the fields (a checkpoint's metadata), read back by `from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config: Mapping) -> "T5Config":
        """From a transformers config.json (unknown keys ignored, missing ones at T5Config's defaults)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in fields})


class T5LayerNorm(nnx.Module):
    """RMSNorm without mean or bias; the variance in float32, the result cast back to a half-precision weight's dtype."""

    def __init__(self, hidden_size: int, *, eps: float, dtype: Dtype):
        self.weight = nnx.Param(jnp.ones((hidden_size,), dtype))
        self.variance_epsilon = eps

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        variance = jnp.mean(jnp.square(hidden_states.astype(jnp.float32)), axis=-1, keepdims=True)
        hidden_states = hidden_states * jax.lax.rsqrt(variance + self.variance_epsilon)
        weight = self.weight[...]
        if weight.dtype in (jnp.float16, jnp.bfloat16):
            hidden_states = hidden_states.astype(weight.dtype)
        return weight * hidden_states


def relative_position_bucket(relative_position: np.ndarray, *, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
    """transformers' `T5Attention._relative_position_bucket` in numpy (int64 positions, float32 logs):
    half the buckets for exact small distances, the other half logarithmic up to `max_distance`."""
    relative_position = np.asarray(relative_position, np.int64)
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(np.int64) * num_buckets
        relative_position = np.abs(relative_position)
    else:
        relative_position = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    with np.errstate(all="ignore"):  # log(0) at distance 0, which takes the exact bucket
        scaled = (
            np.log(relative_position.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        )
        if_large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    if_large = np.minimum(if_large, num_buckets - 1)
    return buckets + np.where(is_small, relative_position, if_large)


class T5Attention(nnx.Module):
    """Self-attention without QK^T scaling; the first block's also holds the relative position bias."""

    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype: Dtype, rngs: nnx.Rngs):
        inner = config.num_heads * config.d_kv
        self.n_heads, self.key_value_proj_dim = config.num_heads, config.d_kv
        self.relative_attention_num_buckets = config.relative_attention_num_buckets
        self.relative_attention_max_distance = config.relative_attention_max_distance
        self.q = linear(config.d_model, inner, dtype=dtype, rngs=rngs, bias=False)
        self.k = linear(config.d_model, inner, dtype=dtype, rngs=rngs, bias=False)
        self.v = linear(config.d_model, inner, dtype=dtype, rngs=rngs, bias=False)
        self.o = linear(inner, config.d_model, dtype=dtype, rngs=rngs, bias=False)
        self.relative_attention_bias = (
            nnx.Embed(config.relative_attention_num_buckets, config.num_heads, dtype=dtype, param_dtype=dtype, rngs=rngs)
            if has_relative_attention_bias else None
        )

    def compute_bias(self, query_length: int, key_length: int) -> jax.Array:
        """(1, heads, query_length, key_length) bias; the bucket table is a trace-time constant."""
        relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
        buckets = relative_position_bucket(relative, bidirectional=True, num_buckets=self.relative_attention_num_buckets,
                                           max_distance=self.relative_attention_max_distance)
        values = self.relative_attention_bias.embedding[...][jnp.asarray(buckets, jnp.int32)]  # (q, k, heads)
        return values.transpose(2, 0, 1)[None]

    def __call__(self, hidden_states: jax.Array, mask: jax.Array | None, position_bias: jax.Array | None):
        batch, length, _ = hidden_states.shape

        def heads(x):
            return x.reshape(batch, length, self.n_heads, self.key_value_proj_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(hidden_states)), heads(self.k(hidden_states)), heads(self.v(hidden_states))
        if position_bias is None:
            if self.relative_attention_bias is None:
                position_bias = jnp.zeros((1, self.n_heads, length, length), q.dtype)
            else:
                position_bias = self.compute_bias(length, length)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) + position_bias
        if mask is not None:
            scores = scores + mask
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bqhd", weights, v).reshape(batch, length, -1)
        return self.o(out), position_bias


class T5DenseActDense(nnx.Module):
    """wi -> act -> wo (original T5's ReLU FFN)."""

    def __init__(self, config: T5Config, *, dtype: Dtype, rngs: nnx.Rngs):
        self.wi = linear(config.d_model, config.d_ff, dtype=dtype, rngs=rngs, bias=False)
        self.wo = linear(config.d_ff, config.d_model, dtype=_wo_dtype(dtype), rngs=rngs, bias=False)
        self.wo_dtype = _wo_dtype(dtype)  # kept apart from wo, which may be swapped for a quantized layer
        self.act = activation(config.dense_act_fn)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        hidden_states = self.act(self.wi(hidden_states))
        return self.wo(hidden_states.astype(self.wo_dtype))


class T5DenseGatedActDense(nnx.Module):
    """act(wi_0 x) * wi_1 x -> wo (T5 v1.1's gated-GELU FFN)."""

    def __init__(self, config: T5Config, *, dtype: Dtype, rngs: nnx.Rngs):
        self.wi_0 = linear(config.d_model, config.d_ff, dtype=dtype, rngs=rngs, bias=False)
        self.wi_1 = linear(config.d_model, config.d_ff, dtype=dtype, rngs=rngs, bias=False)
        self.wo = linear(config.d_ff, config.d_model, dtype=_wo_dtype(dtype), rngs=rngs, bias=False)
        self.wo_dtype = _wo_dtype(dtype)
        self.act = activation(config.dense_act_fn)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        hidden_states = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
        return self.wo(hidden_states.astype(self.wo_dtype))


def _wo_dtype(dtype: Dtype) -> Dtype:
    # transformers keeps `wo` in float32 (`_keep_in_fp32_modules`) when loading in float16 only.
    return jnp.float32 if jnp.dtype(dtype) == jnp.dtype(jnp.float16) else dtype


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype: Dtype, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(config, has_relative_attention_bias=has_relative_attention_bias, dtype=dtype,
                                         rngs=rngs)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype)

    def __call__(self, hidden_states, mask, position_bias):
        out, position_bias = self.SelfAttention(self.layer_norm(hidden_states), mask, position_bias)
        return hidden_states + out, position_bias


class T5LayerFF(nnx.Module):
    def __init__(self, config: T5Config, *, dtype: Dtype, rngs: nnx.Rngs):
        ff = T5DenseGatedActDense if config.is_gated_act else T5DenseActDense
        self.DenseReluDense = ff(config, dtype=dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype)

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return hidden_states + self.DenseReluDense(self.layer_norm(hidden_states))


class T5Block(nnx.Module):
    """layer = [T5LayerSelfAttention, T5LayerFF] (the encoder has no cross-attention)."""

    def __init__(self, config: T5Config, *, has_relative_attention_bias: bool, dtype: Dtype, rngs: nnx.Rngs):
        self.layer = nnx.List([
            T5LayerSelfAttention(config, has_relative_attention_bias=has_relative_attention_bias, dtype=dtype, rngs=rngs),
            T5LayerFF(config, dtype=dtype, rngs=rngs),
        ])

    def __call__(self, hidden_states, mask, position_bias):
        hidden_states, position_bias = self.layer[0](hidden_states, mask, position_bias)
        return self.layer[1](hidden_states), position_bias


class T5Stack(nnx.Module):
    def __init__(self, config: T5Config, embed_tokens: nnx.Embed, *, dtype: Dtype, rngs: nnx.Rngs):
        self.embed_tokens = embed_tokens
        self.block = nnx.List([
            T5Block(config, has_relative_attention_bias=i == 0, dtype=dtype, rngs=rngs) for i in range(config.num_layers)
        ])
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon, dtype=dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        hidden_states = self.embed_tokens(input_ids)
        mask = None
        if attention_mask is not None:  # (B, L) of 1 (attend) / 0 (padding) -> additive (B, 1, 1, L)
            mask = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(hidden_states.dtype).min)
            mask = mask.astype(hidden_states.dtype)
        position_bias = None  # made by the first block, shared by the others
        for block in self.block:
            hidden_states, position_bias = block(hidden_states, mask, position_bias)
        return self.final_layer_norm(hidden_states)


class T5EncoderModel(nnx.Module):
    """`shared` (token embedding, also `encoder.embed_tokens`) + `encoder` (T5Stack).
    `model(input_ids)` -> last hidden state (B, L, d_model), as transformers' `[0]` / `last_hidden_state`."""

    def __init__(self, config: T5Config, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.shared = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.encoder = T5Stack(config, self.shared, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return self.encoder(input_ids, attention_mask)
