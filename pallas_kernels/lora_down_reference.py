"""The LoRA down-projection kernel's reference in XLA ops and the bound between the two.

`down_projection_reference` is what the model's XLA path computes (`convrot_jax.lora.
LowRankFactors.down_projection` on `apply_prologue`'s output): the produced input u rounded to
bf16, one float32 GEMM, times the scale, one rounding to bf16. `down_projection_bound` bounds the
kernel's difference from it elementwise: the float32 sums' order and, on a GELU's columns, the
bf16 roundings that the two float32 GELUs' last bits can move (`gelu_delta`: how far those may
differ; `gelu_spread`: what that does to bf16, nothing but near a rounding boundary).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.rotate_quantize import FAST_TANH_ERROR
from pallas_kernels.rotate_quantize_reference import apply_prologue

U = 2.0**-8  # bf16 unit roundoff
F32_ADD = 2.0**-23  # one float32 add or multiply, truncating or not (tensor cores may truncate)
# Either side's float32 tanh against the true tanh, in units of 2^-24 (float32's spacing below 1):
# the kernel's is libdevice's tanhf (CUDA: <= 2 ulps); XLA's GPU tanh is Eigen's 13/6 rational
# interpolant (`llvm_ir::EmitFastTanh`: "a couple of ulps" in [-8, 8]; a float32 emulation of it
# is off by up to 6.3 units, near z = -5.8; exactly +-1 beyond its clamp near 7.9, where the
# true 1 - |tanh| is < 2.8e-7, under 5 units); CPU tanhs are closer. 16 leaves room for both.
TANH_ULPS = 16
F32_TINY = 2.0**-126  # float32's smallest normal


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
                          tail: jax.Array | None = None, tail_from: int = 0, fast_tanh: bool = False) -> np.ndarray:
    """Elementwise bound (float64, (M, r)) on |kernel h - reference h|. With S = |u| |A|^T (u =
    bf16(`produced_input`)): the two float32 sums of the same K exact bf16 products, in any order
    (the kernel's K ranges summed after), are each within K adds of error on S; the scale's
    multiply is one more rounding each side; and each h is rounded to bf16 once (u of its value,
    |h_kernel| <= |h_ref| + the difference). On the GELU's columns the kernel's and the
    reference's bf16 inputs may differ from u, and from each other, by `gelu_spread` (zero but
    where the GELU's float32 value lies within `gelu_delta` of a bf16 rounding boundary; with
    `fast_tanh` the kernel's tanh is `tanh.approx.f32`); that difference D adds D |A|^T, on which
    each side's K adds act too."""
    k = down.shape[1]
    produced = np.asarray(produced_input(x, gelu_from, tail, tail_from), np.float32)
    u = np.abs(np.asarray(produced.astype(down.dtype), np.float64))
    a = np.abs(np.asarray(down, np.float64))
    s = np.abs(np.asarray(scale, np.float64))
    sums = (2 * k + 2) * F32_ADD * (u @ a.T)
    if gelu_from is not None:
        v = np.asarray(produced_input(x, None, tail, tail_from), np.float32)[:, gelu_from:]
        g = produced[:, gelu_from:]
        tanh_error = FAST_TANH_ERROR if fast_tanh else TANH_ULPS * F32_ADD / 2
        sums += (1 + (2 * k + 2) * F32_ADD) * (gelu_spread(g, gelu_delta(v, g, tanh_error)) @ a[:, gelu_from:].T)
    h = np.abs(np.asarray(down_projection_reference(x, down, scale, gelu_from=gelu_from, tail=tail,
                                                    tail_from=tail_from), np.float64))
    return (s * sums + 2 * U * h) / (1 - U)


def gelu_delta(v: np.ndarray, g: np.ndarray, tanh_error: float = TANH_ULPS * F32_ADD / 2) -> np.ndarray:
    """delta (float64): how far the kernel's float32 evaluation of tanh-GELU at v (float32), its
    tanh within `tanh_error` of the true one, may lie from g, another one within TANH_ULPS e
    (`pallas_kernels.rotate_quantize.gelu_tanh` in the kernel, jax.nn.gelu(approximate=True) in
    XLA: the same formula and float32 constants, other tanhs, operation orders, FMA
    contractions). Each, against the formula in exact arithmetic at v, with p = (1 + tanh z) / 2,
    z = c (v + a v^3), e = 2^-24 = F32_ADD / 2: z's <= 5 roundings (v and a v^3 share a sign: no
    cancellation; FMA contraction only drops some) move tanh by sech^2(z) |z| 5e <= 3e
    (z sech^2 z <= 0.45); the tanh is within T (its error) of the true one; 1 + tanh rounds by
    <= 2e (exactly below -1/2); so p is off by <= (T + 5e) / 2, and g = v p by |v| times that plus
    one rounding, e |g| (second-order terms are far inside the slack of TANH_ULPS). The two sides'
    sum, plus twice float32's smallest normal (a flush of a subnormal input or result to zero
    moves g by less): delta = (tanh_error + (TANH_ULPS + 10) e) / 2 |v| + F32_ADD |g| +
    2 F32_TINY (= F32_ADD ((TANH_ULPS + 5) / 2 |v| + |g|) + 2 F32_TINY for two tanhs of
    TANH_ULPS). Its |v| part is absolute: where v << 0 and 1 + tanh is a few e, g is tiny and
    delta may exceed it (bf16(g) may then move by many of its units)."""
    e = F32_ADD / 2
    return ((tanh_error + (TANH_ULPS + 10) * e) / 2 * np.abs(v.astype(np.float64))
            + F32_ADD * np.abs(g.astype(np.float64)) + 2 * F32_TINY)


def gelu_spread(g: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """The most two bf16 roundings of float32 values within delta of g (float32) may differ by
    (float64): bf16 round-to-nearest-even is monotone, so they lie between the roundings of
    g - delta and g + delta (widened outwards to float32), which are equal, and the spread zero,
    unless that interval holds a bf16 rounding boundary."""
    g64 = g.astype(np.float64)
    lo = np.nextafter((g64 - delta).astype(np.float32), np.float32(-np.inf)).astype(jnp.bfloat16)
    hi = np.nextafter((g64 + delta).astype(np.float32), np.float32(np.inf)).astype(jnp.bfloat16)
    return hi.astype(np.float64) - lo.astype(np.float64)
