"""LoRA on the FLUX transformer (flux_flax.lora, convrot_jax.lora): files in diffusers / PEFT and
kohya naming give diffusers' `load_lora_weights` result on the same model (float32, fused and
unfused), two LoRAs of different ranks and scales at once; the kohya key map equals diffusers'
converter at FLUX.1-dev's real widths; W4A4 and W4A16 layers add the float low-rank term to their
own output; a zero scale is the base model and unloading restores it bit for bit; switching LoRAs
of the same ranks does not recompile; files that do not fit are refused naming the key."""

import flux_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from convrot_jax import ConvDense4bit, Dense4bitWeightOnly, LoRAParam, LowRank, attach_lora, detach_lora
from convrot_jax.linear import int4_weight_only_linear, w4a4_linear_reference
from flux_flax import FluxConfig, fuse_projections, load_transformer, quantize_model
from flux_flax.lora import LoRAError, apply_loras, read_lora, remove_loras

CONFIG = FluxConfig.tiny()
TOKENS = 3 * 5 + 7  # image + text tokens of flux_fixtures.flux_inputs' defaults
EPS = flux_fixtures.F32_EPS

# Layers of the tiny model a diffusers-named LoRA touches: every kind (attention, fused members
# with some members left out, MLPs, modulation, embedders, output), two LoRAs overlapping on some.
DIFFUSERS_A = (
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
    "transformer_blocks.0.ff_context.net.2", "transformer_blocks.0.norm1.linear",
    "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_v",
    "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out",
    "single_transformer_blocks.0.norm.linear", "x_embedder", "context_embedder",
    "time_text_embed.timestep_embedder.linear_1", "norm_out.linear", "proj_out",
)
DIFFUSERS_B = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
               "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.attn.to_k", "x_embedder")
# kohya modules (bfl names, underscored) with (in, out) of the tiny model (hidden 32, MLP 128).
D, MLP = CONFIG.inner_dim, 4 * CONFIG.inner_dim
KOHYA = {
    "double_blocks_0_img_attn_qkv": (D, 3 * D), "double_blocks_0_txt_attn_qkv": (D, 3 * D),
    "double_blocks_0_img_attn_proj": (D, D), "double_blocks_0_txt_attn_proj": (D, D),
    "double_blocks_0_img_mlp_0": (D, MLP), "double_blocks_0_txt_mlp_2": (MLP, D),
    "double_blocks_0_img_mod_lin": (D, 6 * D), "double_blocks_0_txt_mod_lin": (D, 6 * D),
    "single_blocks_0_linear2": (D + MLP, D), "single_blocks_0_modulation_lin": (D, 3 * D),
    "img_in": (CONFIG.in_channels, D), "txt_in": (CONFIG.joint_attention_dim, D),
    "time_in_in_layer": (256, D), "guidance_in_out_layer": (D, D), "vector_in_in_layer": (CONFIG.pooled_projection_dim, D),
    "final_layer_linear": (D, CONFIG.in_channels), "final_layer_adaLN_modulation_1": (D, 2 * D),
}
LINEAR1 = "single_blocks_0_linear1"  # (D, 3D + MLP): diffusers' converter splits it at FLUX.1-dev's widths only


def kohya_tensors(rng, name: str, k: int, n: int, rank: int, *, alpha: float | None = None, sparse_parts: int = 0):
    """A kohya module's tensors; `sparse_parts`: B block-diagonal over that many equal row parts
    (as sd-scripts' split-qkv training writes it; diffusers' converter has a branch for it)."""
    a, b = flux_fixtures.lora_factors(rng, rank, k, n)
    if sparse_parts:
        mask = np.zeros_like(b)
        r, rows = rank // sparse_parts, n // sparse_parts
        for j in range(sparse_parts):
            mask[j * rows:(j + 1) * rows, j * r:(j + 1) * r] = 1
        b = b * mask
    out = {f"lora_unet_{name}.lora_down.weight": a, f"lora_unet_{name}.lora_up.weight": b}
    if alpha is not None:
        out[f"lora_unet_{name}.alpha"] = np.array(alpha, np.float32)
    return out


