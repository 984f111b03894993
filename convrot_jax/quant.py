"""Symmetric int4 quantization, int4 packing, and the QuantizedWeight container.

The rounding recipe (scale, codes, NaN handling) and the nibble packing live in
`pallas_kernels.rounding`, which the kernels import too, so that both sides round alike.
"""

from __future__ import annotations

import math

import flax.struct

import jax.numpy as jnp
import numpy as np

from convrot_jax.hadamard import HadamardKind, check_group_size, rotate
from pallas_kernels.rounding import (  # noqa: F401  (INT4_MAX, SCALE_FLOOR: re-exported)
    INT4_MAX,
    SCALE_FLOOR,
    pack_int4,
    symmetric_int4,
    unpack_int4,
)


@flax.struct.dataclass
class QuantizedWeight:
    """A ConvRot int4 weight: rotated, quantized, packed.

    Invariant: with R the grouped Hadamard rotation (`group_size`, `hadamard`) and c the int4
    codes in `packed`, `W @ R ≈ c * scales` (scales broadcast per output row, or per `scale_group`
    columns along K), and so `W ≈ (c * scales) @ R` because R is symmetric and orthogonal.

    packed: uint8 (N, K/2), two codes a byte along K, low nibble = even k (K-major: the NT layout
    the integer GEMM wants). scales: float32 (N,) or (N, K / scale_group).
    """

    packed: jnp.ndarray
    scales: jnp.ndarray
    group_size: int = flax.struct.field(pytree_node=False, default=256)
    hadamard: str = flax.struct.field(pytree_node=False, default="regular")
    scale_group: int | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * 2

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features), the PyTorch layout of the original weight."""
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return int(self.packed.size * self.packed.dtype.itemsize + self.scales.size * self.scales.dtype.itemsize)

    def codes(self) -> jnp.ndarray:
        """int8 codes (N, K) in the rotated basis."""
        return unpack_int4(self.packed)

    def scales_per_column(self) -> jnp.ndarray:
        """float32 scales broadcast to (N, K) (or (N, 1) for per-channel scales)."""
        if self.scale_group is None:
            return self.scales[:, None]
        return jnp.repeat(self.scales, self.scale_group, axis=1)


def _check_scale_group(k: int, scale_group: int | None) -> None:
    if scale_group is None:
        return
    if scale_group <= 0 or scale_group % 2 or k % scale_group:
        raise ValueError(
            f"scale_group ({scale_group}) must be a positive even divisor of the input features ({k})"
        )


def quantize_weight(
    w: jnp.ndarray,
    *,
    group_size: int = 256,
    hadamard: HadamardKind = "regular",
    scale_group: int | None = None,
) -> QuantizedWeight:
    """Rotates, quantizes and packs a weight in PyTorch layout (out_features, in_features).

    Scales are per output channel, or per `scale_group` columns along K when given (finer scales,
    higher quality, a little more memory).
    """
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {w.shape}")
    n, k = w.shape
    check_group_size(group_size, hadamard)
    _check_scale_group(k, scale_group)
    w_rot = rotate(w, group_size=group_size, hadamard=hadamard)
    if scale_group is None:
        codes, scales = symmetric_int4(w_rot, axis=-1)
    else:
        codes, scales = symmetric_int4(w_rot.reshape(n, k // scale_group, scale_group), axis=-1)
        codes = codes.reshape(n, k)
    return QuantizedWeight(pack_int4(codes), scales, group_size, hadamard, scale_group)


def dequantize_weight(qw: QuantizedWeight) -> jnp.ndarray:
    """(N, K) float32 weight back in the original (unrotated) basis."""
    w_rot = qw.codes().astype(jnp.float32) * qw.scales_per_column()
    return rotate(w_rot, group_size=qw.group_size, hadamard=qw.hadamard)


def quantize_activation_reference(
    x: jnp.ndarray, *, group_size: int = 256, hadamard: HadamardKind = "regular"
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """x (..., K) -> (int8 codes (..., K) in [-7, 7], float32 scales (...,), one per token).

    The XLA reference: grouped rotation, then per-token symmetric int4 (module docstring).
    """
    return symmetric_int4(rotate(x, group_size=group_size, hadamard=hadamard), axis=-1)


def sqnr_db(reference: jnp.ndarray, approx: jnp.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(||ref||^2 / ||ref - approx||^2)."""
    ref = np.asarray(reference, np.float64)
    err = ref - np.asarray(approx, np.float64)
    return float(10 * math.log10(np.sum(ref**2) / max(np.sum(err**2), 1e-300)))


