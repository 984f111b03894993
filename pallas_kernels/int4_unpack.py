"""Packed int4 weight tiles -> codes in registers, for the GEMM kernels that read int4 weights
(W4A4: int8 codes; W4A16: bf16 codes). Shared-memory tiles of packed bytes (low nibble = even k,
docs/design.md §4) are loaded with a register layout whose bytes, reinterpreted as int4, are
already the codes the target layout wants, so the unpack is a bitcast plus Mosaic's int4
conversion (prmt/lop3), never a trip through memory.

Targets (`unpack_tile`):
  "int8_upcast4x"  int8 (R, C) in WGMMA_UPCAST_4X (8 codes a thread), for an 8-byte-a-thread
                   shared-memory store (W4A4's smem form).
  "int8_wgmma"     int8 (R, C) in WGMMA_8BIT, wgmma's A operand (W4A4's registers form).
  "bf16_wgmma_k32" bf16 (R, C) in WGMMA, wgmma's A operand with its K axis permuted within every
                   32 columns by `permute_k32` (W4A16): a thread's 8 consecutive codes go, converted,
                   into its four WGMMA register slots as they are, without the two warp shuffles
                   of a relayout; the B operand (the activations) is permuted alike, which leaves
                   the contraction unchanged.
Interpret mode cannot run `inline_mgpu`: there the same values come from jnp ops
(`unpack_tile(..., interpret=True)`), so only the GPU tests check the register routines.
"""

from __future__ import annotations

import jax
import jax.experimental.mosaic.gpu as mgpu
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils


def check_packed_operands(x_name: str, x, x_dtype: jnp.dtype, w_packed) -> tuple[int, int, int]:
    """An int4 GEMM's activations x (M, K) of `x_dtype` against the packed weight w_packed uint8
    (N, K/2); returns (M, K, N). Raises ValueError naming the operands (x as `x_name`) and shapes."""
    if x.ndim != 2 or w_packed.ndim != 2 or x.shape[1] != 2 * w_packed.shape[1]:
        raise ValueError(f"{x_name} (M, K) {x.shape} and w_packed (N, K/2) {w_packed.shape} do not match")
    if x.dtype != x_dtype or w_packed.dtype != jnp.uint8:
        raise ValueError(f"need {jnp.dtype(x_dtype)} {x_name} and uint8 w_packed, got {x.dtype} and {w_packed.dtype}")
    return *x.shape, w_packed.shape[0]


def check_weight_operands(k: int, n: int, w_scales, scale_group: int | None, bias) -> None:
    """The packed int4 weight's scales and the bias for a GEMM of reduction K and N outputs:
    (N,) scales per channel, or (N, K / scale_group) with scale_group a multiple of 64 (the
    kernels' tile_k); bias (N,). Raises ValueError naming the operand at fault."""
    if scale_group is None:
        if w_scales.shape != (n,):
            raise ValueError(f"w_scales {w_scales.shape} must be (N,) = ({n},) without scale_group")
    else:
        if k % scale_group or w_scales.shape != (n, k // scale_group):
            raise ValueError(f"w_scales {w_scales.shape} must be (N, K / scale_group) = ({n}, {k}/{scale_group})")
        if scale_group % 64:
            raise ValueError(f"the int4 GEMM kernels need scale_group a multiple of 64, got {scale_group}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias {bias.shape} must be (N,) = ({n},)")


TARGETS: tuple[str, ...] = ("int8_upcast4x", "int8_wgmma", "bf16_wgmma_k32")


def permute_k32(a: jax.Array, *, gather: bool = True) -> jax.Array:
    """The K order of the "bf16_wgmma_k32" target along the last axis (a multiple of 32): within
    each 32 columns, column 8j + 2q + e takes column 8q + 2j + e (j, q < 4, e < 2). An involution.

    gather: as a gather of static columns, which XLA emits as one loop that fuses with a pad (the
    reshape-and-swap form became a transpose kernel of its own); False inside a kernel, which
    cannot close over the column table."""
    *lead, k = a.shape
    if gather:
        return jnp.take(a, permute_k32(np.arange(k), gather=False), axis=-1)
    return a.reshape(*lead, k // 32, 4, 4, 2).swapaxes(-3, -2).reshape(*lead, k)


def _as_int4(src: mgpu.FragmentedArray, layout, nibbles: int) -> mgpu.FragmentedArray:
    """The packed bytes' registers reinterpreted as signed int4 codes (LLVM orders vector<N x i4>
    from the low nibble up: our even-k-low format) in `layout`, (R, 2 C)."""
    i4_vec = ir.VectorType.get((nibbles,), ir.IntegerType.get_signless(4))
    regs = np.empty_like(src.registers)
    for idx, reg in np.ndenumerate(src.registers):
        regs[idx] = mgpu_utils.bitcast(reg, i4_vec)
    rows, half = src.shape
    codes = mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=True)
    if codes.shape != (rows, 2 * half):
        raise AssertionError(f"register layouts do not line up: {codes.shape} vs {(rows, 2 * half)}")
    return codes


def _upcast4x_as_wgmma_k32(codes: mgpu.FragmentedArray) -> mgpu.FragmentedArray:
    """bf16 (R, C) in WGMMA_UPCAST_4X -> the same registers read as WGMMA: a thread's vector of 8
    (columns 32 c + 8 q + 0..7) is cut into 4 pairs, pair j filling WGMMA column tile 4 c + j, whose
    slot means columns 32 c + 8 j + 2 q + (0, 1): the `permute_k32` order."""
    shape = codes.shape
    out = np.empty(mgpu_fa.WGMMA_LAYOUT.registers_shape(shape), dtype=object)
    for idx, reg in np.ndenumerate(codes.registers):
        for j in range(4):
            out[(idx[0], 4 * idx[1] + j, *idx[2:])] = mgpu_utils.vector_slice(reg, slice(2 * j, 2 * j + 2))
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu_fa.WGMMA_LAYOUT, _is_signed=None)


