"""Flash attention on Hopper (sm_90) in Pallas Mosaic GPU: bf16, and 8-bit QK^T and PV.

Non-causal, forward only, (B, S, H, D) in and out (jax.nn.dot_product_attention's layout), any
sequence length (padded to whole blocks, padded keys masked in the last KV step). The structure
is jax's `pallas/ops/gpu/attention_mgpu.py` (FlashAttention-3): a CTA holds two query blocks of
`block_q` rows, one per compute warpgroup; a memory warpgroup streams K and V blocks through a
`max_concurrent_steps`-deep ring of shared-memory stages with TMA; the two compute warpgroups
ping-pong so that one's softmax overlaps the other's wgmma (on the GPU two pairs of named
barriers, `_named_barrier`: each warpgroup's softmax turn and PV turn); online softmax in base 2 in
float32. `AttentionConfig(overlap=True)` adds FlashAttention-3's intra-warpgroup overlap: a
warpgroup issues the next block's S = Q K^T with this block's PV and runs the next softmax while
PV's wgmma does (the two warpgroups then take turns issuing); K is released a step before V, and
PV accumulates in place (fp8 too, in the wgmma's own accumulation precision).

Four precisions of the same kernel:
  * "bf16": S = Q K^T and O += P V on bf16 tensor cores, float32 accumulation (the baseline).
  * "sage8" (SageAttention-style, `quantize_qkv` makes the operands): Q and K as int8 (or fp8 e4m3)
    codes, one float32 scale per query token and per block of block_kv keys (a KV step's scale
    multiplies the row scales: no per-element cost), K with its per-channel mean over the sequence
    subtracted first (exact: q.(k - mu) differs from q.k by a constant per query row, which the
    softmax cancels; it removes the common large-norm channels that would eat K's 8-bit range). S is
    an int32 wgmma accumulator started at the bits of a float bias (`_s_start_gpu`), so that its
    bits are the float logits plus that bias (`biased_logits`; fp8 QK: a float32 accumulator),
    scaled per row in float32. P (in [0, 1], kept as P * 448 so that e4m3's range is used) and V
    (one scale per channel) in fp8 e4m3; on the GPU PV accumulates onto the running output in place
    (Hopper's fp8 wgmma accumulates with fewer mantissa bits than float32; measured as accurate as a
    fresh accumulator added each step, which is what interpret mode does: notes/attention.md v6,
    v7).
  * "sage_qk8" (SageAttention1-style): the same 8-bit S, P and V in bf16 (V not quantized):
    half the speed-up, none of the fp8 rounding of P and V (which dominates sage8's error).
  * "int8": the same 8-bit S; P and V as int8 codes on the int8 tensor cores (as fast as fp8),
    with 8 significant bits where e4m3 keeps 4: P is quantized against each row's max within the
    KV block (256 levels over the block's own weights, where the running max would leave the
    typical weight a few levels), as round(255 p) - 128 (s8); V less its per-channel mean (added
    back at the end) in int8 per channel, its scale also large enough that a block's codes sum to
    at most V_BLOCK_ABS_SUM_MAX in magnitude per channel. Each block's P . V is an int32
    accumulator started at LOGIT_BIAS's bits plus 128 * the block's V code sums (what the -128
    offset takes out), so that it ends as the bits of the float LOGIT_BIAS + sum_j u_j v_j
    (u = round(255 p) <= 253: |sum| < 2^22, exact, as for S). The float32 output is kept in units
    of the current block's code reference, with the bias in it: O' = O' r + that float, one FFMA
    an output element a block (r = 2^(previous reference - this one)); the number of biases it
    holds (c = c r + 1) and l follow per row, and (O' - LOGIT_BIAS c) / (255 l) ends it
    (benchmarks/notes/attention.md v10, v14).
8-bit wgmma needs both operands K-major: Q (rows of D), K (rows of D, the B operand transposed),
P (rows of block_kv) are; V is not (its contraction dim is the sequence), so `quantize_qkv`
writes V transposed, (B, H, D, S), and the kernel's B operand is that tile transposed. P stays in
registers as wgmma's A operand, but the float32 accumulator layout gives a thread 2 adjacent
columns of every 8 while the 8-bit A layout wants 4 adjacent of every 16: rather than moving
bytes between threads, each thread's pairs (c, c+1) and (c+8, c+9) are joined into one
4-byte register (`_p_operand_gpu`; "int8": `_p_codes_gpu`), which permutes the keys of P within
each 16, and V's keys are stored with the same permutation (`key_permutation`), so the sum over
keys is unchanged (the trick FlashAttention-3 uses for fp8).

Interpret mode (`interpret=True`, CPU tests) runs the same kernel; its wgmma takes no register
operand, so there P goes through shared memory (8-bit: permuted with jnp ops,
`_p_operand_interpret`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.experimental.mosaic.gpu as mgpu
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, vector

from pallas_kernels.smem import swizzle_transforms
from pallas_kernels.tile_schedule import sm_count

Precision = Literal["bf16", "sage8", "sage_qk8", "int8"]
PRECISIONS: tuple[str, ...] = ("bf16", "sage8", "sage_qk8", "int8")
PV_DTYPES = {"sage8": jnp.float8_e4m3fn, "int8": jnp.int8}  # the 8-bit PV precisions' P and V codes
QK_DTYPES = (jnp.int8, jnp.float8_e4m3fn)
INT8_MAX = 127.0
FP8_MAX = 448.0  # e4m3fn's largest finite value
SCALE_FLOOR = 1e-10  # scale of an all-zero row or channel: zero codes, never NaN
LOG2E = math.log2(math.e)
LOGIT_BIAS_BITS, LOGIT_BIAS = 0x4B400000, 12582912.0  # the float 1.5 * 2**23 and its bits (`biased_logits`)
BIASED_EXACT = 2**22  # `biased_logits` is exact for |x| <= it
INT8_HEAD_DIM_MAX = 256  # int8 Q K^T codes: |q . k| <= 127² D <= 2**22, exact in `biased_logits`
_COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Block sizes: each CTA takes 2 * block_q query rows; K/V stream in blocks of block_kv
    through max_concurrent_steps shared-memory stages. `overlap`: FlashAttention-3's intra-
    warpgroup overlap (the next block's S = Q K^T is issued with this block's PV, and the next
    softmax runs under this PV; the two warpgroups take turns issuing), where the default runs
    S, softmax and PV one after another and overlaps only the other warpgroup's softmax.
    `programs`: a persistent grid of that many CTAs (at most one a tile; e.g. the SM count), each
    running its tiles back to back with the K/V pipeline and the ping-pong running on across
    them, where the default launches one CTA a tile, which fills its pipeline and starts its
    ping-pong anew (~0.9-1.6 KV steps' time a tile of 18 steps at S=4608: notes/attention.md v21)."""
    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    overlap: bool = False
    programs: int | None = None

    def __post_init__(self):
        if self.block_q != 64:
            raise ValueError(f"block_q must be 64 (one wgmma M per warpgroup), got {self.block_q}")
        if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
            raise ValueError(f"block_kv must be 64, 128, 192 or 256, got {self.block_kv}")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"max_concurrent_steps must be at least 2, got {self.max_concurrent_steps}")
        if self.programs is not None and (self.programs < 1 or self.overlap):
            raise ValueError(f"programs (a persistent grid) must be at least 1 and runs the default loop, not "
                             f"overlap=True; got programs={self.programs}, overlap={self.overlap}")


# "int8" / "sage8" run the persistent grid up to this many tokens (`default_config`): measured faster
# at 1536, 4608 and 6144, no faster at 8704 (benchmarks/notes/attention.md v22).
PERSISTENT_SEQ_MAX = 6144


def default_config(precision: Precision, seq: int | None = None, *, interpret: bool = False) -> AttentionConfig:
    """The fastest config measured on the H200 (benchmarks/results/attention_sweep, the kernels
    alone): "sage8" block_kv 256, 2 stages, not overlapped (1.32x cuDNN at B=1 S=4608 and 1.41x at
    B=4 S=8704, against 1.15x / 1.27x with block_kv 128: a KV step's fixed costs, its barriers,
    waits and row reductions, spread over more keys); "int8" the same (1.10x / 1.19x, against
    1.01-1.03x at 192 and 0.87-0.94x at 128, benchmarks/results/attention_sweep_int8); "sage_qk8"
    block_kv 192 (its bf16 V does not fit 256), 2 stages, not overlapped (1.10x / 1.08x, against
    1.00x / 1.03x overlapped at 128);
    "bf16" overlapped (+2-3%, attention_overlap; 192 does not fit shared memory).
    "int8" and "sage8" at `seq` <= PERSISTENT_SEQ_MAX tokens: the persistent grid, one CTA an SM
    (attention_persistent: int8 +11-15% at S=1536, +2.5-6% at 4608, +4.5-5.5% at 6144; at 8704 no
    gain, int8 -4.5% at B=1); without `seq`, one CTA a tile."""
    if precision in ("sage8", "int8"):
        persistent = seq is not None and seq <= PERSISTENT_SEQ_MAX
        return AttentionConfig(block_kv=256, max_concurrent_steps=2,
                               programs=sm_count(interpret) if persistent else None)
    if precision == "sage_qk8":
        return AttentionConfig(block_kv=192, max_concurrent_steps=2)
    return AttentionConfig(overlap=True)


