"""The int4 recipe that the kernels and convrot_jax's XLA reference share, bit for bit.

Every float32 operation and its order is fixed here, once, and both sides import it:
- the rotation: a group of n = 4^levels values is viewed as a 4 x ... x 4 tensor and the 4-point
  regular-Hadamard stage (`regular_stage`, a fixed order of adds) runs along every axis,
  outermost first (`butterfly4`), then one power-of-two multiply by 1/sqrt(n) (`regular_rotate`);
- the quantization (`symmetric_int4`):
      absmax = max |v| over the scale's extent           (float32)
      scale  = max(absmax * float32(1/7), SCALE_FLOOR)    (a multiply: XLA rewrites x / 7 this way
                                                          on some backends and not others)
      codes  = clip(round_half_even(v * (1 / scale)), -7, 7)
  An all-zero extent gets the floor scale and zero codes (never NaN). An extent holding NaN or
  Inf gets a NaN scale and zero codes, so whatever it feeds (one token's layer output) comes out
  NaN instead of finite garbage; other tokens are unaffected;
- the packing: two int4 codes a byte, low nibble = even k, two's complement.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

INT4_MAX = 7
SCALE_FLOOR = 1e-10


def regular_levels(n: int) -> int:
    """The butterfly levels of a regular-Hadamard group of n = 4^levels values (levels >= 1);
    raises ValueError for any other n."""
    if isinstance(n, (int, np.integer)) and n >= 4:
        levels = round(math.log(n, 4))
        if 4**levels == n:
            return int(levels)
    raise ValueError(f"regular Hadamard size must be a power of 4 (4, 16, 64, 256, 1024, ...), got {n}")


def regular_stage(x0, x1, x2, x3):
    """Unscaled 4-point regular Hadamard along one axis, in the fixed order of adds."""
    a, b = x0 + x1, x0 - x1
    c, d = x2 + x3, x2 - x3
    return a + d, a - d, b + c, c - b


def butterfly4(x: jnp.ndarray, levels: int, stage: Callable) -> jnp.ndarray:
    """x (..., 4^levels): `stage` along every axis of the last dim viewed as 4 x ... x 4,
    outermost axis first; unscaled."""
    lead, n = x.shape[:-1], 4**levels
    for level in range(levels):
        outer, inner = 4**level, n // 4 ** (level + 1)
        y = x.reshape(*lead, outer, 4, inner)
        parts = stage(y[..., 0, :], y[..., 1, :], y[..., 2, :], y[..., 3, :])
        x = jnp.stack(parts, axis=-2).reshape(*lead, n)
    return x


def regular_rotate(groups: jnp.ndarray) -> jnp.ndarray:
    """float32 groups (..., n) -> each group times the regular Hadamard matrix H_n / sqrt(n)."""
    n = groups.shape[-1]
    return butterfly4(groups, regular_levels(n), regular_stage) * np.float32(1 / math.sqrt(n))


def int4_scale(absmax):
    """The float32 scale of an extent whose largest magnitude is `absmax` (array or scalar)."""
    return jnp.maximum(absmax * np.float32(1 / INT4_MAX), np.float32(SCALE_FLOOR))


def int4_round(v):
    """float32 v * (1 / scale) -> codes: round half to even, clipped to [-7, 7] (still float)."""
    return jnp.clip(jnp.round(v), -INT4_MAX, INT4_MAX)


def symmetric_int4(v: jnp.ndarray, axis: int = -1) -> tuple[jnp.ndarray, jnp.ndarray]:
    """float32 v -> (int8 codes in [-7, 7], float32 scales with `axis` reduced away)."""
    v = v.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(v), axis=axis, keepdims=True)
    # Not isfinite(absmax): XLA:CPU's max drops NaN (fast min/max), so a NaN among finite
    # values would slip through there and not on the GPU.
    finite = jnp.all(jnp.isfinite(v), axis=axis, keepdims=True)
    scale = int4_scale(absmax)
    inv = np.float32(1.0) / scale
    codes = int4_round(v * inv)
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
