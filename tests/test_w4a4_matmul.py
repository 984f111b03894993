"""The W4A4 GEMM kernel (`pallas_kernels.w4a4_matmul`) vs its XLA reference.

CPU: Mosaic GPU interpret mode at small shapes (several K tiles, several N tiles, a partial M
tile, a persistent grid of 4 programs running several tiles each). Interpret mode cannot run the
kernel's register-level nibble unpack (`inline_mgpu`), so there it unpacks with jnp ops; the
`gpu` tests run the real kernel at the FLUX shapes on a Hopper GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rounding import pack_int4
from pallas_kernels.shapes import FLUX_LINEAR_SHAPES
from pallas_kernels.w4a4_matmul import lora_ranges, w4a4_matmul, w4a4_matmul_int32
from pallas_kernels.w4a4_matmul_config import W4A4MatmulConfig
from pallas_kernels.w4a4_matmul_reference import int_matmul_reference, w4a4_matmul_reference

SMALL = W4A4MatmulConfig(tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=2)
FLUX_KN = list(FLUX_LINEAR_SHAPES.values())
# The op's implementations, run on the CPU: one suite checks both.
IMPLEMENTATIONS = pytest.mark.parametrize(
    "implementation", [w4a4_matmul_reference, functools.partial(w4a4_matmul, interpret=True)],
    ids=["reference", "kernel"])


def _operands(seed: int, m: int, n: int, k: int, scale_group: int | None = None):
    """Random codes over the full int4 range (weights -8..7 exercise every nibble, activations
    -7..7 as the quantizer makes them) and positive scales of varied magnitude."""
    ks = jax.random.split(jax.random.key(seed), 5)
    x_codes = jax.random.randint(ks[0], (m, k), -7, 8, jnp.int8)
    w_codes = jax.random.randint(ks[1], (n, k), -8, 8, jnp.int8)
    x_scales = jnp.exp(jax.random.normal(ks[2], (m,), jnp.float32))
    sw_shape = (n,) if scale_group is None else (n, k // scale_group)
    w_scales = jnp.exp(jax.random.normal(ks[3], sw_shape, jnp.float32)) * 0.01
    bias = jax.random.normal(ks[4], (n,), jnp.float32).astype(jnp.bfloat16)  # a bf16 model's bias, as the layers pass it
    return x_codes, x_scales, w_codes, w_scales, bias


def _assert_bf16_rounding_equal(y: jax.Array, ref: jax.Array, terms: jax.Array, identical: float = 0.99) -> None:
    """Equal up to the final bf16 rounding: each element within one bf16 ulp of the reference
    plus a few float32 ulps of the terms it sums (`terms` = |x.w scaled| + |bias|: the f32
    epilogue may contract a multiply-add into an FMA, which moves a cancelling sum by that much),
    and at least the fraction `identical` of the elements bit-identical."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    y64, r64 = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(y64))
    tol = np.abs(r64) * 2.0**-7 + np.asarray(terms, np.float64) * 2.0**-20
    bad = np.abs(y64 - r64) > tol
    assert not bad.any(), f"{bad.sum()} elements off, first at {np.argwhere(bad)[0]}: {y64[bad][0]} vs {r64[bad][0]}"
    assert np.mean(y64 == r64) >= identical


def _lora_operands(seed: int, m: int, n: int, k: int, rank: int) -> dict:
    """A LoRA branch's GEMM operands (none for rank 0): h (M, r) and B (N, r) in bf16, their
    product about half the linear's magnitude at any K and rank (so a wrong or missing term
    shows): `_operands`' products sum to ~0.5 sqrt(K) in magnitude, h B^T to sqrt(r) times h's
    scale, which is therefore 0.25 sqrt(K / r)."""
    if not rank:
        return {}
    ks = jax.random.split(jax.random.key(seed + 2000), 2)
    h = jax.random.normal(ks[0], (m, rank), jnp.float32) * (0.25 * np.sqrt(k / rank))
    return {"lora_h": h.astype(jnp.bfloat16),
            "lora_up": jax.random.normal(ks[1], (n, rank), jnp.float32).astype(jnp.bfloat16)}


def _lora_terms(lora: dict) -> jax.Array | float:
    """|h| |B|^T: bounds the LoRA product's partial sums (its bf16 products are exact in float32)."""
    if not lora:
        return 0.0
    h, up = (jnp.abs(lora[name].astype(jnp.float32)) for name in ("lora_h", "lora_up"))
    return h @ up.T


