"""Flash attention kernels (`pallas_kernels.attention`) against float32 and dequantized references.

CPU: Mosaic GPU interpret mode at small shapes (several KV blocks, a ragged last one, padded
query rows, two heads), the bf16 and the 8-bit kernel (int8 and fp8 QK^T). Interpret mode runs
the 8-bit wgmma, but not the register regrouping of P (`inline_mgpu`): there P goes through
shared memory, permuted with jnp ops; the `gpu` tests run the real kernels at FLUX shapes.

Bounds (pallas_kernels/attention_reference.py):
  * bf16 kernel vs float32: P's bf16 rounding (2^-8 sum_j w_j |v_j|) + the output's (2^-8).
  * 8-bit kernels vs attention on their own dequantized operands: P's rounding (fp8, bf16, or
    int8 codes against the row's max in its block), worst case per element, and per row at most
    4x its RMS prediction (a dropped KV block or a row with a wrong scale moves a row by far more).
  * quantize_qkv: every dequantized element within half a code step (int8) or 2^-4 (fp8) of
    q, k - mean(k), v: a quantizer that skips K's mean fails it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

import flux_fixtures
from pallas_kernels.attention import (BIASED_EXACT, INT8_HEAD_DIM_MAX, LOGIT_BIAS, LOGIT_BIAS_BITS, P_CODE_MAX,
                                      PERSISTENT_SEQ_MAX, V_BLOCK_ABS_SUM_MAX, AttentionConfig, _row_reduce_gpu,
                                      attention, attention_quantized, biased_logits, block_scales_per_key,
                                      default_config, key_permutation, quantize_qkv, s_start_addends)
from pallas_kernels.attention_reference import (BF16_REL, FP8_REL, INT8_L_GPU_REL, attention_reference, bf16_p_bound,
                                                dequantize, dequantized_attention, flux_like_qkv, p_rounding_bounds,
                                                random_qkv)
from pallas_kernels.tile_schedule import sm_count

SMALL = AttentionConfig(block_q=64, block_kv=64, max_concurrent_steps=2)


def constant_block_qkv(key: jax.Array, shape: tuple[int, int, int, int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random q, k, v but for the first 256 keys, identical in k and at +6 in every channel of v:
    a block of FLUX's padded text tokens at its channels' extreme. Each row's weights are flat
    over that block, so "int8"'s codes there are all ~252 against V codes that, at the channels'
    absmax scale, would all be ~127: sum_j u_j v_j ~ 8.2e6, past the 2^22 that the kernel's biased
    float holds exactly, unless V's scale keeps the block's codes small enough
    (V_BLOCK_ABS_SUM_MAX)."""
    q, k, v = random_qkv(key, shape, jnp.float32)
    k = k.at[:, :256].set(k[:, :1])
    v = v.at[:, :256].set(6.0)
    return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)


INPUTS = {"random": random_qkv, "flux_like": flux_like_qkv, "constant_block": constant_block_qkv}


def _v_codes_in_key_order(qkv) -> np.ndarray:
    """V's codes (B, H, D, s) as integers, back from the kernel's key permutation."""
    codes = np.empty(qkv.v_t_codes.shape, np.int64)
    codes[..., key_permutation(codes.shape[-1])] = np.asarray(qkv.v_t_codes, np.int64)
    return codes