def diffusers_pipeline(torch_model):
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=torch_model)


def run(model, inputs) -> np.ndarray:
    return np.asarray(model(**{k: jnp.asarray(v) for k, v in inputs.items()}), np.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(diffusers dir, inputs, the torch model's linear shapes)."""
    torch_model = flux_fixtures.diffusers_transformer(CONFIG, seed=1)
    directory = flux_fixtures.save_diffusers(torch_model, tmp_path_factory.mktemp("lora") / "transformer")
    return directory, flux_fixtures.flux_inputs(CONFIG), flux_fixtures.linear_shapes(torch_model)


def diffusers_with_loras(directory, inputs, files_and_scales) -> tuple[np.ndarray, np.ndarray]:
    """(diffusers' output without, with the LoRAs (files or state dicts) loaded by `load_lora_weights`)."""
    from diffusers import FluxTransformer2DModel

    torch_model = FluxTransformer2DModel.from_pretrained(str(directory)).eval()
    base = flux_fixtures.run_diffusers(torch_model, inputs)
    pipe = diffusers_pipeline(torch_model)
    names = []
    for i, (path, _) in enumerate(files_and_scales):
        pipe.load_lora_weights(path if isinstance(path, dict) else str(path), adapter_name=f"lora{i}")
        names.append(f"lora{i}")
    pipe.set_adapters(names, adapter_weights=[s for _, s in files_and_scales])
    return base, flux_fixtures.run_diffusers(torch_model, inputs)


def check_against_diffusers(directory, inputs, ours_loras, diffusers_loras, reductions: int, fuse: bool):
    model = load_transformer(directory, dtype=jnp.float32)
    if fuse:
        fuse_projections(model)
    apply_loras(model, [(read_lora(path), scale) for path, scale in ours_loras])
    out = run(model, inputs)
    base, expected = diffusers_with_loras(directory, inputs, diffusers_loras)
    tolerance = flux_fixtures.model_tolerance(CONFIG, TOKENS) + EPS * reductions
    assert flux_fixtures.relative_error(out, expected) <= tolerance
    assert flux_fixtures.relative_error(expected, base) > 1000 * tolerance  # the LoRAs do change the output


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_diffusers_naming_two_loras_match_diffusers(reference, tmp_path, fuse):
    directory, inputs, shapes = reference
    reductions = flux_fixtures.save_lora(tmp_path / "a.safetensors", shapes, DIFFUSERS_A, rank=4, seed=0,
                                      alphas={"*": 2.0, "transformer_blocks.0.attn.to_q": 8.0, "x_embedder": 1.0})
    reductions += flux_fixtures.save_lora(tmp_path / "b.safetensors", shapes, DIFFUSERS_B, rank=2, seed=1)
    loras = [(tmp_path / "a.safetensors", 0.8), (tmp_path / "b.safetensors", -0.6)]
    check_against_diffusers(directory, inputs, loras, loras, reductions, fuse)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_kohya_naming_matches_diffusers(reference, tmp_path, fuse):
    """Every kohya module of the FLUX transformer, fused qkv (dense and block-diagonal) and
    linear1 included, with alphas. diffusers gets the file as its own converter
    (`_convert_kohya_flux_lora_to_diffusers`) makes it, with two of its gaps closed: the modules
    outside the blocks come out without the "transformer." prefix, which `load_lora_weights`
    then drops, so the prefix is added; linear1 is split at FLUX.1-dev's widths (3072 x 3 +
    12288) only, so it is given as the PEFT modules the converter makes of it (A shared, B split
    by rows, alpha / r folded in: checked against the converter at the real widths by
    test_kohya_map_matches_diffusers_converter). The final layer takes no alpha, which the
    converter ignores there."""
    import torch
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    directory, inputs, _ = reference
    rng = np.random.default_rng(2)
    tensors, reductions = {}, 0
    for name, (k, n) in KOHYA.items():
        sparse, rank = (3, 6) if name == "double_blocks_0_txt_attn_qkv" else (0, 4)
        alpha = None if name.startswith("final_layer") else 2.0
        tensors |= kohya_tensors(rng, name, k, n, rank, alpha=alpha, sparse_parts=sparse)
        reductions += k + rank
    linear1 = kohya_tensors(rng, LINEAR1, D, 3 * D + MLP, 4, alpha=3.0)
    save_file(tensors | linear1, str(tmp_path / "kohya.safetensors"))

    converted = _convert_kohya_flux_lora_to_diffusers({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})
    reference_sd = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}
    down, up = linear1[f"lora_unet_{LINEAR1}.lora_down.weight"], linear1[f"lora_unet_{LINEAR1}.lora_up.weight"]
    for name, rows in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), np.split(up, [D, 2 * D, 3 * D])):
        reference_sd[f"transformer.single_transformer_blocks.0.{name}.lora_A.weight"] = torch.from_numpy(down * 0.75)
        reference_sd[f"transformer.single_transformer_blocks.0.{name}.lora_B.weight"] = torch.from_numpy(rows.copy())
        reductions += D + 4
    assert len(reference_sd) == 2 * (len(KOHYA) + 2 * 2 + 4)  # two qkv in three each, linear1 in four
    check_against_diffusers(directory, inputs, [(tmp_path / "kohya.safetensors", 0.7)], [(reference_sd, 0.7)],
                            reductions, fuse)


