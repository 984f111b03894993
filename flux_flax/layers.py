"""FLUX building blocks in Flax NNX, each mirroring the diffusers module of the same name (same
attribute names, same forward), so a diffusers state-dict key is the NNX path with `kernel` for
`weight` (transposed). Norms, RoPE and softmax run in float32 as diffusers upcasts them; the
linears run in the model dtype."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from convrot_jax import ops
from convrot_jax.layers import ConvDense4bit
from flux_flax import sequence_parallel

Dtype = jnp.dtype | type


def linear(in_features: int, out_features: int, *, dtype: Dtype, rngs: nnx.Rngs, bias: bool = True) -> nnx.Linear:
    """`torch.nn.Linear` in the model dtype: kernel (in, out) = torch weight.T."""
    return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class RMSNorm(nnx.Module):
    """`torch.nn.RMSNorm(dim, eps)` with a learned `weight`; computed in float32."""

    def __init__(self, dim: int, *, eps: float, dtype: Dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """`nn.LayerNorm(dim, elementwise_affine=False, eps)`, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Embeddings (diffusers/models/embeddings.py)


def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int, flip_sin_to_cos: bool = True,
                           downscale_freq_shift: float = 0.0, max_period: int = 10000) -> jax.Array:
    """Sinusoidal embedding of (N,) timesteps -> (N, embedding_dim) float32, as diffusers'."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    return emb


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.linear_1 = linear(in_channels, time_embed_dim, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(time_embed_dim, time_embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, sample: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(sample)))


class PixArtAlphaTextProjection(nnx.Module):
    """The pooled-text projection: linear_1 -> SiLU -> linear_2 (FLUX uses act_fn="silu")."""

    def __init__(self, in_features: int, hidden_size: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.linear_1 = linear(in_features, hidden_size, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(hidden_size, hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, caption: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(caption)))


class CombinedTimestepTextProjEmbeddings(nnx.Module):
    """diffusers' CombinedTimestepTextProjEmbeddings, or with `guidance_embeds` its
    CombinedTimestepGuidanceTextProjEmbeddings: temb = t_emb [+ guidance_emb] + pooled_emb."""

    def __init__(self, embedding_dim: int, pooled_projection_dim: int, *, guidance_embeds: bool, dtype: Dtype,
                 rngs: nnx.Rngs):
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim, dtype=dtype, rngs=rngs)
        self.guidance_embedder = (
            TimestepEmbedding(256, embedding_dim, dtype=dtype, rngs=rngs) if guidance_embeds else None
        )
        self.text_embedder = PixArtAlphaTextProjection(pooled_projection_dim, embedding_dim, dtype=dtype, rngs=rngs)

    def __call__(self, timestep: jax.Array, pooled_projection: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
        dtype = pooled_projection.dtype
        emb = self.timestep_embedder(get_timestep_embedding(timestep, 256).astype(dtype))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this model has a guidance embedding (FLUX.1-dev): pass `guidance`")
            emb = emb + self.guidance_embedder(get_timestep_embedding(guidance, 256).astype(dtype))
        return emb + self.text_embedder(pooled_projection)


class FluxPosEmbed(nnx.Module):
    """3-axis RoPE tables: ids (S, n_axes) -> (cos, sin), each (S, head_dim) float32, every
    frequency repeated twice (diffusers' `repeat_interleave_real=True`). diffusers forms the
    angles in float64; here the frequencies are float64 constants and the angle pos * freq is one
    float32 product, off by at most half an ulp (under 8e-6 rad for positions below 128)."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]):
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def __call__(self, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        pos = ids.astype(jnp.float32)
        cos_out, sin_out = [], []
        for i, dim in enumerate(self.axes_dim):
            freqs = 1.0 / (self.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
            angles = pos[:, i, None] * jnp.asarray(freqs, jnp.float32)[None, :]
            cos_out.append(jnp.repeat(jnp.cos(angles), 2, axis=-1))
            sin_out.append(jnp.repeat(jnp.sin(angles), 2, axis=-1))
        return jnp.concatenate(cos_out, axis=-1), jnp.concatenate(sin_out, axis=-1)


def apply_rotary_emb(x: jax.Array, freqs_cis: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates (B, S, H, D) queries/keys by the (S, D) tables; pairs are adjacent (x[2i], x[2i+1]),
    as diffusers' `apply_rotary_emb(..., use_real_unbind_dim=-1, sequence_dim=1)`."""
    cos, sin = (f[None, :, None, :] for f in freqs_cis)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    x_rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x.astype(jnp.float32) * cos + x_rotated.astype(jnp.float32) * sin).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# AdaLN modulation (diffusers/models/normalization.py)
#
# Each module splits its forward in two: `modulation(emb)` is the vector linear(SiLU(emb)), which
# depends only on the conditioning (time, guidance, pooled text: known before the denoising loop,
# so it can be computed for every step at once), and `modulate(x, modulation)` applies it to x.
# `__call__(x, emb)` is the two in turn, as diffusers' forward.


def modulate(x: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    """LayerNorm(x) * (1 + scale) + shift, with (B, dim) scale and shift broadcast over the tokens."""
    return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nnx.Module):
    """linear(SiLU(emb)) -> 6 chunks; returns the modulated norm and gate/shift/scale/gate."""

    def __init__(self, embedding_dim: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.linear = linear(embedding_dim, 6 * embedding_dim, dtype=dtype, rngs=rngs)

    def modulation(self, emb: jax.Array) -> jax.Array:
        """(B, 6 dim): shift, scale, gate of the attention, then of the MLP."""
        return self.linear(jax.nn.silu(emb))

    @staticmethod
    def chunks(modulation: jax.Array) -> list[jax.Array]:
        """shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, (B, dim) each."""
        return jnp.split(modulation, 6, axis=1)

    @staticmethod
    def modulate(x: jax.Array, modulation: jax.Array):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLayerNormZero.chunks(modulation)
        return modulate(x, scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp

    def __call__(self, x: jax.Array, emb: jax.Array):
        return self.modulate(x, self.modulation(emb))


class AdaLayerNormZeroSingle(nnx.Module):
    """linear(SiLU(emb)) -> shift, scale, gate; returns the modulated norm and the gate."""

    def __init__(self, embedding_dim: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.linear = linear(embedding_dim, 3 * embedding_dim, dtype=dtype, rngs=rngs)

    def modulation(self, emb: jax.Array) -> jax.Array:
        """(B, 3 dim): shift, scale, gate."""
        return self.linear(jax.nn.silu(emb))

    @staticmethod
    def chunks(modulation: jax.Array) -> list[jax.Array]:
        """shift, scale, gate, (B, dim) each."""
        return jnp.split(modulation, 3, axis=1)

    @staticmethod
    def modulate(x: jax.Array, modulation: jax.Array) -> tuple[jax.Array, jax.Array]:
        shift_msa, scale_msa, gate_msa = AdaLayerNormZeroSingle.chunks(modulation)
        return modulate(x, scale_msa, shift_msa), gate_msa

    def __call__(self, x: jax.Array, emb: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.modulate(x, self.modulation(emb))


class AdaLayerNormContinuous(nnx.Module):
    """The output norm: linear(SiLU(cond)) -> scale, shift (diffusers' order; black-forest-labs
    stores shift first, which the key map swaps)."""

    def __init__(self, embedding_dim: int, conditioning_embedding_dim: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.linear = linear(conditioning_embedding_dim, 2 * embedding_dim, dtype=dtype, rngs=rngs)

    def modulation(self, conditioning_embedding: jax.Array, dtype: Dtype | None = None) -> jax.Array:
        """(B, 2 dim): scale, shift. `dtype` is that of the x it will modulate: as diffusers, SiLU's
        output is cast to it (None: the embedding's own)."""
        return self.linear(jax.nn.silu(conditioning_embedding).astype(dtype or conditioning_embedding.dtype))

    @staticmethod
    def modulate(x: jax.Array, modulation: jax.Array) -> jax.Array:
        scale, shift = jnp.split(modulation, 2, axis=1)
        return modulate(x, scale, shift)

    def __call__(self, x: jax.Array, conditioning_embedding: jax.Array) -> jax.Array:
        return self.modulate(x, self.modulation(conditioning_embedding, x.dtype))


# ---------------------------------------------------------------------------------------------
# Feed-forward and attention (diffusers/models/attention.py, transformer_flux.py)


class GELU(nnx.Module):
    """diffusers' GELU(approximate="tanh"): proj, then tanh-GELU."""

    def __init__(self, dim_in: int, dim_out: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.proj = linear(dim_in, dim_out, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.proj(x), approximate=True)


class FeedForward(nnx.Module):
    """net = [GELU(dim, 4 dim) with .proj, Dropout (identity at inference), Linear(4 dim, dim)]."""

    def __init__(self, dim: int, *, mult: int = 4, dtype: Dtype, rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List([
            GELU(dim, inner, dtype=dtype, rngs=rngs),
            nnx.Dropout(0.0, deterministic=True),
            linear(inner, dim, dtype=dtype, rngs=rngs),
        ])

    def hidden(self, x: jax.Array) -> jax.Array:
        """The input of the output projection `net[2]`: GELU(proj(x)) (then the identity dropout)."""
        return self.net[1](self.net[0](x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.hidden(x))


def gated_residual(layer: nnx.Module, x: jax.Array, residual: jax.Array, gate: jax.Array, *,
                   fused: bool = False) -> jax.Array:
    """FLUX's gated residual after an output projection or MLP: residual + gate[:, None] * layer(x),
    gate (B, dim) one row per image. With `fused`, a W4A4 layer (`ConvDense4bit`) applies it in its
    GEMM's epilogue (float32, one rounding to the output dtype, no elementwise pass after the
    GEMM; a LoRA branch's term added before the gate); any other layer, or `fused` False, computes
    the expression as written (the layer's output rounded to its dtype, then the gate and the
    residual)."""
    if fused and isinstance(layer, ConvDense4bit):
        return layer(x, residual=residual, gate=gate)
    return residual + gate[:, None] * layer(x)


def attention_implementation(dtype: Dtype, requested: str | None) -> str:
    """The attention implementation (`convrot_jax.ops.ATTENTION_IMPLEMENTATIONS`). By default the
    exact one: cuDNN flash attention on a GPU for 16-bit inputs, XLA otherwise (jax's `None`
    means XLA for now). An explicit request wins: also the Pallas kernels "mosaic_bf16", "sage8"
    (8-bit QK^T and PV), "sage8_fp8", "sage_qk8" and "int8"."""
    if requested is not None:
        ops.check_attention_implementation(requested)
        return requested
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "xla"


class FluxAttention(nnx.Module):
    """Joint attention with QK RMSNorm and RoPE (diffusers' FluxAttention + FluxAttnProcessor).

    With `added_kv_proj_dim` (double-stream blocks) the text stream has its own projections
    (`add_{q,k,v}_proj`, `norm_added_{q,k}`, `to_add_out`) and attention runs over the
    concatenation [text, image]. With `pre_only` (single-stream blocks) there is no output
    projection: the caller fuses it with the MLP's.

    `to_qkv` and `to_added_qkv` (diffusers' names) stay None until `flux_flax.fuse_projections`
    replaces each stream's three projections by one layer with their outputs concatenated; the
    forward then runs one GEMM per stream and reads q, k, v as column ranges of its output.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, *, added_kv_proj_dim: int | None = None,
                 pre_only: bool = False, eps: float = 1e-6, attention_impl: str | None = None, dtype: Dtype,
                 rngs: nnx.Rngs):
        inner = heads * dim_head
        self.heads, self.head_dim = heads, dim_head
        self.attention_impl = attention_impl
        self.qk_producer = True  # the exact attention's q, k, v from the producer kernel (`flux_flax.set_attention`)
        self.norm_q = RMSNorm(dim_head, eps=eps, dtype=dtype)
        self.norm_k = RMSNorm(dim_head, eps=eps, dtype=dtype)
        self.to_q = linear(query_dim, inner, dtype=dtype, rngs=rngs)
        self.to_k = linear(query_dim, inner, dtype=dtype, rngs=rngs)
        self.to_v = linear(query_dim, inner, dtype=dtype, rngs=rngs)
        self.to_out = None if pre_only else nnx.List([
            linear(inner, query_dim, dtype=dtype, rngs=rngs),
            nnx.Dropout(0.0, deterministic=True),
        ])
        self.to_qkv = nnx.data(None)
        if added_kv_proj_dim is not None:
            self.norm_added_q = RMSNorm(dim_head, eps=eps, dtype=dtype)
            self.norm_added_k = RMSNorm(dim_head, eps=eps, dtype=dtype)
            self.add_q_proj = linear(added_kv_proj_dim, inner, dtype=dtype, rngs=rngs)
            self.add_k_proj = linear(added_kv_proj_dim, inner, dtype=dtype, rngs=rngs)
            self.add_v_proj = linear(added_kv_proj_dim, inner, dtype=dtype, rngs=rngs)
            self.to_add_out = linear(inner, query_dim, dtype=dtype, rngs=rngs)
            self.to_added_qkv = nnx.data(None)
        self.added_kv_proj_dim = added_kv_proj_dim

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], -1, self.head_dim)

    def __call__(self, hidden_states: jax.Array | None, encoder_hidden_states: jax.Array | None = None,
                 image_rotary_emb: tuple[jax.Array, jax.Array] | None = None,
                 qkv: jax.Array | Sequence[jax.Array] | None = None,
                 added_qkv: jax.Array | Sequence[jax.Array] | None = None):
        """diffusers' forward: `attend`, then the output projections `to_out` and `to_add_out`
        (double-stream blocks; a single block's attention has none)."""
        out = self.attend(hidden_states, encoder_hidden_states, image_rotary_emb, qkv, added_qkv)
        if encoder_hidden_states is None:
            return out
        hidden_states, encoder_hidden_states = out
        for module in self.to_out:
            hidden_states = module(hidden_states)
        return hidden_states, self.to_add_out(encoder_hidden_states)

    def _projections(self, x: jax.Array | None, given: jax.Array | Sequence[jax.Array] | None,
                     fused: nnx.Module | None, *layers: nnx.Module | None) -> list[ops.Projection]:
        """A stream's q, k, v as (array, first column): `given` (one array holding [q | k | v] in its
        first columns, e.g. a fused projection's output passed whole, or three arrays), else
        computed from x (one GEMM when the projections are fused)."""
        if given is None:
            given = fused(x) if fused is not None else [layer(x) for layer in layers]
        if isinstance(given, jax.Array):
            return [ops.Projection(given, i * self.heads * self.head_dim) for i in range(3)]
        return [ops.Projection(a, 0) for a in given]

    def attend(self, hidden_states: jax.Array | None, encoder_hidden_states: jax.Array | None = None,
               image_rotary_emb: tuple[jax.Array, jax.Array] | None = None,
               qkv: jax.Array | Sequence[jax.Array] | None = None,
               added_qkv: jax.Array | Sequence[jax.Array] | None = None):
        """The attention before its output projections: (image, text) outputs with
        `encoder_hidden_states` (a double block then applies `to_out` and `to_add_out` itself, in
        its gated residuals), else the joint output. `qkv`: the image stream's query, key and
        value projections when the caller made them: one array holding [q | k | v] in its first
        columns (a fused projection's output, passed whole so that the attention's producer reads
        it without a copy of its slices) or three arrays; by default they are computed from
        `hidden_states`. `added_qkv`: the same for the text stream (`encoder_hidden_states` then
        only gives the text length).

        With an exact implementation or "int8" and `qk_producer` (on by default), bf16 projections,
        RoPE, whole blocks of text tokens and no sequence parallelism, on a Hopper GPU
        (`convrot_jax.ops.fuses_attention_producer`), the QK RMSNorm, RoPE (and int8's rotation of
        q and k) and the [text, image] join are one producer launch reading the projections and
        writing bf16 q, k, v in the joint layout (`ops.attention_from_projections`); otherwise they
        run here in XLA ops. The 8-bit kernels' quantization is XLA ops either way (`ops.attention`)."""
        streams = [(self._projections(hidden_states, qkv, self.to_qkv, self.to_q, self.to_k, self.to_v),
                    self.norm_q, self.norm_k)]
        if encoder_hidden_states is not None and self.added_kv_proj_dim is not None:
            streams.insert(0, (self._projections(encoder_hidden_states, added_qkv, self.to_added_qkv, self.add_q_proj,
                                                 self.add_k_proj, self.add_v_proj),
                               self.norm_added_q, self.norm_added_k))
        dtype = streams[0][0][0].array.dtype
        impl = attention_implementation(dtype, self.attention_impl)
        produced = [ops.Stream(*p, norm_q.weight[...], norm_k.weight[...]) for p, norm_q, norm_k in streams]
        if (image_rotary_emb is not None and dtype == jnp.bfloat16 and not sequence_parallel.active()
                and ops.fuses_attention_producer(impl, produced, qk_producer=self.qk_producer)):
            hidden_states = ops.attention_from_projections(produced, *image_rotary_emb, heads=self.heads,
                                                           eps=self.norm_q.eps, implementation=impl)
        else:
            hidden_states = self._attention(streams, image_rotary_emb, impl)
        hidden_states = hidden_states.reshape(*hidden_states.shape[:2], -1).astype(dtype)

        if len(streams) == 1:
            return hidden_states
        text_len = streams[0][0][0].array.shape[1]
        return hidden_states[:, text_len:], hidden_states[:, :text_len]

    def _attention(self, streams, image_rotary_emb, impl: str) -> jax.Array:
        """The unfused path: each stream's QK RMSNorm, the streams joined, RoPE, then the attention
        implementation, (B, S, H, D) in and out; softmax in float32 in every implementation.
        Sequence parallel, the call sees every token of a share of the heads
        (`flux_flax.sequence_parallel`)."""
        columns = lambda p: self._heads(p.array[..., p.column:p.column + self.heads * self.head_dim])
        joined = [jnp.concatenate(xs, axis=1) if len(xs) > 1 else xs[0] for xs in zip(*[
            (norm_q(columns(q)), norm_k(columns(k)), columns(v)) for (q, k, v), norm_q, norm_k in streams])]
        query, key, value = joined
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        attend = functools.partial(ops.attention, implementation=impl)
        return sequence_parallel.attention(attend, query, key, value)
