"""One entry point per op; each picks the XLA reference or a Pallas kernel.

Attention (`attention`) has its own names (ATTENTION_IMPLEMENTATIONS): the exact
`jax.nn.dot_product_attention` backends "cudnn" and "xla", and the Pallas flash-attention
kernels "mosaic_bf16", "sage8" (int8 QK^T, fp8 PV), "sage8_fp8" (fp8 QK^T and PV) and
"sage_qk8" (int8 QK^T, bf16 PV).

W4A4 ops:

implementation:
  "xla"    the reference in plain XLA ops (runs anywhere; the tests' ground truth).
  "pallas" the Pallas Mosaic GPU kernels (Hopper, sm_90). Raises if they cannot run here.
  "auto"   "pallas" on an sm_90 GPU, else "xla". On another GPU it warns once that the kernels
           do not cover it, so a user never loses speed without being told.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import jax
import jax.numpy as jnp

from convrot_jax.hadamard import HadamardKind
from convrot_jax.linear import check_linear_input, w4a4_linear_reference
from convrot_jax.quant import QuantizedWeight, quantize_activation_reference
from pallas_kernels.attention import attention as _attention_kernel
from pallas_kernels.rotate_quantize import rotate_quantize
from pallas_kernels.w4a4_matmul import w4a4_matmul

Implementation = Literal["auto", "xla", "pallas"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "xla", "pallas")
EXACT_ATTENTION: tuple[str, ...] = ("cudnn", "xla")
# kernel name -> (pallas_kernels.attention precision, QK^T dtype)
_ATTENTION_KERNELS = {"mosaic_bf16": ("bf16", jnp.int8), "sage8": ("sage8", jnp.int8),
                      "sage8_fp8": ("sage8", jnp.float8_e4m3fn), "sage_qk8": ("sage_qk8", jnp.int8)}
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = (*EXACT_ATTENTION, *_ATTENTION_KERNELS)


@functools.cache
def _gpu_compute_capability() -> str | None:
    """'9.0' style string of the default device, or None when it is not a CUDA GPU."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return None
    return getattr(device, "compute_capability", None)


def pallas_supported() -> bool:
    """True where the Pallas kernels run: an NVIDIA Hopper (sm_90) GPU."""
    return _gpu_compute_capability() == "9.0"


def resolve_implementation(implementation: str) -> str:
    """Maps "auto" to the concrete backend for this machine; validates the name."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        if pallas_supported():
            return "pallas"
        cc = _gpu_compute_capability()
        if cc is not None:
            _warn_once(f"convrot_jax: no Pallas kernels for compute capability {cc}; using the XLA reference")
        return "xla"
    if implementation == "pallas" and not pallas_supported():
        raise RuntimeError(
            "implementation='pallas' needs an NVIDIA Hopper (sm_90) GPU; this device is "
            f"{jax.devices()[0].device_kind!r}. Use implementation='xla' or 'auto'."
        )
    return implementation


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _flatten(x: jnp.ndarray) -> tuple[jnp.ndarray, tuple[int, ...]]:
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def quantize_activation(
    x: jnp.ndarray,
    *,
    group_size: int = 256,
    hadamard: HadamardKind = "regular",
    implementation: Implementation = "auto",
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """x (..., K) -> (int8 codes (..., K) in [-7, 7], float32 per-token scales (...,)).

    Grouped Hadamard rotation, then symmetric int4 per token (recipe in `pallas_kernels.rounding`).
    """
    impl = resolve_implementation(implementation)
    if impl == "xla" or hadamard != "regular":
        if impl == "pallas" and hadamard != "regular":
            raise ValueError("the Pallas rotate-quantize kernel implements the regular Hadamard only")
        return quantize_activation_reference(x, group_size=group_size, hadamard=hadamard)

    x2, lead = _flatten(x)
    codes, scales = rotate_quantize(x2, group_size=group_size)
    return codes.reshape(*lead, x.shape[-1]), scales.reshape(lead)


def w4a4_linear(
    x: jnp.ndarray,
    qw: QuantizedWeight,
    bias: jnp.ndarray | None = None,
    *,
    implementation: Implementation = "auto",
) -> jnp.ndarray:
    """x (..., K) @ W.T + b through ConvRot W4A4: rotate -> int4 -> integer GEMM with int32
    accumulation -> dequantize (+ bias). Output in x.dtype."""
    check_linear_input(x, qw, bias)
    impl = resolve_implementation(implementation)
    if impl == "pallas" and qw.hadamard != "regular":
        if implementation == "pallas":
            raise ValueError("the Pallas kernels implement the regular Hadamard only")
        impl = "xla"  # "auto" with a Sylvester weight: a comparison setting, reference path.
    if impl == "xla":
        return w4a4_linear_reference(x, qw, bias)

    x2, lead = _flatten(x)
    codes, scales = rotate_quantize(x2, group_size=qw.group_size)
    y = w4a4_matmul(codes, scales, qw.packed, qw.scales, bias, scale_group=qw.scale_group, out_dtype=x.dtype)
    return y.reshape(*lead, qw.out_features)


def check_attention_implementation(implementation: str) -> None:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v over (B, S, H, D) q, k, v, non-causal; output in q's dtype.

    "cudnn" / "xla": `jax.nn.dot_product_attention` (exact: float32 softmax). The kernels
    (`pallas_kernels.attention`, Hopper only): "mosaic_bf16" (bf16 tensor cores), "sage8" (K's mean
    removed, int8 codes per query token and per block of 128 keys, fp8 P and V, float32
    accumulation), "sage8_fp8" (fp8 Q/K codes instead), "sage_qk8" (int8 Q/K codes, bf16 P and V).
    Their Q/K/V quantization is XLA ops in the caller's jit (`pallas_kernels.attention.quantize_qkv`)."""
    check_attention_implementation(implementation)
    if implementation in EXACT_ATTENTION:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    if not pallas_supported():
        raise RuntimeError(
            f"attention implementation {implementation!r} is a Pallas kernel for NVIDIA Hopper (sm_90) GPUs; this "
            f"device is {jax.devices()[0].device_kind!r}. Use 'cudnn' or 'xla'."
        )
    precision, qk_dtype = _ATTENTION_KERNELS[implementation]
    return _attention_kernel(q, k, v, precision=precision, qk_dtype=qk_dtype)