def test_kohya_map_matches_diffusers_converter(tmp_path):
    """At FLUX.1-dev's widths, our reading of kohya modules (dense and block-diagonal linear1,
    a text qkv, the swapped final modulation, alphas) gives every diffusers layer the weight
    change `_convert_kohya_flux_lora_to_diffusers` gives it, probed with a random vector."""
    import torch
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    h, mlp = 3072, 12288
    rng = np.random.default_rng(3)
    tensors = {
        **kohya_tensors(rng, "single_blocks_5_linear1", h, 3 * h + mlp, 2, alpha=1.0),
        **kohya_tensors(rng, "single_blocks_7_linear1", h, 3 * h + mlp, 4),
        **kohya_tensors(rng, "double_blocks_3_txt_attn_qkv", h, 3 * h, 3, alpha=6.0, sparse_parts=3),
        **kohya_tensors(rng, "double_blocks_0_img_mod_lin", h, 6 * h, 2, alpha=0.5),
        **kohya_tensors(rng, "final_layer_adaLN_modulation_1", h, 2 * h, 2),
    }
    # Block-diagonal linear1 (rank 4 = one per part, rows 3072 x 3 + 12288): the converter's sparse branch.
    up = tensors["lora_unet_single_blocks_7_linear1.lora_up.weight"]
    for j, (a, b) in enumerate([(0, h), (h, 2 * h), (2 * h, 3 * h), (3 * h, 3 * h + mlp)]):
        keep = up[a:b, j].copy()
        up[a:b] = 0
        up[a:b, j] = keep
    save_file(tensors, str(tmp_path / "real.safetensors"))
    converted = _convert_kohya_flux_lora_to_diffusers({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})
    probe = rng.standard_normal(h)
    theirs = {}
    for key, a in converted.items():
        if key.endswith(".lora_A.weight"):
            layer = key.removesuffix(".lora_A.weight").removeprefix("transformer.")
            b = converted[key.replace("lora_A", "lora_B")]
            theirs[layer] = b.double().numpy() @ (a.double().numpy() @ probe)
    ours: dict[str, np.ndarray] = {}
    for module in read_lora(tmp_path / "real.safetensors").modules:
        change = module.alpha_scale * (module.up.astype(np.float64) @ (module.down.astype(np.float64) @ probe))
        for layer, a, b in module.targets:
            ours[layer] = ours.get(layer, 0) + change[a:b]
    assert sorted(ours) == sorted(theirs) and len(ours) == 4 + 4 + 3 + 1 + 1
    for layer, value in theirs.items():
        assert np.max(np.abs(ours[layer] - value)) <= 8 * EPS * np.max(np.abs(value)), layer