QK_DTYPES = pytest.mark.parametrize("qk_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])


def _check_bf16(q, k, v, out):
    ref = np.asarray(attention_reference(q, k, v), np.float64)
    err = np.abs(np.asarray(out, np.float64) - ref)
    bound = bf16_p_bound(q, k, v) * (1 + 2.0**-8) + 2.0**-8 * np.abs(ref) + 1e-6
    assert np.all(err <= bound), f"{np.sum(err > bound)} elements off, worst ratio {np.max(err / bound):.2f}"


def _check_quantized(qkv, seq, out, gpu: bool = False):
    """Elementwise worst case and per-row RMS of P's rounding (fp8, bf16 for sage_qk8, codes of
    255 for int8), + the output's bf16 rounding and float32 slack (int8: in the bounds; on the GPU
    also l's float16 sums, a relative error of the row less V's mean)."""
    ref = dequantized_attention(qkv, seq)
    worst, rms = p_rounding_bounds(qkv, seq, gpu=gpu)
    out64 = np.asarray(out, np.float64)
    err = np.abs(out64 - ref)
    if qkv.precision == "int8":
        centered = np.abs(ref - np.asarray(qkv.v_mean, np.float64)[:, None])
        rounding = 2.0**-8 * np.abs(out64) + (INT8_L_GPU_REL if gpu else 1e-6) * centered
    else:
        rel = FP8_REL if qkv.precision == "sage8" else BF16_REL
        rounding = 2.0**-8 * np.abs(out64) + 1e-4 * (worst / rel)  # output bf16; float32 logits, exp2
    assert np.all(np.isfinite(out64))
    assert np.all(err <= worst + rounding), f"{np.sum(err > worst + rounding)} elements past the worst case"
    row_err = np.sqrt(np.sum(np.maximum(err - rounding, 0) ** 2, axis=-1))
    ratio = row_err / rms
    assert np.all(ratio <= 4), f"{np.sum(ratio > 4)} rows past 4x the predicted RMS, worst {ratio.max():.2f}x"


@pytest.mark.parametrize("seq", [200, 40])
def test_bf16_kernel(seq):
    """Several KV blocks and a ragged last one (200), or one block mostly padding (40)."""
    q, k, v = random_qkv(jax.random.key(seq), (1, seq, 2, 128))
    out = attention(q, k, v, precision="bf16", config=SMALL, interpret=True)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    _check_bf16(q, k, v, out)


@pytest.mark.parametrize("qk_dtype, inputs, precision", [
    (jnp.int8, "random", "sage8"), (jnp.float8_e4m3fn, "random", "sage8"), (jnp.int8, "flux_like", "sage8"),
    (jnp.float8_e4m3fn, "flux_like", "sage8"), (jnp.int8, "flux_like", "sage_qk8"), (jnp.int8, "random", "int8"),
    (jnp.int8, "flux_like", "int8")])
def test_quantized_kernel(qk_dtype, inputs, precision):
    """sage8 (fp8 PV) with int8 and fp8 QK^T; sage_qk8 (bf16 PV); int8 (int8 PV)."""
    seq = 200
    q, k, v = INPUTS[inputs](jax.random.key(1), (1, seq, 2, 128))
    qkv = quantize_qkv(q, k, v, config=SMALL, qk_dtype=qk_dtype, precision=precision)
    out = attention_quantized(qkv, seq=seq, config=SMALL, interpret=True)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    _check_quantized(qkv, seq, out)


@pytest.mark.parametrize("precision", ["sage8", "sage_qk8", "int8"])
def test_default_config_kernel(precision):
    """Each 8-bit precision's default config (sage8, int8: block_kv 256, sage_qk8: 192) on a ragged
    sequence of two KV blocks, the second partly padding (44 of 256 keys real, 108 of sage_qk8's
    192)."""
    seq, config = 300, default_config(precision)
    q, k, v = flux_like_qkv(jax.random.key(3), (1, seq, 2, 128))
    qkv = quantize_qkv(q, k, v, config=config, precision=precision)
    _check_quantized(qkv, seq, attention_quantized(qkv, seq=seq, config=config, interpret=True))


def test_sage8_bounds_catch_a_wrong_kernel():
    """The 8-bit check fails sage8 outputs with one KV block left out or one row's scale doubled."""
    seq = 200
    q, k, v = random_qkv(jax.random.key(2), (1, seq, 2, 128))
    qkv = quantize_qkv(q, k, v, config=SMALL)
    q2, k2, v2 = dequantize(qkv, seq)
    w = np.exp2(np.einsum("bqhd,bkhd->bhqk", q2, k2))
    dropped = w.copy()
    dropped[..., 64:128] = 0
    out = lambda w: np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v2)
    with pytest.raises(AssertionError):
        _check_quantized(qkv, seq, out(dropped))
    rescaled = w.copy()
    rescaled[:, :, 7] **= 2
    with pytest.raises(AssertionError):
        _check_quantized(qkv, seq, out(rescaled))
    _check_quantized(qkv, seq, out(w))


