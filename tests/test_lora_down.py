"""The LoRA down-projection kernel (`pallas_kernels.lora_down`) against its XLA reference
(`down_projection_reference`) within `down_projection_bound`: on the CPU in Mosaic GPU interpret
mode (no prologue, a GELU on part or all of the row, a GELU tail read from a second array, ragged
M, ranks 16 and 96, several K ranges); the bound itself through the reference alone (its GELU
delta against float32 evaluations, a wrong GELU or a misplaced A tile beyond it, the GELU's small
part of it at ff.net.2's K); its CUDA lowering at FLUX's shapes; `gpu`: the same checks at FLUX's
shapes on the H200."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.lora_down
from pallas_kernels.lora_down import LoRADownConfig, lora_down
from pallas_kernels.lora_down_reference import (down_projection_bound, down_projection_reference, gelu_delta,
                                                gelu_spread, produced_input)
from pallas_kernels.rotate_quantize import FAST_TANH_ERROR, gelu_tanh


def _operands(rng, m: int, k: int, rank: int, tail_k: int = 0):
    """x (M, k - tail's part) or (M, 256) with a tail (M, tail_k); A (rank, K) of a LoRA's scale;
    per-rank scales of both signs."""
    own = k if not tail_k else 256
    x = jnp.asarray(rng.standard_normal((m, own)) * 2, jnp.bfloat16)
    tail = jnp.asarray(rng.standard_normal((m, tail_k)) * 2, jnp.bfloat16) if tail_k else None
    down = jnp.asarray(rng.standard_normal((rank, k)) / np.sqrt(k), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(-2, 2, rank), jnp.float32)
    return x, tail, down, scale


def _check(h, x, down, scale, fast_tanh: bool = False, **prologue) -> None:
    """h within the bound (`fast_tanh`: the kernel's GELU used tanh.approx.f32, as on the GPU by
    default; interpret mode runs jnp.tanh)."""
    ref = down_projection_reference(x, down, scale, **prologue)
    bound = down_projection_bound(x, down, scale, fast_tanh=fast_tanh, **prologue)
    err = np.abs(np.asarray(h, np.float64) - np.asarray(ref, np.float64))
    bad = err > bound
    assert not bad.any(), f"{bad.sum()} of {bad.size} off, worst {err[bad].max()} against {bound[bad].min()}"
    # the bound tells a faulty kernel from a right one. Without a GELU: it is far below the values,
    # so a misplaced A tile would not fit in it. With one: a kernel that lost the GELU would fall
    # outside it almost everywhere (at K >= 12288 the float32 sums' worst case alone is ~0.2-0.3
    # of |h|, too loose for the first form)
    if prologue.get("gelu_from") is None:
        mean_ref = np.mean(np.abs(np.asarray(ref, np.float64)))
        assert np.mean(bound) < 0.2 * mean_ref, f"mean bound {np.mean(bound)} against mean |ref| {mean_ref}"
    else:
        plain = {key: value for key, value in prologue.items() if key != "gelu_from"}
        lost = np.asarray(down_projection_reference(x, down, scale, **plain), np.float64)
        outside = np.mean(np.abs(lost - np.asarray(ref, np.float64)) > bound)
        assert outside > 0.5, f"a lost GELU stays inside the bound for {1 - outside:.0%} of h"


CASES = {  # name: (M, K, rank, prologue keywords, tail width)
    "plain_r16": (128, 512, 16, {}, 0),
    "plain_ragged_r96": (100, 512, 96, {}, 0),
    "gelu_part_r16": (100, 512, 16, {"gelu_from": 256}, 0),
    "gelu_all_r96": (64, 512, 96, {"gelu_from": 0}, 0),
    "gelu_tail_r96": (100, 768, 96, {"gelu_from": 256, "tail_from": 256}, 768),
}


@pytest.mark.parametrize("case", list(CASES))
def test_interpret_matches_reference(case):
    """The kernel in interpret mode (4 SMs: the K range split in 2 or 4) against the reference
    within `down_projection_bound`."""
    m, k, rank, prologue, tail_k = CASES[case]
    rng = np.random.default_rng(len(case))
    x, tail, down, scale = _operands(rng, m, k, rank, tail_k)
    if tail is not None:
        prologue = dict(prologue, tail=tail)
    h = lora_down(x, down, scale, interpret=True, **prologue)
    assert h.shape == (m, rank) and h.dtype == jnp.bfloat16
    _check(h, x, down, scale, **prologue)


def test_interpret_without_k_split_is_the_same_product():
    """One K range per row tile (no partial sums) gives the same h within the bound, and a
    rank that is not a multiple of 8 (A padded with zero rows) works."""
    rng = np.random.default_rng(7)
    x, _, down, scale = _operands(rng, 64, 256, 12)
    h = lora_down(x, down, scale, gelu_from=0, interpret=True, config=LoRADownConfig(ctas_per_sm=None))
    _check(h, x, down, scale, gelu_from=0)


def test_interpret_wider_k_tiles_and_deeper_ring():
    """Other configs of the kernel (benchmarks/bench_lora_down.py's variants): 128-column K tiles
    on the GELU tail form, and an 8-deep ring aiming at 1 CTA per SM, give h within the bound."""
    rng = np.random.default_rng(11)
    m, k, rank, prologue, tail_k = CASES["gelu_tail_r96"]
    x, tail, down, scale = _operands(rng, m, k, rank, tail_k)
    prologue = dict(prologue, tail=tail)
    for config in (LoRADownConfig(tile_k=128), LoRADownConfig(max_concurrent_steps=8, ctas_per_sm=1)):
        _check(lora_down(x, down, scale, interpret=True, config=config, **prologue), x, down, scale, **prologue)


def test_refuses_what_it_cannot_take():
    """Errors name the operand: a rank over 256, columns not multiples of tile_k, float32 x, an
    unknown place for the GELU'd tile."""
    rng = np.random.default_rng(8)
    x, _, down, scale = _operands(rng, 64, 256, 16)
    with pytest.raises(ValueError, match="rank"):
        lora_down(x, jnp.zeros((264, 256), jnp.bfloat16), jnp.zeros(264), interpret=True)
    with pytest.raises(ValueError, match="multiples of tile_k"):
        lora_down(x, down, scale, gelu_from=32, interpret=True)
    with pytest.raises(ValueError, match="bfloat16"):
        lora_down(x.astype(jnp.float32), down, scale, interpret=True)
    with pytest.raises(ValueError, match=r"down \(16, 256\)"):
        lora_down(x[:, :128], down, scale, interpret=True)
    with pytest.raises(ValueError, match="gelu_operand must be 'registers' or 'smem', got 'tmem'"):
        LoRADownConfig(gelu_operand="tmem")


# --- CPU: the bound, through the reference alone -------------------------------------------------

def test_gelu_delta_covers_float32_evaluations():
    """Every bf16 value in [-16, 16] (subnormals included): XLA's jax.nn.gelu, `gelu_tanh` and
    the formula in numpy float32 (libm's tanh) all lie within `gelu_delta` of each other; with a
    tanh off by FAST_TANH_ERROR / 2 either way (tanh.approx.f32's stated error), within
    `gelu_delta(..., FAST_TANH_ERROR)` of XLA's."""
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(jnp.bfloat16).astype(np.float32)
    v = bits[np.isfinite(bits) & (np.abs(bits) <= 16)]
    c, a = np.float32(np.sqrt(2 / np.pi)), np.float32(0.044715)
    xla = jax.jit(lambda t: jax.nn.gelu(t, approximate=True))
    evaluations = [np.asarray(xla(v)), np.asarray(jax.jit(gelu_tanh)(v)),
                   v * (np.float32(0.5) * (np.float32(1) + np.tanh(c * (v + a * (v * v * v)))))]
    g = evaluations[0]
    delta = gelu_delta(v, g)
    tanh = np.tanh(c * (v + a * (v * v * v)))
    approx = [v * (np.float32(0.5) * (np.float32(1) + np.clip(tanh + np.float32(sign * FAST_TANH_ERROR / 2), -1, 1)))
              for sign in (-1, 1)]
    for others, delta in [(evaluations[1:], delta), (approx, gelu_delta(v, g, FAST_TANH_ERROR))]:
        for other in others:
            err = np.abs(other.astype(np.float64) - g.astype(np.float64))
            assert (err <= delta).all(), f"v = {v[err > delta]}: {err[err > delta]} against {delta[err > delta]}"


def test_gelu_spread():
    """Zero unless a bf16 rounding boundary lies within delta; across one, a bf16 unit (below 1
    it is half the unit above); where delta spans many units, all of them."""
    f32 = lambda *values: np.asarray(values, np.float32)  # noqa: E731
    delta = np.asarray([2**-20, 2**-10, 2**-9 + 2**-12, 2**-8 + 2**-12, 2**-16])
    spread = gelu_spread(f32(1 + 2**-8, 1, 1, 1, 3 * 2**-20), delta)
    np.testing.assert_array_equal(spread, [2**-7, 0, 2**-8, 2**-8 + 2**-7, 2**-15])


def test_bound_catches_a_wrong_gelu():
    """At a moderate shape the bound is about a hundredth of h: the GELU starting one column
    tile late, or two A tiles swapped, moves nearly every h beyond it (the kernel's faults that
    the interpret tests' bound must not let through)."""
    rng = np.random.default_rng(3)
    x, _, down, scale = _operands(rng, 64, 512, 16)
    ref = np.asarray(down_projection_reference(x, down, scale, gelu_from=256), np.float64)
    bound = down_projection_bound(x, down, scale, gelu_from=256)
    swapped = jnp.concatenate([down[:, 64:128], down[:, :64], down[:, 128:]], axis=1)
    for wrong in [down_projection_reference(x, down, scale, gelu_from=320),
                  down_projection_reference(x, swapped, scale, gelu_from=256)]:
        assert np.mean(np.abs(np.asarray(wrong, np.float64) - ref) > bound) > 0.9


def test_gelu_costs_little_of_the_bound_at_ff_net_2():
    """At ff.net.2's K = 12288 the GELU's last bits add under a tenth to the bound of the same
    bf16 input taken as it is (the float32 sums' K adds and the roundings): only elements within
    delta of a bf16 rounding boundary are charged (a bf16 unit on every element, the rule before,
    made it 3.6 times as large)."""
    rng = np.random.default_rng(12288 + 32)
    x, _, down, scale = _operands(rng, 64, 12288, 32)
    produced = produced_input(x, 0).astype(jnp.bfloat16)
    with_gelu = down_projection_bound(x, down, scale, gelu_from=0)
    as_input = down_projection_bound(produced, down, scale)
    assert np.mean(with_gelu) < 1.1 * np.mean(as_input)


# --- CPU: the GPU code path lowers for CUDA -----------------------------------------------------

@pytest.mark.parametrize("m,k,rank,site", [
    (4608, 3072, 32, "plain"), (4608, 3072, 96, "plain"), (4608, 3072, 128, "plain"), (1536, 3072, 16, "plain"),
    (4608, 12288, 32, "gelu"), (4608, 15360, 32, "tail"), (4608, 15360, 96, "tail"), (4608, 3072, 256, "plain"),
    (4608, 15360, 32, "gelu_part"), (4608, 12288, 32, "gelu_smem")])
def test_lowers_for_cuda(monkeypatch, m, k, rank, site):
    """At FLUX's shapes (H200: 132 SMs): the attention and MLP projections' inputs (K = 3072;
    ranks 32, the fused q/k/v stack 96, q/k/v/MLP 128, the most 256), ff.net.2's GELU (K = 12288),
    proj_out's [attention, GELU(the fused projection's MLP columns 9216..21504)] (K = 15360), and
    a GELU from column 3072 of one array (the per-step select), the GELU'd tile through shared
    memory (`gelu_operand="smem"`)."""
    monkeypatch.setattr(pallas_kernels.lora_down, "sm_count", lambda interpret: 4 if interpret else 132)
    s = jax.ShapeDtypeStruct
    a = [s((rank, k), jnp.bfloat16), s((rank,), jnp.float32)]
    if site == "tail":
        f = lambda x, tail, down, scale: lora_down(x, down, scale, gelu_from=3072, tail=tail, tail_from=9216)
        operands = [s((m, 3072), jnp.bfloat16), s((m, 21504), jnp.bfloat16), *a]
    else:
        gelu_from = {"gelu": 0, "gelu_smem": 0, "gelu_part": 3072}.get(site)
        config = LoRADownConfig(gelu_operand="smem" if site == "gelu_smem" else "registers")
        f = lambda x, down, scale: lora_down(x, down, scale, gelu_from=gelu_from, config=config)
        operands = [s((m, k), jnp.bfloat16), *a]
    text = jax.jit(f).trace(*operands).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert ("tanh.approx.f32" in text) == (site != "plain")  # the GELU's tanh: the fast one by default


# --- GPU ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("k,rank,site", [
    (3072, 32, "plain"), (3072, 96, "plain"), (3072, 128, "plain"), (12288, 32, "gelu"), (12288, 32, "gelu_smem"),
    (15360, 32, "gelu_part"), (15360, 32, "tail"), (15360, 96, "tail")])
def test_gpu_matches_reference(k, rank, site):
    """On the H200 at 4608 tokens, the FLUX sites of `test_lowers_for_cuda`, within the bound (the
    GELU'd tile as wgmma's register operand, or through shared memory)."""
    rng = np.random.default_rng(k + rank)
    m = 4608
    if site == "tail":
        x, tail, down, scale = _operands(rng, m, k, rank, 21504)
        x = jnp.asarray(rng.standard_normal((m, 3072)) * 2, jnp.bfloat16)
        prologue = dict(gelu_from=3072, tail=tail, tail_from=9216)
    else:
        x, _, down, scale = _operands(rng, m, k, rank)
        prologue = {"gelu": dict(gelu_from=0), "gelu_smem": dict(gelu_from=0), "gelu_part": dict(gelu_from=3072)}
        prologue = prologue.get(site, {})
    config = LoRADownConfig(gelu_operand="smem" if site == "gelu_smem" else "registers")
    assert config.fast_tanh
    _check(lora_down(x, down, scale, config=config, **prologue), x, down, scale, fast_tanh=True, **prologue)
