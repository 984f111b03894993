"""Readers, key map and config: layouts detected, the bfl map equal to diffusers' own converter,
config inferred from shapes, and every bad input refused with an error naming what is wrong."""

import json

import flux_fixtures
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from flux_flax.errors import (
    CheckpointError,
    MissingKeyError,
    NotAFluxCheckpointError,
    ShapeMismatchError,
    UnexpectedKeyError,
)
from flux_flax.keymaps import diffusers_to_bfl
from flux_flax.safetensors_io import DIFFUSERS_WEIGHTS, open_checkpoint
from flux_flax import FluxConfig, abstract_transformer, expected_shapes, load_transformer

CONFIG = FluxConfig.tiny()


@pytest.fixture(scope="module")
def torch_model():
    return flux_fixtures.diffusers_transformer(CONFIG, seed=2)


@pytest.fixture
def diffusers_dir(torch_model, tmp_path):
    return flux_fixtures.save_diffusers(torch_model, tmp_path / "transformer")


def rewrite_weights(directory, edit) -> None:
    """Loads the single diffusers weights file, applies `edit(dict)`, writes it back."""
    file = directory / DIFFUSERS_WEIGHTS
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


# Config ---------------------------------------------------------------------------------------


def test_config_presets_and_round_trip():
    dev, schnell = FluxConfig.dev(), FluxConfig.schnell()
    assert dev.guidance_embeds and not schnell.guidance_embeds
    assert (dev.inner_dim, dev.mlp_hidden_dim, dev.num_layers, dev.num_single_layers) == (3072, 12288, 19, 38)
    small = FluxConfig.small()
    assert all(k % 256 == 0 for k in (small.inner_dim, small.mlp_hidden_dim, small.inner_dim + small.mlp_hidden_dim,
                                      small.joint_attention_dim))
    for config in (dev, schnell, CONFIG, small):
        data = json.loads(json.dumps(config.to_dict()))
        assert FluxConfig.from_dict(data) == config
    hf_config = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0", "attention_head_dim": 128,
                 "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
                 "num_layers": 19, "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768}
    assert FluxConfig.from_diffusers_config(hf_config) == dev
    with pytest.raises(NotAFluxCheckpointError, match="UNet2DConditionModel"):
        FluxConfig.from_diffusers_config({"_class_name": "UNet2DConditionModel"})
    with pytest.raises(ValueError, match="unknown FluxConfig fields"):
        FluxConfig.from_dict({"num_layers": 2, "sample_size": 64})
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxConfig.tiny(axes_dims_rope=(4, 4, 4))


# Key map and readers --------------------------------------------------------------------------


def test_bfl_key_map_equals_diffusers_converter(tmp_path):
    """Our lazy map against diffusers' `convert_flux_transformer_checkpoint_to_diffusers` on a
    black-forest-labs state dict with FLUX.1's hidden size 3072 (which that function hard-codes)
    and two columns per matrix to stay small."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    bfl_keys = diffusers_to_bfl(flux_fixtures.state_dict_numpy(flux_fixtures.diffusers_transformer(CONFIG))).keys()
    hidden, rng = 3072, np.random.default_rng(0)

    def rows(key: str) -> int:
        if "qkv" in key:
            return 3 * hidden
        if "linear1" in key:
            return 3 * hidden + 4 * hidden
        if "adaLN_modulation" in key:
            return 2 * hidden
        return hidden

    bfl = {k: rng.standard_normal((rows(k), 2) if k.endswith("weight") else (rows(k),)).astype(np.float32)
           for k in bfl_keys}
    expected = convert_flux_transformer_checkpoint_to_diffusers({k: torch.from_numpy(v) for k, v in bfl.items()})

    save_file(bfl, str(tmp_path / "flux1.safetensors"))
    with open_checkpoint(tmp_path / "flux1.safetensors") as ckpt:
        assert ckpt.layout == "bfl"
        assert sorted(ckpt.keys()) == sorted(expected)
        for key, value in expected.items():
            assert ckpt.info(key).shape == tuple(value.shape), key
            np.testing.assert_array_equal(np.asarray(ckpt.read(key)), value.numpy(), err_msg=key)


def test_reader_lists_without_reading_and_reads_bf16(tmp_path):
    bf16_model = flux_fixtures.diffusers_transformer(CONFIG).to(torch.bfloat16)
    directory = flux_fixtures.save_diffusers(bf16_model, tmp_path / "bf16")
    with open_checkpoint(directory) as ckpt:
        assert ckpt.layout == "diffusers"
        info = ckpt.info("transformer_blocks.0.attn.to_q.weight")
        assert (info.shape, info.dtype) == ((32, 32), "BF16")
        assert ckpt.read("x_embedder.weight").dtype == jnp.bfloat16
        assert ckpt.diffusers_config()["num_layers"] == 1
    model = load_transformer(directory, dtype=jnp.float32)
    assert model.x_embedder.kernel.dtype == jnp.float32


def test_bfl_config_inferred_from_shapes(tmp_path):
    """With FLUX.1's head size (128) a bfl file needs no config: it is read off the shapes."""
    config = FluxConfig.small(num_layers=1, num_single_layers=2, guidance_embeds=False)
    ref = flux_fixtures.diffusers_transformer(config)
    file = flux_fixtures.save_bfl(ref, tmp_path / "flux1-small.safetensors")
    model = load_transformer(file, dtype=jnp.float32)
    assert model.config == config
    np.testing.assert_array_equal(np.asarray(model.norm_out.linear.kernel[...]).T,
                                  ref.norm_out.linear.weight.detach().numpy())


