"""The fused LoRA path of the W4A4 layer (`convrot_jax.ops.w4a4_linear(lora=...)` on the Pallas
kernels: h = (u A^T) * s in the `lora_down` kernel (XLA with a LayerNorm prologue or
`down_kernel=False`), h B^T in the GEMM epilogue before the gate) against the unfused
one (`LowRank.fused = False`: the layer, then `LowRankFactors.add_to`): on the CPU through Mosaic
GPU interpret mode (the ops' kernels swapped for their interpret-mode calls), within the bound of
the two paths' roundings; a zero scale or rank gives the base layer bit for bit; the fused path
lowers for CUDA at FLUX's shapes; `gpu`: fused against unfused at FLUX's shapes on the H200."""

import dataclasses
import functools

import flux_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.lora_down
import pallas_kernels.rotate_quantize
import pallas_kernels.tile_schedule
import pallas_kernels.w4a16_matmul
import pallas_kernels.w4a4_matmul
from convrot_jax import ConvDense4bit, GeluTanh, LayerNormModulation, LowRank, attach_lora, ops, set_lora_fusion
from convrot_jax.lora import LowRankFactors
from convrot_jax.prologue import apply_prologue
from convrot_jax.quant import QuantizedWeight
from pallas_kernels.lora_down import LoRADownConfig
from pallas_kernels.lora_down_reference import down_projection_bound
from pallas_kernels.w4a4_matmul_config import W4A4MatmulConfig

U = 2.0**-8  # bf16 unit roundoff
F32_ADD = 2.0**-23  # one float32 add, truncating or not (tensor cores may truncate)
SMALL = W4A4MatmulConfig(tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=2)


def _interpret_kernels(monkeypatch, weight_operand: str) -> None:
    """`convrot_jax.ops`'s Pallas path on the CPU: its kernels in Mosaic GPU interpret mode, the
    GEMM with small tiles in the given weight form."""
    monkeypatch.setattr(ops, "pallas_supported", lambda: True)
    monkeypatch.setattr(ops, "rotate_quantize",
                        functools.partial(pallas_kernels.rotate_quantize.rotate_quantize, interpret=True))
    monkeypatch.setattr(ops, "lora_down", functools.partial(pallas_kernels.lora_down.lora_down, interpret=True))
    monkeypatch.setattr(ops, "w4a4_matmul", functools.partial(
        pallas_kernels.w4a4_matmul.w4a4_matmul, interpret=True,
        config=dataclasses.replace(SMALL, weight_operand=weight_operand)))


def _layer(rng, k: int, n: int) -> ConvDense4bit:
    weight = jnp.asarray(rng.standard_normal((n, k)) / np.sqrt(k), jnp.float32)
    return ConvDense4bit.from_linear(weight, jnp.asarray(rng.standard_normal(n) * 0.1), implementation="pallas")


def _two_loras(rng, k: int, n: int, ranks=(16, 24), scales=(0.8, -1.3)) -> LowRank:
    """Two LoRAs on one layer as one branch, ranks concatenated (as `flux_flax.lora` attaches
    them), bf16 factors, each with its own scale."""
    parts = [flux_fixtures.lora_factors(rng, r, k, n) for r in ranks]
    down = jnp.asarray(np.concatenate([a for a, _ in parts]), jnp.bfloat16)
    up = jnp.asarray(np.concatenate([b for _, b in parts], axis=1), jnp.bfloat16)
    scale = np.concatenate([np.full(r, s, np.float32) for r, s in zip(ranks, scales)])
    return LowRank(down, up, scale)


def _abs64(a) -> np.ndarray:
    return np.abs(np.asarray(a, np.float64))


