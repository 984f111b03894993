"""FLUX.1 transformer in Flax NNX, mirroring diffusers' `transformer_flux.py` one to one.

Module paths equal diffusers' state-dict prefixes ("transformer_blocks.0.attn.to_q", ...), so
loading is a mechanical key map (`flux_flax.loading`) and the quantization policy addresses layers
by the same dotted names (`linear_paths`)."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from flux_flax.config import ROPE_THETA, FluxConfig
from flux_flax.fusion import fuse_projections
from flux_flax.layers import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    CombinedTimestepTextProjEmbeddings,
    Dtype,
    FeedForward,
    FluxAttention,
    FluxPosEmbed,
    layer_norm,
    linear,
)

RotaryEmb = tuple[jax.Array, jax.Array]


class FluxTransformerBlock(nnx.Module):
    """Double-stream block: image and text streams, each with its own AdaLN modulation,
    projections and MLP, meeting in one joint attention."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, *, eps: float = 1e-6,
                 attention_impl: str | None = None, dtype: Dtype, rngs: nnx.Rngs):
        self.norm1 = AdaLayerNormZero(dim, dtype=dtype, rngs=rngs)
        self.norm1_context = AdaLayerNormZero(dim, dtype=dtype, rngs=rngs)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, added_kv_proj_dim=dim, eps=eps,
                                  attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
        self.ff_context = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, temb: jax.Array,
                 image_rotary_emb: RotaryEmb) -> tuple[jax.Array, jax.Array]:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, temb
        )

        attn_output, context_attn_output = self.attn(norm_hidden_states, norm_encoder_hidden_states,
                                                     image_rotary_emb)

        # Image stream: gated attention residual, then the modulated MLP (norm2 is a plain LayerNorm).
        hidden_states = hidden_states + gate_msa[:, None] * attn_output
        norm_hidden_states = layer_norm(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp[:, None] * self.ff(norm_hidden_states)

        # Text stream, the same with its own weights.
        encoder_hidden_states = encoder_hidden_states + c_gate_msa[:, None] * context_attn_output
        norm_encoder_hidden_states = layer_norm(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp[:, None] * self.ff_context(norm_encoder_hidden_states)
        return encoder_hidden_states, hidden_states


class FluxSingleTransformerBlock(nnx.Module):
    """Single-stream block over [text, image]: attention and MLP in parallel from one modulated
    norm, their outputs concatenated into one projection (`proj_out`, K = dim + 4 dim).

    `to_qkv_mlp` (this port's name; diffusers has none) stays None until
    `flux_flax.fuse_projections` replaces attn.to_q, attn.to_k, attn.to_v and proj_mlp, which all
    read the same norm, by one layer with their outputs concatenated (dim -> 3 dim + 4 dim)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, *, mlp_ratio: float = 4.0,
                 attention_impl: str | None = None, dtype: Dtype, rngs: nnx.Rngs):
        mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim, dtype=dtype, rngs=rngs)
        self.proj_mlp = linear(dim, mlp_hidden_dim, dtype=dtype, rngs=rngs)
        self.proj_out = linear(dim + mlp_hidden_dim, dim, dtype=dtype, rngs=rngs)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, pre_only=True, eps=1e-6,
                                  attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        self.to_qkv_mlp = nnx.data(None)

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, temb: jax.Array,
                 image_rotary_emb: RotaryEmb) -> tuple[jax.Array, jax.Array]:
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = jnp.concatenate([encoder_hidden_states, hidden_states], axis=1)

        residual = hidden_states
        norm_hidden_states, gate = self.norm(hidden_states, temb)
        if self.to_qkv_mlp is None:
            mlp_hidden_states = self.proj_mlp(norm_hidden_states)
            attn_output = self.attn(norm_hidden_states, image_rotary_emb=image_rotary_emb)
        else:  # q, k, v are dim wide each (proj_out's K = dim + mlp), the MLP's input the rest.
            dim = norm_hidden_states.shape[-1]
            *qkv, mlp_hidden_states = jnp.split(self.to_qkv_mlp(norm_hidden_states), [dim, 2 * dim, 3 * dim], axis=-1)
            attn_output = self.attn(norm_hidden_states, image_rotary_emb=image_rotary_emb, qkv=qkv)
        mlp_hidden_states = jax.nn.gelu(mlp_hidden_states, approximate=True)

        hidden_states = jnp.concatenate([attn_output, mlp_hidden_states], axis=2)
        hidden_states = residual + gate[:, None] * self.proj_out(hidden_states)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


class FluxTransformer2DModel(nnx.Module):
    """The FLUX.1 transformer. `dtype` is the weight and activation dtype (bf16 for inference,
    float32 for reference tests). `attention_impl` picks `jax.nn.dot_product_attention`'s backend
    ("cudnn" / "xla"); None means cuDNN on a GPU in 16-bit, XLA otherwise.

    Build it abstractly with `nnx.eval_shape(lambda: FluxTransformer2DModel(cfg, rngs=nnx.Rngs(0)))`
    when weights will be loaded (`flux_flax.load_transformer` does so)."""

    def __init__(self, config: FluxConfig, *, dtype: Dtype = jnp.bfloat16, attention_impl: str | None = None,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        dim = config.inner_dim
        heads, head_dim = config.num_attention_heads, config.attention_head_dim

        self.pos_embed = FluxPosEmbed(ROPE_THETA, config.axes_dims_rope)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            dim, config.pooled_projection_dim, guidance_embeds=config.guidance_embeds, dtype=dtype, rngs=rngs
        )
        self.context_embedder = linear(config.joint_attention_dim, dim, dtype=dtype, rngs=rngs)
        self.x_embedder = linear(config.in_channels, dim, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([
            FluxTransformerBlock(dim, heads, head_dim, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
            for _ in range(config.num_layers)
        ])
        self.single_transformer_blocks = nnx.List([
            FluxSingleTransformerBlock(dim, heads, head_dim, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
            for _ in range(config.num_single_layers)
        ])
        self.norm_out = AdaLayerNormContinuous(dim, dim, dtype=dtype, rngs=rngs)
        out = config.patch_size * config.patch_size * config.resolved_out_channels
        self.proj_out = linear(dim, out, dtype=dtype, rngs=rngs)

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, pooled_projections: jax.Array,
                 timestep: jax.Array, img_ids: jax.Array, txt_ids: jax.Array,
                 guidance: jax.Array | None = None) -> jax.Array:
        """hidden_states (B, S_img, in_channels) packed latents; encoder_hidden_states (B, S_txt,
        joint_attention_dim) T5 states; pooled_projections (B, pooled_projection_dim) CLIP;
        timestep (B,) or scalar, in [0, 1]; img_ids (S_img, 3), txt_ids (S_txt, 3) RoPE positions;
        guidance (B,) or scalar guidance scale (models with `guidance_embeds` only).
        Returns (B, S_img, patch² * out_channels) in the model dtype."""
        dtype = self.dtype
        hidden_states = self.x_embedder(hidden_states.astype(dtype))

        # As diffusers: the [0, 1] time is cast to the activation dtype, then scaled by 1000.
        # A scalar time or guidance applies to the whole batch.
        batch = (hidden_states.shape[0],)
        timestep = jnp.broadcast_to(jnp.asarray(timestep), batch).astype(dtype) * 1000
        if guidance is not None:
            guidance = jnp.broadcast_to(jnp.asarray(guidance), batch).astype(dtype) * 1000
        temb = self.time_text_embed(timestep, pooled_projections.astype(dtype), guidance)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states.astype(dtype))

        ids = jnp.concatenate([txt_ids, img_ids], axis=0)
        image_rotary_emb = self.pos_embed(ids)

        for block in self.transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb, image_rotary_emb)
        for block in self.single_transformer_blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb, image_rotary_emb)

        hidden_states = self.norm_out(hidden_states, temb)
        return self.proj_out(hidden_states)

    def fuse_qkv_projections(self) -> "FluxTransformer2DModel":
        """diffusers' name for `flux_flax.fuse_projections(self)`: fuses, in place, the projections
        that read the same input (q/k/v per stream; q/k/v + MLP input in single blocks)."""
        return fuse_projections(self)


def module_path(path: tuple) -> str:
    """An NNX graph path -> the dotted diffusers name ("transformer_blocks", 0, "attn") -> "transformer_blocks.0.attn"."""
    return ".".join(str(p) for p in path)


def linear_paths(model: nnx.Module) -> Iterator[tuple[str, nnx.Linear]]:
    """(dotted diffusers path, nnx.Linear) for every float Linear layer, in model order. Layers
    already swapped for quantized ones are not listed."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear):
            yield module_path(path), node


def param_paths(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable]]:
    """(dotted path of the variable, variable) for every `nnx.Param`, e.g.
    ("transformer_blocks.0.attn.to_q.kernel", Param). `flux_flax.loading` maps these to diffusers keys."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            yield module_path(path), node
