"""FLUX.1 transformer in Flax NNX, mirroring diffusers' `transformer_flux.py` one to one.

Module paths equal diffusers' state-dict prefixes ("transformer_blocks.0.attn.to_q", ...), so
loading is a mechanical key map (`flux_flax.loading`) and the quantization policy addresses layers
by the same dotted names (`linear_paths`)."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx, struct

from convrot_jax import GeluTanh, LayerNormModulation, ops
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
    gated_residual,
    linear,
    modulate,
)
from flux_flax.producers import produce_linear

RotaryEmb = tuple[jax.Array, jax.Array]


@struct.dataclass
class Modulation:
    """Every AdaLN modulation vector of a transformer call: each norm's linear(SiLU(temb)), (B, k *
    dim) per row of the batch, named after the model's attributes. It depends only on the timestep,
    guidance and pooled text, so a sampler can compute it for all steps before its loop
    (`FluxTransformer2DModel.modulation`) and pass one step's to `FluxTransformer2DModel.__call__`.
    A pytree: `jax.tree.map` indexes or reshapes every vector at once."""

    transformer_blocks: tuple[tuple[jax.Array, jax.Array], ...]  # (norm1, norm1_context), 6 dim each
    single_transformer_blocks: tuple[jax.Array, ...]  # norm, 3 dim
    norm_out: jax.Array  # 2 dim


def _modulated_qkv(layer: nnx.Module | None, x: jax.Array, shift: jax.Array, scale: jax.Array,
                   fused: frozenset[str]) -> jax.Array | None:
    """A stream's [q | k | v] (one array, unsplit: FluxAttention.attend reads its column ranges)
    from its fused projection `layer` of modulate(x) (the producer fused into a W4A4 layer's
    quantization when "layernorm" is in `fused`); None without a fused layer."""
    if layer is None:
        return None
    return produce_linear(layer, x, LayerNormModulation(shift, scale), fused)


def _feed_forward(ff: FeedForward, x: jax.Array, shift: jax.Array, scale: jax.Array, gate: jax.Array,
                  fused: frozenset[str], epilogue: bool) -> jax.Array:
    """x + gate * ff(modulate(x)): net.0.proj, tanh-GELU, net.2 (dropout is the identity), each
    producer fused into the next W4A4 layer per `fused` (flux_flax.producers), the gated residual
    in net.2's GEMM epilogue with `epilogue`."""
    h = produce_linear(ff.net[0].proj, x, LayerNormModulation(shift, scale), fused)
    return produce_linear(ff.net[2], h, GeluTanh(), fused, residual=x, gate=gate, fuse_epilogue=epilogue)