def assert_fused_matches_unfused(fused, unfused, base, term_bound, rank: int, *, unfused_pre_gate=None, gate=None,
                                 residual=None, h_term_bound=0.0) -> None:
    """fused = bf16(g (b + h B^T) + res), h B^T accumulated onto the layer's float32 value b in
    the epilogue; unfused = bf16(g y_u + res) with y_u = bf16(bf16(b) + fl(h B^T)) (no gate:
    g = 1, res = 0, the outer rounding absent). Elementwise, with base = bf16(b) (|b| <=
    |base| / (1 - u)) and S = |h| |B|^T: the pre-gate values differ by at most
    u |b| (the unfused path's rounding of b) + (r + 1) adds of float32 error on (|b| + S) (the
    epilogue's sum) + r adds on S (XLA's) + the unfused roundings of y_u (u + one add, on
    |y_u| / (1 - u)); the gate multiplies that, its product and the residual's add cost two
    float32 roundings of |res| + |g| |y|, and each output is one bf16 rounding of its value.
    When the fused h is the down-projection kernel's, not XLA's: plus D = |dh| |B|^T
    (`h_term_bound`, dh bounded by `down_projection_bound`), on which the epilogue's r + 1 adds
    also act."""
    c = (U + F32_ADD) / (1 - U)
    b = _abs64(base) / (1 - U)
    pre = ((U + (rank + 1) * F32_ADD) * b + (2 * rank + 1) * F32_ADD * np.asarray(term_bound, np.float64)
           + (1 + (rank + 1) * F32_ADD) * np.asarray(h_term_bound, np.float64))
    outer = c * (_abs64(fused) + _abs64(unfused))
    if gate is None:
        tol = outer + pre
    else:
        g = _abs64(gate)[:, None, :]
        y_u = _abs64(unfused_pre_gate)
        tol = outer + g * (pre + c * y_u) + 2 * F32_ADD * (_abs64(residual) + g * (y_u / (1 - U) + pre))
    err = np.abs(np.asarray(fused, np.float64) - np.asarray(unfused, np.float64))
    bad = err > tol
    assert not bad.any(), f"{bad.sum()} of {bad.size} off, worst {err[bad].max()} against {tol[bad].min()}"


def _assert_term_shows(with_lora, base) -> None:
    """The LoRA term moves the layer's output by more than a tenth of its mean magnitude on average
    (far beyond the bound), so a lost or misplaced term fails."""
    moved = np.asarray(with_lora, np.float64) - np.asarray(base, np.float64)
    assert np.mean(np.abs(moved)) > 0.1 * np.mean(_abs64(base))


def _term_bound(lora: LowRankFactors, produced) -> np.ndarray:
    """S = |h| |B|^T of the unfused path's h (XLA's bf16 down-projection of the layer's input)."""
    h = _abs64(lora.down_projection(produced))
    return h @ _abs64(lora.up).T


def _h_term_bound(lora: LowRankFactors, x, prologue, fast_tanh: bool) -> np.ndarray | float:
    """|dh| |B|^T, dh the fused h's distance from XLA's: `down_projection_bound` where the
    `lora_down` kernel makes it (no prologue, a GELU; `fast_tanh`: its GELU's tanh is
    tanh.approx.f32, as on the GPU), 0 where XLA does (a LayerNorm)."""
    if isinstance(prologue, LayerNormModulation) or not lora.down_kernel:
        return 0.0
    rows = lambda v: v.reshape(-1, v.shape[-1])  # noqa: E731
    kw = {}
    if isinstance(prologue, GeluTanh):
        kw = dict(gelu_from=prologue.start, tail_from=prologue.tail_from,
                  tail=None if prologue.tail is None else rows(prologue.tail))
    dh = down_projection_bound(rows(x), lora.down, lora.scale, fast_tanh=fast_tanh, **kw)
    return (dh @ _abs64(lora.up).T).reshape(*x.shape[:-1], -1)


# --- CPU: interpret mode ------------------------------------------------------------------------

def _check_fused_against_unfused(layer, x, prologue, extra: dict, loras, down_kernel: bool = True,
                                 fast_tanh: bool = False) -> None:
    """`layer` on x without a branch, then with `loras` attached fused (h from the `lora_down`
    kernel where it takes the call, or with `down_kernel` False from XLA) and unfused (with
    `extra`'s gate and residual, if any): fused equals unfused within
    `assert_fused_matches_unfused`'s bound, and the term moves the output well beyond it.
    `fast_tanh`: the kernels run on the GPU, where the GELU's tanh is tanh.approx.f32."""
    base = layer(x, prologue=prologue)  # no LoRA, no gate: bf16(b)
    attach_lora(layer, loras)
    set_lora_fusion(layer, True, down_kernel=down_kernel)
    fused = layer(x, prologue=prologue, **extra)
    set_lora_fusion(layer, False, down_kernel=down_kernel)
    unfused = layer(x, prologue=prologue, **extra)
    pre_gate = layer(x, prologue=prologue) if extra else None
    lora = layer.lora.factors()
    produced = x if prologue is None else apply_prologue(x, prologue)
    assert_fused_matches_unfused(fused, unfused, base, _term_bound(lora, produced), lora.down.shape[0],
                                 unfused_pre_gate=pre_gate, h_term_bound=_h_term_bound(lora, x, prologue, fast_tanh),
                                 **extra)
    _assert_term_shows(pre_gate if extra else unfused, base)


