"""Producers quantized where they are made: the AdaLN LayerNorm + modulate and the MLPs' tanh-GELU
that feed W4A4 layers can run inside the rotate-quantize kernel (`convrot_jax.prologue`), which
then reads the producer's input instead of an activation XLA wrote to HBM in bf16.

`produce_linear(layer, x, prologue, fused)` is the one dispatch the blocks use at each such site:
a W4A4 layer (`ConvDense4bit`) whose prologue kind is in `fused` quantizes prologue(x) straight
from x; any other layer (bf16, W4A16, or that kind not fused) gets `produce(x, prologue)`, the
producer as the model has always run it in XLA ops, in the model dtype. `fuse_producers(model,
kinds)` is the switch, per model (off unless called; the pipeline calls it with DEFAULT_KINDS), so
fused and unfused run in one process.

The sites (FLUX.1): double blocks' norm1 / norm1_context when their q, k, v are fused into one
layer (attn.to_qkv / attn.to_added_qkv: the modulated norm then feeds that layer alone), norm2
before ff.net.0.proj (and the text stream's), ff.net.2 after the GELU; single blocks' norm before
the fused to_qkv_mlp, and proj_out after GELU(MLP) (its first `dim` features, the attention
output, pass unchanged; fused, the kernel reads the attention output and the fused projection's
MLP columns where they lie, `GeluTanh`'s tail, so their concatenation is never written).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from convrot_jax import ConvDense4bit, GeluTanh, LayerNormModulation
from convrot_jax.prologue import Prologue
from flux_flax.layers import gated_residual, modulate

KINDS: dict[type, str] = {LayerNormModulation: "layernorm", GeluTanh: "gelu"}
# What the pipeline fuses (FluxPipeline.from_pretrained with fuse=True): the kinds measured faster
# than XLA's producer + the plain rotate-quantize kernel (benchmarks/results/rotate_quantize_prologues.md,
# H200, one image): GELU 1.35x at K = 12288 and 1.26x at K = 15360 (M = 4608 and 1536); the
# LayerNorm + modulation only ties (40.3 against 40.4 us at M = 4608, 17.2 against 17.4 at 1536).
DEFAULT_KINDS: tuple[str, ...] = ("gelu",)


def produce(x: jax.Array, prologue: Prologue) -> jax.Array:
    """The producer in XLA ops as the unfused model runs it, output in x.dtype."""
    if isinstance(prologue, LayerNormModulation):
        return modulate(x, prologue.scale, prologue.shift)
    x = prologue.joined(x)
    gelu = jax.nn.gelu(x[..., prologue.start:], approximate=True)
    return gelu if prologue.start == 0 else jnp.concatenate([x[..., :prologue.start], gelu], axis=-1)


def produce_linear(layer: nnx.Module, x: jax.Array, prologue: Prologue, fused: frozenset[str], *,
                   residual: jax.Array | None = None, gate: jax.Array | None = None,
                   fuse_epilogue: bool = False) -> jax.Array:
    """layer(prologue(x)): fused into the W4A4 layer's quantization when its kind is in `fused`
    (and a GELU starts on one of the layer's rotation groups), else the XLA producer, then the
    layer. With `residual` and `gate`, FLUX's gated residual residual + gate[:, None] *
    layer(prologue(x)), in the W4A4 GEMM's epilogue with `fuse_epilogue`
    (`flux_flax.layers.gated_residual`). A LoRA branch on the layer goes with it: the W4A4 op
    reads it from the produced input and adds it before the gate (`convrot_jax.ops.w4a4_linear`)."""
    group = getattr(layer, "group_size", 1)
    fits = not isinstance(prologue, GeluTanh) or prologue.start % group == prologue.tail_from % group == 0
    if isinstance(layer, ConvDense4bit) and KINDS[type(prologue)] in fused and fits:
        if residual is None:
            return layer(x, prologue=prologue)
        if fuse_epilogue:
            return layer(x, prologue=prologue, residual=residual, gate=gate)
        return residual + gate[:, None] * layer(x, prologue=prologue)
    if residual is None:
        return layer(produce(x, prologue))
    return gated_residual(layer, produce(x, prologue), residual, gate, fused=fuse_epilogue)


def fuse_producers(model: nnx.Module, kinds: Iterable[str] = DEFAULT_KINDS) -> nnx.Module:
    """Sets, IN PLACE, which producer kinds ("layernorm", "gelu"; none: unfused; default: the
    measured winners, DEFAULT_KINDS) every block of a FLUX transformer `model` fuses into its W4A4
    layers; returns `model`."""
    kinds = frozenset(kinds)
    if not kinds <= set(KINDS.values()):
        raise ValueError(f"producer kinds must be among {sorted(KINDS.values())}, got {sorted(kinds)}")
    for block in (*model.transformer_blocks, *model.single_transformer_blocks):
        block.fused_producers = kinds
    return model