@dataclasses.dataclass(frozen=True)
class QuantizedQKV:
    """The operands of the 8-bit kernels. Invariants (s = padded sequence):
    q ~= q_codes * q_scale[..., None] (per token; q_scale also holds the softmax scale * log2 e),
    k - mean_s(k) ~= k_codes * k_scale per block of block_kv keys (`block_scales_per_key`),
    "sage8" (fp8 PV): v ~= swapaxes(v_t_codes, -1, -2)[..., inverse of key_permutation, :] * v_scale
      (per channel; keys permuted within each 16, as the kernel's P registers are); v_bf16 None;
    "int8" (int8 PV): the same with int8 codes of v - v_mean (V's per-channel mean over the
      sequence, added back to the output: exact, the softmax weights sum to 1), padded keys' codes
      0, sum_j |codes| <= V_BLOCK_ABS_SUM_MAX over each block's keys per channel, and
      pv_start[..., j, :] = LOGIT_BIAS_BITS + 128 * the sum of block j's codes (int32: the start
      values of block j's P . V accumulator; 128: what P's -128 offset takes out, `_p_codes_gpu`);
    "sage_qk8" (bf16 PV): v_bf16 = v in bf16, padded; v_t_codes and v_scale None."""
    q_codes: jax.Array  # (B, s, H, D) int8 or float8_e4m3fn
    q_scale: jax.Array  # (B, H, s) float32
    k_codes: jax.Array  # (B, s, H, D), q_codes' dtype
    k_scale: jax.Array  # (B, H, s / block_kv) float32
    v_t_codes: jax.Array | None  # (B, H, D, s) float8_e4m3fn or int8
    v_scale: jax.Array | None  # (B, H, D) float32
    v_bf16: jax.Array | None  # (B, s, H, D) bfloat16
    v_mean: jax.Array | None = None  # (B, H, D) float32, "int8" only
    pv_start: jax.Array | None = None  # (B, H, s / block_kv, D) int32, "int8" only

    @property
    def precision(self) -> Precision:
        if self.v_t_codes is None:
            return "sage_qk8"
        return "int8" if self.v_t_codes.dtype == jnp.int8 else "sage8"


jax.tree_util.register_dataclass(QuantizedQKV, data_fields=[f.name for f in dataclasses.fields(QuantizedQKV)],
                                 meta_fields=[])


def _pad_seq(x: jax.Array, seq_pad: int, axis: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, seq_pad - x.shape[axis])
    return jnp.pad(x, pad) if seq_pad != x.shape[axis] else x


def padded_length(seq: int, config: AttentionConfig) -> int:
    """Whole CTA query tiles (2 * block_q) and whole KV blocks."""
    unit = math.lcm(_COMPUTE_WGS * config.block_q, config.block_kv)
    return -(-seq // unit) * unit


def key_permutation(n: int) -> np.ndarray:
    """perm[new] = old: within each 16 keys, new 4c + 2h + i <- old 8h + 2c + i (c < 4, h, i < 2):
    the key order of P after `_p_operand_gpu` joins a thread's accumulator pairs."""
    if n % 16:
        raise ValueError(f"key count must be a multiple of 16, got {n}")
    return np.arange(n).reshape(n // 16, 2, 4, 2).transpose(0, 2, 1, 3).reshape(n)


def _transpose_permuting_keys(v: jax.Array) -> jax.Array:
    """(B, s, H, D) -> (B, H, D, s) with the keys in `key_permutation` order: the plain transpose,
    then the permutation within each 16 keys along the minor axis (reshapes and transposes, no
    gather). The optimization barrier keeps XLA from folding the two into one transpose whose
    minor pairs of bytes it moves slowly (the FLUX step at 1024²: 2.5 ms of transposes against 0.4
    ms plus ~1.1 ms more in the codes' fusion; benchmarks/notes/attention.md v19)."""
    b, s, h, d = v.shape
    t = lax.optimization_barrier(jnp.transpose(v, (0, 2, 3, 1)))
    split = t.reshape(b, h, d, s // 16, 2, 4, 2)  # key = 16 g + 8 h' + 2 c + i
    return split.transpose(0, 1, 2, 3, 5, 4, 6).reshape(b, h, d, s)  # -> 16 g + 4 c + 2 h' + i


def _p_operand_interpret(p: jax.Array) -> jax.Array:
    """P's columns in `key_permutation` order, with jnp ops (interpret mode stages P in smem)."""
    rows, cols = p.shape
    return p.reshape(rows, cols // 16, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(rows, cols)


ROW_REDUCE_ILP = 32  # independent partial results a thread in the GPU path's row max (and fp8 P's row sum)


def _row_reduce_gpu(x: jax.Array, op: Literal["max", "add"]) -> jax.Array:
    """x's max or sum over axis 1, (rows, cols) WGMMA -> (rows,), with ROW_REDUCE_ILP partial
    results a thread before they are combined: Pallas's `x.max(axis=1)` takes Mosaic's default,
    one dependent chain of 32 FMNMX a row at block_kv 256, which the softmax waits for
    (benchmarks/notes/attention.md v12)."""
    rows, _ = x.shape

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,),
                       return_type=plgpu.ShapeDtypeStruct((rows,), x.dtype, layout=plgpu.Layout.WGMMA.reduce(1)))
    def reduce(_, src):
        return src.reduce(op, 1, acc_ilp=ROW_REDUCE_ILP)

    return reduce(x)


P_CODE_TOP = 255  # "int8" P: round(255 p / the row's max in the block) - 128, an s8 code
P_CODE_OFFSET = 128
P_CODE_MAX = 253  # the largest round(255 p) the headroom lets a code reach (`_kernel`'s softmax)
P_HEADROOM = 2.0**-6  # log2 units (see `_kernel`'s softmax); the same in numerator and l: cancels
# A block's codes are taken against its row max, or against the running max less this many log2
# units where the block's max is lower still: the output's rescale between blocks stays <= 2^64.
P_REFERENCE_FLOOR = 64.0
# sum_j |V codes| per block and channel: then |sum_j u_j v_j| <= P_CODE_MAX * this < BIASED_EXACT
V_BLOCK_ABS_SUM_MAX = (BIASED_EXACT - 1) // P_CODE_MAX
_F16X2_255, _F16X2_1408 = 0x5BF85BF8, 0x65806580  # f16 pairs (255, 255), (1536 - 128, 1536 - 128)


def _p_operand_exact(x: jax.Array, precision: Precision) -> tuple[jax.Array, jax.Array]:
    """P from float32 exponents x (64, n) with jnp ops (float32 2^x), in key order, and its row
    sums: "int8" s8 codes round(255 * 2^x) - 128, "sage8" fp8 2^x, else bf16 2^x."""
    p = jnp.exp2(x)
    if precision == "int8":
        p_op = (jnp.round(p * P_CODE_TOP) - P_CODE_OFFSET).astype(jnp.int8)
    else:
        p_op = p.astype(PV_DTYPES.get(precision, jnp.bfloat16))
    return p_op, p.sum(axis=1)


def _ptx(text: str, constraints: str, *args: ir.Value, width: int = 32) -> ir.Value:
    return llvm.inline_asm(ir.IntegerType.get_signless(width), list(args), text, constraints)


def _register_pairs(src, rows: int, cols: int) -> tuple[tuple[int, ...], list]:
    """A (rows, cols) WGMMA-layout array's registers as wgmma's 8-bit A layout takes them: for each
    register index idx of WGMMA_8BIT (columns 4c..4c+3 of each 16), the source registers (2g, h)
    and (2g + 1, h) (g = idx[1]; columns 2c, 2c+1 of each 8), which joined hold P's columns in
    `key_permutation` order. Returns the 8-bit register shape and the (idx, pair) list."""
    shape = mgpu.WGMMA_LAYOUT_8BIT.registers_shape((rows, cols))
    if src.registers.shape != (shape[0], 2 * shape[1], *shape[2:]):
        raise AssertionError(f"register layouts do not line up: {src.registers.shape} vs {shape}")
    return shape, [(idx, [src.registers[(idx[0], 2 * idx[1] + j, *idx[2:])] for j in range(2)])
                   for idx in np.ndindex(shape)]


def _p_operand_gpu(p: jax.Array) -> jax.Array:
    """fp8 P (64, n) in the accumulator layout (WGMMA: 2 bytes a register, columns 2c, 2c+1 of
    each 8) -> wgmma's 8-bit A layout (WGMMA_8BIT: 4 bytes, columns 4c..4c+3 of each 16) without
    moving data: register (g, h) of the result joins registers (2g, h) and (2g + 1, h), so its
    columns are P's in `key_permutation` order."""
    rows, cols = p.shape

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA,),
        return_type=plgpu.ShapeDtypeStruct((rows, cols), p.dtype, layout=plgpu.Layout.WGMMA_8BIT),
    )
    def regroup(_, src):
        shape, pairs = _register_pairs(src, rows, cols)
        regs = np.empty(shape, dtype=object)
        for idx, pair in pairs:
            regs[idx] = mgpu_utils.vector_concat(pair)
        return mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT_8BIT, _is_signed=None)

    return regroup(p)