def _bf16_spacing(x: np.ndarray) -> np.ndarray:
    """bf16's spacing at each |x| (2^(exponent - 7); normal numbers)."""
    return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(x), 2.0**-126))) - 7)


def _same_arithmetic(q, k, v, precision: str, default: AttentionConfig, other: AttentionConfig) -> np.ndarray:
    """The kernel in interpret mode under `other` against `default`, a config that reorders its
    work but not its arithmetic: XLA:CPU compiles each kernel body on its own and may round one of
    them differently in another fusion (measured: 1 output of 10240), which moves an output by one
    bf16 unit at most, rarely. Returns `other`'s output."""
    seq = q.shape[1]
    outs = []
    for config in (default, other):
        if precision == "bf16":
            outs.append(np.asarray(attention(q, k, v, precision="bf16", config=config, interpret=True), np.float32))
        else:
            qkv = quantize_qkv(q, k, v, config=config, precision=precision)
            outs.append(np.asarray(attention_quantized(qkv, seq=seq, config=config, interpret=True), np.float32))
    assert np.all(np.abs(outs[1] - outs[0]) <= _bf16_spacing(outs[0]))
    assert np.mean(outs[1] != outs[0]) <= 1e-3
    return outs[1]


@pytest.mark.parametrize("precision, seq", [("bf16", 200), ("sage8", 200), ("sage_qk8", 200), ("sage8", 40)])
def test_overlap_is_the_same_arithmetic(precision, seq):
    """FlashAttention-3's intra-warpgroup overlap (`AttentionConfig.overlap`) reorders when S, the
    softmax and PV run, not what they compute: interpret mode (fresh PV accumulators in both)
    gives the default kernel's outputs. Same float32 operations, but XLA:CPU compiles each kernel
    body on its own and may round one of them differently in another fusion (measured: 1 output
    of 10240 at S=40), which can move an output by one bf16 unit at most; a block computed twice,
    skipped, or taken from the wrong slot moves whole rows far more. Several KV blocks and a ragged
    last one (200), one mostly padded block (40)."""
    q, k, v = random_qkv(jax.random.key(seq), (1, seq, 2, 128))
    overlapped = _same_arithmetic(q, k, v, precision, SMALL, dataclasses.replace(SMALL, overlap=True))
    if precision == "bf16":
        _check_bf16(q, k, v, overlapped)


@pytest.mark.parametrize("precision, programs", [("int8", 3), ("sage8", 3), ("bf16", 100)])
def test_persistent_grid_is_the_same_arithmetic(precision, programs):
    """A persistent grid (`AttentionConfig.programs`) runs each tile's arithmetic as the one-tile-a-CTA
    grid does, its K/V ring, barriers and ping-pong running on across a CTA's tiles: interpret mode
    gives the default kernel's outputs, up to XLA:CPU compiling the two kernel bodies apart (as in
    `test_overlap_is_the_same_arithmetic`: one bf16 unit at most, rarely). A tile given another's
    coordinates, K/V from a slot before its refill, or a tile skipped moves whole rows far more.
    2 batches x 2 heads x 2 query blocks = 8 tiles on 3 CTAs (3, 3, 2 tiles, both q buffers reused,
    ragged last KV blocks), and on more CTAs than tiles (one each)."""
    q, k, v = random_qkv(jax.random.key(11), (2, 200, 2, 128))
    _same_arithmetic(q, k, v, precision, SMALL, dataclasses.replace(SMALL, programs=programs))


def test_persistent_grid_settings_are_checked():
    with pytest.raises(ValueError, match="programs .a persistent grid. must be at least 1.*programs=0"):
        AttentionConfig(programs=0)
    with pytest.raises(ValueError, match="not overlap=True; got programs=132, overlap=True"):
        AttentionConfig(programs=132, overlap=True)


