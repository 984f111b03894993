"""Flax NNX drop-in replacements for a Dense layer: W4A4 (`ConvDense4bit`) and W4A16
(`Dense4bitWeightOnly`). Both hold a `QuantizedWeight` as two `QuantizedParam` variables (packed
codes, scales) plus static settings, so `nnx.state`, `nnx.eval_shape` and Orbax see plain arrays."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from convrot_jax.hadamard import HadamardKind
from convrot_jax.linear import int4_weight_only_linear
from convrot_jax.ops import Implementation, w4a4_linear
from convrot_jax.quant import QuantizedWeight, quantize_weight


class QuantizedParam(nnx.Variable):
    """A frozen quantized tensor (packed int4 codes or their scales): not a trainable Param."""


class _QuantizedDense(nnx.Module):
    def __init__(self, qweight: QuantizedWeight, bias: jnp.ndarray | None = None):
        self.packed = QuantizedParam(qweight.packed)
        self.scales = QuantizedParam(qweight.scales)
        self.bias = nnx.Param(bias) if bias is not None else None
        self.group_size = qweight.group_size
        self.hadamard = qweight.hadamard
        self.scale_group = qweight.scale_group

    @classmethod
    def from_linear(
        cls,
        weight: jnp.ndarray,
        bias: jnp.ndarray | None = None,
        *,
        group_size: int = 256,
        hadamard: HadamardKind = "regular",
        scale_group: int | None = None,
        bias_dtype=jnp.bfloat16,
        **kwargs,
    ):
        """Quantizes a float weight in PyTorch layout (out_features, in_features); for a Flax
        `nnx.Linear`, pass `kernel.T`. The bias is kept in `bias_dtype`."""
        qw = quantize_weight(weight, group_size=group_size, hadamard=hadamard, scale_group=scale_group)
        b = None if bias is None else jnp.asarray(bias, bias_dtype)
        return cls(qw, b, **kwargs)

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.packed[...], self.scales[...], self.group_size, self.hadamard, self.scale_group)

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * 2

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def _bias(self) -> jnp.ndarray | None:
        return None if self.bias is None else self.bias[...]


class ConvDense4bit(_QuantizedDense):
    """W4A4 Dense: rotate the activations online, quantize per token to int4, integer GEMM against
    the offline-rotated int4 weight, dequantize (+ bias). Accepts any leading shape; output dtype
    is the input's."""

    def __init__(
        self, qweight: QuantizedWeight, bias: jnp.ndarray | None = None, *, implementation: Implementation = "auto"
    ):
        super().__init__(qweight, bias)
        self.implementation = implementation

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return w4a4_linear(x, self.qweight, self._bias(), implementation=self.implementation)


class Dense4bitWeightOnly(_QuantizedDense):
    """W4A16 Dense for memory-bound layers (FLUX's AdaLN modulation: one row per image): int4
    weights, activations kept in their dtype."""

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return int4_weight_only_linear(x, self.qweight, self._bias())
