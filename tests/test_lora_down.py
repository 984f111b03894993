"""The LoRA down-projection kernel (`pallas_kernels.lora_down`) against its XLA reference
(`down_projection_reference`) within `down_projection_bound`: on the CPU in Mosaic GPU interpret
mode (no prologue, a GELU on part or all of the row, a GELU tail read from a second array, ragged
M, ranks 16 and 96, several K ranges); its CUDA lowering at FLUX's shapes; `gpu`: the same checks
at FLUX's shapes on the H200."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.lora_down
from pallas_kernels.lora_down import LoRADownConfig, lora_down
from pallas_kernels.lora_down_reference import down_projection_bound, down_projection_reference


def _operands(rng, m: int, k: int, rank: int, tail_k: int = 0):
    """x (M, k - tail's part) or (M, 256) with a tail (M, tail_k); A (rank, K) of a LoRA's scale;
    per-rank scales of both signs."""
    own = k if not tail_k else 256
    x = jnp.asarray(rng.standard_normal((m, own)) * 2, jnp.bfloat16)
    tail = jnp.asarray(rng.standard_normal((m, tail_k)) * 2, jnp.bfloat16) if tail_k else None
    down = jnp.asarray(rng.standard_normal((rank, k)) / np.sqrt(k), jnp.bfloat16)
    scale = jnp.asarray(rng.uniform(-2, 2, rank), jnp.float32)
    return x, tail, down, scale


def _check(h, x, down, scale, **prologue) -> None:
    ref = down_projection_reference(x, down, scale, **prologue)
    bound = down_projection_bound(x, down, scale, **prologue)
    err = np.abs(np.asarray(h, np.float64) - np.asarray(ref, np.float64))
    bad = err > bound
    assert not bad.any(), f"{bad.sum()} of {bad.size} off, worst {err[bad].max()} against {bound[bad].min()}"
    # the bound is far below the values: a lost GELU or a misplaced A tile would not fit in it
    assert np.mean(bound) < 0.2 * np.mean(np.abs(np.asarray(ref, np.float64)))


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


# --- GPU ----------------------------------------------------------------------------------------

# Failed on the H200 (2026-12-01, merged main; the failure reports were not captured): the
# kernel stays opt-in (`LowRank.down_kernel`) until they pass. Strict: a pass is reported.
_GELU_FAILS_ON_GPU = pytest.mark.xfail(strict=True, reason="GELU forms fail the bound on the H200 (notes/lora.md v2)")


@pytest.mark.gpu
@pytest.mark.parametrize("k,rank,site", [
    (3072, 32, "plain"), (3072, 96, "plain"), (3072, 128, "plain"),
    *(pytest.param(*case, marks=_GELU_FAILS_ON_GPU) for case in [
        (12288, 32, "gelu"), (12288, 32, "gelu_smem"), (15360, 32, "gelu_part"), (15360, 32, "tail"),
        (15360, 96, "tail")]),
])
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
    _check(lora_down(x, down, scale, config=config, **prologue), x, down, scale, **prologue)