def test_default_grid_by_length():
    """The 8-bit kernels take the persistent grid (one CTA an SM) up to PERSISTENT_SEQ_MAX tokens,
    where it was measured faster, and one CTA a tile beyond it or when the length is not given."""
    assert default_config("int8", PERSISTENT_SEQ_MAX, interpret=True).programs == 4  # interpret: 4 "SMs"
    assert default_config("sage8", 1536, interpret=True).programs == 4
    assert default_config("int8", PERSISTENT_SEQ_MAX + 1).programs is None
    assert default_config("int8").programs is None
    assert default_config("sage_qk8", 1536).programs is None and default_config("bf16", 1536).programs is None


@QK_DTYPES
def test_quantize_qkv(qk_dtype):
    """Codes x scales (q per token, k per block of block_kv keys, v per channel) reconstruct q,
    k - mean(k) and v within the format's rounding; the padding is zero; V's keys are in
    `key_permutation` order."""
    seq, config = 200, SMALL
    q, k, v = flux_like_qkv(jax.random.key(3), (2, seq, 2, 128))
    qkv = quantize_qkv(q, k, v, config=config, qk_dtype=qk_dtype)
    q2, k_deq, v_deq = dequantize(qkv, seq)
    f64 = lambda x: np.asarray(x, np.float64)
    q64, k64, v64 = f64(q.astype(jnp.float32)), f64(k.astype(jnp.float32)), f64(v.astype(jnp.float32))
    k_centred = k64 - k64.mean(axis=1, keepdims=True)
    c = np.log2(np.e) / np.sqrt(128)

    def within(x_deq, x, scale):
        step = scale / 2 if qk_dtype == jnp.int8 else FP8_REL * np.abs(x) + 2.0**-10 * scale
        return np.all(np.abs(x_deq - x) <= step * (1 + 1e-6) + 1e-6 * np.abs(x))

    q_scale = np.swapaxes(f64(qkv.q_scale), 1, 2)[:, :seq, :, None] / c
    k_scale = np.swapaxes(f64(block_scales_per_key(qkv.k_scale, config.block_kv)), 1, 2)[:, :seq, :, None]
    assert within(q2 / c, q64, q_scale)
    assert within(k_deq, k_centred, k_scale)
    v_scale = f64(qkv.v_scale)[:, None]
    assert np.all(np.abs(v_deq - v64) <= FP8_REL * np.abs(v64) + 2.0**-10 * v_scale + 1e-6)
    assert not np.any(np.asarray(qkv.q_codes[:, seq:], np.float32))
    assert not np.any(np.asarray(qkv.k_codes[:, seq:], np.float32))
    assert sorted(key_permutation(64)) == list(range(64)) and list(key_permutation(16)[:4]) == [0, 1, 8, 9]


def test_quantize_qkv_int8_v():
    """"int8": V less its per-channel mean in int8 codes within half a code step (the mean added
    back by `dequantize`), padded keys' codes 0, each block's accumulator start values
    LOGIT_BIAS_BITS + 128 * the sums of its codes (what the kernel adds back for P's -128 offset),
    and every block's sum of |codes| per channel within V_BLOCK_ABS_SUM_MAX."""
    seq, config = 200, SMALL
    q, k, v = flux_like_qkv(jax.random.key(4), (2, seq, 2, 128))
    v = v + 3.0  # a mean to take out
    qkv = quantize_qkv(q, k, v, config=config, precision="int8")
    assert qkv.precision == "int8" and qkv.v_t_codes.dtype == jnp.int8
    _, _, v_deq = dequantize(qkv, seq)
    v64 = np.asarray(v.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(qkv.v_mean), v64.mean(axis=1), rtol=1e-6, atol=1e-6)
    assert np.all(np.abs(v_deq - v64) <= np.asarray(qkv.v_scale, np.float64)[:, None] / 2 * (1 + 1e-6) + 1e-5)
    codes = _v_codes_in_key_order(qkv)
    assert not np.any(codes[..., seq:])
    blocks = codes.reshape(*codes.shape[:3], -1, config.block_kv)  # permutation stays within blocks
    np.testing.assert_array_equal(np.asarray(qkv.pv_start),
                                  LOGIT_BIAS_BITS + 128 * np.transpose(blocks.sum(-1), (0, 1, 3, 2)))
    assert np.abs(blocks).sum(-1).max() <= V_BLOCK_ABS_SUM_MAX