def _assert_lora_shows(ref: jax.Array, base: jax.Array) -> None:
    """The LoRA term moves the output by more than a tenth of its mean magnitude on average."""
    ref64, base64 = np.asarray(ref, np.float64), np.asarray(base, np.float64)
    assert np.mean(np.abs(ref64 - base64)) > 0.1 * np.mean(np.abs(base64))


def _check(m, n, k, *, bias, scale_group=None, config=None, interpret, seed=0, lora_rank=0):
    """The kernel against the reference: exact int32 sums, outputs equal up to the final bf16
    rounding; with `lora_rank`, a LoRA branch's term in the epilogue too."""
    x_codes, x_scales, w_codes, w_scales, b = _operands(seed, m, n, k, scale_group)
    w_packed = pack_int4(w_codes)
    b = b if bias else None
    lora = _lora_operands(seed, m, n, k, lora_rank)
    if scale_group is None:
        acc = w4a4_matmul_int32(x_codes, w_packed, config=config, interpret=interpret)
        np.testing.assert_array_equal(np.asarray(acc), np.asarray(int_matmul_reference(x_codes, w_codes)))
    y = w4a4_matmul(x_codes, x_scales, w_packed, w_scales, b, scale_group=scale_group, config=config,
                    interpret=interpret, **lora)
    ref = w4a4_matmul_reference(x_codes, x_scales, w_packed, w_scales, b, scale_group=scale_group, **lora)
    terms = _term_magnitudes(x_codes, x_scales, w_codes, w_scales, scale_group) + _lora_terms(lora)
    _assert_bf16_rounding_equal(y, ref, terms + (0 if b is None else jnp.abs(b)))
    if lora:
        _assert_lora_shows(ref, w4a4_matmul_reference(x_codes, x_scales, w_packed, w_scales, b, scale_group=scale_group))


def _gated_operands(seed: int, m: int, n: int, images: int):
    """A gate per image and output channel (signed, varied magnitude) and a bf16 residual of the
    output's scale."""
    ks = jax.random.split(jax.random.key(seed + 1000), 2)
    gate = jax.random.normal(ks[0], (images, n), jnp.float32).astype(jnp.bfloat16)
    residual = (jax.random.normal(ks[1], (m, n), jnp.float32) * 4).astype(jnp.bfloat16)
    return gate, residual