def _p_codes_gpu(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """"int8" P on the GPU from float32 p = 2^x in [0, 1] (64, n) in the accumulator layout: each
    pair of p rounded to float16 (one cvt.rn.f16x2.f32), then one f16x2 FMA 255 p + (1536 - 128),
    whose float16 bits hold round(255 p) - 128 in the low byte of each half (float16 spacing is 1
    on [1024, 2048), so the FMA's rounding is the code's), and one PRMT gathering four such bytes
    into wgmma's 8-bit A register, joined as `_p_operand_gpu` joins fp8 pairs (keys in
    `key_permutation` order). About 1.25 instructions a key where float32 codes (an FFMA against a
    float32 magic number, then byte gathering) take ~1.75. Returns the s8 codes (WGMMA_8BIT) and
    the row sums of the float16 p as a (64, 8) WGMMA array of each thread's partial sums
    (`.sum(axis=1)` completes them), summed in float16 pairs over 8 keys a lane, then in
    float32."""
    rows, cols = p.shape

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA,),
        return_type=(plgpu.ShapeDtypeStruct((rows, cols), jnp.int8, layout=plgpu.Layout.WGMMA_8BIT),
                     plgpu.ShapeDtypeStruct((rows, 8), jnp.float32, layout=plgpu.Layout.WGMMA)))
    def codes(_, src):
        i64 = ir.IntegerType.get_signless(64)
        shape, pairs = _register_pairs(src, rows, cols)
        if shape[1] % 4:
            raise AssertionError(f"the row sums group 4 registers of 16 keys: {cols} keys do not split")
        sums_shape = mgpu.WGMMA_LAYOUT.registers_shape((rows, 8))
        byte_vector = ir.VectorType.get((4,), ir.IntegerType.get_signless(8))
        regs = np.empty(shape, dtype=object)
        groups = {}  # (sums index, group of 4 registers) -> float16 pair partial sum
        to_f16 = lambda pair: _ptx("{ .reg .b32 lo, hi; mov.b64 {lo, hi}, $1; cvt.rn.f16x2.f32 $0, hi, lo; }",
                                   "=r,l", mgpu_utils.bitcast(pair, i64))
        add = lambda a, b: _ptx("add.rn.f16x2 $0, $1, $2;", "=r,r,r", a, b)
        for idx, pair in pairs:
            halves = [to_f16(r) for r in pair]
            packed = _ptx(f"{{ .reg .b32 m0, m1, k, c; mov.b32 k, {_F16X2_255}; mov.b32 c, {_F16X2_1408}; "
                          "fma.rn.f16x2 m0, $1, k, c; fma.rn.f16x2 m1, $2, k, c; prmt.b32 $0, m0, m1, 0x6420; }",
                          "=r,r,r", *halves)
            regs[idx] = mgpu_utils.bitcast(packed, byte_vector)
            group = ((idx[0], 0, *idx[2:]), idx[1] // 4)  # 4 registers: 8 keys a float16 lane
            groups[group] = add(*halves) if group not in groups else add(groups[group], add(*halves))
        f32x2 = ir.VectorType.get((2,), ir.F32Type.get())
        sums = np.empty(sums_shape, dtype=object)
        for (key, _), half_pair in groups.items():
            wide = mgpu_utils.bitcast(
                _ptx("{ .reg .b16 lo, hi; .reg .b32 a, b; mov.b32 {lo, hi}, $1; cvt.f32.f16 a, lo; "
                     "cvt.f32.f16 b, hi; mov.b64 $0, {a, b}; }", "=l,r", half_pair, width=64), f32x2)
            sums[key] = wide if sums[key] is None else arith.addf(sums[key], wide)
        return (mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_LAYOUT_8BIT, _is_signed=True),
                mgpu.FragmentedArray(_registers=sums, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None))

    return codes(p)


def _fill_bias_gpu(smem_ref) -> None:
    """Every thread stores LOGIT_BIAS_BITS into both int32 words of `smem_ref` (8 bytes). All the
    stores are identical, so whatever order they land in, a thread's later loads read the bias
    (its own store precedes them): no barrier needed."""

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
    def fill(_, smem):
        word = arith.constant(ir.IntegerType.get_signless(32), LOGIT_BIAS_BITS)
        mgpu_utils.inline_ptx("st.shared.v2.b32 [$0], {$1, $1};", mgpu_utils.memref_ptr(smem), word,
                              has_side_effects=True)

    fill(smem_ref)


def s_start_addends(n: int) -> np.ndarray:
    """`_s_start_gpu`'s n float64 addends as uint64 bits: 2^(k - 1022) for k < n (exponent field
    k + 1), distinct and far below half an ulp of the bias pair (a double near 2^181)."""
    return np.arange(1, n + 1, dtype=np.uint64) << np.uint64(52)


