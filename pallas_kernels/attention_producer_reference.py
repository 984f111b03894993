"""The unfused path `attention_producer` replaces, and the bound its output is tested against.

`projections_reference` is the model's XLA producer of q, k, v (FLUX's FluxAttention.attend: per
stream, per-head RMSNorm of q and k rounded to bf16; the streams concatenated; RoPE in float32
rounded to bf16).

`bf16_flip_bounds`: the kernel runs the same operations, but sums the norm's mean square in
another order (and on the GPU its rsqrt and its products may round differently from XLA's), so a
bf16 rounding of the normed n or of the rotated r can land one unit (ulp, at most 2^-7 of the
value in bf16) away. Per element that moves r by at most
    delta = 2^-7 (|n_e| |cos| + |n_o| |sin|) + 2^-7 |r|
(one ulp in each normed operand, then one in r).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention_producer import Projection, Stream

BF16_ULP = 2.0**-7  # an ulp of a bf16 is at most this fraction of its value


def _heads(p: Projection, heads: int, d: int) -> jax.Array:
    x = p.array[..., p.column:p.column + heads * d]
    return x.reshape(*x.shape[:-1], heads, d)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """torch.nn.RMSNorm over the last axis in float32, rounded to x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """(B, S, H, D) rotated by (S, D) tables, pairs (2i, 2i + 1), float32, rounded to x's dtype."""
    c, s = (t[None, :, None, :] for t in (cos, sin))
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x.astype(jnp.float32) * c + rotated.astype(jnp.float32) * s).astype(x.dtype)


def normed(streams: Sequence[Stream], heads: int, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The joint (B, S, H, D) q and k after their RMSNorm (before RoPE), and v."""
    d = streams[0].q_weight.shape[-1]
    cat = lambda xs: jnp.concatenate(xs, axis=1)
    return (cat([rms_norm(_heads(s.q, heads, d), s.q_weight, eps) for s in streams]),
            cat([rms_norm(_heads(s.k, heads, d), s.k_weight, eps) for s in streams]),
            cat([_heads(s.v, heads, d) for s in streams]))


def projections_reference(streams: Sequence[Stream], cos: jax.Array, sin: jax.Array, *, heads: int, eps: float
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The joint (B, S, H, D) bf16 q, k, v as the unfused model makes them."""
    q, k, v = normed(streams, heads, eps)
    return rope(q, cos, sin), rope(k, cos, sin), v


def bf16_flip_bounds(n: jax.Array, r: jax.Array, cos: jax.Array, sin: jax.Array) -> np.ndarray:
    """delta (module docstring) per element of the rotated r (B, S, H, D), from the normed n."""
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    n64, r64 = f64(n), f64(r)
    swapped = n64.reshape(*n64.shape[:-1], -1, 2)[..., ::-1].reshape(n64.shape)  # n_o at 2i, n_e at 2i + 1
    c, s = (np.abs(f64(t))[None, :, None, :] for t in (cos, sin))
    return BF16_ULP * (np.abs(n64) * c + np.abs(swapped) * s + np.abs(r64))
