"""Producer prologues: the elementwise or per-row op that makes a W4A4 layer's input, described so
that the rotate-quantize kernel can compute it from the producer's own input (codes and per-token
scales straight from there: the producer's bf16 output never goes through HBM).

    LayerNormModulation(shift, scale)   LayerNorm(x) * (1 + scale[b]) + shift[b] (no affine, eps
                                         1e-6, float32 statistics), image b's tokens; (B, K) each
    GeluTanh(start)                      tanh-GELU on the features from `start` on, the rest as is
    GeluTanh(start, tail, tail_from)     x's `start` features, then tanh-GELU of tail's from
                                         `tail_from` on: their concatenation, never written

`apply_prologue` is the XLA reference (float32, what the kernel is tested against);
`convrot_jax.ops.w4a4_linear(x, qw, bias, prologue=...)` runs the layer on the prologue's output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels.rotate_quantize_reference import apply_prologue as _apply


@struct.dataclass
class LayerNormModulation:
    """LayerNorm(x) * (1 + scale) + shift with per-image (B, K) shift and scale: for x (B, ..., K),
    image b's rows use row b (FLUX's AdaLN modulate)."""

    shift: jax.Array
    scale: jax.Array


@struct.dataclass
class GeluTanh:
    """jax.nn.gelu(approximate=True) on the features from `start` (a multiple of the layer's
    group size) on; the features before it pass unchanged (FLUX's single blocks feed
    [attention, GELU(MLP)] to one projection). With `tail` (..., K2), x holds only the `start`
    unchanged features and the GELU's input is tail[..., tail_from:]: the layer reads
    [x, GELU(tail[..., tail_from:])] from the two arrays, so neither the concatenation nor a
    slice of the tail (FLUX: the MLP part of the fused qkv + MLP projection) is copied."""

    start: int = struct.field(pytree_node=False, default=0)
    tail: jax.Array | None = None
    tail_from: int = struct.field(pytree_node=False, default=0)

    def joined(self, x: jax.Array) -> jax.Array:
        """The layer's input before the GELU: x, or with a tail [x, tail[..., tail_from:]]."""
        if self.tail is None:
            return x
        return jnp.concatenate([x, self.tail[..., self.tail_from:].astype(x.dtype)], axis=-1)


Prologue = LayerNormModulation | GeluTanh


def kernel_arguments(prologue: Prologue) -> dict:
    """The rotate-quantize keywords (`pallas_kernels.rotate_quantize`) describing `prologue`."""
    if isinstance(prologue, LayerNormModulation):
        return {"prologue": "layernorm", "shift": prologue.shift, "scale": prologue.scale}
    if isinstance(prologue, GeluTanh):
        if prologue.tail is None:
            return {"prologue": "gelu_tanh", "gelu_from": prologue.start}
        tail = prologue.tail.reshape(-1, prologue.tail.shape[-1])
        return {"prologue": "gelu_tanh", "gelu_from": prologue.start, "tail": tail, "tail_from": prologue.tail_from}
    raise TypeError(f"prologue must be a LayerNormModulation or a GeluTanh, got {type(prologue).__name__}")


def check_prologue(x: jax.Array, prologue: Prologue, group_size: int | None = None) -> None:
    """Raises ValueError naming the shapes when `prologue` does not fit x (..., K) (and, for the
    kernel, a layer of `group_size`)."""
    kernel_arguments(prologue)
    if isinstance(prologue, LayerNormModulation):
        want = (x.shape[0] if x.ndim > 2 else prologue.shift.shape[0], x.shape[-1])
        if prologue.shift.shape != want or prologue.scale.shape != want or x.ndim < 2:
            raise ValueError(f"LayerNormModulation shift {prologue.shift.shape} and scale {prologue.scale.shape} "
                             f"must be (images, features) = {want} for x {x.shape}")
    elif prologue.tail is not None:
        tail = prologue.tail
        if prologue.start != x.shape[-1] or tail.shape[:-1] != x.shape[:-1] or not 0 <= prologue.tail_from < tail.shape[-1]:
            raise ValueError(f"GeluTanh with a tail {tail.shape} (from feature {prologue.tail_from}) needs start = x's "
                             f"{x.shape[-1]} features (got {prologue.start}), x's leading shape {x.shape[:-1]} and "
                             f"tail_from inside the tail")
        if group_size and (prologue.start % group_size or prologue.tail_from % group_size or tail.shape[-1] % group_size):
            raise ValueError(f"GeluTanh x features {prologue.start}, tail features {tail.shape[-1]} and tail_from "
                             f"{prologue.tail_from} must be multiples of the layer's group size {group_size}")
    elif not 0 <= prologue.start < x.shape[-1]:
        raise ValueError(f"GeluTanh start {prologue.start} is outside x's {x.shape[-1]} features (x {x.shape})")
    elif group_size and prologue.start % group_size:
        raise ValueError(f"GeluTanh start {prologue.start} must be a multiple of the layer's group size {group_size}")


def produced_shape(x: jax.Array, prologue: Prologue) -> tuple[int, ...]:
    """The shape of prologue(x): x's, or with a GeluTanh tail the concatenated width."""
    if isinstance(prologue, GeluTanh) and prologue.tail is not None:
        return (*x.shape[:-1], x.shape[-1] + prologue.tail.shape[-1] - prologue.tail_from)
    return x.shape


def apply_prologue(x: jax.Array, prologue: Prologue) -> jax.Array:
    """The prologue in XLA ops, float32: x (..., K) -> (..., K) (with a GeluTanh tail, the
    concatenated width)."""
    check_prologue(x, prologue)
    if isinstance(prologue, GeluTanh):
        x = prologue.joined(x)
        prologue = GeluTanh(prologue.start)
    args = kernel_arguments(prologue)
    y = _apply(x.reshape(-1, x.shape[-1]), args.pop("prologue"), **args)
    return y.reshape(x.shape)