# ---------------------------------------------------------------------------------------------
# The runtime: int4 layers, scale 0, unloading, recompilation.

def low_rank_bound(x, a, b, s):
    """Elementwise |((x A^T) s) B^T| computed on absolute values: the scale of its rounding."""
    return (np.abs(x) @ np.abs(a).T * np.abs(s)) @ np.abs(b).T


@pytest.mark.parametrize("kind", ["w4a4", "w4a16"])
def test_int4_layer_adds_the_float_low_rank_term(kind):
    """y = int4 layer(x) + ((x A^T) s) B^T: the float32 term against float64 numpy, the layer's
    own output against its reference, within float32 rounding of the K + r long sums."""
    rng = np.random.default_rng(4)
    k, n, rank, m = 256, 96, 8, 10
    weight = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    cls = ConvDense4bit if kind == "w4a4" else Dense4bitWeightOnly
    extra = {"implementation": "xla"} if kind == "w4a4" else {}
    layer = cls.from_linear(jnp.asarray(weight), jnp.asarray(bias), bias_dtype=jnp.float32, **extra)
    x = rng.standard_normal((2, m, k), np.float32)
    base = (w4a4_linear_reference if kind == "w4a4" else int4_weight_only_linear)(jnp.asarray(x), layer.qweight,
                                                                                   jnp.asarray(bias))
    a, b = flux_fixtures.lora_factors(rng, rank, k, n)
    s = np.linspace(-1.5, 2.0, rank).astype(np.float32)
    attach_lora(layer, LowRank(jnp.asarray(a), jnp.asarray(b), s))
    y = np.asarray(layer(jnp.asarray(x)))
    term = ((x.astype(np.float64) @ a.T) * s) @ b.T
    bound = EPS * ((k + rank + 1) * low_rank_bound(x, a, b, s) + np.abs(y))
    assert np.all(np.abs(y - (np.asarray(base, np.float64) + term)) <= bound)
    assert np.max(np.abs(term)) > 0.1 * np.max(np.abs(np.asarray(base)))
    detach_lora(layer)
    np.testing.assert_array_equal(np.asarray(layer(jnp.asarray(x))), np.asarray(base))


@pytest.fixture(scope="module")
def quantized(reference):
    """The tiny model, W4A4 / W4A16 per the default policy (group 16), fused, float32 activations."""
    directory, inputs, shapes = reference
    model = load_transformer(directory, dtype=jnp.float32)
    quantize_model(model, group_size=16, implementation="xla")
    fuse_projections(model)
    return model, inputs, shapes


def test_fused_w4a4_layer_gets_its_members_blocks(quantized, tmp_path):
    """LoRAs on to_q and proj_mlp of a single block land in their rows of the fused W4A4
    to_qkv_mlp (k and v rows exactly unchanged), each equal to its own float term."""
    model, _, shapes = quantized
    members = ("single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp")
    flux_fixtures.save_lora(tmp_path / "l.safetensors", shapes, members, rank=4, seed=5,
                         alphas={"*": 4.0, members[1]: 2.0})
    lora = read_lora(tmp_path / "l.safetensors")
    layer = model.single_transformer_blocks[0].to_qkv_mlp
    assert isinstance(layer, ConvDense4bit)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((7, D), np.float32))
    base = np.asarray(layer(x))
    apply_loras(model, [(lora, 1.5)])
    try:
        assert layer.lora.rank == 8
        # Each member's rows over its own ranks: what the W4A4 epilogue multiplies per tile.
        assert layer.lora.blocks == ((0, D, 0, 4), (3 * D, 3 * D + MLP, 4, 8))
        y = np.asarray(layer(x))
    finally:
        remove_loras(model)
    np.testing.assert_array_equal(y[:, D:3 * D], base[:, D:3 * D])
    for module, (start, stop) in zip(lora.modules, [(0, D), (3 * D, 3 * D + MLP)]):
        s = np.float32(1.5 * module.alpha_scale)
        term = ((np.asarray(x, np.float64) @ module.down.T) * s) @ module.up.T
        bound = EPS * ((D + 4 + 1) * low_rank_bound(np.asarray(x), module.down, module.up, s) + np.abs(y[:, start:stop]))
        assert np.all(np.abs(y[:, start:stop] - (base[:, start:stop] + term)) <= bound)