def test_int8_v_scale_keeps_pv_exact():
    """A block of identical keys at V's extreme (`constant_block_qkv`, the default block of 256):
    V's scale rises so that the block's codes sum to at most V_BLOCK_ABS_SUM_MAX per channel, which
    keeps every P . V within the kernel's exact range (at the absmax scale alone they would sum to
    ~127 * 256), and the kernel's output stays within the int8 bounds (interpret mode)."""
    seq, config = 600, default_config("int8")
    q, k, v = constant_block_qkv(jax.random.key(5), (1, seq, 1, 128))
    qkv = quantize_qkv(q, k, v, config=config, precision="int8")
    block_sums = np.abs(_v_codes_in_key_order(qkv)[..., :256]).sum(-1)
    assert np.all(block_sums <= V_BLOCK_ABS_SUM_MAX) and np.all(block_sums > 0.9 * V_BLOCK_ABS_SUM_MAX)
    assert P_CODE_MAX * block_sums.max() < BIASED_EXACT
    _check_quantized(qkv, seq, attention_quantized(qkv, seq=seq, config=config, interpret=True))


@pytest.mark.parametrize("precision, overlap, programs",
                         [(p, o, None) for p in ("bf16", "sage8", "sage_qk8") for o in (False, True)]
                         + [("int8", False, None), ("int8", False, 132), ("sage8", False, 132)])
def test_lowers_for_the_gpu(precision, overlap, programs):
    """The GPU code path (P in registers, PV in place where the kernel does so: what interpret
    mode does not run) lowers for CUDA from this machine, at a ragged FLUX-like length; the
    8-bit kernels also on a persistent grid of the H200's 132 SMs."""
    x = jax.ShapeDtypeStruct((1, 1000, 24, 128), jnp.bfloat16)
    config = dataclasses.replace(default_config(precision), overlap=overlap, programs=programs)
    f = jax.jit(lambda q, k, v: attention(q, k, v, precision=precision, config=config))
    assert "mosaic_gpu" in f.trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()


def test_biased_logits_are_exact_over_the_int8_logit_range():
    """The kernel's int32 q . k -> float32 (an int32 accumulator started at LOGIT_BIAS_BITS, read
    as a float) is LOGIT_BIAS + q . k exactly wherever |q . k| <= 127² D can reach (D <= 256)."""
    bound = BIASED_EXACT
    edges = [-bound, -(127**2) * INT8_HEAD_DIM_MAX, -1, 0, 1, 127**2 * INT8_HEAD_DIM_MAX, bound - 1, bound]
    x = jnp.concatenate([jnp.array(edges, jnp.int32),
                         jax.random.randint(jax.random.key(0), (4096,), -bound, bound + 1, jnp.int32)])
    got = np.asarray(biased_logits(x), np.float64) - LOGIT_BIAS
    np.testing.assert_array_equal(got, np.asarray(x, np.float64))


def test_s_start_addends_leave_the_bias_pair():
    """The GPU kernel fills S's accumulator by float64 adds of the pair of LOGIT_BIAS_BITS words and
    one addend each (`_s_start_gpu`): every sum must be the pair's bits exactly (else S starts
    wrong), and the addends distinct (else ptxas merges the adds into moves). 64 pairs: block_kv
    256 (the largest) holds 128 registers a thread."""
    pair = np.array([(LOGIT_BIAS_BITS << 32) | LOGIT_BIAS_BITS], np.uint64).view(np.float64)
    addends = s_start_addends(64)
    sums = (pair + addends.view(np.float64)).view(np.uint64)
    np.testing.assert_array_equal(sums, np.full(64, pair.view(np.uint64)[0]))
    assert len(set(addends.tolist())) == 64 and np.all(addends.view(np.float64) > 0)


