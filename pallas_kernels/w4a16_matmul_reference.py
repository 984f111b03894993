"""The W4A16 GEMM's reference in XLA ops: the kernel's arithmetic (exact int4 codes against the
bf16 activations with float32 sums, the scales applied to the sums), so that kernel and
reference differ only in summation order and the final rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.rounding import unpack_int4


def w4a16_matmul_reference(
    x: jax.Array,
    w_packed: jax.Array,
    w_scales: jax.Array,
    bias: jax.Array | None = None,
    *,
    scale_group: int | None = None,
    out_dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
    """(M, N) = sum over scale groups of (x_g . codes_g^T) * s_g (+ bias), float32, then the cast.
    w_scales: (N,), or (N, K / scale_group) with `scale_group`."""
    codes = unpack_int4(w_packed).astype(jnp.float32)
    xf = x.astype(jnp.float32)
    if scale_group is None:
        y = jnp.dot(xf, codes.T, precision=jax.lax.Precision.HIGHEST) * w_scales.astype(jnp.float32)[None, :]
    else:
        m, k = x.shape
        g = scale_group
        parts = jnp.einsum("mgk,ngk->mng", xf.reshape(m, k // g, g), codes.reshape(-1, k // g, g),
                           precision=jax.lax.Precision.HIGHEST)
        y = (parts * w_scales.astype(jnp.float32)[None]).sum(-1)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)