def test_a_branch_refuses_blocks_that_do_not_hold_its_b():
    """`blocks` tell the W4A4 epilogue which rank chunks each tile may skip: a B with a nonzero
    outside them (which the kernel would drop) or a block outside B is refused, naming it."""
    up = np.zeros((8, 4), np.float32)
    up[0:4, 0:2], up[5, 3] = 1.0, 2.0
    down, scale = np.zeros((4, 3), np.float32), np.ones(4, np.float32)
    assert LowRank(down, up, scale, blocks=((0, 4, 0, 2), (4, 8, 2, 4))).blocks == ((0, 4, 0, 2), (4, 8, 2, 4))
    with pytest.raises(ValueError, match=r"1 nonzeros outside its blocks .* first at \(row, rank\) \(5, 3\)"):
        LowRank(down, up, scale, blocks=((0, 4, 0, 2),))
    with pytest.raises(ValueError, match=r"LoRA block \(0, 9, 0, 2\) must be .* inside B \(8, 4\)"):
        LowRank(down, up, scale, blocks=((0, 9, 0, 2),))


def test_scale_zero_is_the_base_model_and_unloading_restores_it(quantized, tmp_path):
    model, inputs, shapes = quantized
    flux_fixtures.save_lora(tmp_path / "a.safetensors", shapes, DIFFUSERS_A, rank=4, seed=7)
    graphdef, state = nnx.split(model)
    base = run(model, inputs)
    lora = read_lora(tmp_path / "a.safetensors")
    apply_loras(model, [(lora, 0.0)])
    np.testing.assert_array_equal(run(model, inputs), base)
    apply_loras(model, [(lora, 1.0)])
    assert flux_fixtures.relative_error(run(model, inputs), base) > 0.01
    remove_loras(model)
    np.testing.assert_array_equal(run(model, inputs), base)
    after_graphdef, after_state = nnx.split(model)
    assert after_graphdef == graphdef
    assert jax.tree.all(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), after_state, state))


def test_switching_loras_of_the_same_ranks_does_not_recompile(reference, tmp_path):
    """The factors are inputs of the jitted step (graph definition static, as FluxPipeline jits
    it): another LoRA of the same ranks, or another scale, reuses the compiled program; unloading
    goes back to the base model's."""
    directory, inputs, shapes = reference
    model = fuse_projections(load_transformer(directory, dtype=jnp.float32))
    for i in range(3):
        flux_fixtures.save_lora(tmp_path / f"{i}.safetensors", shapes, DIFFUSERS_A, rank=4, seed=10 + i)
    traces = []

    def forward(graphdef, state, x):
        traces.append(1)
        return nnx.merge(graphdef, state)(**x)

    step = jax.jit(forward, static_argnums=0)
    x = {k: jnp.asarray(v) for k, v in inputs.items()}
    outputs = []
    for i, scale in [(0, 1.0), (1, 1.0), (2, -0.5), (0, 1.0)]:
        apply_loras(model, [(read_lora(tmp_path / f"{i}.safetensors"), scale)])
        outputs.append(np.asarray(step(*nnx.split(model), x)))
    assert len(traces) == 1
    assert all(flux_fixtures.relative_error(o, outputs[0]) > 0.01 for o in outputs[1:3])
    np.testing.assert_array_equal(outputs[3], outputs[0])
    remove_loras(model)
    step(*nnx.split(model), x)
    assert len(traces) == 2
    assert not jax.tree.leaves(nnx.state(model, LoRAParam))


