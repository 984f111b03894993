"""The rotate-quantize op's reference in XLA ops, its prologues and its input checks.

`rotate_quantize_reference` is what the kernel (`pallas_kernels.rotate_quantize`) is tested
against: the prologue in float32, then the grouped regular-Hadamard rotation and the per-row
symmetric int4 quantization of `pallas_kernels.rounding`, i.e. `convrot_jax`'s
`quantize_activation_reference` after the prologue. Without a prologue the kernel is
bit-identical to it.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.rounding import pack_int4, regular_levels, regular_rotate, symmetric_int4

Prologue = Literal["none", "layernorm", "gelu_tanh"]
PROLOGUES: tuple[str, ...] = ("none", "layernorm", "gelu_tanh")
LAYERNORM_EPS = 1e-6


def check_inputs(
    x: jax.Array, group_size: int, prologue: str, shift: jax.Array | None, scale: jax.Array | None,
    gelu_from: int = 0,
) -> bool:
    """Validates a rotate-quantize call; returns whether the LayerNorm is modulated. Errors name
    the argument and shape at fault."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (tokens, features), got shape {x.shape}")
    if x.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(f"x must be bfloat16 or float32, got {x.dtype}")
    m, k = x.shape
    regular_levels(group_size)
    if k % group_size:
        raise ValueError(f"x's last axis ({k}, shape {x.shape}) must be a multiple of group_size ({group_size})")
    if prologue not in PROLOGUES:
        raise ValueError(f"prologue must be one of {PROLOGUES}, got {prologue!r}")
    if gelu_from and (prologue != "gelu_tanh" or gelu_from % group_size or not 0 < gelu_from < k):
        raise ValueError(f"gelu_from={gelu_from} needs prologue='gelu_tanh' and a multiple of group_size "
                         f"({group_size}) inside x's {k} columns (shape {x.shape})")
    modulated = shift is not None or scale is not None
    if modulated:
        if prologue != "layernorm" or shift is None or scale is None:
            raise ValueError("shift and scale go together, with prologue='layernorm'")
        if shift.shape != scale.shape or shift.ndim != 2 or shift.shape[1] != k or m % shift.shape[0]:
            raise ValueError(
                f"shift {shift.shape} and scale {scale.shape} must both be (B, {k}) with B dividing "
                f"the {m} rows of x {x.shape}"
            )
    return modulated


def apply_prologue(
    x: jax.Array, prologue: Prologue = "none", shift: jax.Array | None = None, scale: jax.Array | None = None,
    gelu_from: int = 0,
) -> jax.Array:
    """The prologue in jnp, float32: x (M, K) -> (M, K). "layernorm" has no affine (eps 1e-6);
    shift/scale (B, K) modulate image b's M / B consecutive rows: LayerNorm(x) * (1 + scale) +
    shift. "gelu_tanh" is jax.nn.gelu(approximate=True) on the columns from `gelu_from` on (the
    columns before it pass unchanged: FLUX's single blocks feed [attention, GELU(MLP)])."""
    xf = x.astype(jnp.float32)
    if prologue == "gelu_tanh":
        return jnp.concatenate([xf[:, :gelu_from], jax.nn.gelu(xf[:, gelu_from:], approximate=True)], axis=-1)
    if prologue == "none":
        return xf
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + np.float32(LAYERNORM_EPS))
    if shift is None:
        return y
    b = shift.shape[0]
    y = y.reshape(b, -1, y.shape[-1])
    y = y * (1 + scale.astype(jnp.float32)[:, None]) + shift.astype(jnp.float32)[:, None]
    return y.reshape(xf.shape)


def rotate_quantize_reference(
    x: jax.Array,
    *,
    group_size: int = 256,
    packed: bool = False,
    prologue: Prologue = "none",
    shift: jax.Array | None = None,
    scale: jax.Array | None = None,
    gelu_from: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """x (M, K) -> (codes, float32 scales (M,)) as the kernel returns them: the prologue, then
    each group of `group_size` rotated and each row quantized; codes int8 (M, K) in [-7, 7], or
    with `packed` uint8 (M, K/2), low nibble = even k."""
    check_inputs(x, group_size, prologue, shift, scale, gelu_from)
    y = apply_prologue(x, prologue, shift, scale, gelu_from)
    m, k = y.shape
    rotated = regular_rotate(y.reshape(m, k // group_size, group_size)).reshape(m, k)
    codes, scales = symmetric_int4(rotated, axis=-1)
    return (pack_int4(codes) if packed else codes), scales