def _gated_terms(terms: jax.Array, gate: jax.Array, residual: jax.Array) -> jax.Array:
    """`terms` (the magnitudes summed into each element before the gate) through the gated
    residual: |residual| + |gate row of the element's image| * terms."""
    m, n = terms.shape
    images = gate.shape[0]
    gated = (jnp.abs(gate.astype(jnp.float32))[:, None, :] * terms.reshape(images, m // images, n)).reshape(m, n)
    return jnp.abs(residual.astype(jnp.float32)) + gated


def _check_gated(images: int, tokens: int, n: int, k: int, *, bias: bool, config, interpret: bool, seed: int,
                 scale_group: int | None = None, lora_rank: int = 0):
    """The kernel's gated residual against the reference: equal up to the final bf16 rounding;
    with `lora_rank`, a LoRA branch's term added before the gate."""
    m = images * tokens
    x_codes, x_scales, w_codes, w_scales, b = _operands(seed, m, n, k, scale_group)
    gate, residual = _gated_operands(seed, m, n, images)
    b = b if bias else None
    w_packed = pack_int4(w_codes)
    lora = _lora_operands(seed, m, n, k, lora_rank)
    y = w4a4_matmul(x_codes, x_scales, w_packed, w_scales, b, gate=gate, residual=residual, scale_group=scale_group,
                    config=config, interpret=interpret, **lora)
    ref = w4a4_matmul_reference(x_codes, x_scales, w_packed, w_scales, b, gate=gate, residual=residual,
                                scale_group=scale_group, **lora)
    terms = (_term_magnitudes(x_codes, x_scales, w_codes, w_scales, scale_group) + (0 if b is None else jnp.abs(b))
             + _lora_terms(lora))
    _assert_bf16_rounding_equal(y, ref, _gated_terms(terms, gate, residual))
    if lora:
        _assert_lora_shows(ref, w4a4_matmul_reference(x_codes, x_scales, w_packed, w_scales, b, gate=gate,
                                                      residual=residual, scale_group=scale_group))


def _term_magnitudes(x_codes, x_scales, w_codes, w_scales, scale_group):
    """sum over scale groups of |x||w| * scales: bounds every partial sum the epilogue forms."""
    xa, wa = jnp.abs(x_codes), jnp.abs(w_codes)
    if scale_group is None:
        return int_matmul_reference(xa, wa).astype(jnp.float32) * x_scales[:, None] * w_scales[None, :]
    g = scale_group
    parts = [int_matmul_reference(xa[:, j * g:(j + 1) * g], wa[:, j * g:(j + 1) * g]).astype(jnp.float32)
             * w_scales[None, :, j] for j in range(w_scales.shape[1])]
    return sum(parts) * x_scales[:, None]


def _float64_product(x_codes, x_scales, w_codes, w_scales, bias, scale_group):
    """The op in float64 numpy: exact integer sums, then the scales and bias."""
    x, w = np.asarray(x_codes, np.int64), np.asarray(w_codes, np.int64)
    sw = np.asarray(w_scales, np.float64)
    if scale_group is None:
        y = (x @ w.T) * sw[None, :]
    else:
        g = scale_group
        y = sum((x[:, j * g:(j + 1) * g] @ w[:, j * g:(j + 1) * g].T) * sw[None, :, j] for j in range(sw.shape[1]))
    return y * np.asarray(x_scales, np.float64)[:, None] + np.asarray(bias, np.float64)[None, :]


# --- CPU: the reference and the kernel in interpret mode --------------------------------------

@pytest.mark.parametrize("scale_group", [None, pytest.param(64, marks=pytest.mark.slow)])
@IMPLEMENTATIONS
def test_matches_float64(implementation, scale_group):
    """Within one bf16 rounding of the float64 product (per-channel and per-group scales)."""
    x_codes, x_scales, w_codes, w_scales, b = _operands(3, 37, 256, 256, scale_group)
    y = implementation(x_codes, x_scales, pack_int4(w_codes), w_scales, b, scale_group=scale_group)
    want = jnp.asarray(_float64_product(x_codes, x_scales, w_codes, w_scales, b, scale_group), jnp.bfloat16)
    terms = _term_magnitudes(x_codes, x_scales, w_codes, w_scales, scale_group) + jnp.abs(b)
    _assert_bf16_rounding_equal(y, want, terms, identical=0.9)


@IMPLEMENTATIONS
def test_gated_residual_matches_float64(implementation):
    """residual + gate[m // S] * (x.w + b) within one bf16 rounding of float64: 3 images of 13
    tokens (M = 39, a partial tile per image for the kernel), so a wrong image mapping is off by
    another image's gate."""
    images, tokens, n, k = 3, 13, 256, 256
    x_codes, x_scales, w_codes, w_scales, b = _operands(5, images * tokens, n, k)
    gate, residual = _gated_operands(5, images * tokens, n, images)
    y = implementation(x_codes, x_scales, pack_int4(w_codes), w_scales, b, gate=gate, residual=residual)
    linear = _float64_product(x_codes, x_scales, w_codes, w_scales, b, None).reshape(images, tokens, n)
    want = np.asarray(residual, np.float64) + (np.asarray(gate, np.float64)[:, None, :] * linear).reshape(-1, n)
    terms = _term_magnitudes(x_codes, x_scales, w_codes, w_scales, None) + jnp.abs(b)
    _assert_bf16_rounding_equal(y, jnp.asarray(want, jnp.bfloat16), _gated_terms(terms, gate, residual),
                                identical=0.9)


# --- CPU, interpret mode: the kernel against the reference --------------------------------------

@pytest.mark.parametrize("weight_operand", ["smem", "registers"])
@pytest.mark.parametrize("m", [1, 37, pytest.param(200, marks=pytest.mark.slow)])
def test_interpret_per_channel(m, weight_operand):
    cfg = dataclasses.replace(SMALL, weight_operand=weight_operand)
    _check(m, 256, 384, bias=m != 37, config=cfg, interpret=True, seed=m)


@pytest.mark.parametrize("weight_operand", ["smem", "registers"])
@pytest.mark.parametrize("m,n,split_tail", [(37, 256, True), pytest.param(320, 256, True, marks=pytest.mark.slow),
                                            pytest.param(320, 256, False, marks=pytest.mark.slow)])
def test_interpret_tile_schedule(m, n, split_tail, weight_operand):
    """K = 4 steps of a 2-stage ring on 4 programs: (37, 256) is 2 tiles, each split into 2 K
    pieces on 4 programs; (320, 256) is 10 tiles, 2 rounds of chained pipelines, then 2 tail tiles
    split into K pieces (or run whole); int32 sums exact, outputs equal to bf16 rounding."""
    cfg = dataclasses.replace(SMALL, weight_operand=weight_operand, split_tail=split_tail)
    _check(m, n, 512, bias=True, config=cfg, interpret=True, seed=m + n)


@pytest.mark.parametrize("scale_group", [64, 128])
def test_interpret_per_group(scale_group):
    cfg = W4A4MatmulConfig(tile_m=64, tile_n=64, tile_k=scale_group, max_concurrent_steps=2)
    _check(70, 256, 256, bias=True, scale_group=scale_group, config=cfg, interpret=True, seed=scale_group)


@pytest.mark.parametrize("weight_operand", ["smem", "registers"])
@pytest.mark.parametrize("images,tokens,bias", [(3, 13, True), (2, 64, False)])
def test_interpret_gated_residual(images, tokens, bias, weight_operand):
    """The epilogue's gate and residual: 3 images of 13 tokens (each padded to its own tile) or 2
    of one whole tile each, with and without bias."""
    cfg = dataclasses.replace(SMALL, weight_operand=weight_operand)
    _check_gated(images, tokens, 256, 384, bias=bias, config=cfg, interpret=True, seed=images + tokens)


@pytest.mark.parametrize("weight_operand", ["smem", "registers"])
def test_interpret_gated_residual_split_tail(weight_operand):
    """3 images of 10 tokens x 2 column tiles = 6 tiles on 4 programs: one round, then 2 tail tiles
    split into 2 K pieces, whose gate and residual the XLA finish (`_add_split_tiles`) applies."""
    cfg = dataclasses.replace(SMALL, weight_operand=weight_operand)
    _check_gated(3, 10, 256, 512, bias=True, config=cfg, interpret=True, seed=30)


def test_interpret_gated_residual_several_epilogue_tiles():
    """128 x 128 warpgroup tiles, four 64 x 64 epilogue tiles each: two residual slots, refilled
    during the epilogue; 2 images of 100 tokens."""
    cfg = W4A4MatmulConfig(tile_m=128, tile_n=128, tile_k=128, max_concurrent_steps=2, weight_operand="registers")
    _check_gated(2, 100, 256, 256, bias=True, config=cfg, interpret=True, seed=7)


def test_interpret_gated_residual_per_group():
    """Per-group weight scales (the f32 accumulator path), 2 images of 35 tokens."""
    cfg = W4A4MatmulConfig(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=2)
    _check_gated(2, 35, 256, 256, bias=True, config=cfg, interpret=True, seed=64, scale_group=64)


@pytest.mark.parametrize("weight_operand", [pytest.param("smem", marks=pytest.mark.slow), "registers"])
def test_interpret_lora(weight_operand):
    """A LoRA branch in the epilogue (bf16 h . B^T accumulated onto the dequantized sum), rank 40:
    two chunks of 32, the second loaded in the epilogue, 24 zero rank columns of padding; M = 100
    padded to 2 row tiles; 6 tiles on 4 programs: one round of chained pipelines, then 2 tail
    tiles split into 2 K pieces, whose term the XLA finish (`_add_split_tiles`) adds."""
    cfg = dataclasses.replace(SMALL, weight_operand=weight_operand)
    from pallas_kernels.tile_schedule import tile_schedule
    assert tile_schedule(2 * 3, 512 // cfg.tile_k, 4, cfg.max_concurrent_steps, True).splits == 2
    _check(100, 384, 512, bias=True, config=cfg, interpret=True, seed=40, lora_rank=40)


@pytest.mark.parametrize("weight_operand", [pytest.param("smem", marks=pytest.mark.slow), "registers"])
def test_interpret_lora_gated_residual(weight_operand):
    """The LoRA term before the gate: 3 images of 13 tokens (each padded to its tile, h too), rank 16
    (one chunk, half of it padding)."""
    cfg = dataclasses.replace(SMALL, weight_operand=weight_operand)
    _check_gated(3, 13, 256, 256, bias=True, config=cfg, interpret=True, seed=16, lora_rank=16)


def test_interpret_lora_per_group():
    """Per-group weight scales (the f32 accumulator path) with a rank-24 branch and a gate."""
    cfg = W4A4MatmulConfig(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=2)
    _check_gated(2, 35, 256, 256, bias=False, config=cfg, interpret=True, seed=24, scale_group=64, lora_rank=24)


@pytest.mark.parametrize("weight_operand", ["smem", "registers"])
def test_interpret_lora_scale_zero_is_the_base_output(weight_operand):
    """h = 0 (a zero LoRA scale) adds exact zeros: bit for bit the kernel without a branch."""
    cfg = dataclasses.replace(SMALL, weight_operand=weight_operand)
    x_codes, x_scales, w_codes, w_scales, b = _operands(9, 37, 256, 256)
    args = (x_codes, x_scales, pack_int4(w_codes), w_scales, b)
    up = jnp.ones((256, 32), jnp.bfloat16)
    y = w4a4_matmul(*args, lora_h=jnp.zeros((37, 32), jnp.bfloat16), lora_up=up, config=cfg, interpret=True)
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(w4a4_matmul(*args, config=cfg, interpret=True), np.float32))


# B's nonzero (rows / 64, rank chunks of 32) blocks: a member's own chunk, another's, none, two
# chunks around a zero one; `lora_ranges` gives each CTA tile's 128 rows [first, end) of their
# chunks: [0, 2) and [0, 3).
BLOCKS = {(0, 0), (1, 1), (3, 0), (3, 2)}
BLOCK_RECTS = tuple((rows * 64, (rows + 1) * 64, chunk * 32, (chunk + 1) * 32) for rows, chunk in sorted(BLOCKS))
BLOCK_RANGES = [0, 2, 0, 3]


def _block_diagonal_up(n: int, rank: int) -> jax.Array:
    up = _lora_operands(1, 1, n, 1, rank)["lora_up"]
    mask = np.zeros((n, rank), bool)
    for a, b, c, d in BLOCK_RECTS:
        mask[a:b, c:d] = True
    return jnp.where(jnp.asarray(mask), up, 0)


def test_lora_ranges():
    np.testing.assert_array_equal(lora_ranges(BLOCK_RECTS, 256, 96, 128, 32), BLOCK_RANGES)
    np.testing.assert_array_equal(lora_ranges(None, 256, 96, 128, 32), [0, 3, 0, 3])  # dense: every chunk
    # A block's ranks not on chunk boundaries reach every chunk they touch; rows of no block: [0, 0).
    np.testing.assert_array_equal(lora_ranges(((0, 10, 40, 70),), 256, 96, 128, 32), [1, 3, 0, 0])


@pytest.mark.parametrize("weight_operand", ["smem", "registers"])
def test_interpret_lora_block_diagonal(weight_operand):
    """A B with zero blocks (a fused layer whose members carry their own LoRAs): each CTA tile
    multiplies its rows' chunks only (a range of two, or three around a zero chunk; a warpgroup
    whose rows have none multiplies zeros), equal to the reference's full product up to the final
    rounding."""
    cfg = dataclasses.replace(SMALL, weight_operand=weight_operand)
    m, n, k, rank = 70, 256, 256, 96
    x_codes, x_scales, w_codes, w_scales, b = _operands(96, m, n, k)
    lora = {"lora_h": _lora_operands(96, m, n, k, rank)["lora_h"], "lora_up": _block_diagonal_up(n, rank)}
    args = (x_codes, x_scales, pack_int4(w_codes), w_scales, b)
    y = w4a4_matmul(*args, config=cfg, interpret=True, lora_blocks=BLOCK_RECTS, **lora)
    ref = w4a4_matmul_reference(*args, **lora)
    terms = _term_magnitudes(x_codes, x_scales, w_codes, w_scales, None) + jnp.abs(b) + _lora_terms(lora)
    _assert_bf16_rounding_equal(y, ref, terms)
    _assert_lora_shows(ref[:, :128], w4a4_matmul_reference(*args)[:, :128])


def test_lora_bad_operands_raise():
    x, sx = jnp.zeros((8, 256), jnp.int8), jnp.ones(8)
    w, sw = jnp.zeros((128, 128), jnp.uint8), jnp.ones(128)
    h, up = jnp.zeros((8, 16), jnp.bfloat16), jnp.zeros((128, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="both lora_h and lora_up, got only lora_h"):
        w4a4_matmul(x, sx, w, sw, lora_h=h)
    with pytest.raises(ValueError, match=r"must be \(M, r\) = \(8, r\) and \(N, r\) = \(128, r\)"):
        w4a4_matmul(x, sx, w, sw, lora_h=h[:4], lora_up=up)
    with pytest.raises(ValueError, match="with one rank r"):
        w4a4_matmul(x, sx, w, sw, lora_h=h, lora_up=up[:, :8])
    with pytest.raises(ValueError, match="must be bfloat16"):
        w4a4_matmul(x, sx, w, sw, lora_h=h.astype(jnp.float32), lora_up=up)
    with pytest.raises(ValueError, match=r"LoRA block \(0, 129, 0, 16\) must be .* inside B \(128, 16\)"):
        w4a4_matmul(x, sx, w, sw, lora_h=h, lora_up=up, lora_blocks=((0, 64, 0, 16), (0, 129, 0, 16)))
    with pytest.raises(ValueError, match="lora_blocks given without a LoRA branch"):
        w4a4_matmul(x, sx, w, sw, lora_blocks=((0, 64, 0, 16),))


def test_gated_residual_bad_operands_raise():
    x, sx = jnp.zeros((8, 256), jnp.int8), jnp.ones(8)
    w, sw = jnp.zeros((128, 128), jnp.uint8), jnp.ones(128)
    res, gate = jnp.zeros((8, 128), jnp.bfloat16), jnp.ones((2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="both gate and residual, got only gate"):
        w4a4_matmul(x, sx, w, sw, gate=gate)
    with pytest.raises(ValueError, match=r"gate \(3, 128\) must be \(B, N\)"):
        w4a4_matmul(x, sx, w, sw, gate=jnp.ones((3, 128)), residual=res)
    with pytest.raises(ValueError, match=r"residual \(8, 64\) must be the output.s shape \(8, 128\)"):
        w4a4_matmul(x, sx, w, sw, gate=gate, residual=res[:, :64])
    with pytest.raises(ValueError, match="residual dtype float32 must be the output dtype bfloat16"):
        w4a4_matmul(x, sx, w, sw, gate=gate, residual=res.astype(jnp.float32))


def test_unpack_matches_reference_nibble_order():
    """One k-tile, one weight row with all 16 codes: catches a swapped low/high nibble."""
    w_codes = jnp.tile(jnp.arange(-8, 8, dtype=jnp.int8), 8)[None].repeat(128, 0)
    x_codes = jnp.eye(64, 128, dtype=jnp.int8)
    acc = w4a4_matmul_int32(x_codes, pack_int4(w_codes), config=SMALL, interpret=True)
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(w_codes[:, :64].T, np.int32))


def test_bad_shapes_raise():
    x = jnp.zeros((8, 256), jnp.int8)
    w = jnp.zeros((128, 128), jnp.uint8)
    with pytest.raises(ValueError, match=r"x_codes \(M, K\) \(8, 256\) and w_packed \(N, K/2\) \(128, 64\) do not"):
        w4a4_matmul(x, jnp.ones(8), jnp.zeros((128, 64), jnp.uint8), jnp.ones(128))
    with pytest.raises(ValueError, match="x_scales"):
        w4a4_matmul(x, jnp.ones(9), w, jnp.ones(128))
    with pytest.raises(ValueError, match="w_scales"):
        w4a4_matmul(x, jnp.ones(8), w, jnp.ones((128, 2)))
    with pytest.raises(ValueError, match="multiple of"):
        w4a4_matmul(x, jnp.ones(8), jnp.zeros((96, 128), jnp.uint8), jnp.ones(96), config=SMALL)
    with pytest.raises(ValueError, match="need int8 x_codes and uint8 w_packed, got int32 and uint8"):
        w4a4_matmul(x.astype(jnp.int32), jnp.ones(8), w, jnp.ones(128))


# --- GPU (Hopper), the real kernel at the FLUX shapes ------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("k,n", FLUX_KN)
@pytest.mark.parametrize("m", [1, 37, 512, 4608])
def test_gpu_flux_per_channel(m, k, n):
    _check(m, n, k, bias=m != 512, interpret=False, seed=m + n + k)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_operand", ["smem", "registers"])
@pytest.mark.parametrize("k,n", [(3072, 12288), (15360, 3072)])
@pytest.mark.parametrize("m", [37, 4608])
def test_gpu_both_weight_operands(m, k, n, weight_operand):
    """Both forms at 256 x 128 CTA tiles, many K steps: the registers form's per-step wgmma wait
    (its A operand lives in registers) and its transposing epilogue store."""
    cfg = W4A4MatmulConfig(tile_m=256, tile_n=64, tile_k=128, max_concurrent_steps=4, weight_operand=weight_operand)
    _check(m, n, k, bias=True, config=cfg, interpret=False, seed=m + k)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(3072, 3072), (12288, 3072), (15360, 3072)])
@pytest.mark.parametrize("tokens", [1536, 4608])
@pytest.mark.parametrize("images", [1, 2])
def test_gpu_flux_gated_residual(images, tokens, k, n):
    """FLUX's gated residuals (attention / MLP output projections, single blocks' proj_out) at
    its token counts, 1 and 2 images, with the shipped configs (both forms, split tails)."""
    _check_gated(images, tokens, n, k, bias=True, config=None, interpret=False, seed=images + tokens + k)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_operand", ["smem", "registers"])
def test_gpu_gated_residual_both_weight_operands(weight_operand):
    """Both forms at 256 x 128 CTA tiles (4 epilogue tiles a warpgroup: residual slots refilled),
    3 images of 1000 tokens (partial tiles per image), no bias."""
    cfg = W4A4MatmulConfig(tile_m=256, tile_n=64, tile_k=128, max_concurrent_steps=4, weight_operand=weight_operand)
    _check_gated(3, 1000, 3072, 3072, bias=False, config=cfg, interpret=False, seed=11)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", FLUX_KN)
def test_gpu_flux_per_group(k, n):
    _check(512, n, k, bias=True, scale_group=128, interpret=False, seed=k + n)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [37, 4608])