# ---------------------------------------------------------------------------------------------
# Files that do not fit.

def _peft(name, a_shape, b_shape):
    return {f"transformer.{name}.lora_A.weight": np.ones(a_shape, np.float32),
            f"transformer.{name}.lora_B.weight": np.ones(b_shape, np.float32)}


READ_ERRORS = {
    "lokr": ({"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": np.ones((4, 4), np.float32),
              "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": np.ones((8, 8), np.float32)}, r"LoKr.*lokr_w1"),
    "loha": ({"lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a": np.ones((96, 4), np.float32)}, r"LoHa.*hada_w1_a"),
    "dora_kohya": ({"lora_unet_img_in.lora_down.weight": np.ones((4, 4), np.float32),
                    "lora_unet_img_in.lora_up.weight": np.ones((32, 4), np.float32),
                    "lora_unet_img_in.dora_scale": np.ones((1, 4), np.float32)}, r"DoRA.*lora_unet_img_in\.dora_scale"),
    "dora_peft": ({**_peft("x_embedder", (4, 4), (32, 4)),
                   "transformer.x_embedder.lora_magnitude_vector": np.ones(32, np.float32)}, r"DoRA.*x_embedder"),
    "sdxl": ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
              np.ones((4, 640), np.float32),
              "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight":
              np.ones((640, 4), np.float32)}, r"not a FLUX transformer LoRA.*Stable Diffusion / SDXL.*down_blocks_1"),
    "sdxl_peft": (_peft("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", (4, 640), (640, 4)),
                  r"not a FLUX transformer LoRA.*SDXL"),
    "text_encoder": ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.ones((4, 32)),
                      "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.ones((32, 4))},
                     r"text-encoder.*lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
    "rank_mismatch": (_peft("transformer_blocks.0.attn.to_q", (4, 32), (32, 3)),
                      r"module 'transformer.transformer_blocks.0.attn.to_q' has A \(4, 32\) and B \(32, 3\)"),
    "no_up": ({"transformer.x_embedder.lora_A.weight": np.ones((4, 4), np.float32)},
              r"module 'transformer.x_embedder' has no up weight"),
    "unknown_module": ({**_peft("x_embedder", (4, 4), (32, 4)), **_peft("transformer_blocks.0.attn.to_zz", (4, 32), (32, 4))},
                       None),
    "unknown_kohya_module": ({**kohya_tensors(np.random.default_rng(0), "img_in", 4, 32, 2),
                              **kohya_tensors(np.random.default_rng(0), "double_blocks_0_img_attn_zz", 32, 32, 2)},
                             r"1 module\(s\) match no FLUX transformer layer: 'lora_unet_double_blocks_0_img_attn_zz'"),
    "not_lora": ({"transformer.x_embedder.weight": np.ones((32, 4), np.float32)},
                 r"key 'transformer.x_embedder.weight' is not a LoRA tensor"),
}
APPLY_ERRORS = {
    "block_out_of_range": (_peft("transformer_blocks.5.attn.to_q", (4, 32), (32, 4)),
                           r"'transformer.transformer_blocks.5.attn.to_q' targets transformer_blocks.5.attn.to_q, "
                           r"which this model does not have"),
    "unknown_module": (READ_ERRORS["unknown_module"][0], r"targets transformer_blocks.0.attn.to_zz"),
    "in_features": (_peft("transformer_blocks.0.attn.to_q", (4, 48), (32, 4)),
                    r"'transformer.transformer_blocks.0.attn.to_q': A \(4, 48\) and B rows 32 do not fit "
                    r"transformer_blocks.0.attn.to_q \(in_features 32, out_features 32\)"),
    "out_features": (kohya_tensors(np.random.default_rng(0), "double_blocks_0_img_attn_qkv", 32, 3 * 40, 2),
                     r"lora_unet_double_blocks_0_img_attn_qkv.*B rows 40 do not fit transformer_blocks.0.attn.to_q"),
}