_TAIL = jnp.asarray(np.random.default_rng(3).standard_normal((2, 40, 512)) * 2, jnp.bfloat16)
CASES = {  # name: (prologue, gated); x (2, 40, 512), or (2, 40, 256) before the tail's 256 columns
    "plain": (None, False),
    "gelu_gated": (GeluTanh(256), True),
    "gelu_tail_gated": (GeluTanh(256, _TAIL, 256), True),
    "layernorm": (LayerNormModulation(jnp.asarray(np.random.default_rng(1).normal(0, 0.5, (2, 512)), jnp.bfloat16),
                                      jnp.asarray(np.random.default_rng(2).normal(0, 0.5, (2, 512)), jnp.bfloat16)),
                  False),
}


@pytest.mark.parametrize("case,weight_operand,down_kernel", [
    pytest.param("plain", "registers", True, marks=pytest.mark.slow),
    pytest.param("gelu_gated", "smem", True, marks=pytest.mark.slow),
    pytest.param("gelu_gated", "registers", False, marks=pytest.mark.slow),
    ("gelu_gated", "registers", True), ("gelu_tail_gated", "registers", True), ("layernorm", "smem", True)])
def test_interpret_fused_matches_unfused(monkeypatch, case, weight_operand, down_kernel):
    """Two LoRAs (ranks 16 and 24: two rank chunks in the epilogue) on a W4A4 layer of 2 images
    of 40 tokens (K = 512, N = 128): fused equals unfused within `assert_fused_matches_unfused`'s
    bound, with a producer prologue (tanh-GELU from column 256, also as [x, GELU(tail)] read from
    two arrays, or the modulated LayerNorm) and FLUX's gated residual, h from the `lora_down`
    kernel or XLA; the term moves the output well beyond that bound."""
    _interpret_kernels(monkeypatch, weight_operand)
    prologue, gated = CASES[case]
    rng = np.random.default_rng(len(case))
    k, n = 512, 128
    layer = _layer(rng, k, n)
    own = prologue.start if isinstance(prologue, GeluTanh) and prologue.tail is not None else k
    x = jnp.asarray(rng.standard_normal((2, 40, own)) * 2, jnp.bfloat16)
    extra = {}
    if gated:
        extra = dict(gate=jnp.asarray(rng.standard_normal((2, n)), jnp.bfloat16),
                     residual=jnp.asarray(rng.standard_normal((2, 40, n)) * 4, jnp.bfloat16))
    _check_fused_against_unfused(layer, x, prologue, extra, _two_loras(rng, k, n), down_kernel)


def test_interpret_zero_scale_and_zero_rank_are_the_base_layer(monkeypatch):
    """A zero scale (h = 0: the epilogue adds exact zeros) and a rank-0 branch (no term) give the
    fused layer's output without a branch bit for bit, with the GELU prologue and the gate."""
    _interpret_kernels(monkeypatch, "registers")
    rng = np.random.default_rng(3)
    k, n = 512, 128
    layer = _layer(rng, k, n)
    x = jnp.asarray(rng.standard_normal((2, 40, k)), jnp.bfloat16)
    extra = dict(prologue=GeluTanh(256), gate=jnp.asarray(rng.standard_normal((2, n)), jnp.bfloat16),
                 residual=jnp.asarray(rng.standard_normal((2, 40, n)), jnp.bfloat16))
    base = np.asarray(layer(x, **extra), np.float32)
    branch = _two_loras(rng, k, n, scales=(0.0, 0.0))
    attach_lora(layer, branch)
    np.testing.assert_array_equal(np.asarray(layer(x, **extra), np.float32), base)
    attach_lora(layer, LowRank(jnp.zeros((0, k), jnp.bfloat16), jnp.zeros((n, 0), jnp.bfloat16), np.zeros(0)))
    np.testing.assert_array_equal(np.asarray(layer(x, **extra), np.float32), base)


def test_fusion_switch_is_static_and_reaches_every_branch():
    """`set_lora_fusion` sets every branch of a model; the setting is part of the graph (a jitted
    step compiles again), the factors stay inputs."""
    from flax import nnx

    rng = np.random.default_rng(4)
    model = nnx.List([_layer(rng, 256, 128), _layer(rng, 256, 128)])
    for layer in model:
        attach_lora(layer, _two_loras(rng, 256, 128))
    before = nnx.split(model)[0]
    set_lora_fusion(model, False)
    assert [layer.lora.factors().fused for layer in model] == [False, False]
    assert nnx.split(model)[0] != before
    set_lora_fusion(model, True)
    assert nnx.split(model)[0] == before


# --- CPU: the GPU code path lowers for CUDA -----------------------------------------------------