def _s_start_gpu(bias_ref, shape: tuple[int, int]) -> jax.Array:
    """S's int32 accumulator filled with LOGIT_BIAS_BITS, two registers an instruction: Mosaic's
    wgmma always accumulates, and a fill made in registers costs one move a register (128 a
    thread at block_kv 256); a float64 add writes a register pair. Each add is the pair of bias
    words (a double near 2^181, read once a step from `bias_ref`: loop-variant, so ptxas neither
    hoists nor folds the adds) plus its own tiny double (`s_start_addends`: the sum is the pair
    itself; distinct, so ptxas does not merge the adds). The float64 pipe is otherwise idle: 64
    adds in place of 128 moves took 2% off the int8 and sage8 kernels at B=1 (notes v15)."""

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),),
                       return_type=plgpu.ShapeDtypeStruct(shape, jnp.int32, layout=plgpu.Layout.WGMMA))
    def fill(_, bias):
        i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
        pair = mgpu_utils.inline_ptx("ld.volatile.shared.b64 $0, [$1];", mgpu_utils.memref_ptr(bias),
                                     result_types=i64, has_side_effects=True)
        layout = mgpu_fa.WGMMA_LAYOUT_ACC_32BIT  # wgmma's register order: (2k, 2k + 1) an aligned pair
        regs = np.empty(layout.registers_shape(shape), dtype=object)
        flat = regs.reshape(-1)
        for k, addend in enumerate(s_start_addends(flat.size // 2)):
            words = mgpu_utils.inline_ptx(
                f"{{ .reg .f64 b, t; mov.b64 b, $2; add.rn.f64 t, b, 0d{int(addend):016X}; mov.b64 {{$0, $1}}, t; }}",
                pair, result_types=[i32, i32])
            for j, word in enumerate(words):
                flat[2 * k + j] = vector.broadcast(ir.VectorType.get((1,), i32), word)
        return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=True).to_layout(mgpu.WGMMA_LAYOUT)

    return fill(bias_ref)


def _codes(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """x / scale as int8 (rounded, clipped to +-127) or fp8 codes."""
    scaled = x / scale
    return jnp.clip(jnp.round(scaled), -INT8_MAX, INT8_MAX).astype(dtype) if dtype == jnp.int8 else scaled.astype(dtype)


def _scale(absmax: jax.Array, dtype) -> jax.Array:
    """The float32 scale that maps absmax to the format's largest code (SCALE_FLOOR for zeros)."""
    return jnp.maximum(absmax * (1.0 / (INT8_MAX if dtype == jnp.int8 else FP8_MAX)), SCALE_FLOOR)


def token_codes(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Codes and float32 scales of float32 x (..., D) per token: max |x| over the last axis -> the
    format's largest value. Written without keepdims (the scale broadcast back with
    broadcast_in_dim), so that a Mosaic GPU kernel body could run it on a WGMMA-layout tile as it
    is."""
    scale = _scale(jnp.max(jnp.abs(x), axis=-1), dtype)
    return _codes(x, lax.broadcast_in_dim(scale, x.shape, tuple(range(x.ndim - 1))), dtype), scale


class _ColumnStats(NamedTuple):
    """Per-channel statistics of a (B, S, H, D) x over its keys, from one set of reductions: the mean over
    the sequence (B, 1, H, D) and each block of block_kv keys' max and min (B, blocks, H, D; an
    all-padding block: -inf and +inf)."""
    mean: jax.Array
    block_max: jax.Array
    block_min: jax.Array


def _column_stats(x32: jax.Array, seq_pad: int, block_kv: int) -> _ColumnStats:
    """`_ColumnStats` of float32 x32: the three reductions share one input and one shape, so that
    XLA can fuse them; max |x - mean| then needs no second pass over x (`_centred_absmax`)."""
    b, seq, h, d = x32.shape
    blocks = _pad_seq(x32, seq_pad, 1).reshape(b, seq_pad // block_kv, block_kv, h, d)
    valid = (jnp.arange(seq_pad) < seq).reshape(1, -1, block_kv, 1, 1)
    total = jnp.sum(blocks, axis=2)  # padded keys are 0
    return _ColumnStats(mean=jnp.sum(total, axis=1, keepdims=True) / seq,
                        block_max=jnp.max(jnp.where(valid, blocks, -jnp.inf), axis=2),
                        block_min=jnp.min(jnp.where(valid, blocks, jnp.inf), axis=2))


def _centred_absmax(stats: _ColumnStats) -> jax.Array:
    """max |x - mean| per block and channel (B, blocks, H, D), from the blocks' extremes: float32
    rounding is monotonic, so this is the max of the rounded |x - mean| bit for bit."""
    return jnp.maximum(stats.block_max - stats.mean, stats.mean - stats.block_min)


def quantize_qkv(q: jax.Array, k: jax.Array, v: jax.Array, *, config: AttentionConfig, qk_dtype=jnp.int8,
                 precision: Precision = "sage8", softmax_scale: float | None = None) -> QuantizedQKV:
    """The operands of the 8-bit kernel `precision` ("sage8": fp8 V codes, "int8": int8 codes of
    V less its mean, "sage_qk8": bf16 V) from (B, S, H, D) q, k, v, padded to `padded_length`.

    Plain XLA ops in the caller's jit, written so that q, k, v need few passes: q one for its row
    maxima and one for its codes (`token_codes`); k and v one set of reductions each for their
    per-channel statistics (`_column_stats`: the mean and each block's extremes, from which
    max |x - mean| follows; XLA may still split them into several kernels) and one pass for their
    codes (v one more for its block sums of |v - mean|, which need the mean). Against the mean,
    then max |x - mean|, then the codes, each over centred float32 copies: the FLUX step 2.2 ms
    faster at 1024² (benchmarks/notes/attention.md, v19). A Pallas producer making all these codes
    from the projections was slower at every measured shape (v8); the bf16 producer also writing
    q's codes was slower than these (v22)."""
    if qk_dtype not in QK_DTYPES:
        raise ValueError(f"qk_dtype must be int8 or float8_e4m3fn, got {qk_dtype}")
    if precision not in ("sage8", "sage_qk8", "int8"):
        raise ValueError(f"quantize_qkv makes the 8-bit kernels' operands: precision 'sage8', 'sage_qk8' or "
                         f"'int8', got {precision!r}")
    _check_qkv(q, k, v)
    b, seq, h, d = q.shape
    seq_pad = padded_length(seq, config)
    blocks = seq_pad // config.block_kv
    scale = (1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale) * LOG2E
    q_codes, q_scale = token_codes(q.astype(jnp.float32), qk_dtype)  # q_scale (B, S, H)
    k32 = k.astype(jnp.float32)
    k_stats = _column_stats(k32, seq_pad, config.block_kv)
    k_scale = _scale(jnp.max(_centred_absmax(k_stats), axis=-1), qk_dtype)  # (B, blocks, H)
    k_blocks = _pad_seq(k32 - k_stats.mean, seq_pad, 1).reshape(b, blocks, config.block_kv, h, d)
    k_codes = _codes(k_blocks, k_scale[:, :, None, :, None], qk_dtype)
    return QuantizedQKV(
        q_codes=_pad_seq(q_codes, seq_pad, 1), q_scale=_pad_seq(jnp.swapaxes(q_scale, 1, 2) * scale, seq_pad, 2),
        k_codes=k_codes.reshape(b, seq_pad, h, d), k_scale=jnp.swapaxes(k_scale, 1, 2),
        **_v_operands(v, seq_pad, precision, config.block_kv))


def _v_operands(v: jax.Array, seq_pad: int, precision: Precision, block_kv: int) -> dict[str, jax.Array | None]:
    """`QuantizedQKV`'s V fields from (B, S, H, D) v: "sage8" fp8 codes per channel, "int8" int8
    codes of v - mean per channel (and their blocks' accumulator start values), written straight
    into the kernel's (B, H, D, s) layout with the keys permuted; "sage_qk8" v in bf16.

    "int8": a channel's scale is also at least its largest block sum of |v - mean| over
    (V_BLOCK_ABS_SUM_MAX - block_kv / 2) (each code adds at most half a step to that sum), so that
    P . V stays exact in the kernel's biased float. Only blocks whose values sit near their
    channel's extreme over most of their keys (FLUX's padded text tokens can) reach it; it then
    takes the channel a bit of its resolution."""
    if precision == "sage_qk8":
        return dict(v_t_codes=None, v_scale=None, v_bf16=_pad_seq(v.astype(jnp.bfloat16), seq_pad, 1))
    b, _, h, d = v.shape
    v32 = v.astype(jnp.float32)
    stats = _column_stats(v32, seq_pad, block_kv)
    if precision == "sage8":
        absmax = jnp.max(jnp.maximum(stats.block_max, -stats.block_min), axis=1)  # max |v| per channel
        v_scale = _scale(absmax, PV_DTYPES[precision])  # (B, H, D)
        v_codes = _codes(_pad_seq(v32, seq_pad, 1), v_scale[:, None], PV_DTYPES[precision])
        return dict(v_t_codes=_transpose_permuting_keys(v_codes), v_scale=v_scale, v_bf16=None)
    centred = _pad_seq(v32 - stats.mean, seq_pad, 1)  # padded keys: 0, code 0
    block_abs_sums = jnp.abs(centred).reshape(b, seq_pad // block_kv, block_kv, h, d).sum(axis=2)
    v_scale = jnp.maximum(_scale(jnp.max(_centred_absmax(stats), axis=1), jnp.int8),
                          jnp.max(block_abs_sums, axis=1) / (V_BLOCK_ABS_SUM_MAX - block_kv / 2))  # (B, H, D)
    v_t_codes = _transpose_permuting_keys(_codes(centred, v_scale[:, None], jnp.int8))  # (B, H, D, s)
    sums = v_t_codes.astype(jnp.int32).reshape(b, h, d, seq_pad // block_kv, block_kv).sum(axis=-1)  # the
    # permutation stays within blocks
    return dict(v_t_codes=v_t_codes, v_scale=v_scale, v_bf16=None, v_mean=stats.mean[:, 0],
                pv_start=jnp.transpose(LOGIT_BIAS_BITS + P_CODE_OFFSET * sums, (0, 1, 3, 2)))


def block_scales_per_key(k_scale: jax.Array, block_kv: int) -> jax.Array:
    """(B, H, blocks) K scales -> (B, H, blocks * block_kv): each key's scale."""
    return jnp.repeat(k_scale, block_kv, axis=-1)


def biased_logits(x: jax.Array) -> jax.Array:
    """int32 q . k -> the float32 LOGIT_BIAS + x, exactly for |x| <= 2**22 (int8 codes: 127² D, D
    <= 256): x added to LOGIT_BIAS's bits are that float's bits. On the GPU the kernel starts the
    QK^T accumulator at LOGIT_BIAS_BITS, so the wgmma makes these bits and no per-logit
    instruction converts them (a conversion, or an add then a subtract, was 1-2 of the ~12
    instructions a (query, key) pair costs the softmax, which bounds the 8-bit kernel); the bias
    goes into the softmax's per-row shift."""
    return lax.bitcast_convert_type(x + LOGIT_BIAS_BITS, jnp.float32)


def _check_qkv(q, k, v) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, S, H, D) shape, got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[-1] % 64:
        raise ValueError(f"head dim D must be a multiple of 64, got q {q.shape}")


# Named barriers of the ping-pong (0 is __syncthreads, 1-3 Mosaic's warpgroup barriers): warpgroup w
# waits at _SOFTMAX_TURN + w for its softmax turn and at _PV_TURN + w for its PV turn.
_SOFTMAX_TURN, _PV_TURN = 8, 10


def _named_barrier(op: Literal["arrive", "sync"], base: int, other: bool) -> None:
    """`bar.{op}` on the named barrier base + this compute warpgroup's index (or the other's), for
    the two compute warpgroups (256 threads): "arrive" counts this warpgroup's threads without
    waiting, "sync" counts them and waits for the other's arrival. A hardware barrier, where an
    mbarrier is an object in shared memory that each thread's arrive updates (with release order)
    and whose wait polls: the ping-pong's handoff on these took 3-4% off the int8 kernel at B=1
    (benchmarks/notes/attention.md v17)."""

    @plgpu.inline_mgpu()
    def emit(_):
        i32 = ir.IntegerType.get_signless(32)
        wg = mgpu_utils.warpgroup_idx(sync=False)
        if other:
            wg = arith.subi(mgpu_utils.c(1, i32), wg)
        index = arith.addi(wg, mgpu_utils.c(base, i32))
        threads = _COMPUTE_WGS * mgpu_utils.WARPGROUP_SIZE
        mgpu_utils.inline_ptx(f"bar.{op} $0, {threads};", index, has_side_effects=True)

    emit()


def _tile_grid(q_shape: tuple[int, ...], block_q: int) -> tuple[int, int, int]:
    """(heads, query blocks, batch): the tiles of (B, seq_pad, H, D) q, 2 * block_q rows each."""
    return q_shape[2], q_shape[1] // (_COMPUTE_WGS * block_q), q_shape[0]


def _tile(t: jax.Array, q_shape: tuple[int, ...], block_q: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(head, query block, batch) of tile t, heads fastest: the order of the one-tile-a-CTA grid
    (h, q_seq, b), so that the tiles in flight share their K/V blocks in L2 the same way."""
    heads, blocks, _ = _tile_grid(q_shape, block_q)
    return t % heads, t // heads % blocks, t // (heads * blocks)


def _kernel(*refs, precision: Precision, seq: int, config: AttentionConfig, programs: int | None, interpret: bool):
    """One CTA: two query blocks (one a compute warpgroup) against the whole K/V sequence; with
    `programs` (a persistent grid of that many CTAs) one such tile after another."""
    qk8, pv8, pv_int = precision != "bf16", precision in PV_DTYPES, precision == "int8"
    qs_ref = ks_ref = vs_ref = vm_ref = pv_start_ref = None
    if pv_int:
        q_ref, qs_ref, k_ref, ks_ref, v_ref, vs_ref, vm_ref, pv_start_ref, out_ref, scoped = refs
    elif pv8:
        q_ref, qs_ref, k_ref, ks_ref, v_ref, vs_ref, out_ref, scoped = refs  # v_ref: V transposed
    elif qk8:
        q_ref, qs_ref, k_ref, ks_ref, v_ref, out_ref, scoped = refs
    else:
        q_ref, k_ref, v_ref, out_ref, scoped = refs
    (q_smem2, o_smem2, p_smem2, k_smem, v_smem, ks_smem, bias_smem), (k_bars, v_bars, q_bars, ks_bars), \
        (k_consumed, v_consumed), schedule_barrier, turns = scoped
    bq, bkv = config.block_q, config.block_kv
    head_dim = q_ref.shape[-1]
    logit_scale = LOG2E / math.sqrt(head_dim)  # bf16: logits * log2 e from q.k
    kv_steps = -(-seq // bkv)  # KV blocks holding keys (the padding may add whole blocks: skipped)
    full_steps = seq // bkv  # steps without padded keys; a ragged last one is masked
    stages = k_smem.shape[0]
    if programs is None:  # one (head, query block, batch) tile a CTA: the grid's own
        batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    else:  # a persistent grid: CTA c takes tiles c, c + programs, ... (`_tile`)
        wg = lax.axis_index("wg")
        program, tiles = lax.axis_index("program"), math.prod(_tile_grid(q_ref.shape, bq))
        tile_count = (tiles - 1 - program) // programs + 1
        total_steps = tile_count * kv_steps  # KV steps over all of this CTA's tiles
    int_logits = q_ref.dtype == jnp.int8
    s_dtype = jnp.int32 if int_logits else jnp.float32
    # PV accumulates in place (as the template does) where a WGMMA accumulator can be initialised:
    # on the GPU (fp8 PV too: its accumulation error measured the same as a fresh accumulator's,
    # notes/attention.md v6). In interpret mode each step's PV goes to a fresh accumulator that is
    # added to the running one.
    # "int8" PV cannot: its int32 accumulator holds one block's sum, added by one FFMA (`kv_step`).
    pv_in_place = not interpret and not pv_int

    # The ping-pong (the default loop). Each KV step a warpgroup issues S = Q K^T, signals that the
    # other may issue its PV (queued behind this S on the tensor cores), waits for its softmax turn,
    # signals the other's softmax turn once its logits are made (`softmax`), and waits for its PV
    # turn. On the GPU these are named barriers; interpret mode keeps one mbarrier whose phases
    # pair the same points (it cannot run inline PTX; the order changes no output).
    def grant(turn: int):  # the other warpgroup's turn
        if interpret:
            plgpu.barrier_arrive(schedule_barrier)
        else:
            _named_barrier("arrive", turn, other=True)

    def take(turn: int):  # wait for this warpgroup's turn
        if interpret:
            plgpu.barrier_wait(schedule_barrier)
        else:
            _named_barrier("sync", turn, other=False)

    def qk_issued():  # then this warpgroup's softmax turn
        grant(_PV_TURN)
        take(_SOFTMAX_TURN)

    def softmax_done():
        grant(_SOFTMAX_TURN)

    def pv_turn():
        take(_PV_TURN)

    def first_turn():  # warpgroup 1 before its loop: warpgroup 0 takes the first softmax turn
        softmax_done()
        pv_turn()

    def slot_of(step):
        return lax.rem(step, jnp.array(stages, step.dtype))

    def first_row(block):  # this warpgroup's first query row in query block `block`
        return block * (_COMPUTE_WGS * bq) + wg * bq

    def copy_q(batch, head, q_base, q_smem, barrier):
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_base, bq), head], q_smem, barrier)

    def load_row_scale(batch, head, q_base):
        if not qk8:
            return None
        return plgpu.load(qs_ref.at[batch, head, pl.ds(q_base, bq)], layout=plgpu.Layout.WGMMA.reduce(1),
                          optimized=False)

    def compute_tile(batch, head, q_base, q_smem, o_smem, row_scale, base=None):
        """One tile's query rows against the whole K/V sequence, its output stored. `base`: the
        persistent grid's KV steps before this tile (its slots and barrier phases run on from
        them), the CTA's first turn and last turn taken outside; None: the tile is the CTA's."""
        at = (lambda step: step) if base is None else (lambda step: base + step)
        row_fill = lambda x: plgpu.layout_cast(jnp.full((bq,), x, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        m_i, l_i = row_fill(-jnp.inf), row_fill(0)
        if pv_int:  # l, the biases the output holds, the previous block's code reference
            l_i = (l_i, row_fill(0), row_fill(-jnp.inf))
        acc = plgpu.layout_cast(jnp.full((bq, head_dim), 0, jnp.float32), plgpu.Layout.WGMMA)

        # The wgmmas take their stage's slot from outside run_state / run_scoped: a constant step
        # (the ragged last one) would give a constant there, which run_state cannot lower.
        def issue_qk(s_ref, slot):
            if int_logits and not interpret:
                s_ref[...] = _s_start_gpu(bias_smem, (bq, bkv))
            plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].T)

        def logits(s):
            """S as the softmax takes it: float32, + LOGIT_BIAS for int8 codes (`biased_logits`)."""
            if not int_logits:
                return s
            return lax.bitcast_convert_type(s, jnp.float32) if not interpret else biased_logits(s)

        def issue_pv(pv_ref, p_op, slot):
            p_ref = p_smem2.at[wg] if interpret else p_op  # interpret: wgmma's A from shared memory
            plgpu.wgmma(pv_ref, p_ref, v_smem.at[slot].T if pv8 else v_smem.at[slot])

        def row_max(s):
            return s.max(axis=1) if interpret else _row_reduce_gpu(s, "max")

        def load_block_scale(slot):
            plgpu.barrier_wait(ks_bars.at[slot])
            return plgpu.load(ks_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)

        def softmax(s, step, m_i, l_i, masked: bool, block_scale=None):
            """Online softmax in base 2 of `step`'s logits (m_i: the running max of logits * log2 e);
            releases the step's K. Returns P as the PV wgmma's operand, alpha (the rescale of what
            PV accumulated before this step), m and l; "int8": in l's place the block's row sums
            of P (on the GPU each thread's partial sums) and its code reference.

            "int8": P is quantized against a reference per row and block, its max in this block
            (its 256 levels then span the block's own weights, where the running max would leave the
            typical weight a few levels) or m - P_REFERENCE_FLOOR if that is larger; alpha =
            2^(previous reference - this one) carries the output into this block's units (<= 2^64:
            no overflow however far a block's max falls below m), and l sums the unrounded weights."""
            slot = slot_of(at(step))
            if qk8:  # logits * log2 e = codes . codes * q_scale (row) * this block's k_scale
                if block_scale is None:
                    block_scale = load_block_scale(slot)
                s_scale = row_scale * block_scale
                row = lax.broadcast_in_dim(s_scale, s.shape, [0])
            else:
                row = logit_scale
            plgpu.barrier_arrive(k_consumed.at[slot])
            if masked:
                cols = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(cols + step * bkv < seq, s, -jnp.inf)
            s_max = row_max(s)
            if int_logits:  # s holds LOGIT_BIAS + q . k: the bias leaves the max exactly
                s_max = s_max - LOGIT_BIAS
            s_max = s_max * s_scale if qk8 else s_max * logit_scale
            m_new = jnp.maximum(m_i, s_max)
            # "int8": 2^(x - P_HEADROOM) <= 2^-2^-6 ~ 0.989 but for float32 rounding of x (which
            # can put the row's max a hair above 0) and float16 rounding of p: 255 p rounds to at
            # most P_CODE_MAX = 253, never past the code range; fp8: P * 448, e4m3's whole range.
            if pv_int:
                reference = jnp.maximum(s_max, m_new - P_REFERENCE_FLOOR)
                alpha = jnp.exp2(l_i[2] - reference)
                shift = reference + P_HEADROOM
            else:
                alpha = jnp.exp2(m_i - m_new)
                shift = m_new - math.log2(FP8_MAX) if pv8 else m_new
            if int_logits:  # (LOGIT_BIAS + q . k) * scale - (shift + LOGIT_BIAS * scale): one FMA a logit
                shift = shift + LOGIT_BIAS * s_scale
            x = s * row - lax.broadcast_in_dim(shift, s.shape, [0])
            if not config.overlap:  # the other warpgroup's softmax turn once the logits are made,
                # before their exponentials (measured against the arrive after P, at S's arrival and
                # after the row max: notes/attention.md v17)
                x = lax.optimization_barrier(x)
                softmax_done()
            if pv_int and not interpret:  # p_sum: each thread's partial sums, completed in `kv_step`
                p_op, p_sum = _p_codes_gpu(jnp.exp2(x))
            elif pv8 and not interpret:
                p = jnp.exp2(x)
                p_op, p_sum = _p_operand_gpu(p.astype(jnp.float8_e4m3fn)), _row_reduce_gpu(p, "add")
            else:
                p_op, p_sum = _p_operand_exact(x, precision)
                if interpret:
                    p_smem2[wg] = _p_operand_interpret(p_op) if pv8 else p_op
                    plgpu.commit_smem()
            if pv_int:  # l's update waits for PV's issue (`kv_step`)
                return p_op, alpha, m_new, (p_sum, reference)
            return p_op, alpha, m_new, l_i * alpha + p_sum

        def rescale(acc, alpha):
            return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        def kv_step(step, carry, masked: bool = False):
            """One KV block: S = Q K^T, softmax, O += P V, one after another (the other warpgroup's
            softmax runs under this one's wgmma)."""
            acc, m_i, l_i = carry
            slot = slot_of(at(step))

            def compute_qk(acc_ref):
                with jax.named_scope("qk_issue"):
                    issue_qk(acc_ref, slot)
                with jax.named_scope("qk_schedule"):
                    qk_issued()
                with jax.named_scope("qk_wait"):
                    return acc_ref[...]
            with jax.named_scope("ks_wait"):
                block_scale = load_block_scale(slot) if pv_int else None  # "int8": its wait runs under S's
            s = logits(pl.run_scoped(compute_qk, plgpu.ACC((bq, bkv), s_dtype)))
            with jax.named_scope("softmax"):
                p_op, alpha, m_i, l_new = softmax(s, step, m_i, l_i, masked, block_scale)
                if pv_int:  # loaded here, S dead: its latency runs under the barrier waits below
                    pv_start = plgpu.load(pv_start_ref.at[batch, head, step], layout=plgpu.Layout.WGMMA.reduce(0),
                                          optimized=False)
                    # The rescale and l's cross-lane sums wait for PV's issue (below): fewer instructions
                    # before the arrive, and ptxas then moves part of the exponentials past it (notes v12).
                    alpha, l_new, m_i, p_op = lax.optimization_barrier((alpha, l_new, m_i, p_op))
                else:
                    acc, l_i, m_i, p_op = lax.optimization_barrier((rescale(acc, alpha), l_new, m_i, p_op))
            with jax.named_scope("pv_gate"):
                plgpu.barrier_wait(v_bars.at[slot])
                pv_turn()

            if base is not None:  # this tile's next step's K, or the next tile's first; made out here, as
                # run_state cannot lower a constant (the ragged step's) inside
                next_step = at(step) + 1
                has_next, next_slot = next_step < total_steps, slot_of(next_step)

            def wait_next_k():
                if base is not None:
                    @pl.when(has_next)
                    def _():
                        plgpu.barrier_wait(k_bars.at[next_slot])
                    return
                if masked:  # the ragged step is the last: no next K (and a constant step here
                    return  # would make a constant condition, which run_state cannot lower)

                @pl.when(step + 1 < kv_steps)
                def _():
                    plgpu.barrier_wait(k_bars.at[slot_of(step + 1)])

            def compute_pv(pv_ref):
                issue_pv(pv_ref, p_op, slot)
                wait_next_k()

            if pv_int:  # the s8 P . V codes from LOGIT_BIAS's bits + 128 * the block's code sums: the
                # bits of the float LOGIT_BIAS + sum_j u_j v_j (u = round(255 p), |sum| < 2^22)
                start = lax.broadcast_in_dim(pv_start, acc.shape, [1])
                if interpret:  # interpret mode cannot start an accumulator at a value
                    pv = pl.run_scoped(lambda r: (compute_pv(r), r[...])[1], plgpu.ACC(acc.shape, jnp.int32))
                    pv = lax.bitcast_convert_type(pv + start, jnp.float32)
                else:
                    with jax.named_scope("pv"):
                        pv = pl.run_state(compute_pv)(plgpu.ACC.init(start))
                    pv = lax.bitcast_convert_type(pv, jnp.float32)
                with jax.named_scope("update"):
                    p_sum, reference = l_new
                    if p_sum.ndim == 2:  # the GPU's per-thread partial sums (`_p_codes_gpu`)
                        p_sum = p_sum.sum(axis=1)
                    l, biases, _ = l_i
                    l_i = (l * alpha + p_sum, biases * alpha + 1.0, reference)
                    acc = rescale(acc, alpha) + pv  # one FFMA an element: the bias stays in, counted
            elif pv_in_place:
                with jax.named_scope("pv"):
                    acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
            else:
                acc = acc + pl.run_scoped(lambda r: (compute_pv(r), r[...])[1], plgpu.ACC((bq, head_dim), jnp.float32))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_i, l_i

        def take_turn():
            plgpu.barrier_wait(turns.at[wg])

        def give_turn():
            plgpu.barrier_arrive(turns.at[1 - wg])

        def issue_pv_onto(pv_ref, acc, alpha, p_op, slot):
            """PV's wgmma onto acc rescaled by alpha (in place), or into the fresh `pv_ref`."""
            if pv_in_place:
                pv_ref[...] = rescale(acc, alpha)
            issue_pv(pv_ref, p_op, slot)

        def add_pv(acc, alpha, pv):
            """The running output after `issue_pv_onto`: in place, PV's accumulator itself; else acc
            rescaled plus the fresh accumulator, two roundings as in `kv_step` (no FMA)."""
            return pv if pv_in_place else lax.optimization_barrier(rescale(acc, alpha)) + pv

        def overlapped_step(step, carry, masked: bool = False):
            """FlashAttention-3's intra-warpgroup overlap: issue S of step + 1 and PV of step, then
            the softmax of step + 1 runs while PV's wgmma does. `carry` holds acc before step's
            rescale and the alpha it takes (applied as PV starts); the warpgroups take turns issuing
            wgmmas (`turns`)."""
            acc, p_op, alpha, m_i, l_i = carry
            slot, next_slot = slot_of(step), slot_of(step + 1)
            plgpu.barrier_wait(k_bars.at[next_slot])
            plgpu.barrier_wait(v_bars.at[slot])
            take_turn()

            def gemms(s_ref, pv_ref):
                issue_qk(s_ref, next_slot)
                issue_pv_onto(pv_ref, acc, alpha, p_op, slot)
                give_turn()
                s = logits(plgpu.wgmma_accumulator_load(s_ref, wait_n=1))  # S done, PV may still run
                p_next, alpha_next, m_next, l_next = softmax(s, step + 1, m_i, l_i, masked)
                return pv_ref[...], p_next, alpha_next, m_next, l_next
            pv, p_op, alpha_next, m_i, l_i = pl.run_scoped(
                gemms, plgpu.ACC((bq, bkv), s_dtype), plgpu.ACC((bq, head_dim), jnp.float32))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return add_pv(acc, alpha, pv), p_op, alpha_next, m_i, l_i

        if config.overlap:
            pl.when(wg == 1)(give_turn)  # warpgroup 0 issues first
            plgpu.barrier_wait(k_bars.at[0])
            take_turn()

            def first_qk(s_ref):
                issue_qk(s_ref, 0)
                give_turn()
                return s_ref[...]
            s = logits(pl.run_scoped(first_qk, plgpu.ACC((bq, bkv), s_dtype)))
            p_op, alpha, m_i, l_i = softmax(s, jnp.int32(0), m_i, l_i, masked=full_steps == 0)
            carry = (acc, p_op, alpha, m_i, l_i)
            # overlapped_step(j) makes step j + 1's P: j + 1 < full_steps unmasked, then the ragged one.
            carry = lax.fori_loop(0, max(full_steps - 1, 0), overlapped_step, carry)
            if 0 < full_steps < kv_steps:
                carry = overlapped_step(jnp.int32(kv_steps - 2), carry, masked=True)
            acc, p_op, alpha, m_i, l_i = carry
            last_slot = (kv_steps - 1) % stages
            plgpu.barrier_wait(v_bars.at[last_slot])
            take_turn()

            def last_pv(pv_ref):
                issue_pv_onto(pv_ref, acc, alpha, p_op, last_slot)
                give_turn()
                return pv_ref[...]
            pv = pl.run_scoped(last_pv, plgpu.ACC((bq, head_dim), jnp.float32))
            plgpu.barrier_arrive(v_consumed.at[last_slot])
            acc = add_pv(acc, alpha, pv)
            pl.when(wg == 0)(take_turn)  # warpgroup 1's last turn given: every arrival observed
        else:
            if base is None:
                plgpu.barrier_wait(k_bars.at[0])
                pl.when(wg == 1)(first_turn)
            carry = lax.fori_loop(0, full_steps, kv_step, (acc, m_i, l_i))
            if full_steps < kv_steps:  # the ragged last block
                carry = kv_step(jnp.int32(full_steps), carry, masked=True)
            acc, m_i, l_i = carry
            if base is None:
                pl.when(wg == 0)(qk_issued)  # stands in for the QK issue of a step after the last

        if pv_int:  # the biases out, the codes' 255 in: float32 rounding, notes/attention.md v14
            l_i, biases, _ = l_i
            acc = acc - lax.broadcast_in_dim(biases * LOGIT_BIAS, acc.shape, [0])
            l_i = l_i * P_CODE_TOP
        out = acc * lax.broadcast_in_dim(1.0 / l_i, acc.shape, [0])
        if pv8:
            v_scale = plgpu.load(vs_ref.at[batch, head], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
            out = out * lax.broadcast_in_dim(v_scale, acc.shape, [1])
        if pv_int:
            v_mean = plgpu.load(vm_ref.at[batch, head], layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
            out = out + lax.broadcast_in_dim(v_mean, acc.shape, [1])
        if base is not None:  # the previous tile's output may still be read out of o_smem
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        o_smem[...] = out.astype(out_ref.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[batch, pl.ds(q_base, bq), head])
        if base is None:
            plgpu.wait_smem_to_gmem(0)

    def tile_rows(i):
        """(batch, head, first query row) of this warpgroup in the persistent CTA's i-th tile."""
        t_head, t_block, t_batch = _tile(program + i * programs, q_ref.shape, bq)
        return t_batch, t_head, first_row(t_block)

    def persistent_compute_wg():
        """The CTA's tiles one after another: the ping-pong and the K/V ring run on across them
        (`compute_tile`'s `base`), and the next tile's q is copied in while this one runs (two q
        buffers a warpgroup), so no tile waits for its pipeline to fill."""
        def copy_tile_q(i, buf):
            copy_q(*tile_rows(i), q_smem2.at[2 * wg + buf], q_bars.at[2 * wg + buf])

        copy_tile_q(0, 0)
        if int_logits and not interpret:
            _fill_bias_gpu(bias_smem)
        plgpu.barrier_wait(k_bars.at[0])
        pl.when(wg == 1)(first_turn)

        @pl.loop(0, tile_count)
        def _(i):
            buf = lax.rem(i, 2)
            t_batch, t_head, q_base = tile_rows(i)
            row_scale = load_row_scale(t_batch, t_head, q_base)
            plgpu.barrier_wait(q_bars.at[2 * wg + buf])

            @pl.when(i + 1 < tile_count)
            def _():
                copy_tile_q(i + 1, 1 - buf)
            compute_tile(t_batch, t_head, q_base, q_smem2.at[2 * wg + buf], o_smem2.at[wg], row_scale,
                         base=i * kv_steps)

        pl.when(wg == 0)(qk_issued)  # stands in for the QK issue of a step after the last
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute_wg():
        plgpu.set_max_registers(232, action="increase")
        if programs is not None:
            persistent_compute_wg()
            return
        q_smem, o_smem = q_smem2.at[wg], o_smem2.at[wg]
        q_base = first_row(lax.axis_index("q_seq"))
        copy_q(batch, head, q_base, q_smem, q_bars.at[wg])
        row_scale = load_row_scale(batch, head, q_base)
        if int_logits and not interpret:  # what S's start values are made from (`_s_start_gpu`)
            _fill_bias_gpu(bias_smem)
        plgpu.barrier_wait(q_bars.at[wg])
        compute_tile(batch, head, q_base, q_smem, o_smem, row_scale)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory_wg():
        plgpu.set_max_registers(40, action="decrease")

        def fetch_k(batch, head, step, slot):
            plgpu.copy_gmem_to_smem(k_ref.at[batch, pl.ds(step * bkv, bkv), head], k_smem.at[slot], k_bars.at[slot])
            if qk8:  # the block's K scale, repeated block_q times (one per query row)
                plgpu.copy_gmem_to_smem(ks_ref.at[batch, head, pl.ds(step * bq, bq)], ks_smem.at[slot],
                                        ks_bars.at[slot])

        def fetch_v(batch, head, step, slot):
            rows = pl.ds(step * bkv, bkv)
            v_tile = v_ref.at[batch, head, :, rows] if pv8 else v_ref.at[batch, rows, head]
            plgpu.copy_gmem_to_smem(v_tile, v_smem.at[slot], v_bars.at[slot])

        if programs is None:
            def at(step):
                return batch, head, step
            steps = kv_steps
        else:  # the CTA's tiles' steps in one run: step g is tile g // kv_steps's KV step g % kv_steps
            def at(g):
                t_head, _, t_batch = _tile(program + g // kv_steps * programs, q_ref.shape, bq)
                return t_batch, t_head, g % kv_steps
            steps = total_steps

        for i in range(stages):  # stages <= kv_steps: the first tile's
            fetch_k(*at(jnp.int32(i)), i)
            fetch_v(*at(jnp.int32(i)), i)

        @pl.loop(0, steps - stages)
        def _(step):  # K is released before V (the overlapped loop reads S a step ahead of PV)
            slot = slot_of(step)
            with jax.named_scope("k_free_wait"):
                plgpu.barrier_wait(k_consumed.at[slot])
            fetch_k(*at(step + stages), slot)
            with jax.named_scope("v_free_wait"):
                plgpu.barrier_wait(v_consumed.at[slot])
            fetch_v(*at(step + stages), slot)

        for slot in range(stages):  # the last steps' releases: every barrier phase is observed
            plgpu.barrier_wait(k_consumed.at[slot])
            plgpu.barrier_wait(v_consumed.at[slot])


PROFILE_SCOPES_PER_STEP = 8  # the named scopes a compute warpgroup opens a KV step (`_kernel`'s kv_step)


def _run(operands: tuple, *, precision: Precision, shape: tuple[int, int, int, int], out_dtype,
         config: AttentionConfig, interpret: bool, profile_dir: str | None = None) -> jax.Array:
    """Launches the kernel on padded operands; returns (B, seq_pad, H, D). `profile_dir`: Mosaic
    GPU's profiler records each warpgroup's named scopes (clock cycles) and writes a trace there."""
    b, seq, h, d = shape
    seq_pad = padded_length(seq, config)
    bq, bkv = config.block_q, config.block_kv
    stages = min(config.max_concurrent_steps, -(-seq // bkv))
    q_dtype = operands[0].dtype
    item = jnp.dtype(q_dtype).itemsize
    qk8, pv8 = precision != "bf16", precision in PV_DTYPES
    p_dtype = v_dtype = PV_DTYPES[precision] if pv8 else jnp.bfloat16
    v_tile = (d, bkv) if pv8 else (bkv, d)
    tile_grid = _tile_grid((b, seq_pad, h, d), bq)
    tiles = math.prod(tile_grid)
    programs = None if config.programs is None else min(config.programs, tiles)
    q_buffers = _COMPUTE_WGS * (1 if programs is None else 2)  # persistent: the next tile's q copied in meanwhile
    scratch = (
        plgpu.SMEM((q_buffers, bq, d), q_dtype, transforms=swizzle_transforms(d, item)),
        plgpu.SMEM((_COMPUTE_WGS, bq, d), out_dtype, transforms=swizzle_transforms(d, jnp.dtype(out_dtype).itemsize)),
        plgpu.SMEM((_COMPUTE_WGS, bq, bkv), p_dtype, transforms=swizzle_transforms(bkv, jnp.dtype(p_dtype).itemsize))
        if interpret else None,
        plgpu.SMEM((stages, bkv, d), q_dtype, transforms=swizzle_transforms(d, item)),
        plgpu.SMEM((stages, *v_tile), v_dtype, transforms=swizzle_transforms(v_tile[1], jnp.dtype(v_dtype).itemsize)),
        plgpu.SMEM((stages, bq), jnp.float32) if qk8 else None,
        plgpu.SMEM((2,), jnp.int32) if q_dtype == jnp.int8 and not interpret else None,  # `_s_start_gpu`'s bias
    )
    barriers = (
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=q_buffers),
        plgpu.Barrier(num_barriers=stages) if qk8 else None,
    )
    consumed = (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),) * 2
    kernel_fn = functools.partial(_kernel, precision=precision, seq=seq, config=config, programs=programs,
                                  interpret=interpret)

    # The ping-pong's mbarrier: interpret mode waits on it, the GPU takes turns on named barriers
    # (`_named_barrier`) and still allocates it: left out there, the int8 kernel ran 4% slower at
    # B=1 and no faster at B=4, in two A/B rounds (benchmarks/notes/attention.md v18; why not found).
    schedule = None if config.overlap else plgpu.Barrier(num_arrivals=_COMPUTE_WGS)
    turns = plgpu.Barrier(num_arrivals=1, num_barriers=_COMPUTE_WGS) if config.overlap else None

    profiling = {}
    if profile_dir:  # room for every scope of every step of a CTA's tiles, and a few outside the loop
        cta_steps = -(-seq // bkv) * (1 if programs is None else -(-tiles // programs))
        profiling = dict(profile_space=PROFILE_SCOPES_PER_STEP * cta_steps + 16, profile_dir=profile_dir)

    def entry(*refs):
        pl.run_scoped(lambda *scoped: kernel_fn(*refs, scoped), scratch, barriers, consumed, schedule, turns,
                      collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((b, seq_pad, h, d), out_dtype),
        grid=tile_grid if programs is None else (programs,),
        grid_names=("heads", "q_seq", "batch") if programs is None else ("program",),
        kernel_name=f"flash_attention_{precision}",  # how profiles (bench_e2e's stages) tell it from the GEMM
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, **profiling),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(*operands)


@functools.partial(jax.jit, static_argnames=("seq", "out_dtype", "config", "interpret", "profile_dir"))
def attention_quantized(qkv: QuantizedQKV, *, seq: int, out_dtype=jnp.bfloat16, config: AttentionConfig | None = None,
                        interpret: bool = False, profile_dir: str | None = None) -> jax.Array:
    """The 8-bit kernel ("sage8", "int8" or "sage_qk8", from the operands) on `quantize_qkv`'s output;
    `seq` is the unpadded length (keys beyond it are masked). Returns (B, seq, H, D) in out_dtype.
    `profile_dir` (GPU): a trace of the warpgroups' phases goes there (`benchmarks.attention_trace`)."""
    precision = qkv.precision
    config = config or default_config(precision, seq, interpret=interpret)
    if profile_dir and interpret:
        raise ValueError(f"profile_dir={profile_dir!r} needs the GPU: interpret mode has no clock to record")
    b, seq_pad, h, d = qkv.q_codes.shape
    if seq_pad != padded_length(seq, config) or qkv.k_codes.shape != qkv.q_codes.shape:
        raise ValueError(f"q_codes {qkv.q_codes.shape} / k_codes {qkv.k_codes.shape} are not seq={seq} padded "
                         f"to {padded_length(seq, config)} for {config}")
    if qkv.q_codes.dtype not in QK_DTYPES or qkv.k_codes.dtype != qkv.q_codes.dtype:
        raise ValueError(f"q_codes/k_codes must both be int8 or float8_e4m3fn, got {qkv.q_codes.dtype}, "
                         f"{qkv.k_codes.dtype}")
    if qkv.q_codes.dtype == jnp.int8 and d > INT8_HEAD_DIM_MAX:
        raise ValueError(f"int8 Q K^T needs head dim D <= {INT8_HEAD_DIM_MAX} (exact int32 -> float of the "
                         f"logits), got q_codes {qkv.q_codes.shape}; use qk_dtype float8_e4m3fn")
    if qkv.k_scale.shape != (b, h, seq_pad // config.block_kv):
        raise ValueError(f"k_scale must be (B, H, blocks) = {(b, h, seq_pad // config.block_kv)} for {config}, "
                         f"got {qkv.k_scale.shape}")
    # One K scale per KV step, repeated for each query row: the kernel loads it as a row vector.
    operands = [qkv.q_codes, qkv.q_scale, qkv.k_codes, jnp.repeat(qkv.k_scale, config.block_q, axis=-1)]
    if precision in PV_DTYPES:
        if qkv.v_t_codes.shape != (b, h, d, seq_pad):
            raise ValueError(f"v_t_codes must be {(b, h, d, seq_pad)}, got {qkv.v_t_codes.shape}")
        operands += [qkv.v_t_codes, qkv.v_scale]
        if precision == "int8":
            if config.overlap:
                raise ValueError(f"precision 'int8' runs the default (not overlapped) loop, got {config}")
            start_shape = (b, h, seq_pad // config.block_kv, d)
            if qkv.pv_start is None or qkv.pv_start.shape != start_shape or qkv.v_mean is None:
                raise ValueError(f"int8 V needs v_mean (B, H, D) and pv_start {start_shape} made for {config}, "
                                 f"got {None if qkv.pv_start is None else qkv.pv_start.shape}")
            operands += [qkv.v_mean, qkv.pv_start]
    else:
        if qkv.v_bf16.shape != qkv.q_codes.shape or qkv.v_bf16.dtype != jnp.bfloat16:
            raise ValueError(f"v_bf16 must be bfloat16 {qkv.q_codes.shape}, got {qkv.v_bf16.dtype} {qkv.v_bf16.shape}")
        operands.append(qkv.v_bf16)
    out = _run(tuple(operands), precision=precision, shape=(b, seq, h, d), out_dtype=out_dtype, config=config,
               interpret=interpret, profile_dir=profile_dir)
    return out[:, :seq]


@functools.partial(jax.jit, static_argnames=("precision", "qk_dtype", "config", "out_dtype", "interpret"))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, precision: Precision = "bf16", qk_dtype=jnp.int8,
              config: AttentionConfig | None = None, out_dtype=None, interpret: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v over (B, S, H, D) q, k, v (non-causal); output in out_dtype
    (default q's dtype; the 8-bit kernels write it directly, e.g. bf16 from float32 q and k).

    precision "bf16": the kernel on bf16 inputs (others are cast); "sage8" / "int8" / "sage_qk8":
    `quantize_qkv` (qk_dtype int8 or float8_e4m3fn) then the 8-bit kernel (fp8 / int8 / bf16 PV)."""
    _check_qkv(q, k, v)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    b, seq, h, d = q.shape
    config = config or default_config(precision, seq, interpret=interpret)
    out_dtype = out_dtype or q.dtype
    if precision != "bf16":
        qkv = quantize_qkv(q, k, v, config=config, qk_dtype=qk_dtype, precision=precision)
        return attention_quantized(qkv, seq=seq, out_dtype=out_dtype, config=config, interpret=interpret)
    seq_pad = padded_length(seq, config)
    q, k, v = (_pad_seq(x.astype(jnp.bfloat16), seq_pad, 1) for x in (q, k, v))
    out = _run((q, k, v), precision="bf16", shape=(b, seq, h, d), out_dtype=jnp.bfloat16, config=config,
               interpret=interpret)
    return out[:, :seq].astype(out_dtype)