class FluxTransformerBlock(nnx.Module):
    """Double-stream block: image and text streams, each with its own AdaLN modulation,
    projections and MLP, meeting in one joint attention. `fused_producers`: which producers
    run inside the next W4A4 layer's quantization (flux_flax.producers.fuse_producers);
    `fuse_epilogue` (False until `flux_flax.fuse_gated_residuals` sets it): the four gated
    residuals (after to_out, to_add_out and both MLPs) run in the W4A4 GEMMs' epilogues."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, *, eps: float = 1e-6,
                 attention_impl: str | None = None, dtype: Dtype, rngs: nnx.Rngs):
        self.norm1 = AdaLayerNormZero(dim, dtype=dtype, rngs=rngs)
        self.norm1_context = AdaLayerNormZero(dim, dtype=dtype, rngs=rngs)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, added_kv_proj_dim=dim, eps=eps,
                                  attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
        self.ff_context = FeedForward(dim, dtype=dtype, rngs=rngs)
        self.fused_producers = frozenset()
        self.fuse_epilogue = False

    def modulation(self, temb: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The image and text streams' AdaLN vectors (norm1, norm1_context), (B, 6 dim) each."""
        return self.norm1.modulation(temb), self.norm1_context.modulation(temb)

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, temb: jax.Array,
                 image_rotary_emb: RotaryEmb) -> tuple[jax.Array, jax.Array]:
        """diffusers' signature: the block's modulation of `temb`, then `forward`."""
        return self.forward(hidden_states, encoder_hidden_states, self.modulation(temb), image_rotary_emb)

    def forward(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array,
                modulation: tuple[jax.Array, jax.Array], image_rotary_emb: RotaryEmb) -> tuple[jax.Array, jax.Array]:
        """The block given its `modulation` (precomputed, or from `__call__`)."""
        image_modulation, text_modulation = modulation
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1.chunks(image_modulation)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context.chunks(
            text_modulation)
        fused = self.fused_producers

        # Each stream's modulated norm feeds its fused q/k/v projection, or without one the three.
        qkv = _modulated_qkv(self.attn.to_qkv, hidden_states, shift_msa, scale_msa, fused)
        added_qkv = _modulated_qkv(self.attn.to_added_qkv, encoder_hidden_states, c_shift_msa, c_scale_msa, fused)
        attn_output, context_attn_output = self.attn.attend(
            modulate(hidden_states, scale_msa, shift_msa) if qkv is None else None,
            modulate(encoder_hidden_states, c_scale_msa, c_shift_msa) if added_qkv is None else encoder_hidden_states,
            image_rotary_emb, qkv=qkv, added_qkv=added_qkv)
        epilogue = self.fuse_epilogue

        # Image stream: gated attention residual (through to_out), then the modulated MLP (norm2 is a
        # plain LayerNorm) and its gated residual.
        hidden_states = gated_residual(self.attn.to_out[0], attn_output, hidden_states, gate_msa, fused=epilogue)
        hidden_states = _feed_forward(self.ff, hidden_states, shift_mlp, scale_mlp, gate_mlp, fused, epilogue)

        # Text stream, the same with its own weights.
        encoder_hidden_states = gated_residual(self.attn.to_add_out, context_attn_output, encoder_hidden_states,
                                               c_gate_msa, fused=epilogue)
        encoder_hidden_states = _feed_forward(self.ff_context, encoder_hidden_states, c_shift_mlp, c_scale_mlp,
                                              c_gate_mlp, fused, epilogue)
        return encoder_hidden_states, hidden_states


class FluxSingleTransformerBlock(nnx.Module):
    """Single-stream block over [text, image]: attention and MLP in parallel from one modulated
    norm, their outputs concatenated into one projection (`proj_out`, K = dim + 4 dim), the MLP's
    tanh-GELU applied to its part of that input. `fused_producers`: as FluxTransformerBlock's.

    `to_qkv_mlp` (this port's name; diffusers has none) stays None until
    `flux_flax.fuse_projections` replaces attn.to_q, attn.to_k, attn.to_v and proj_mlp, which all
    read the same norm, by one layer with their outputs concatenated (dim -> 3 dim + 4 dim).
    `fuse_epilogue`: as the double block's, for the gated residual after proj_out."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, *, mlp_ratio: float = 4.0,
                 attention_impl: str | None = None, dtype: Dtype, rngs: nnx.Rngs):
        mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim, dtype=dtype, rngs=rngs)
        self.proj_mlp = linear(dim, mlp_hidden_dim, dtype=dtype, rngs=rngs)
        self.proj_out = linear(dim + mlp_hidden_dim, dim, dtype=dtype, rngs=rngs)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, pre_only=True, eps=1e-6,
                                  attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        self.to_qkv_mlp = nnx.data(None)
        self.fused_producers = frozenset()
        self.fuse_epilogue = False

    def modulation(self, temb: jax.Array) -> jax.Array:
        """The block's AdaLN vector (norm), (B, 3 dim)."""
        return self.norm.modulation(temb)

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, temb: jax.Array,
                 image_rotary_emb: RotaryEmb) -> tuple[jax.Array, jax.Array]:
        """diffusers' signature: the block's modulation of `temb`, then `forward`."""
        return self.forward(hidden_states, encoder_hidden_states, self.modulation(temb), image_rotary_emb)

    def forward(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, modulation: jax.Array,
                image_rotary_emb: RotaryEmb) -> tuple[jax.Array, jax.Array]:
        """The block given its `modulation` (precomputed, or from `__call__`)."""
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = jnp.concatenate([encoder_hidden_states, hidden_states], axis=1)

        residual = hidden_states
        shift, scale, gate = self.norm.chunks(modulation)
        dim = hidden_states.shape[-1]
        if self.to_qkv_mlp is None:
            norm_hidden_states = modulate(hidden_states, scale, shift)
            gelu = GeluTanh(dim, tail=self.proj_mlp(norm_hidden_states))
            attn_output = self.attn(norm_hidden_states, image_rotary_emb=image_rotary_emb)
        else:  # q, k, v are dim wide each (proj_out's K = dim + mlp), the MLP's input the rest.
            projected = produce_linear(self.to_qkv_mlp, hidden_states, LayerNormModulation(shift, scale),
                                       self.fused_producers)
            attn_output = self.attn(None, image_rotary_emb=image_rotary_emb, qkv=projected)  # its first 3 dim
            gelu = GeluTanh(dim, tail=projected, tail_from=3 * dim)

        # proj_out reads [attention, GELU(MLP)]: the GELU is its producer, on the features from dim on.
        hidden_states = produce_linear(self.proj_out, attn_output, gelu, self.fused_producers,
                                       residual=residual, gate=gate, fuse_epilogue=self.fuse_epilogue)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


