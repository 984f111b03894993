"""Flax NNX drop-in replacements for a Dense layer: W4A4 (`ConvDense4bit`) and W4A16
(`Dense4bitWeightOnly`). Both hold a `QuantizedWeight` as two `QuantizedParam` variables (packed
codes, scales) plus static settings, so `nnx.state`, `nnx.eval_shape` and Orbax see plain arrays.
`concatenate` fuses layers that read the same input into one (one activation pass, one GEMM)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import jax.numpy as jnp
from flax import nnx

from convrot_jax.hadamard import HadamardKind
from convrot_jax.linear import int4_weight_only_linear
from convrot_jax.ops import Implementation, w4a4_linear
from convrot_jax.quant import QuantizedWeight, quantize_weight


class QuantizedParam(nnx.Variable):
    """A frozen quantized tensor (packed int4 codes or their scales): not a trainable Param."""


def require_equal(layers: Sequence[object], names: Sequence[str]) -> None:
    """Raises a ValueError naming the first attribute in `names` on which `layers` differ."""
    for name in names:
        values = [getattr(layer, name) for layer in layers]
        if len(set(values)) > 1:
            raise ValueError(f"cannot concatenate layers with different {name}: {values}")


def concatenate_biases(biases: Sequence[jnp.ndarray | None], out_features: Sequence[int]) -> jnp.ndarray | None:
    """The bias of layers concatenated along their outputs: None if none has one, else the biases
    concatenated, with zeros (in the first present bias's dtype) for the layers without."""
    present = [b for b in biases if b is not None]
    if not present:
        return None
    return jnp.concatenate([jnp.zeros((n,), present[0].dtype) if b is None else b for b, n in zip(biases, out_features)])


class _QuantizedDense(nnx.Module):
    # Constructor keywords beyond the weight and bias (ConvDense4bit: implementation), which
    # `concatenate` requires equal and passes on.
    _settings: tuple[str, ...] = ()

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

    @classmethod
    def concatenate(cls, layers: Sequence[Self]) -> Self:
        """One layer whose output is `layers`' outputs concatenated along out_features, so that
        projections reading the same input run as one activation pass and one GEMM. Exact, with
        no requantization: the scales are per output row (or per row and K group), so the fused
        weight is the concatenation of the quantized ones. All layers must share in_features and
        every setting; a missing bias becomes zeros when another layer has one."""
        if not layers or any(type(layer) is not cls for layer in layers):
            raise TypeError(f"{cls.__name__}.concatenate takes a non-empty sequence of {cls.__name__} layers, "
                            f"got {[type(layer).__name__ for layer in layers]}")
        require_equal(layers, ("in_features", "group_size", "hadamard", "scale_group", *cls._settings))
        first = layers[0]
        qweight = QuantizedWeight(
            jnp.concatenate([layer.packed[...] for layer in layers]),
            jnp.concatenate([layer.scales[...] for layer in layers]),
            first.group_size, first.hadamard, first.scale_group,
        )
        bias = concatenate_biases([layer._bias() for layer in layers], [layer.out_features for layer in layers])
        return cls(qweight, bias, **{name: getattr(first, name) for name in cls._settings})

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

    _settings = ("implementation",)

    def __init__(
        self, qweight: QuantizedWeight, bias: jnp.ndarray | None = None, *, implementation: Implementation = "auto"
    ):
        super().__init__(qweight, bias)
        self.implementation = implementation

    def __call__(self, x: jnp.ndarray, *, residual: jnp.ndarray | None = None,
                 gate: jnp.ndarray | None = None) -> jnp.ndarray:
        """The layer's output, or with `residual` and `gate` the gated residual residual + gate[:, None]
        * output in one rounding (`convrot_jax.ops.w4a4_linear`)."""
        return w4a4_linear(x, self.qweight, self._bias(), residual=residual, gate=gate,
                           implementation=self.implementation)


class Dense4bitWeightOnly(_QuantizedDense):
    """W4A16 Dense for memory-bound layers (FLUX's AdaLN modulation: one row per image): int4
    weights, activations kept in their dtype."""

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return int4_weight_only_linear(x, self.qweight, self._bias())
