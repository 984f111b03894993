"""Fused projections: diffusers' `fuse_qkv_projections`, extended to the single blocks' MLP input.

Layers that read the same input are replaced by one layer with their outputs concatenated, so a
W4A4 model pays one rotate+quantize pass over that input and one larger GEMM (a wider N runs at
more TOP/s: benchmarks/results/w4a4_matmul.md; docs/design.md §2) instead of three or four:

    transformer_blocks.*.attn.{to_q,to_k,to_v}                 -> attn.to_qkv        (diffusers' name)
    transformer_blocks.*.attn.{add_q_proj,add_k_proj,add_v_proj} -> attn.to_added_qkv  (diffusers' name)
    single_transformer_blocks.*.{attn.to_q,attn.to_k,attn.to_v,proj_mlp} -> to_qkv_mlp
        (this port's name; black-forest-labs' checkpoints store this very layer as `linear1`)

The replaced layers become None. Fusion runs after loading and quantizing, as in diffusers, so
checkpoints and the key map keep diffusers' unfused names (the default policy names the fused
layers too: quantizing a fused float model gives the same layers). It is exact for the int4 layers
(their scales are per output row, so the fused weight is the concatenation of the quantized ones)
and for float layers up to the GEMM's summation order.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from convrot_jax.layers import ConvDense4bit, Dense4bitWeightOnly, concatenate_biases, require_equal


def concatenate_linears(layers: Sequence[nnx.Module]) -> nnx.Module | None:
    """One layer computing `layers`' outputs concatenated along the features, or None when they
    are not all of one type (e.g. a policy that quantized only some of them). Float `nnx.Linear`
    layers must share in_features and their dtypes; int4 layers are joined by their `concatenate`."""
    kind = type(layers[0])
    if any(type(layer) is not kind for layer in layers):
        return None
    if issubclass(kind, (ConvDense4bit, Dense4bitWeightOnly)):
        return kind.concatenate(layers)
    if kind is not nnx.Linear:
        raise TypeError(f"cannot fuse {kind.__name__} layers")
    require_equal(layers, ("in_features", "dtype", "param_dtype", "precision", "dot_general", "promote_dtype",
                           "preferred_element_type"))
    first = layers[0]
    kernel = jnp.concatenate([layer.kernel[...] for layer in layers], axis=1)
    bias = concatenate_biases([None if layer.bias is None else layer.bias[...] for layer in layers],
                              [layer.out_features for layer in layers])
    # Built abstractly (no random init of a weight about to be overwritten), then filled.
    fused = nnx.eval_shape(lambda: nnx.Linear(
        first.in_features, kernel.shape[1], use_bias=bias is not None, dtype=first.dtype, param_dtype=kernel.dtype,
        precision=first.precision, dot_general=first.dot_general, promote_dtype=first.promote_dtype,
        preferred_element_type=first.preferred_element_type, rngs=nnx.Rngs(0)))
    fused.kernel.set_value(kernel)
    if bias is not None:
        fused.bias.set_value(bias)
    return fused


def _fuse(path: str, target: nnx.Module, name: str, members: Sequence[tuple[nnx.Module, str]]) -> bool:
    """Sets `target.<name>` (dotted `path`) to the concatenation of the layers that `members` name
    as (module, attribute), and those attributes to None. Returns False, changing nothing, when
    they are already fused or of different types."""
    layers = [getattr(module, attr) for module, attr in members]
    if any(layer is None for layer in layers):
        return False
    try:
        fused = concatenate_linears(layers)
    except ValueError as e:
        raise ValueError(f"cannot fuse {path}: {e}") from None
    if fused is None:
        return False
    setattr(target, name, fused)
    for module, attr in members:
        setattr(module, attr, None)
    return True


def fuse_projections(model: nnx.Module) -> nnx.Module:
    """Fuses, IN PLACE, the projection sets listed in this module's docstring in every block of a
    FLUX transformer `model` (float or quantized layers alike) and returns `model`. A set whose layers differ in
    type stays unfused (a single block then tries to fuse just its q, k, v into attn.to_qkv).
    Fusing again is a no-op. A set whose int4 layers differ in settings raises a ValueError."""
    for i, block in enumerate(model.transformer_blocks):
        path, attn = f"transformer_blocks.{i}", block.attn
        _fuse(f"{path}.attn.to_qkv", attn, "to_qkv", [(attn, "to_q"), (attn, "to_k"), (attn, "to_v")])
        _fuse(f"{path}.attn.to_added_qkv", attn, "to_added_qkv",
              [(attn, "add_q_proj"), (attn, "add_k_proj"), (attn, "add_v_proj")])
    for i, block in enumerate(model.single_transformer_blocks):
        path, attn = f"single_transformer_blocks.{i}", block.attn
        qkv = [(attn, "to_q"), (attn, "to_k"), (attn, "to_v")]
        if not _fuse(f"{path}.to_qkv_mlp", block, "to_qkv_mlp", [*qkv, (block, "proj_mlp")]):
            _fuse(f"{path}.attn.to_qkv", attn, "to_qkv", qkv)
    return model


def fuse_gated_residuals(model: nnx.Module, enabled: bool = True) -> nnx.Module:
    """Sets, IN PLACE, every block's `fuse_epilogue` of a FLUX transformer `model`: with `enabled`
    its gated residuals (residual + gate * projection, after the attention output projections,
    the MLPs and the single blocks' proj_out) run in the W4A4 GEMMs' epilogues
    (`flux_flax.layers.gated_residual`; float layers are unaffected). The output changes only by
    rounding: one rounding to bf16 instead of three. A static setting: a jitted step recompiles.
    Returns `model`."""
    for block in (*model.transformer_blocks, *model.single_transformer_blocks):
        block.fuse_epilogue = enabled
    return model
