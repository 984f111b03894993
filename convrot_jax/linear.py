"""XLA reference linears: W4A4 (rotate -> int4 -> int8 GEMM, int32 accumulation -> dequantize)
and W4A16 (int4 weights dequantized to the activation dtype). The Pallas kernels are tested
against these."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from convrot_jax.hadamard import rotate
from convrot_jax.quant import QuantizedWeight, quantize_activation_reference
from pallas_kernels.w4a4_matmul_reference import int_matmul_reference  # noqa: F401  (re-exported)
from pallas_kernels.w4a4_matmul_reference import dequantized_matmul_reference as _dequantized_matmul
from pallas_kernels.w4a4_matmul_reference import check_gated_residual, gated_residual_reference


def check_linear_input(x: jnp.ndarray, qw: QuantizedWeight, bias: jnp.ndarray | None) -> None:
    """Raises ValueError naming the shapes when x or bias do not fit the quantized weight."""
    if x.ndim < 1 or x.shape[-1] != qw.in_features:
        raise ValueError(
            f"input's last axis {x.shape} does not match the weight's in_features {qw.in_features} "
            f"(weight shape {qw.shape})"
        )
    if bias is not None and bias.shape != (qw.out_features,):
        raise ValueError(f"bias shape {bias.shape} does not match out_features ({qw.out_features},)")


def check_gated_residual_input(x: jnp.ndarray, qw: QuantizedWeight, residual: jnp.ndarray | None,
                                gate: jnp.ndarray | None) -> None:
    """The gated residual's operands for x (B, ..., K): both or neither, gate (B, out_features) (one
    row per image, the leading axis), residual x's shape with out_features last and x's dtype: the
    GEMM kernel's check (`check_gated_residual`) with the images on x's leading axis. Raises
    ValueError naming the one at fault."""
    check_gated_residual((*x.shape[:-1], qw.out_features), gate, residual, x.dtype,
                         images=x.shape[0] if x.ndim >= 2 else None)
    if gate is not None and x.ndim < 2:
        raise ValueError(f"the gated residual needs an input (B, ..., K) with B images first, got {x.shape}")


def dequantized_matmul_reference(
    x_codes: jnp.ndarray, x_scales: jnp.ndarray, qw: QuantizedWeight
) -> jnp.ndarray:
    """float32 (M, N) = sum over scale groups of int32 partial products times both scales
    (`pallas_kernels.w4a4_matmul_reference`, the GEMM kernel's reference)."""
    return _dequantized_matmul(x_codes, x_scales, qw.codes(), qw.scales, qw.scale_group)


def w4a4_linear_reference(
    x: jnp.ndarray, qw: QuantizedWeight, bias: jnp.ndarray | None = None, *, residual: jnp.ndarray | None = None,
    gate: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """x (..., K) @ W.T + b through the ConvRot W4A4 path, in plain XLA ops; output in x.dtype.
    With `residual` and `gate` (`convrot_jax.ops.w4a4_linear`): residual + gate[:, None] * that,
    in float32 with one rounding, as the GEMM kernel's epilogue."""
    check_linear_input(x, qw, bias)
    check_gated_residual_input(x, qw, residual, gate)
    lead = x.shape[:-1]
    codes, scales = quantize_activation_reference(
        x.reshape(-1, qw.in_features), group_size=qw.group_size, hadamard=qw.hadamard
    )
    y = dequantized_matmul_reference(codes, scales, qw)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    if gate is not None:
        y = gated_residual_reference(y, gate, residual.reshape(y.shape))
    return y.astype(x.dtype).reshape(*lead, qw.out_features)


def int4_weight_only_linear(
    x: jnp.ndarray, qw: QuantizedWeight, bias: jnp.ndarray | None = None
) -> jnp.ndarray:
    """W4A16: x (..., K) @ W.T + b with int4 weights dequantized to x.dtype in the rotated basis
    (x is rotated too, so no inverse rotation of the weight is needed). float32 accumulation."""
    check_linear_input(x, qw, bias)
    x_rot = rotate(x, group_size=qw.group_size, hadamard=qw.hadamard).astype(x.dtype)
    w = (qw.codes().astype(jnp.float32) * qw.scales_per_column()).astype(x.dtype)
    y = jax.lax.dot_general(
        x_rot, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)
