"""One entry point per op; each picks the XLA reference or a Pallas kernel.

Attention (`attention`) has its own names (ATTENTION_IMPLEMENTATIONS): the exact
`jax.nn.dot_product_attention` backends "cudnn" and "xla", and the Pallas flash-attention
kernels "mosaic_bf16", "sage8" (int8 QK^T, fp8 PV), "sage8_fp8" (fp8 QK^T and PV),
"sage_qk8" (int8 QK^T, bf16 PV) and "int8" (q and k rotated, int8 QK^T and PV).

W4A4 ops:

implementation:
  "xla"    the reference in plain XLA ops (runs anywhere; the tests' ground truth).
  "pallas" the Pallas Mosaic GPU kernels (Hopper, sm_90). Raises if they cannot run here.
  "auto"   "pallas" on an sm_90 GPU, else "xla". On another GPU it warns once that the kernels
           do not cover it, so a user never loses speed without being told.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from convrot_jax.hadamard import HadamardKind, hadamard_matrix, rotate
from convrot_jax.linear import (
    check_gated_residual_input,
    check_linear_input,
    int4_weight_only_linear,
    w4a4_linear_reference,
)
from convrot_jax.lora import LowRankFactors
from convrot_jax.prologue import GeluTanh, Prologue, apply_prologue, check_prologue, kernel_arguments, produced_shape
from convrot_jax.quant import QuantizedWeight, quantize_activation_reference
from pallas_kernels.attention import attention as _attention_kernel
from pallas_kernels.attention_producer import Projection, Stream  # noqa: F401  (re-exported for the model)
from pallas_kernels.attention_producer import project_fits as _project_fits
from pallas_kernels.attention_producer import project_qkv as _project_qkv
from pallas_kernels.attention_producer import stageable as _stageable
from pallas_kernels.lora_down import lora_down
from pallas_kernels.lora_down import supports as lora_down_supports
from pallas_kernels.rotate_quantize import rotate_quantize
from pallas_kernels.w4a16_matmul import w4a16_matmul
from pallas_kernels.w4a16_matmul_config import config_for as w4a16_config_for
from pallas_kernels.w4a4_matmul import w4a4_matmul
from pallas_kernels.w4a4_matmul_reference import gated_residual_reference

Implementation = Literal["auto", "xla", "pallas"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "xla", "pallas")
EXACT_ATTENTION: tuple[str, ...] = ("cudnn", "xla")
# kernel name -> (pallas_kernels.attention precision, QK^T dtype, q and k rotated first)
_ATTENTION_KERNELS = {"mosaic_bf16": ("bf16", jnp.int8, False), "sage8": ("sage8", jnp.int8, False),
                      "sage8_fp8": ("sage8", jnp.float8_e4m3fn, False), "sage_qk8": ("sage_qk8", jnp.int8, False),
                      "int8": ("int8", jnp.int8, True)}
QK_ROTATION_GROUP = 64  # ConvRot's regular Hadamard, along the head dim (q k^T unchanged)
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
    prologue: Prologue | None = None,
    residual: jnp.ndarray | None = None,
    gate: jnp.ndarray | None = None,
    implementation: Implementation = "auto",
    lora: LowRankFactors | None = None,
) -> jnp.ndarray:
    """x (..., K) @ W.T + b through ConvRot W4A4: rotate -> int4 -> integer GEMM with int32
    accumulation -> dequantize (+ bias). Output in x.dtype.

    prologue (`convrot_jax.prologue`): the layer's input is prologue(x), made where it is
    quantized: inside the rotate-quantize kernel ("pallas"), or in float32 XLA ops before the
    reference ("xla"); either way it is never rounded to x.dtype.

    With `residual` and `gate`, the gated residual `residual + gate[:, None] * (x @ W.T + b)` of
    FLUX's output projections and MLPs, in float32 with one rounding, applied in the GEMM's
    epilogue (no elementwise pass after it): x (B, ..., K), gate (B, out_features) one row per
    image, residual x's shape with out_features last and x's dtype.

    `lora`: a low-rank branch (`convrot_jax.lora`) whose float term ((u A^T) * s) B^T of the
    layer's input u (prologue(x) with a prologue) is added to the layer's output before the gate.
    "pallas" fuses it: h = (u A^T) * s (M, r), rounded once to bf16, from the layer's input
    (`_lora_down_projection`: the `lora_down` kernel, which reads x and applies a GELU prologue
    where it reads it, so u is never written; XLA's GEMM on u for a LayerNorm prologue or with
    `lora.down_kernel` False), then h B^T accumulated in float32 onto the dequantized sum in the
    W4A4 GEMM's epilogue, before the gate and the one rounding.
    "xla", a branch with `fused` False or factors not in bf16 (the epilogue's wgmma operands):
    unfused, the reference: the layer without the gated
    residual in x.dtype, plus the term (`LowRankFactors.add_to`, two XLA GEMMs), then the gated
    residual in float32 with one rounding."""
    if prologue is not None:
        check_prologue(x, prologue, qw.group_size)
    layer_input = x if prologue is None else jax.ShapeDtypeStruct(produced_shape(x, prologue), x.dtype)
    check_linear_input(layer_input, qw, bias)
    check_gated_residual_input(layer_input, qw, residual, gate)
    if lora is not None and lora.down.shape[0] == 0:
        lora = None  # a rank-0 branch adds nothing: the base layer exactly
    impl = resolve_implementation(implementation)
    if impl == "pallas" and qw.hadamard != "regular":
        if implementation == "pallas":
            raise ValueError("the Pallas kernels implement the regular Hadamard only")
        impl = "xla"  # "auto" with a Sylvester weight: a comparison setting, reference path.
    if lora is not None and (impl == "xla" or not lora.fused or lora.up.dtype != jnp.bfloat16):
        return _unfused_lora(x, qw, bias, prologue, residual, gate, impl, lora)
    if impl == "xla":
        if prologue is None:
            return w4a4_linear_reference(x, qw, bias, residual=residual, gate=gate)
        produced = apply_prologue(x, prologue)  # float32, never rounded to x.dtype
        return w4a4_linear_reference(produced, qw, bias, residual=None if residual is None else
                                     residual.astype(produced.dtype), gate=gate).astype(x.dtype)

    x2, lead = _flatten(x)
    codes, scales = rotate_quantize(x2, group_size=qw.group_size,
                                    **(kernel_arguments(prologue) if prologue is not None else {}))
    h = None if lora is None else _lora_down_projection(x, prologue, lora)
    y = w4a4_matmul(codes, scales, qw.packed, qw.scales, bias, gate=gate,
                    residual=None if residual is None else residual.reshape(-1, qw.out_features),
                    lora_h=h, lora_up=None if lora is None else lora.up,
                    lora_blocks=None if lora is None else lora.blocks,
                    scale_group=qw.scale_group, out_dtype=x.dtype)
    return y.reshape(*lead, qw.out_features)


def _lora_down_projection(x: jnp.ndarray, prologue: Prologue | None, lora: LowRankFactors) -> jnp.ndarray:
    """h (M, r) = (u A^T) * s of the layer's input u = prologue(x), rounded once to bf16: in the
    `lora_down` kernel (x and a GELU's tail read where they lie, the GELU applied in registers)
    where it takes the call and `lora.down_kernel` allows; else XLA's GEMM on u
    (`LowRankFactors.down_projection`, u made by `apply_prologue`), the reference."""
    rank, k = lora.down.shape
    gelu = prologue if isinstance(prologue, GeluTanh) else None
    tail = None if gelu is None or gelu.tail is None else gelu.tail.reshape(-1, gelu.tail.shape[-1])
    columns = (k, x.shape[-1]) + ((gelu.start, gelu.tail_from) if gelu else ())
    bf16 = x.dtype == lora.down.dtype == jnp.bfloat16 and (tail is None or tail.dtype == jnp.bfloat16)
    if lora.down_kernel and (prologue is None or gelu is not None) and bf16 and lora_down_supports(rank, *columns):
        return lora_down(x.reshape(-1, x.shape[-1]), lora.down, lora.scale, tail=tail,
                         gelu_from=None if gelu is None else gelu.start, tail_from=0 if gelu is None else gelu.tail_from)
    produced = x if prologue is None else apply_prologue(x, prologue)
    return lora.down_projection(produced).reshape(-1, rank)


def _unfused_lora(x: jnp.ndarray, qw: QuantizedWeight, bias: jnp.ndarray | None, prologue: Prologue | None,
                  residual: jnp.ndarray | None, gate: jnp.ndarray | None, impl: str,
                  lora: LowRankFactors) -> jnp.ndarray:
    """`w4a4_linear` with an unfused branch: the layer (implementation `impl`, no gated residual)
    in x.dtype, plus the term of its input, then the gated residual in float32, one rounding."""
    produced = x if prologue is None else apply_prologue(x, prologue)
    y = lora.add_to(w4a4_linear(x, qw, bias, prologue=prologue, implementation=impl), produced)
    if gate is None:
        return y
    n = qw.out_features
    return gated_residual_reference(y.reshape(-1, n).astype(jnp.float32), gate,
                                    residual.reshape(-1, n)).astype(x.dtype).reshape(y.shape)


# The most rows "auto" gives the W4A16 kernel: measured on the H200 the layer through it is 10x
# the XLA reference at 4 rows and 6.5x at 64 (28 us against the reference's ~180 us weight
# dequantization), and the kernel is still ahead at 112 (40 us), but its time grows with the rows
# much faster than the work does (benchmarks/results/w4a16_matmul.md).
W4A16_KERNEL_MAX_TOKENS = 128


def _w4a16_kernel_refusal(x: jnp.ndarray, qw: QuantizedWeight) -> str | None:
    """Why the W4A16 kernel cannot run this layer (None: it can)."""
    if x.dtype != jnp.bfloat16:
        return f"the W4A16 kernel takes bfloat16 activations, got {x.dtype}"
    if qw.scale_group is not None and qw.scale_group % 64:
        return f"the W4A16 kernel needs scale_group a multiple of 64, got {qw.scale_group}"
    m = math.prod(x.shape[:-1])
    cfg = w4a16_config_for(m, qw.out_features, qw.in_features, qw.scale_group)
    if qw.out_features % (2 * cfg.tile_n) or qw.in_features % cfg.tile_k:
        return (f"the W4A16 kernel needs out_features a multiple of {2 * cfg.tile_n} and in_features of "
                f"{cfg.tile_k}, got weight {qw.shape}")
    return None


def w4a16_linear(
    x: jnp.ndarray,
    qw: QuantizedWeight,
    bias: jnp.ndarray | None = None,
    *,
    implementation: Implementation = "auto",
) -> jnp.ndarray:
    """W4A16: x (..., K) @ W.T + b with int4 weights and x kept in its dtype: rotate x (XLA),
    then the weight-only GEMM. Output in x.dtype. "pallas" reads the packed weight in the kernel
    (`pallas_kernels.w4a16_matmul`, bfloat16 x); "auto" takes it where it runs for up to
    `W4A16_KERNEL_MAX_TOKENS` rows (FLUX's modulation: batch, or steps x batch) and the XLA
    reference (`convrot_jax.linear.int4_weight_only_linear`) elsewhere and for more rows (a T5
    prompt's 512 tokens), where the kernel, built for a few rows, falls behind dequantizing the
    weight once per call (benchmarks/results/w4a16_matmul.md)."""
    check_linear_input(x, qw, bias)
    impl = resolve_implementation(implementation)
    refusal = _w4a16_kernel_refusal(x, qw) if impl == "pallas" else None
    if refusal is not None and implementation == "pallas":
        raise ValueError(f"implementation='pallas': {refusal}")
    if implementation == "auto" and math.prod(x.shape[:-1]) > W4A16_KERNEL_MAX_TOKENS:
        refusal = "many tokens: the XLA path is faster there"
    if impl == "xla" or refusal is not None:
        return int4_weight_only_linear(x, qw, bias)

    x2, lead = _flatten(x)
    # A few rows: the rotation as one matmul (the butterfly fused with the kernel's K permutation
    # into one slow loop: `rotate`'s docstring).
    x_rot = rotate(x2, group_size=qw.group_size, hadamard=qw.hadamard, method="matmul").astype(x.dtype)
    y = w4a16_matmul(x_rot, qw.packed, qw.scales, bias, scale_group=qw.scale_group, out_dtype=x.dtype)
    return y.reshape(*lead, qw.out_features)


def check_attention_implementation(implementation: str) -> None:
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")


def qk_rotation_matrix() -> jax.Array:
    """The (QK_ROTATION_GROUP, QK_ROTATION_GROUP) regular Hadamard the "int8" attention's producer
    multiplies q and k by (`attention_producer.project_qkv`'s qk_rotation), in bf16: exact, its
    entries are +-1/8."""
    return hadamard_matrix(QK_ROTATION_GROUP, dtype=jnp.bfloat16)


def _rotates_qk(implementation: str) -> bool:
    """Whether the kernel takes q and k rotated by ConvRot's grouped Hadamard (QK_ROTATION_GROUP)."""
    return implementation in _ATTENTION_KERNELS and _ATTENTION_KERNELS[implementation][2]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v over (B, S, H, D) q, k, v, non-causal; output in q's dtype.

    "cudnn" / "xla": `jax.nn.dot_product_attention` (exact: float32 softmax). The kernels
    (`pallas_kernels.attention`, Hopper only): "mosaic_bf16" (bf16 tensor cores), "sage8" (K's mean
    removed, int8 codes per query token and per block of 256 keys, fp8 P and V, float32
    accumulation), "sage8_fp8" (fp8 Q/K codes instead), "sage_qk8" (int8 Q/K codes, bf16 P and V),
    "int8" (q and k rotated along the head dim by ConvRot's grouped regular Hadamard, an orthogonal
    map that leaves q k^T as it is and spreads large-norm channels before the int8 codes; P as
    int8 codes against each row's max in its block of keys, V less its mean in int8).
    Their Q/K/V quantization is XLA ops in the caller's jit (`pallas_kernels.attention.quantize_qkv`)."""
    check_attention_implementation(implementation)
    if implementation in EXACT_ATTENTION:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    _require_hopper(implementation)
    if _rotates_qk(implementation):  # rounded to q's dtype (as benchmarks/bench_attention measures the
        # accuracy): the quantizer reads q and k twice each, half the bytes of float32 copies
        q, k = (rotate(x, group_size=QK_ROTATION_GROUP, method="matmul").astype(x.dtype) for x in (q, k))
    return _kernel_attention(q, k, v, implementation)


def _kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str) -> jax.Array:
    """A Pallas kernel's attention on q, k, v as it takes them (rotated where it rotates)."""
    precision, qk_dtype, _ = _ATTENTION_KERNELS[implementation]
    return _attention_kernel(q, k, v, precision=precision, qk_dtype=qk_dtype, out_dtype=v.dtype)


def _require_hopper(implementation: str) -> None:
    if not pallas_supported():
        raise RuntimeError(
            f"attention implementation {implementation!r} is a Pallas kernel for NVIDIA Hopper (sm_90) GPUs; this "
            f"device is {jax.devices()[0].device_kind!r}. Use 'cudnn' or 'xla'."
        )


def fuses_attention_producer(implementation: str, streams: Sequence[Stream], *, qk_producer: bool = False) -> bool:
    """Whether `attention_from_projections` runs `implementation` on these streams: with
    `qk_producer` on a Hopper GPU where the producer kernel takes the streams
    (`attention_producer.project_fits`), the exact ones ("cudnn", "xla") and "int8", whose q and
    k the producer also rotates, which it does on tiles staged in shared memory
    (`attention_producer.stageable`: FLUX's streams whenever the image tokens are a multiple of 8;
    elsewhere it warns once, naming the streams, since XLA's norm, RoPE and rotation are slower).
    Elsewhere the caller's XLA ops run (the option changes rounding only). The other 8-bit
    kernels take XLA's norm and RoPE: from the bf16 producer sage8 was no faster
    (benchmarks/notes/attention.md, v9), and a producer that wrote their codes was slower (v8)."""
    lengths = [s.q.array.shape[1] for s in streams]
    if not (qk_producer and pallas_supported() and _project_fits(lengths)):
        return False
    if implementation in EXACT_ATTENTION:
        return True
    if not _rotates_qk(implementation):
        return False
    if not _stageable(streams):
        _warn_once(f"attention implementation {implementation!r}: the producer cannot stage streams of {lengths} "
                   "tokens in shared memory (every stream a multiple of 8 tokens, its columns multiples of 64: "
                   "pallas_kernels.attention_producer.stageable), so q and k are normed and rotated by XLA ops "
                   "and cuBLAS instead: slower (a W4A4 FLUX step at 1024² by 5%, benchmarks/notes/attention.md v20)")
        return False
    return True


def attention_from_projections(streams: Sequence[Stream], cos: jax.Array, sin: jax.Array, *, heads: int, eps: float,
                               implementation: str) -> jax.Array:
    """`attention` over the joint sequence [stream 0, stream 1, ...] made from the streams' bf16
    q/k/v projections (`pallas_kernels.attention_producer.Stream`): one producer launch RMSNorms q
    and k per head (eps, each stream's weights), rotates them by RoPE (cos, sin (S, D)), for "int8"
    also by its grouped Hadamard, and writes bf16 q, k, v in the joint layout
    (`pallas_kernels.attention_producer.project_qkv`: no XLA norm, RoPE, rotation or
    concatenation), then the attention: softmax(q k^T / sqrt(D)) v, (B, S, H, D) in the
    projections' dtype. `fuses_attention_producer` says which implementations and streams."""
    if not fuses_attention_producer(implementation, streams, qk_producer=True):
        raise ValueError(f"attention implementation {implementation!r} on streams of "
                         f"{[s.q.array.shape[1] for s in streams]} tokens has no fused producer on this device "
                         f"({jax.devices()[0].device_kind!r}; fuses_attention_producer)")
    if implementation in EXACT_ATTENTION:
        return attention(*_project_qkv(streams, cos, sin, heads=heads, eps=eps), implementation=implementation)
    q, k, v = _project_qkv(streams, cos, sin, heads=heads, eps=eps, qk_rotation=qk_rotation_matrix())
    return _kernel_attention(q, k, v, implementation)