def test_abstract_model_holds_no_arrays():
    model = abstract_transformer(FluxConfig.dev())
    shapes = expected_shapes(model)
    assert shapes["single_transformer_blocks.37.proj_out.weight"] == (3072, 15360)
    assert shapes["transformer_blocks.0.attn.norm_added_k.weight"] == (128,)
    assert sum(np.prod(s) for s in shapes.values()) == 11_901_408_320  # FLUX.1-dev: 11.9 B parameters
    assert type(model.x_embedder.kernel.get_value()).__name__ == "ShapeDtypeStruct"


# Bad inputs -----------------------------------------------------------------------------------


def test_missing_key_is_named(diffusers_dir):
    rewrite_weights(diffusers_dir, lambda t: t.pop("transformer_blocks.0.attn.norm_added_k.weight"))
    with pytest.raises(MissingKeyError, match=r"transformer_blocks\.0\.attn\.norm_added_k\.weight") as e:
        load_transformer(diffusers_dir, dtype=jnp.float32)
    assert e.value.keys == ["transformer_blocks.0.attn.norm_added_k.weight"]


def test_unexpected_key_is_named(diffusers_dir):
    rewrite_weights(diffusers_dir, lambda t: t.update({"transformer_blocks.0.attn.to_qkv.weight": np.zeros((96, 32), np.float32)}))
    with pytest.raises(UnexpectedKeyError, match=r"transformer_blocks\.0\.attn\.to_qkv\.weight"):
        load_transformer(diffusers_dir, dtype=jnp.float32)


def test_shape_mismatch_names_key_and_both_shapes(diffusers_dir):
    rewrite_weights(diffusers_dir, lambda t: t.update({"context_embedder.weight": np.zeros((32, 48), np.float32)}))
    with pytest.raises(ShapeMismatchError) as e:
        load_transformer(diffusers_dir, dtype=jnp.float32)
    message = str(e.value)
    assert "context_embedder.weight" in message and "(32, 32)" in message and "(32, 48)" in message
    assert e.value.mismatches == {"context_embedder.weight": ((32, 32), (32, 48))}


def test_wrong_config_for_file_is_refused(torch_model, tmp_path):
    file = flux_fixtures.save_bfl(torch_model, tmp_path / "flux1-tiny.safetensors")
    with pytest.raises(UnexpectedKeyError, match="guidance_embedder"):
        load_transformer(file, config=FluxConfig.tiny(guidance_embeds=False))
    with pytest.raises(CheckpointError, match="pass a config"):
        load_transformer(file)  # head size 16: RoPE axes not inferable


def test_not_a_flux_checkpoint(tmp_path, diffusers_dir):
    other = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": np.zeros((4, 4), np.float32)}, str(other))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    for path in (other, garbage, empty_dir):
        with pytest.raises(NotAFluxCheckpointError):
            load_transformer(path)

    config = json.loads((diffusers_dir / "config.json").read_text())
    (diffusers_dir / "config.json").write_text(json.dumps({**config, "_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(NotAFluxCheckpointError, match="SD3Transformer2DModel"):
        load_transformer(diffusers_dir)
    with pytest.raises(FileNotFoundError):
        load_transformer(tmp_path / "nowhere")
    assert issubclass(NotAFluxCheckpointError, ValueError) and issubclass(MissingKeyError, ValueError)


def test_index_naming_absent_shard(torch_model, tmp_path):
    directory = flux_fixtures.save_diffusers(torch_model, tmp_path / "sharded", max_shard_size="20KB")
    next(directory.glob("*-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="do not exist"):
        load_transformer(directory)