def test_gpu_per_group_64(m):
    _check(m, 3072, 3072, bias=False, scale_group=64, interpret=False, seed=m)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_operand", ["smem", "registers"])
@pytest.mark.parametrize("k,n", [(3072, 12288), (12288, 3072)])
def test_gpu_lora_both_weight_operands(k, n, weight_operand):
    """A dense rank-96 LoRA (three chunks, two loaded in the epilogue) at 4608 tokens; K = 12288
    takes the split tail."""
    cfg = W4A4MatmulConfig(tile_m=256, tile_n=64, tile_k=128, max_concurrent_steps=4, weight_operand=weight_operand)
    _check(4608, n, k, bias=True, config=cfg, interpret=False, seed=k + n, lora_rank=96)


@pytest.mark.gpu
def test_gpu_lora_gated_residual_block_diagonal():
    """The shipped config at proj_out's shape (K = 15360) with the gated residual and a rank-32
    LoRA, then a block-diagonal rank-96 B at to_qkv's (N = 9216: each warpgroup tile its chunk)."""
    _check_gated(1, 4608, 3072, 15360, bias=True, config=None, interpret=False, seed=15, lora_rank=32)
    m, n, k, rank = 4608, 9216, 3072, 96
    x_codes, x_scales, w_codes, w_scales, b = _operands(9, m, n, k)
    lora = _lora_operands(9, m, n, k, rank)
    member = jnp.arange(n)[:, None] // 3072 == jnp.arange(rank)[None, :] // 32
    lora["lora_up"] = jnp.where(member, lora["lora_up"], 0)
    blocks = tuple((i * 3072, (i + 1) * 3072, i * 32, (i + 1) * 32) for i in range(3))
    args = (x_codes, x_scales, pack_int4(w_codes), w_scales, b)
    ref = w4a4_matmul_reference(*args, **lora)
    terms = _term_magnitudes(x_codes, x_scales, w_codes, w_scales, None) + jnp.abs(b) + _lora_terms(lora)
    _assert_bf16_rounding_equal(w4a4_matmul(*args, lora_blocks=blocks, **lora), ref, terms)


def test_repeated_calls_share_one_traced_kernel():
    """As for rotate_quantize: one traced kernel per shape, however many layers call it."""
    x = jnp.zeros((64, 256), jnp.int8)
    w = jnp.zeros((256, 128), jnp.uint8)
    sx, sw = jnp.ones((64,)), jnp.ones((256,))

    def two_layers(x):
        return (w4a4_matmul(x, sx, w, sw, interpret=True), w4a4_matmul(x + 1, sx, w, sw, interpret=True))

    calls = [e for e in jax.make_jaxpr(two_layers)(x).eqns if e.primitive.name in ("jit", "pjit")]
    assert len(calls) == 2 and calls[0].params["jaxpr"] is calls[1].params["jaxpr"]
