"""References for `pallas_kernels.attention`: float32 attention, attention on the dequantized
8-bit operands, and the bounds the kernels are tested against; FLUX-like test inputs.

The "sage8" kernel's error has two parts that the tests check apart:
  * quantizing q, k, v (`quantize_qkv`): `dequantize` undoes it up to half a code step;
  * inside the kernel, only P's rounding (the logits come from exact int32 sums, or fp8
    products summed in float32): in fp8 ("sage8") each p is off by at most 2^-4 of itself (e4m3
    keeps 4 significant bits, round to nearest) plus half a subnormal step; in bf16 ("sage_qk8")
    by 2^-8; in "int8" by half a code step, 1/255 of the largest weight of its row in its KV block
    (times 2^P_HEADROOM), plus what float32 logits and (GPU) the float16 rounding of p add, and
    the float32 rounding of the output that the kernel keeps with LOGIT_BIAS in it
    (INT8_BIASED_OUTPUT_REL). `p_rounding_bounds` turns that into a worst-case bound per element and
    an RMS prediction per row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import (BIASED_EXACT, FP8_MAX, LOG2E, LOGIT_BIAS, P_CODE_TOP, P_HEADROOM,
                                      P_REFERENCE_FLOOR, QuantizedQKV, block_scales_per_key, key_permutation)

FP8_REL = 2.0**-4  # e4m3 round to nearest: |fp8(x) - x| <= 2^-4 |x| for normal x
FP8_SUBNORMAL_HALF_STEP = 2.0**-10  # e4m3 subnormal spacing 2^-9
BF16_REL = 2.0**-8
# "int8" on the GPU (`attention._p_codes_gpu`): p = 2^x (ex2.approx.ftz.f32, relative error
# <= 2^-22) rounded to float16 (2^-11 of p <= 1) before 255 p is rounded to a code: <= 255
# (2^-11 + 2^-22) ~ 0.125 of a code more. l sums those float16 p in float16 pairs, 8 terms a lane
# (7 adds, each <= 2^-11 of a partial sum <= the lane's sum), then in float32: <= 8 * 2^-11 of l.
INT8_P_GPU_CODES = P_CODE_TOP * (2.0**-11 + 2.0**-22)
INT8_L_GPU_REL = 8 * 2.0**-11
# "int8" keeps its float32 output O' with LOGIT_BIAS in it, in units of the current block's code
# reference (`attention._kernel`): per block O' = O' a + (LOGIT_BIAS + P.V) and c = c a + 1 (the
# biases it holds), at most two float32 roundings each (one where fused), |O'| <= c (LOGIT_BIAS +
# BIASED_EXACT); at the end O' - LOGIT_BIAS c. A block's roundings, carried to the end by the later
# rescales, are <= 2^-24 (2 (LOGIT_BIAS + BIASED_EXACT) + 2 LOGIT_BIAS) sum_{b' <= b} F_b' (F_b':
# the factor that carries block b' to the final units); the end's, one block's worth. Divided by
# 255 l, F_b' / l is 2^P_HEADROOM times the normalized weight of block b''s reference, so per element
# and V code step (v_scale): INT8_BIASED_OUTPUT_REL (nb + 1) sum_b' reference weight_b'.
INT8_BIASED_OUTPUT_REL = 2.0**-24 * (4 * LOGIT_BIAS + 2 * BIASED_EXACT) * 2.0**P_HEADROOM / P_CODE_TOP


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v in float32 (jax.nn.dot_product_attention, XLA), (B, S, H, D)."""
    f32 = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        return jax.nn.dot_product_attention(f32(q), f32(k), f32(v), implementation="xla")