@pytest.mark.parametrize("case", sorted(k for k, (_, m) in READ_ERRORS.items() if m))
def test_files_that_are_not_flux_loras_are_refused_naming_the_key(tmp_path, case):
    tensors, message = READ_ERRORS[case]
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(tmp_path / "x.safetensors"))
    with pytest.raises(LoRAError, match=message):
        read_lora(tmp_path / "x.safetensors")


@pytest.fixture(scope="module", params=[True, False], ids=["fused", "unfused"])
def float_model(request, reference):
    model = load_transformer(reference[0], dtype=jnp.float32)
    return fuse_projections(model) if request.param else model


@pytest.mark.parametrize("case", sorted(APPLY_ERRORS))
def test_loras_that_do_not_fit_the_model_are_refused_naming_the_key(float_model, tmp_path, case):
    model = float_model
    tensors, message = APPLY_ERRORS[case]
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(tmp_path / "x.safetensors"))
    lora = read_lora(tmp_path / "x.safetensors")
    graphdef = nnx.split(model)[0]
    with pytest.raises(LoRAError, match=message):
        apply_loras(model, [(lora, 1.0)])
    assert nnx.split(model)[0] == graphdef  # nothing attached


def test_missing_file_is_named(tmp_path):
    with pytest.raises(LoRAError, match="nothing.safetensors does not exist"):
        read_lora(tmp_path / "nothing.safetensors")


def test_a_model_carrying_loras_is_not_saved_fused_or_quantized(reference, tmp_path):
    """Each would lose the branches (a checkpoint holds the base model; fusing and quantizing
    rebuild the layers): refused, the model unchanged."""
    from flux_flax.checkpoint import save_checkpoint
    from flux_flax.errors import CheckpointError

    directory, _, shapes = reference
    model = load_transformer(directory, dtype=jnp.float32)
    flux_fixtures.save_lora(tmp_path / "l.safetensors", shapes, ["x_embedder", "transformer_blocks.0.attn.to_q"],
                            rank=2, seed=0)
    apply_loras(model, [(read_lora(tmp_path / "l.safetensors"), 1.0)])
    graphdef = nnx.split(model)[0]
    with pytest.raises(CheckpointError, match="unload them before saving"):
        save_checkpoint(model, tmp_path / "ckpt", quantization=None, source={})
    assert not (tmp_path / "ckpt").exists()
    for action, call in [("fuse", fuse_projections), ("quantize", quantize_model)]:
        with pytest.raises(ValueError, match=f"cannot {action} a model carrying LoRA branches"):
            call(model)
    assert nnx.split(model)[0] == graphdef


@pytest.mark.gpu
def test_pallas_w4a4_layer_adds_the_low_rank_term():
    """On the GPU: the Pallas W4A4 layer (rotate-quantize + GEMM kernels) with an unfused bf16 LoRA
    equals its own output plus `LowRankFactors.add_to`'s term, at a FLUX shape (the fused path:
    tests/test_lora_fused.py)."""
    from convrot_jax import LowRankFactors

    rng = np.random.default_rng(8)
    k, n, rank, m = 3072, 3072, 32, 512
    weight = jnp.asarray(rng.standard_normal((n, k)) / np.sqrt(k), jnp.float32)
    layer = ConvDense4bit.from_linear(weight, implementation="pallas")
    x = jnp.asarray(rng.standard_normal((1, m, k)), jnp.bfloat16)
    base = layer(x)
    a, b = (jnp.asarray(f, jnp.bfloat16) for f in flux_fixtures.lora_factors(rng, rank, k, n))
    s = jnp.full((rank,), 0.7, jnp.float32)
    attach_lora(layer, LowRank(a, b, s, fused=False))
    y = layer(x)
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(LowRankFactors(a, b, s).add_to(base, x), np.float32))
    assert not np.array_equal(np.asarray(y, np.float32), np.asarray(base, np.float32))
