"""One entry point per op; each picks the XLA reference or a Pallas kernel.

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
from convrot_jax.linear import check_gated_residual_input, check_linear_input, w4a4_linear_reference
from convrot_jax.quant import QuantizedWeight, quantize_activation_reference
from pallas_kernels.rotate_quantize import rotate_quantize
from pallas_kernels.w4a4_matmul import w4a4_matmul

Implementation = Literal["auto", "xla", "pallas"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "xla", "pallas")


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
    residual: jnp.ndarray | None = None,
    gate: jnp.ndarray | None = None,
    implementation: Implementation = "auto",
) -> jnp.ndarray:
    """x (..., K) @ W.T + b through ConvRot W4A4: rotate -> int4 -> integer GEMM with int32
    accumulation -> dequantize (+ bias). Output in x.dtype.

    With `residual` and `gate`, the gated residual `residual + gate[:, None] * (x @ W.T + b)` of
    FLUX's output projections and MLPs, in float32 with one rounding, applied in the GEMM's
    epilogue (no elementwise pass after it): x (B, ..., K), gate (B, out_features) one row per
    image, residual x's shape with out_features last and x's dtype."""
    check_linear_input(x, qw, bias)
    check_gated_residual_input(x, qw, residual, gate)
    impl = resolve_implementation(implementation)
    if impl == "pallas" and qw.hadamard != "regular":
        if implementation == "pallas":
            raise ValueError("the Pallas kernels implement the regular Hadamard only")
        impl = "xla"  # "auto" with a Sylvester weight: a comparison setting, reference path.
    if impl == "xla":
        return w4a4_linear_reference(x, qw, bias, residual=residual, gate=gate)

    x2, lead = _flatten(x)
    codes, scales = rotate_quantize(x2, group_size=qw.group_size)
    y = w4a4_matmul(codes, scales, qw.packed, qw.scales, bias, gate=gate,
                    residual=None if residual is None else residual.reshape(-1, qw.out_features),
                    scale_group=qw.scale_group, out_dtype=x.dtype)
    return y.reshape(*lead, qw.out_features)
