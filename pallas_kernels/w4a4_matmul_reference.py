"""The W4A4 GEMM's reference in XLA ops: unpack, int8 dot with exact int32 accumulation,
dequantize. `convrot_jax.linear` builds its reference linear on it."""

from __future__ import annotations

import math

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
    gate: jax.Array | None = None,
    residual: jax.Array | None = None,
    lora_h: jax.Array | None = None,
    lora_up: jax.Array | None = None,
    scale_group: int | None = None,
    out_dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
    """The kernel's function in XLA ops: `dequantized_matmul_reference` (unpack, int8 dot with
    int32 accumulation, scales in the kernel's order), then bias, then the LoRA term
    lora_h . lora_up^T (float32 product) when given, then the gated residual when given, then the
    cast: all float32, one rounding."""
    y = dequantized_matmul_reference(x_codes, x_scales.astype(jnp.float32), unpack_int4(w_packed), w_scales,
                                     scale_group)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    check_lora_operands(*y.shape, lora_h, lora_up)
    if lora_h is not None:
        y = y + jax.lax.dot_general(lora_h, lora_up, _NT, preferred_element_type=jnp.float32)
    check_gated_residual(y.shape, gate, residual)
    if gate is not None:
        y = gated_residual_reference(y, gate, residual)
    return y.astype(out_dtype)


def gated_residual_reference(y: jax.Array, gate: jax.Array, residual: jax.Array) -> jax.Array:
    """float32 residual + gate[m // (M / B)] * y for y (M, N) float32, gate (B, N), residual (M, N):
    the M rows are B images of M / B tokens, each scaled by its image's gate row."""
    m, n = y.shape
    images = gate.shape[0]
    g = gate.astype(jnp.float32)[:, None, :]
    gated = (g * y.reshape(images, m // images, n)).reshape(m, n)
    return residual.astype(jnp.float32) + gated


def check_gated_residual(out_shape: tuple[int, ...], gate: jax.Array | None, residual: jax.Array | None,
                         out_dtype: jnp.dtype | None = None, images: int | None = None) -> None:
    """The gated residual's operands for an output of shape (..., N) whose rows (all axes but the
    last, M in all) are B images of M / B rows each: both or neither; gate (B, N), B = `images`
    where the caller knows it (a layer: its input's leading axis), else any B dividing M; residual
    of the output's shape, and of `out_dtype` where given. The one check of the kernel, its
    reference and the layers (`convrot_jax.linear`). Raises ValueError naming the one at fault."""
    if not _given_together("the gated residual", gate=gate, residual=residual):
        return
    out_shape = tuple(out_shape)
    m, n = math.prod(out_shape[:-1]), out_shape[-1]
    if (gate.ndim != 2 or gate.shape[1] != n or gate.shape[0] < 1 or m % gate.shape[0]
            or images is not None and gate.shape[0] != images):
        raise ValueError(f"gate {gate.shape} must be (B, N) = ({'B' if images is None else images}, {n}), a row per "
                         f"image: the output {out_shape}'s M = {m} rows are B images of M / B rows")
    if residual.shape != out_shape:
        raise ValueError(f"residual {residual.shape} must be the output's shape {out_shape}")
    if out_dtype is not None and residual.dtype != jnp.dtype(out_dtype):
        raise ValueError(f"residual dtype {residual.dtype} must be the output dtype {jnp.dtype(out_dtype)}")


def check_lora_operands(m: int, n: int, lora_h: jax.Array | None, lora_up: jax.Array | None) -> None:
    """A LoRA branch's GEMM operands: both or neither; h (M, r) and B (N, r), both bfloat16, r >= 1.
    Raises ValueError naming the one at fault."""
    if not _given_together("a LoRA branch", lora_h=lora_h, lora_up=lora_up):
        return
    if lora_h.ndim != 2 or lora_up.ndim != 2 or lora_h.shape[1] != lora_up.shape[1] or lora_h.shape[1] < 1:
        raise ValueError(f"lora_h {lora_h.shape} and lora_up {lora_up.shape} must be (M, r) and (N, r) with one rank r")
    if lora_h.shape[0] != m or lora_up.shape[0] != n:
        raise ValueError(f"lora_h {lora_h.shape} and lora_up {lora_up.shape} must be (M, r) = ({m}, r) and "
                         f"(N, r) = ({n}, r)")
    if lora_h.dtype != jnp.bfloat16 or lora_up.dtype != jnp.bfloat16:
        raise ValueError(f"lora_h and lora_up must be bfloat16 (the epilogue's wgmma operands), got {lora_h.dtype} "
                         f"and {lora_up.dtype}")


def _given_together(what: str, **pair: jax.Array | None) -> bool:
    """Whether the two operands of `what` are given: both (True) or neither (False); one alone
    raises ValueError naming it."""
    (a, x), (b, y) = pair.items()
    if (x is None) != (y is None):
        raise ValueError(f"{what} needs both {a} and {b}, got only {a if y is None else b}")
    return x is not None
