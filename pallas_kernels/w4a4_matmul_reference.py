"""The W4A4 GEMM's reference in XLA ops: unpack, int8 dot with exact int32 accumulation,
dequantize. `convrot_jax.linear` builds its reference linear on it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.rounding import unpack_int4

# NT layout: contract the last axis of both operands (both K-major), as cuBLASLt's int8 GEMM wants.
_NT = (((1,), (1,)), ((), ()))


def int_matmul_reference(x_codes: jax.Array, w_codes: jax.Array) -> jax.Array:
    """int8 (M, K) x int8 (N, K) -> int32 (M, N), exact."""
    return jax.lax.dot_general(x_codes, w_codes, _NT, preferred_element_type=jnp.int32)


def dequantized_matmul_reference(
    x_codes: jax.Array, x_scales: jax.Array, w_codes: jax.Array, w_scales: jax.Array, scale_group: int | None = None
) -> jax.Array:
    """float32 (M, N) = sum over scale groups of int32 partial products times both scales.
    w_scales: (N,), or (N, K / scale_group) with `scale_group`."""
    if scale_group is None:
        acc = int_matmul_reference(x_codes, w_codes)
        return acc.astype(jnp.float32) * x_scales[:, None] * w_scales[None, :]
    g = scale_group
    groups = w_codes.shape[1] // g

    def body(j, y):
        xs = jax.lax.dynamic_slice_in_dim(x_codes, j * g, g, axis=1)
        ws = jax.lax.dynamic_slice_in_dim(w_codes, j * g, g, axis=1)
        acc = int_matmul_reference(xs, ws).astype(jnp.float32)
        return y + acc * jax.lax.dynamic_index_in_dim(w_scales, j, axis=1, keepdims=False)[None, :]

    y = jax.lax.fori_loop(0, groups, body, jnp.zeros((x_codes.shape[0], w_codes.shape[0]), jnp.float32))
    return y * x_scales[:, None]


def w4a4_matmul_reference(
    x_codes: jax.Array,
    x_scales: jax.Array,
    w_packed: jax.Array,
    w_scales: jax.Array,
    bias: jax.Array | None = None,
    *,
    scale_group: int | None = None,
    out_dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
    """The kernel's function in XLA ops: `dequantized_matmul_reference` (unpack, int8 dot with
    int32 accumulation, scales in the kernel's order), then bias, then the cast."""
    y = dequantized_matmul_reference(x_codes, x_scales.astype(jnp.float32), unpack_int4(w_packed), w_scales,
                                     scale_group)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)
