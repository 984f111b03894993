"""flux_flax.vae: the Flax decoder equals diffusers' AutoencoderKL decoder (tiny config, fp32)."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from flux_flax.vae import VAE_WEIGHTS, VAEConfig, load_vae


def save_random_vae(folder, config: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """A diffusers VAE with non-trivial random weights (norm affines and biases too), saved to `folder`."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config.to_diffusers()).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    vae.save_pretrained(folder)
    return vae


def decode_both(ref: AutoencoderKL, ours, z: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        expected = ref.decode(z).sample.numpy()
    got = np.asarray(ours.decode(jnp.asarray(z.numpy().transpose(0, 2, 3, 1))))
    return expected, got.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("post_quant_conv", [False, True])
def test_decoder_matches_diffusers(tmp_path, post_quant_conv):
    config = dataclasses.replace(VAEConfig.tiny(), use_post_quant_conv=post_quant_conv)
    ref = save_random_vae(tmp_path, config)
    vae = load_vae(tmp_path)
    assert vae.config == config and vae.config.scale_factor == 8
    z = torch.randn(2, config.latent_channels, 6, 10, generator=torch.Generator().manual_seed(1))
    expected, got = decode_both(ref, vae, z)
    assert got.shape == expected.shape == (2, 3, 48, 80)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_unscale_matches_flux_pipeline(tmp_path):
    save_random_vae(tmp_path, VAEConfig.tiny())
    vae = load_vae(tmp_path)
    x = np.linspace(-2, 2, 5, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(vae.unscale(x)), x / 0.3611 + 0.1159, rtol=1e-6)


@pytest.mark.slow
def test_bf16_decoder_is_close_to_fp32(tmp_path):
    ref = save_random_vae(tmp_path, VAEConfig.tiny())
    vae = load_vae(tmp_path, dtype=jnp.bfloat16)
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    expected, got = decode_both(ref, vae, z)
    assert got.dtype == jnp.bfloat16
    assert np.abs(got.astype(np.float32) - expected).max() < 0.05 * np.abs(expected).max()


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path)
    save_random_vae(tmp_path, VAEConfig.tiny())
    (tmp_path / VAE_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=VAE_WEIGHTS):
        load_vae(tmp_path)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    save_random_vae(tmp_path, VAEConfig.tiny())
    weights = load_file(tmp_path / VAE_WEIGHTS)
    key = "decoder.up_blocks.1.resnets.0.conv1.weight"
    save_file({k: v for k, v in weights.items() if k != key}, tmp_path / VAE_WEIGHTS)
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        load_vae(tmp_path)
    save_file({**weights, key: weights[key][:, :4].contiguous()}, tmp_path / VAE_WEIGHTS)
    with pytest.raises(ValueError, match="expected shape"):
        load_vae(tmp_path)


def test_config_that_does_not_match_the_weights_is_refused(tmp_path):
    save_random_vae(tmp_path, VAEConfig.tiny())
    config = json.loads((tmp_path / "config.json").read_text())
    config["layers_per_block"] = 0  # the file holds one more resnet per up block than this config
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not use"):
        load_vae(tmp_path)


def test_save_vae_round_trips(tmp_path):
    """`save_vae` writes a folder that `load_vae` reads back to the same weights, and that
    diffusers' AutoencoderKL loads (its encoder half is absent, so it warns and initialises it)."""
    from flax import nnx

    from flux_flax.vae import save_vae

    config = VAEConfig.tiny()
    save_random_vae(tmp_path / "ref", config)
    vae = load_vae(tmp_path / "ref")
    save_vae(vae, tmp_path / "copy")
    again = load_vae(tmp_path / "copy")
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(vae)), nnx.to_flat_state(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    ref = AutoencoderKL.from_pretrained(tmp_path / "copy", low_cpu_mem_usage=False).eval()
    z = torch.randn(1, config.latent_channels, 4, 4)
    expected, got = decode_both(ref, vae, z)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
