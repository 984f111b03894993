"""The LoRA down-projection kernel's reference in XLA ops and the bound between the two.

`down_projection_reference` is what the model's XLA path computes (`convrot_jax.lora.
LowRankFactors.down_projection` on `apply_prologue`'s output): the produced input u rounded to
bf16, one float32 GEMM, times the scale, one rounding to bf16. `down_projection_bound` bounds the
kernel's difference from it elementwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.rotate_quantize_reference import apply_prologue

U = 2.0**-8  # bf16 unit roundoff
F32_ADD = 2.0**-23  # one float32 add or multiply, truncating or not (tensor cores may truncate)


def produced_input(x: jax.Array, gelu_from: int | None = None, tail: jax.Array | None = None,
                   tail_from: int = 0) -> jax.Array:
    """u in float32 before its bf16 rounding: x, or [x, tail[:, tail_from:]] with tanh-GELU from
    column `gelu_from` on."""
    row = x if tail is None else jnp.concatenate([x, tail[:, tail_from:]], axis=-1)
    if gelu_from is None:
        return row.astype(jnp.float32)
    return apply_prologue(row, "gelu_tanh", gelu_from=gelu_from)


def down_projection_reference(x: jax.Array, down: jax.Array, scale: jax.Array, *, gelu_from: int | None = None,
                              tail: jax.Array | None = None, tail_from: int = 0) -> jax.Array:
    """h (M, r) = bf16((bf16(u) A^T) * scale), the product in float32 (`pallas_kernels.lora_down`'s
    arguments)."""
    u = produced_input(x, gelu_from, tail, tail_from).astype(down.dtype)
    h = jax.lax.dot_general(u, down, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (h * scale.astype(jnp.float32)).astype(down.dtype)


def down_projection_bound(x: jax.Array, down: jax.Array, scale: jax.Array, *, gelu_from: int | None = None,
                          tail: jax.Array | None = None, tail_from: int = 0) -> np.ndarray:
    """Elementwise bound (float64, (M, r)) on |kernel h - reference h|. With S = |u| |A|^T (u the
    reference's bf16 input): the two float32 sums of the same K exact bf16 products, in any order
    (the kernel's K ranges summed after), are each within K adds of error on S; the GELU's
    float32 value may differ in its last bits (another operation order, another tanh), which can
    move its bf16 rounding by one unit, 2u |u| (1 + 2u), on the GELU's columns; the scale's
    multiply is one more rounding each side; and each h is rounded to bf16 once (u of its value,
    |h_kernel| <= |h_ref| + the difference). Where GELU(v) is tiny (v << 0, 1 + tanh near its
    float32 granularity) the last bits are an absolute error, |v| times one float32 unit."""
    k = down.shape[1]
    u = np.abs(np.asarray(produced_input(x, gelu_from, tail, tail_from).astype(down.dtype), np.float64))
    a = np.abs(np.asarray(down, np.float64))
    s = np.abs(np.asarray(scale, np.float64))
    sums = (2 * k + 2) * F32_ADD * (u @ a.T)
    if gelu_from is not None:
        v = np.abs(np.asarray(produced_input(x, None, tail, tail_from), np.float64))
        sums += (2 * U * (1 + 2 * U) * u[:, gelu_from:] + F32_ADD * v[:, gelu_from:]) @ a[:, gelu_from:].T
    h = np.abs(np.asarray(down_projection_reference(x, down, scale, gelu_from=gelu_from, tail=tail,
                                                    tail_from=tail_from), np.float64))
    return (s * sums + 2 * U * h) / (1 - U)
