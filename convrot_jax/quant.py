"""Symmetric int4 quantization, int4 packing, and the QuantizedWeight container.

Rounding recipe (the Pallas kernels reproduce it bit for bit):
    absmax = max |v| over the scale's extent          (float32)
    scale  = max(absmax * float32(1/7), SCALE_FLOOR)   (a multiply: XLA rewrites x / 7 this way
                                                        on some backends and not others)
    codes  = clip(round_half_even(v * (1 / scale)), -7, 7)
An all-zero extent gets the floor scale and zero codes (never NaN). An extent holding NaN or Inf
gets a NaN scale and zero codes, so whatever it feeds (one token's layer output) comes out NaN
instead of finite garbage; other tokens are unaffected.
"""

from __future__ import annotations

import math

import flax.struct

import jax.numpy as jnp
import numpy as np

from convrot_jax.hadamard import HadamardKind, check_group_size, rotate

INT4_MAX = 7
SCALE_FLOOR = 1e-10


def symmetric_int4(v: jnp.ndarray, axis: int = -1) -> tuple[jnp.ndarray, jnp.ndarray]:
    """float32 v -> (int8 codes in [-7, 7], float32 scales with `axis` reduced away)."""
    v = v.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(v), axis=axis, keepdims=True)
    # Not isfinite(absmax): XLA:CPU's max drops NaN (fast min/max), so a NaN among finite
    # values would slip through there and not on the GPU.
    finite = jnp.all(jnp.isfinite(v), axis=axis, keepdims=True)
    scale = jnp.maximum(absmax * np.float32(1 / INT4_MAX), np.float32(SCALE_FLOOR))
    inv = np.float32(1.0) / scale
    codes = jnp.clip(jnp.round(v * inv), -INT4_MAX, INT4_MAX)
    codes = jnp.where(finite, codes, 0).astype(jnp.int8)
    scale = jnp.where(finite, scale, jnp.nan)
    return codes, jnp.squeeze(scale, axis)


def pack_int4(codes: jnp.ndarray) -> jnp.ndarray:
    """int8 codes (..., K) in [-8, 7] -> uint8 (..., K/2); low nibble = even k, two's complement."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of int4 codes along the last axis: {codes.shape}")
    c = codes.astype(jnp.uint8) & 0xF
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: jnp.ndarray) -> jnp.ndarray:
    """uint8 (..., K/2) -> int8 codes (..., K), the inverse of `pack_int4`."""
    p = packed.astype(jnp.uint8)
    low = ((p & 0xF) ^ 8).astype(jnp.int8) - 8
    high = ((p >> 4) ^ 8).astype(jnp.int8) - 8
    return jnp.stack([low, high], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


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