def test_rejects_bad_shapes():
    x = jnp.zeros((1, 64, 2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="share one"):
        attention(x, x[:, :32], x, interpret=True)
    with pytest.raises(ValueError, match="multiple of 64"):
        attention(x[..., :96], x[..., :96], x[..., :96], interpret=True)
    with pytest.raises(ValueError, match="precision"):
        attention(x, x, x, precision="fp4", interpret=True)
    wide = jnp.zeros((1, 64, 1, INT8_HEAD_DIM_MAX + 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"int8 Q K\^T needs head dim D <= 256.*q_codes \(1, \d+, 1, 320\)"):
        attention(wide, wide, wide, precision="sage8", config=SMALL, interpret=True)
    with pytest.raises(ValueError, match="'int8' runs the default .not overlapped. loop"):
        attention(x, x, x, precision="int8", config=dataclasses.replace(SMALL, overlap=True), interpret=True)
    with pytest.raises(ValueError, match="8-bit kernels' operands.*got 'bf16'"):
        quantize_qkv(x, x, x, config=SMALL, precision="bf16")


def _row_reduce_kernel(x: jax.Array, op: str) -> jax.Array:
    """`_row_reduce_gpu` alone: x (64, cols) float32 through shared memory into the WGMMA layout,
    each row's max or sum broadcast back over its row."""
    def body(x_gmem, out_gmem):
        def scoped(x_smem, out_smem, bar):
            plgpu.copy_gmem_to_smem(x_gmem, x_smem, bar.at[0])
            plgpu.barrier_wait(bar.at[0])
            rows = _row_reduce_gpu(plgpu.load(x_smem, layout=plgpu.Layout.WGMMA, optimized=False), op)
            out_smem[...] = lax.broadcast_in_dim(rows, x.shape, [0])
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, out_gmem)
            plgpu.wait_smem_to_gmem(0)
        pl.run_scoped(scoped, plgpu.SMEM(x.shape, x.dtype), plgpu.SMEM(x.shape, x.dtype), plgpu.Barrier(num_barriers=1))

    return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)