@pytest.fixture
def cuda_lowering(monkeypatch):
    """The Pallas path traced for CUDA on this machine: an H200's 132 SMs, `pallas_supported`."""
    monkeypatch.setattr(ops, "pallas_supported", lambda: True)
    for module in (pallas_kernels.tile_schedule, pallas_kernels.w4a4_matmul, pallas_kernels.rotate_quantize,
                   pallas_kernels.lora_down, pallas_kernels.w4a16_matmul):
        monkeypatch.setattr(module, "sm_count", lambda interpret: 4 if interpret else 132)


@pytest.mark.parametrize("m,k,n,rank,site", [
    (4608, 3072, 3072, 32, "plain"), (4608, 3072, 12288, 32, "plain"), (4608, 3072, 3072, 96, "plain"),
    (4608, 3072, 12288, 96, "plain"), (4608, 12288, 3072, 32, "gelu_gated"), (4608, 3072, 12288, 32, "layernorm"),
    (512, 3072, 3072, 32, "gated"), (4608, 3072, 3072, 32, "per_group")])
def test_fused_path_lowers_for_cuda(cuda_lowering, m, k, n, rank, site):
    """The fused path (rotate-quantize kernel, the down-projection kernel (XLA's GEMM after a
    LayerNorm), the GEMM with the term in its epilogue) lowers through Mosaic GPU at FLUX's
    shapes: the registers form (M = 4608; ranks
    32 and 96: one and three chunks), its split tail (K = 12288), the smem form (M = 512), the
    GELU prologue with the gated residual (ff.net.2), the modulated LayerNorm (ff.net.0), per-group
    weight scales."""
    s = jax.ShapeDtypeStruct
    scale_group = 64 if site == "per_group" else None
    operands = [s((1, m, k), jnp.bfloat16), s((n, k // 2), jnp.uint8),
                s((n,) if scale_group is None else (n, k // scale_group), jnp.float32),
                s((rank, k), jnp.bfloat16), s((n, rank), jnp.bfloat16), s((rank,), jnp.float32)]
    if site in ("gelu_gated", "gated"):
        operands += [s((1, n), jnp.bfloat16), s((1, m, n), jnp.bfloat16)]
    if site == "layernorm":
        operands += [s((1, k), jnp.bfloat16), s((1, k), jnp.bfloat16)]

    def layer(x, packed, scales, down, up, scale, *extra):
        qw = QuantizedWeight(packed, scales, 256, "regular", scale_group)
        kw = {}
        if site in ("gelu_gated", "gated"):
            kw = dict(gate=extra[0], residual=extra[1])
        if site == "gelu_gated":
            kw["prologue"] = GeluTanh(0)
        if site == "layernorm":
            kw["prologue"] = LayerNormModulation(*extra)
        return ops.w4a4_linear(x, qw, lora=LowRankFactors(down, up, scale), implementation="pallas", **kw)

    text = jax.jit(layer).trace(*operands).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == (2 if site == "layernorm" else 3)  # each kernel once


@pytest.mark.parametrize("down_kernel", [True, False], ids=["kernel", "xla"])
def test_proj_out_input_is_never_made_outside_the_kernels(cuda_lowering, down_kernel):
    """FLUX's proj_out (M = 4608) with a rank-32 branch, traced for CUDA: the layer's input
    [attention (3072), GELU(the fused projection's MLP columns 9216..21504)] (K = 15360) exists in
    no XLA op (neither the concatenation nor the GELU'd columns) when the down-projection is the
    kernel, and does with XLA's (`down_kernel=False`, what the check is checked on)."""
    s = jax.ShapeDtypeStruct
    m, k, n, rank = 4608, 15360, 3072, 32
    operands = [s((1, m, 3072), jnp.bfloat16), s((1, m, 21504), jnp.bfloat16), s((n, k // 2), jnp.uint8),
                s((n,), jnp.float32), s((rank, k), jnp.bfloat16), s((n, rank), jnp.bfloat16), s((rank,), jnp.float32)]

    def layer(x, tail, packed, scales, down, up, scale):
        qw = QuantizedWeight(packed, scales, 256, "regular", None)
        lora = LowRankFactors(down, up, scale, down_kernel=down_kernel)
        return ops.w4a4_linear(x, qw, prologue=GeluTanh(3072, tail, 9216), lora=lora, implementation="pallas")

    text = jax.jit(layer).trace(*operands).lower(lowering_platforms=("cuda",)).as_text()
    made = [f"{m}x{width}x{dtype}>" for width in (k, 12288) for dtype in ("bf16", "f32")]  # not the int8 codes
    assert any(t in text for t in made) != down_kernel


# --- GPU: fused against unfused at FLUX's shapes --------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("k,n,rank,case", [(3072, 3072, 32, "plain"), (3072, 12288, 32, "plain"),
                                           (3072, 3072, 96, "plain"), (3072, 12288, 96, "plain"),
                                           (12288, 3072, 32, "gelu_gated"), (15360, 3072, 32, "gated")])
def test_gpu_fused_matches_unfused(k, n, rank, case):
    """On the H200 at 4608 tokens: the fused Pallas layer against the unfused one (same kernels,
    the term in XLA after them) within `assert_fused_matches_unfused`'s bound; two LoRAs
    (ranks rank / 4 and 3 rank / 4, concatenated)."""
    rng = np.random.default_rng(rank + n)
    m = 4608
    layer = _layer(rng, k, n)
    x = jnp.asarray(rng.standard_normal((1, m, k)), jnp.bfloat16)
    prologue = GeluTanh(0) if case == "gelu_gated" else None
    extra = {}
    if case != "plain":
        extra = dict(gate=jnp.asarray(rng.standard_normal((1, n)), jnp.bfloat16),
                     residual=jnp.asarray(rng.standard_normal((1, m, n)) * 4, jnp.bfloat16))
    _check_fused_against_unfused(layer, x, prologue, extra, _two_loras(rng, k, n, ranks=(rank // 4, 3 * rank // 4)),
                                 fast_tanh=LoRADownConfig().fast_tanh)


@pytest.mark.parametrize("kinds", [("gelu",), ("layernorm", "gelu")], ids=["gelu", "layernorm_gelu"])
def test_model_sends_each_down_projection_to_its_path(cuda_lowering, monkeypatch, kinds):
    """The small FLUX model (W4A4 Pallas, fused projections, producers `kinds` fused) with a LoRA
    on every W4A4 layer, traced for the GPU: each layer's down-projection goes to the `lora_down`
    kernel with its producer's GELU (ff.net.2 / ff_context.net.2: from column 0; proj_out: the
    attention output, then the fused projection's MLP columns as the GELU's tail), or to XLA
    after a fused LayerNorm (whose layers then make no kernel call); `down_kernel=False` sends
    them all to XLA."""
    from flax import nnx

    from flux_flax import FluxConfig, fuse_producers, fuse_projections
    from flux_flax.random_weights import random_transformer

    config = FluxConfig.small()
    d, mlp = config.inner_dim, 4 * config.inner_dim
    model = fuse_producers(fuse_projections(random_transformer(config, dtype=jnp.bfloat16, quantize="pallas")), kinds)
    rng = np.random.default_rng(9)
    layers = [layer for _, layer in nnx.iter_graph(model) if isinstance(layer, ConvDense4bit)]
    for layer in layers:
        attach_lora(layer, _two_loras(rng, layer.in_features, layer.out_features, ranks=(8, 8)))
    calls = []

    def recorder(x, down, scale, *, gelu_from, tail, tail_from):
        calls.append((x.shape[-1], down.shape[1], gelu_from, None if tail is None else tail.shape[-1], tail_from))
        return jnp.zeros((x.shape[0], down.shape[0]), jnp.bfloat16)

    monkeypatch.setattr(ops, "lora_down", recorder)
    inputs = {k: jnp.asarray(v, jnp.bfloat16) for k, v in flux_fixtures.flux_inputs(config).items()}

    def trace():
        calls.clear()
        graphdef, state = nnx.split(model)
        jax.jit(lambda s, kw: nnx.merge(graphdef, s)(**kw)).trace(state, inputs)
        return sorted(calls, key=str)

    per_double = [(d, d, None, None, 0)] * 2  # to_out, to_add_out
    per_double += [(mlp, mlp, 0, None, 0)] * 2  # ff.net.2, ff_context.net.2: GELU of the whole row
    if "layernorm" not in kinds:  # to_qkv, to_added_qkv, ff.net.0, ff_context.net.0 read the modulated norm
        per_double += [(d, d, None, None, 0)] * 4
    per_single = [(d, d + mlp, d, 3 * d + mlp, 3 * d)]  # proj_out: [attention, GELU(to_qkv_mlp[:, 3d:])]
    if "layernorm" not in kinds:
        per_single += [(d, d, None, None, 0)]  # to_qkv_mlp
    expected = per_double * config.num_layers + per_single * config.num_single_layers
    assert trace() == sorted(expected, key=str)
    set_lora_fusion(model, True, down_kernel=False)
    assert trace() == []