def dequantize(qkv: QuantizedQKV, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 (B, seq, H, D) q', k', v' with q' . k' = logits * log2 e (the softmax scale and
    log2 e live in q_scale) and k' = k - mean(k) up to rounding."""
    f64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)
    q = f64(qkv.q_codes) * np.swapaxes(f64(qkv.q_scale), 1, 2)[..., None]
    block_kv = qkv.k_codes.shape[1] // qkv.k_scale.shape[-1]
    k = f64(qkv.k_codes) * np.swapaxes(f64(block_scales_per_key(qkv.k_scale, block_kv)), 1, 2)[..., None]
    if qkv.v_t_codes is not None:
        v_t = np.empty(qkv.v_t_codes.shape, np.float64)
        v_t[..., key_permutation(v_t.shape[-1])] = f64(qkv.v_t_codes)
        v = np.transpose(v_t * f64(qkv.v_scale)[..., None], (0, 3, 1, 2))
        if qkv.precision == "int8":
            v = v + f64(qkv.v_mean)[:, None]
    else:
        v = f64(qkv.v_bf16)
    return q[:, :seq], k[:, :seq], v[:, :seq]


def _weights(q2: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Softmax weights (B, H, S, S) from base-2 logits q2 . k."""
    s = np.einsum("bqhd,bkhd->bhqk", q2, k, optimize=True)
    w = np.exp2(s - s.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


def dequantized_attention(qkv: QuantizedQKV, seq: int) -> np.ndarray:
    """float64 attention on the dequantized operands: what the kernel computes but for P's fp8
    rounding. (B, seq, H, D)."""
    q2, k, v = dequantize(qkv, seq)
    return np.einsum("bhqk,bkhd->bqhd", _weights(q2, k), v, optimize=True)


def _int8_p_bounds(qkv: QuantizedQKV, seq: int, gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """`p_rounding_bounds` for "int8": weight j of a row is off by at most (1/2 + slack) code
    steps, a step being 2^P_HEADROOM / 255 of the reference weight of j's KV block (the row's
    largest weight in the block, or 2^-P_REFERENCE_FLOOR of its largest so far if that is larger);
    slack: the float32 logit x = (LOGIT_BIAS + q.k) s - (reference + LOGIT_BIAS s) is off by at
    most 4 roundings of LOGIT_BIAS s (2^-24 of it each), 255 ln 2 * that in codes, +
    INT8_P_GPU_CODES on the GPU. The error multiplies V less its mean (the mean is added exactly).
    The biased output's float32 roundings (INT8_BIASED_OUTPUT_REL) add to both, as a worst case."""
    q2, k, v = dequantize(qkv, seq)
    w = _weights(q2, k)
    s = w.shape[-1]
    block_kv = qkv.k_codes.shape[1] // qkv.k_scale.shape[-1]
    blocks = -(-s // block_kv)
    wb = np.pad(w, [(0, 0)] * 3 + [(0, blocks * block_kv - s)]).reshape(*w.shape[:3], blocks, block_kv)
    block_max = wb.max(-1)
    reference = np.maximum(block_max, np.maximum.accumulate(block_max, axis=-1) * 2.0**-P_REFERENCE_FLOOR)
    step = np.repeat(reference, block_kv, axis=-1)[..., :s] * 2.0**P_HEADROOM / P_CODE_TOP  # (B, H, S, S)
    s_scale = (np.asarray(qkv.q_scale, np.float64)[..., :seq, None]
               * np.asarray(block_scales_per_key(qkv.k_scale, block_kv), np.float64)[:, :, None, :s])
    half = 0.5 + P_CODE_TOP * math.log(2) * 4 * LOGIT_BIAS * 2.0**-24 * s_scale + (INT8_P_GPU_CODES if gpu else 0)
    vc = np.abs(v - np.asarray(qkv.v_mean, np.float64)[:, None])
    worst = np.einsum("bhqk,bkhd->bqhd", step * half, vc, optimize=True)
    rms = np.sqrt(np.einsum("bhqk,bkh->bqh", step**2, (vc**2).sum(-1), optimize=True)) / math.sqrt(12)
    biased = (INT8_BIASED_OUTPUT_REL * (blocks + 1) * np.transpose(reference.sum(-1), (0, 2, 1))[..., None]
              * np.asarray(qkv.v_scale, np.float64)[:, None])  # (B, S, H, D)
    return worst + biased, np.sqrt(rms**2 + (biased**2).sum(-1))


def p_rounding_bounds(qkv: QuantizedQKV, seq: int, gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """What P's rounding can do to the output of `dequantized_attention`.

    The kernel's output row is sum_j p_j (1 + eta_j) v_j / sum_j p_j. "sage8": p = 448 *
    exp2(logit - running max) in fp8, |eta_j| <= 2^-4 (normal p), or an absolute error of at most
    2^-10 (subnormal p; the sum is >= 448 since the largest p of a row is 448). "sage_qk8": p in
    bf16, |eta_j| <= 2^-8. With rel = 2^-4 or 2^-8, returns
      worst (B, seq, H, D): rel sum_j w_j |v_j| (+ 2^-10 / 448 sum_j |v_j| in fp8), per element;
      rms (B, seq, H): sqrt(sum_j w_j^2 |v_j|^2) rel / sqrt(3), per row: the RMS of the row's
        error if the eta_j are independent and uniform within +-rel (round to nearest of
        continuous values; the actual spread is at most that).
    `gpu`: "int8"'s codes on the GPU (INT8_P_GPU_CODES)."""
    if qkv.precision == "int8":
        return _int8_p_bounds(qkv, seq, gpu)
    q2, k, v = dequantize(qkv, seq)
    w = _weights(q2, k)
    av = np.abs(v)
    rel = FP8_REL if qkv.precision == "sage8" else BF16_REL
    worst = rel * np.einsum("bhqk,bkhd->bqhd", w, av, optimize=True)
    if qkv.precision == "sage8":
        worst += FP8_SUBNORMAL_HALF_STEP / FP8_MAX * av.sum(1)[:, None]
    rms = np.sqrt(np.einsum("bhqk,bkh->bqh", w**2, (v**2).sum(-1), optimize=True)) * rel / math.sqrt(3)
    return worst, rms


def bf16_p_bound(q: jax.Array, k: jax.Array, v: jax.Array) -> np.ndarray:
    """Worst-case error of the bf16 kernel against float32 attention on the same bf16 inputs,
    per element: P rounded to bf16 (2^-8 of itself) -> 2^-8 sum_j w_j |v_j|. (The output's own
    bf16 rounding is the caller's, 2^-8 of the value.)"""
    f64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)
    q64, k64, v64 = f64(q), f64(k), f64(v)
    w = _weights(q64 * (LOG2E / math.sqrt(q.shape[-1])), k64)
    return BF16_REL * np.einsum("bhqk,bkhd->bqhd", w, np.abs(v64), optimize=True)


def flux_like_qkv(key: jax.Array, shape: tuple[int, int, int, int], dtype=jnp.bfloat16,
                  outlier_channels: tuple[int, ...] = (1, 5, 9, 14)) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, S, H, D) q, k, v with the structure that breaks naive 8-bit attention: a few channels
    (among FLUX's first 16, which RoPE leaves unrotated: their position index is 0) with 5x the
    norm in q and k, and in k a large mean shared by all tokens (+20 there; what K smoothing
    removes). Logits come out at a few units, as after FLUX's QK RMSNorm."""
    kq, kk, kv = jax.random.split(key, 3)
    d = shape[-1]
    boost = np.ones(d, np.float32)
    boost[list(outlier_channels)] = 5.0
    bias = np.zeros(d, np.float32)
    bias[list(outlier_channels)] = 20.0
    q = jax.random.normal(kq, shape, jnp.float32) * boost
    k = jax.random.normal(kk, shape, jnp.float32) * boost * 0.4 + bias
    v = jax.random.normal(kv, shape, jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def random_qkv(key: jax.Array, shape: tuple[int, int, int, int], dtype=jnp.bfloat16
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Independent standard normal q, k, v."""
    return tuple(jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in jax.random.split(key, 3))


def rel_l2(x, ref) -> float:
    x64, r64 = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x64 - r64) / np.linalg.norm(r64))