def _row_reduce_inputs(cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Logit-like rows for the max (each row's max at another column, the last columns of every
    other row masked to -inf as the ragged step does) and P-like weights in [0, 1] for the sum."""
    rng = np.random.default_rng(cols)
    logits = rng.standard_normal((64, cols)).astype(np.float32)
    rows = np.arange(64)
    logits[rows, (rows * 37) % cols] = 10 + rows  # a distinct winner a row, anywhere in it
    logits[::2, cols - 40:] = -np.inf
    return logits, rng.uniform(0, 1, (64, cols)).astype(np.float32)


@pytest.mark.parametrize("cols", [128, 256])
def test_row_reduce_lowers_for_the_gpu(cols):
    """The row-reduction kernel of `test_gpu_row_reduce` lowers for CUDA from this machine."""
    x = jax.ShapeDtypeStruct((64, cols), jnp.float32)
    for op in ("max", "add"):
        lowered = jax.jit(lambda x: _row_reduce_kernel(x, op)).trace(x).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()


# ------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("cols", [128, 256])
def test_gpu_row_reduce(cols):
    """The kernel's row max (every precision) and fp8 P's row sum with ROW_REDUCE_ILP partial
    results a thread: the max exactly, the sum within float32's bound for any order of cols
    nonnegative terms, ~(cols - 1) 2^-24 of the sum (one value dropped or counted twice moves it by
    ~1/cols of it, at least ~250x the bound)."""
    logits, weights = _row_reduce_inputs(cols)
    np.testing.assert_array_equal(np.asarray(_row_reduce_kernel(jnp.asarray(logits), "max"))[:, 0],
                                  logits.max(axis=1))
    total = np.asarray(_row_reduce_kernel(jnp.asarray(weights), "add"), np.float64)
    ref = weights.astype(np.float64).sum(axis=1, keepdims=True)
    gamma = (cols - 1) * 2.0**-24 / (1 - (cols - 1) * 2.0**-24)
    assert np.all(np.abs(total - ref) <= gamma * ref)


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True], ids=["default", "overlap"])
@pytest.mark.parametrize("seq", [4608, 1000])
def test_gpu_bf16(seq, overlap):
    q, k, v = random_qkv(jax.random.key(seq), (1, seq, 2, 128))
    config = dataclasses.replace(default_config("bf16"), overlap=overlap)
    _check_bf16(q, k, v, attention(q, k, v, precision="bf16", config=config))


@pytest.mark.gpu
@pytest.mark.parametrize("seq, inputs, precision, qk_dtype", [
    (4608, "random", "sage8", jnp.int8), (4608, "flux_like", "sage8", jnp.int8),
    (4608, "flux_like", "sage8", jnp.float8_e4m3fn), (4608, "flux_like", "sage_qk8", jnp.int8),
    (1000, "random", "sage8", jnp.int8), (1000, "flux_like", "sage_qk8", jnp.int8)])
@pytest.mark.parametrize("overlap", [False, True], ids=["default", "overlap"])
def test_gpu_sage8(seq, inputs, precision, qk_dtype, overlap):
    """FLUX's 1024² sequence, and a ragged one; sage8 (fp8 PV) and sage_qk8 (bf16 PV). Overlapped,
    fp8 PV accumulates in place in the wgmma (the default kernel: a fresh accumulator a block),
    within the same bounds."""
    q, k, v = INPUTS[inputs](jax.random.key(seq), (1, seq, 2, 128))
    config = dataclasses.replace(default_config(precision), overlap=overlap)
    qkv = quantize_qkv(q, k, v, config=config, qk_dtype=qk_dtype, precision=precision)
    _check_quantized(qkv, seq, attention_quantized(qkv, seq=seq, config=config))


@pytest.mark.gpu
@pytest.mark.parametrize("seq, inputs", [(4608, "random"), (4608, "flux_like"), (4608, "constant_block"),
                                         (1000, "random"), (1000, "flux_like"), (1000, "constant_block")])
def test_gpu_int8(seq, inputs):
    """int8 PV (P's codes through float16, `_p_codes_gpu`) at FLUX's sequence and a ragged one,
    within the bounds that add the float16 arithmetic's error."""
    q, k, v = INPUTS[inputs](jax.random.key(seq), (1, seq, 2, 128))
    config = default_config("int8")
    qkv = quantize_qkv(q, k, v, config=config, precision="int8")
    _check_quantized(qkv, seq, attention_quantized(qkv, seq=seq, config=config), gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8", "sage8"])
@pytest.mark.parametrize("batch, seq", [(1, 4608), (2, 1000)])
def test_gpu_persistent_grid(precision, batch, seq):
    """The persistent grid (one CTA an SM, each running its tiles back to back) within the kernel's
    bounds, and the default grid's output but for rounding (the same arithmetic a tile; ptxas
    schedules the two kernels apart: one bf16 unit at most)."""
    q, k, v = INPUTS["flux_like"](jax.random.key(seq), (batch, seq, 24, 128))
    config = default_config(precision)
    qkv = quantize_qkv(q, k, v, config=config, precision=precision)
    default = np.asarray(attention_quantized(qkv, seq=seq, config=config), np.float32)
    persistent_config = dataclasses.replace(config, programs=sm_count(interpret=False))
    persistent = attention_quantized(qkv, seq=seq, config=persistent_config)
    _check_quantized(qkv, seq, persistent, gpu=True)
    assert np.all(np.abs(np.asarray(persistent, np.float32) - default) <= _bf16_spacing(default))


def test_profile_needs_the_gpu():
    q, k, v = random_qkv(jax.random.key(5), (1, 128, 1, 64))
    config = default_config("int8")
    qkv = quantize_qkv(q, k, v, config=config, precision="int8")
    with pytest.raises(ValueError, match="profile_dir='trace' needs the GPU"):
        attention_quantized(qkv, seq=128, config=config, interpret=True, profile_dir="trace")


@pytest.mark.gpu
def test_gpu_profile_records_each_kv_step(tmp_path):
    """`profile_dir` (benchmarks/attention_trace.py reads it): Mosaic GPU's trace holds each named
    scope of the compute warpgroups' KV step once a step (a ragged 1000: 4 steps of 256 keys, the
    last masked) and the producer's waits for the steps past the first `stages`; the output is
    the unprofiled kernel's, bit for bit."""
    import json

    q, k, v = random_qkv(jax.random.key(5), (1, 1000, 2, 128))
    config = default_config("int8")
    qkv = quantize_qkv(q, k, v, config=config, precision="int8")
    plain = attention_quantized(qkv, seq=1000, config=config)
    profiled = jax.block_until_ready(attention_quantized(qkv, seq=1000, config=config, profile_dir=str(tmp_path)))
    jax.effects_barrier()
    np.testing.assert_array_equal(np.asarray(profiled), np.asarray(plain))
    (trace,) = tmp_path.glob("*trace.json")
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "B"]
    per_trace: dict[int, list[str]] = {}
    for e in events:
        per_trace.setdefault(e["tid"], []).append(e["name"])
    steps, stages = 4, config.max_concurrent_steps
    assert len(per_trace) == 3 * 2 * (1024 // 128)  # 3 warpgroups a CTA; 2 heads x 8 CTAs of 128 query rows
    for tid, names in per_trace.items():
        if (tid - 1) % 3 < 2:  # a compute warpgroup
            for scope in ("ks_wait", "qk_issue", "qk_schedule", "qk_wait", "softmax", "pv_gate", "pv", "update"):
                assert names.count(scope) == steps, (tid, scope, names)
        else:
            assert names.count("k_free_wait") == names.count("v_free_wait") == steps - stages, (tid, names)


# ------------------------------------------------------------------------------------ in the model
def test_attention_names_agree():
    """The command line's --attention choices (named without jax) are the op's implementations."""
    from convrot_jax import ops
    from flux_flax.settings import ATTENTION_CHOICES

    assert ATTENTION_CHOICES == ops.ATTENTION_IMPLEMENTATIONS


def test_kernel_attention_needs_hopper():
    from convrot_jax import ops

    x = jnp.zeros((1, 64, 2, 128), jnp.bfloat16)
    with pytest.raises(RuntimeError, match="Hopper"):
        ops.attention(x, x, x, implementation="sage8")
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        ops.attention(x, x, x, implementation="fp4")


def test_set_attention_reaches_every_block():
    from flax import nnx

    from flux_flax import FluxConfig, FluxTransformer2DModel, set_attention
    from flux_flax.layers import FluxAttention

    model = FluxTransformer2DModel(FluxConfig.tiny(), rngs=nnx.Rngs(0))
    set_attention(model, "sage8")
    impls = [n.attention_impl for _, n in nnx.iter_graph(model) if isinstance(n, FluxAttention)]
    assert len(impls) == 2 and set(impls) == {"sage8"}
    with pytest.raises(ValueError, match="must be one of"):
        set_attention(model, "fp4")


@pytest.mark.parametrize("impl", ["mosaic_bf16", "sage8", "int8"])
def test_flux_attention_runs_the_kernel(impl, monkeypatch):
    """FluxAttention (joint text + image, QK norm, RoPE) with a kernel implementation (interpret
    mode standing in for the GPU) against the exact XLA path: a wiring check; the kernels' bounds
    are tested above. The result must differ from XLA's (the kernel ran) but only by rounding."""
    import functools

    from flax import nnx

    from convrot_jax import ops
    from flux_flax.layers import FluxAttention
    from pallas_kernels import attention as kernels

    monkeypatch.setattr(ops, "pallas_supported", lambda: True)
    monkeypatch.setattr(ops, "_attention_kernel", functools.partial(kernels.attention, config=SMALL, interpret=True))
    attn = FluxAttention(256, 2, 128, added_kv_proj_dim=256, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    error = flux_fixtures.joint_attention_error(attn, impl, image_tokens=56, text_tokens=8)
    assert 1e-4 < error < 0.1