class FluxTransformer2DModel(nnx.Module):
    """The FLUX.1 transformer. `dtype` is the weight and activation dtype (bf16 for inference,
    float32 for reference tests). `attention_impl` picks the attention implementation
    (`flux_flax.layers.attention_implementation`: "cudnn", "xla", or the Pallas kernels
    "mosaic_bf16", "sage8", "sage8_fp8", "sage_qk8", "int8"); None means the exact default, cuDNN on a GPU in 16-bit,
    XLA otherwise. `set_attention` changes it on a built or loaded model.

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

    def modulation(self, timestep: jax.Array, pooled_projections: jax.Array,
                   guidance: jax.Array | None = None) -> Modulation:
        """Every AdaLN modulation vector for N rows: pooled_projections (N, pooled_projection_dim);
        timestep and guidance (N,) or scalars, in the units of `__call__`. Each row's vectors are
        those `__call__` computes for a batch row with these inputs.

        A sampler may stack all its steps' rows (M = steps x batch) into one call, so that each
        modulation layer runs once per generation as one GEMM instead of once per step (with
        W4A16 weights also unpacking its int4 weight once). Every op here is per row (elementwise,
        or a GEMM row: a dot product over K of that row alone), so the rows are the per-step ones
        up to the order in which the GEMM sums over K. XLA may pick that order per M: on a GPU
        (another cuBLAS algorithm or split-K), and on XLA:CPU at large K too (measured at K =
        3072: rows of M = 2 and M = 4 differ in the last bit). Where the order does not depend on
        M, as on XLA:CPU at the tests' widths, the rows are bit for bit the per-step ones
        (tests/test_modulation.py)."""
        dtype = self.dtype
        # As diffusers: the [0, 1] time is cast to the activation dtype, then scaled by 1000.
        rows = jnp.broadcast_shapes(jnp.shape(timestep), pooled_projections.shape[:1],
                                    () if guidance is None else jnp.shape(guidance))
        timestep = jnp.broadcast_to(jnp.asarray(timestep), rows).astype(dtype) * 1000
        if guidance is not None:
            guidance = jnp.broadcast_to(jnp.asarray(guidance), rows).astype(dtype) * 1000
        temb = self.time_text_embed(timestep, pooled_projections.astype(dtype), guidance)
        return Modulation(
            transformer_blocks=tuple(block.modulation(temb) for block in self.transformer_blocks),
            single_transformer_blocks=tuple(block.modulation(temb) for block in self.single_transformer_blocks),
            norm_out=self.norm_out.modulation(temb, dtype),
        )

    def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, pooled_projections: jax.Array,
                 timestep: jax.Array, img_ids: jax.Array, txt_ids: jax.Array,
                 guidance: jax.Array | None = None, modulation: Modulation | None = None) -> jax.Array:
        """hidden_states (B, S_img, in_channels) packed latents; encoder_hidden_states (B, S_txt,
        joint_attention_dim) T5 states; pooled_projections (B, pooled_projection_dim) CLIP;
        timestep (B,) or scalar, in [0, 1]; img_ids (S_img, 3), txt_ids (S_txt, 3) RoPE positions;
        guidance (B,) or scalar guidance scale (models with `guidance_embeds` only).
        `modulation`: this call's `self.modulation(timestep, pooled_projections, guidance)` when
        precomputed (then those three inputs are not read, and the step runs no modulation
        layer and no time/text embedding). Returns (B, S_img, patch² * out_channels) in the
        model dtype."""
        dtype = self.dtype
        if modulation is None:
            modulation = self.modulation(timestep, pooled_projections, guidance)
        hidden_states = self.x_embedder(hidden_states.astype(dtype))
        encoder_hidden_states = self.context_embedder(encoder_hidden_states.astype(dtype))

        ids = jnp.concatenate([txt_ids, img_ids], axis=0)
        image_rotary_emb = self.pos_embed(ids)

        for block, block_modulation in zip(self.transformer_blocks, modulation.transformer_blocks, strict=True):
            encoder_hidden_states, hidden_states = block.forward(
                hidden_states, encoder_hidden_states, block_modulation, image_rotary_emb)
        for block, block_modulation in zip(self.single_transformer_blocks, modulation.single_transformer_blocks,
                                           strict=True):
            encoder_hidden_states, hidden_states = block.forward(
                hidden_states, encoder_hidden_states, block_modulation, image_rotary_emb)

        hidden_states = self.norm_out.modulate(hidden_states, modulation.norm_out)
        return self.proj_out(hidden_states)

    def fuse_qkv_projections(self) -> "FluxTransformer2DModel":
        """diffusers' name for `flux_flax.fuse_projections(self)`: fuses, in place, the projections
        that read the same input (q/k/v per stream; q/k/v + MLP input in single blocks)."""
        return fuse_projections(self)


def module_path(path: tuple) -> str:
    """An NNX graph path -> the dotted diffusers name ("transformer_blocks", 0, "attn") -> "transformer_blocks.0.attn"."""
    return ".".join(str(p) for p in path)


def set_attention(model: nnx.Module, implementation: str | None, *, qk_producer: bool = True) -> nnx.Module:
    """Sets, IN PLACE, the attention implementation of every FluxAttention in `model` (see
    `FluxTransformer2DModel`; None: the exact default) and returns `model`. With `qk_producer`
    (the default: measured 1-2% faster per W4A4 step than XLA's fusions, and a shorter compile,
    `benchmarks/notes/fusions.md`; on a Hopper GPU, elsewhere ignored) the exact attention
    ("cudnn", "xla") and "int8" get their bf16 q, k, v from one producer kernel reading the q/k/v
    projections (per-head RMSNorm, RoPE, int8's rotation, the [text, image] join:
    `pallas_kernels.attention_producer.project_qkv`) instead of XLA ops
    (`convrot_jax.ops.fuses_attention_producer`); the 8-bit kernels' codes are XLA ops either way
    (measured faster than a producer making them). A
    runtime choice, not part of the weights or the checkpoint: a jitted caller that takes the
    graph definition as a static argument compiles again."""
    if implementation is not None:
        ops.check_attention_implementation(implementation)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, FluxAttention):
            node.attention_impl = implementation
            node.qk_producer = qk_producer
    return model


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