def _unpack_gpu(packed, target: str) -> jax.Array:
    rows, half = packed.shape
    if target == "int8_wgmma":  # 2 bytes a thread (WGMMA) -> 4 codes (WGMMA_8BIT)
        src_layout, dst_layout, nibbles = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA_8BIT, 4
        codes_layout, dtype = mgpu.WGMMA_LAYOUT_8BIT, jnp.int8
    elif target == "int8_upcast4x":  # 4 bytes a thread (WGMMA_8BIT, ldmatrix) -> 8 codes
        src_layout, dst_layout, nibbles = plgpu.Layout.WGMMA_8BIT, plgpu.Layout.WGMMA_UPCAST_4X, 8
        codes_layout, dtype = mgpu.WGMMA_LAYOUT_UPCAST_4X, jnp.int8
    else:  # 4 bytes a thread -> 8 codes -> bf16, read as WGMMA in the permuted K order
        src_layout, dst_layout, nibbles = plgpu.Layout.WGMMA_8BIT, plgpu.Layout.WGMMA, 8
        codes_layout, dtype = mgpu.WGMMA_LAYOUT_UPCAST_4X, jnp.bfloat16

    @plgpu.inline_mgpu(
        arg_types=(src_layout,),
        return_type=plgpu.ShapeDtypeStruct((rows, 2 * half), dtype, layout=dst_layout),
    )
    def unpack(_, src):
        codes = _as_int4(src, codes_layout, nibbles)
        if dtype == jnp.int8:
            return codes.astype(ir.IntegerType.get_signless(8), is_signed=True)
        return _upcast4x_as_wgmma_k32(codes.astype(ir.BF16Type.get()))

    return unpack(plgpu.load(packed, layout=src_layout))


def _unpack_interpret(packed, target: str) -> jax.Array:
    p = packed[...].astype(jnp.int8)
    low = lax.shift_right_arithmetic(lax.shift_left(p, jnp.int8(4)), jnp.int8(4))
    high = lax.shift_right_arithmetic(p, jnp.int8(4))
    codes = jnp.stack([low, high], axis=-1).reshape(p.shape[0], 2 * p.shape[1])
    if target == "bf16_wgmma_k32":
        return permute_k32(codes, gather=False).astype(jnp.bfloat16)
    return codes


def unpack_tile(packed, target: str, *, interpret: bool = False) -> jax.Array:
    """uint8 (R, C/2) packed codes (a shared-memory ref, R a multiple of 64, C of 32) -> the codes
    (R, C) in `target`'s dtype, register layout and K order (module docstring)."""
    if target not in TARGETS:
        raise ValueError(f"unpack target must be one of {TARGETS}, got {target!r}")
    return _unpack_interpret(packed, target) if interpret else _unpack_gpu(packed, target)
