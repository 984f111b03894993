"""flux_flax.pipeline end to end: the tiny JAX pipeline equals diffusers' FluxPipeline built from
the same random weights (same initial latents, 2 steps), the text encoders (JAX by default, or
PyTorch) equal diffusers' `encode_prompt`, a JAX-backend run never imports torch, and bad input
gives clear errors."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import flux_fixtures
import jax.numpy as jnp
from flax import nnx
import numpy as np
import pytest
import torch
from PIL import Image

from flux_flax.config import FluxConfig
from flux_flax.demo_assets import tiny_text_encoders
from flux_flax.pipeline import FluxPipeline, GenerationSettings, NonFiniteOutputError, PipelineMismatchError, save_png
from flux_flax.vae import VAEConfig, load_vae

T5_LENGTH = 24
PROMPTS = ["a cat on a red chair", "an astronaut riding a horse"]
SETTINGS = GenerationSettings(height=64, width=96, num_inference_steps=2, guidance_scale=3.5, seed=3)
DEV_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
    base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """diffusers' FluxPipeline with random tiny parts, saved as a diffusers FLUX folder."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from diffusers import FluxPipeline as DiffusersFluxPipeline

    config = FluxConfig.tiny()
    transformer = flux_fixtures.diffusers_transformer(config)
    torch.manual_seed(1)
    vae = AutoencoderKL(**VAEConfig.tiny(latent_channels=config.in_channels // 4).to_diffusers()).eval()
    text = tiny_text_encoders(config.pooled_projection_dim, config.joint_attention_dim, max_sequence_length=T5_LENGTH)
    pipe = DiffusersFluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER), vae=vae,
        text_encoder=text.text_encoder, tokenizer=text.tokenizer,
        text_encoder_2=text.text_encoder_2, tokenizer_2=text.tokenizer_2, transformer=transformer,
    )
    folder = tmp_path_factory.mktemp("flux_tiny")
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def ours(reference):
    _, folder = reference
    return FluxPipeline.from_pretrained(
        folder, dtype=jnp.float32, text_dtype=torch.float32, max_sequence_length=T5_LENGTH, progress=False
    )


@pytest.fixture(scope="module")
def ours_torch_text(reference, ours):
    """The same pipeline with transformers' PyTorch text encoders (the transformer and VAE shared)."""
    _, folder = reference
    torch_text = FluxPipeline.from_pretrained(
        folder, dtype=jnp.float32, text_backend="torch", text_dtype=torch.float32, max_sequence_length=T5_LENGTH,
        progress=False,
    ).text_encoders
    return FluxPipeline(ours.transformer, ours.vae, torch_text, progress=False)


def run_reference(pipe, latents, output_type: str) -> np.ndarray:
    with torch.no_grad():
        return pipe(
            prompt=PROMPTS, height=SETTINGS.height, width=SETTINGS.width,
            num_inference_steps=SETTINGS.num_inference_steps, guidance_scale=SETTINGS.guidance_scale,
            latents=torch.from_numpy(np.array(latents)), max_sequence_length=T5_LENGTH, output_type=output_type,
        ).images


def test_prompt_embeddings_match_diffusers(reference, ours):
    pipe, _ = reference
    with torch.no_grad():
        ref_embeds, ref_pooled, _ = pipe.encode_prompt(PROMPTS, max_sequence_length=T5_LENGTH)
    embeds = ours.encode_prompts(PROMPTS)
    assert embeds.prompt_embeds.shape == (2, T5_LENGTH, 32) and embeds.pooled_prompt_embeds.shape == (2, 32)
    np.testing.assert_allclose(embeds.prompt_embeds, ref_embeds.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embeds.pooled_prompt_embeds, ref_pooled.numpy(), rtol=1e-5, atol=1e-5)
    assert np.abs(embeds.pooled_prompt_embeds[0] - embeds.pooled_prompt_embeds[1]).max() > 1e-2


def test_text_backends_agree(ours, ours_torch_text):
    """The whole tiny pipeline with the JAX text encoders equals the one with the PyTorch ones."""
    from flux_flax.text import TextEncoders
    from flux_flax.text_jax import JaxTextEncoders

    assert isinstance(ours.text_encoders, JaxTextEncoders) and isinstance(ours_torch_text.text_encoders, TextEncoders)
    jax_embeds, torch_embeds = ours.encode_prompts(PROMPTS), ours_torch_text.encode_prompts(PROMPTS)
    # Bounds of test_text_encoders: T5 width 32, d_ff 64, 4 heads of 8, 2 layers; CLIP the same at 77 tokens.
    t5_bound = flux_fixtures.float32_tolerance(*(32, 32, 8, T5_LENGTH, T5_LENGTH, 32, 32, 32, 64) * 2, 32)
    clip_bound = flux_fixtures.float32_tolerance(*(64, 32, 8, 77, 77, 32, 64, 32, 64) * 2, 64)
    assert flux_fixtures.relative_error(jax_embeds.prompt_embeds, torch_embeds.prompt_embeds) <= t5_bound
    assert flux_fixtures.relative_error(jax_embeds.pooled_prompt_embeds, torch_embeds.pooled_prompt_embeds) <= clip_bound

    latents = ours.prepare_latents([SETTINGS.seed, SETTINGS.seed + 1], SETTINGS.height, SETTINGS.width)
    final = ours.denoise(latents, jax_embeds, SETTINGS)
    final_torch_text = ours_torch_text.denoise(latents, torch_embeds, SETTINGS)
    tokens = latents.shape[1] + T5_LENGTH
    bound = SETTINGS.num_inference_steps * flux_fixtures.model_tolerance(ours.config, tokens)
    assert flux_fixtures.relative_error(final, final_torch_text) <= bound
    images, images_torch_text = ours(PROMPTS, SETTINGS), ours_torch_text(PROMPTS, SETTINGS)
    assert np.abs(images.astype(int) - images_torch_text.astype(int)).max() <= 1


@pytest.mark.slow
def test_jax_text_backend_never_imports_torch(reference, tmp_path):
    """`import flux_flax` and a whole `convrot-flux generate` run (default: JAX text encoders)
    leave torch unimported."""
    _, folder = reference
    script = f"""
import sys
import flux_flax
from flux_flax import cli
code = cli.main(["generate", "--model", {str(folder)!r}, "--prompt", "a cat", "--size", "64x64", "--steps", "1",
                 "--out", {str(tmp_path)!r}, "--max-sequence-length", "{T5_LENGTH}", "--no-compile-cache",
                 "--dtype", "float32"])
print("exit", code, "torch imported:", "torch" in sys.modules)
"""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert "exit 0 torch imported: False" in result.stdout, result.stdout + result.stderr
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_pipeline_matches_diffusers(reference, ours):
    pipe, _ = reference
    assert ours.transformer.single_transformer_blocks[0].to_qkv_mlp is not None  # from_pretrained fuses
    latents = ours.prepare_latents([SETTINGS.seed, SETTINGS.seed + 1], SETTINGS.height, SETTINGS.width)
    final = ours.denoise(latents, ours.encode_prompts(PROMPTS), SETTINGS)
    images = ours(PROMPTS, SETTINGS)  # seeds 3 and 4: the same latents
    ref_final = run_reference(pipe, latents, "latent").numpy()
    # Each Euler step adds dt * velocity (dt < 1), so the model's float32 bound adds up per step.
    tokens = latents.shape[1] + T5_LENGTH
    bound = SETTINGS.num_inference_steps * flux_fixtures.model_tolerance(ours.config, tokens)
    assert flux_fixtures.relative_error(final, ref_final) <= bound
    assert flux_fixtures.relative_error(final, latents) > 0.1  # the steps did move the latents

    ref_images = run_reference(pipe, latents, "np")  # float in [0, 1], (B, H, W, 3)
    assert images.shape == ref_images.shape == (2, SETTINGS.height, SETTINGS.width, 3) and images.dtype == np.uint8
    assert np.abs(images.astype(np.float32) - ref_images * 255).max() <= 1.0  # at most one rounding step
    assert images.std() > 1  # not a flat image


def test_seed_decides_the_noise(ours):
    a = ours.prepare_latents([5, 6], 64, 64)
    b = ours.prepare_latents([5, 7], 64, 64)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.allclose(a[1], b[1])


def test_generate_pngs_batches_and_metadata(ours, tmp_path):
    prompts = ["one", "two", "three"]
    paths = ours.generate_pngs(prompts, SETTINGS, tmp_path, batch_size=2, metadata={"model": "tiny"})
    assert [p.name for p in paths] == ["0000-one-s3.png", "0001-two-s4.png", "0002-three-s5.png"]
    with Image.open(paths[2]) as img:
        assert img.size == (SETTINGS.width, SETTINGS.height) and img.mode == "RGB"
        params = json.loads(img.text["parameters"])
        assert img.text["prompt"] == "three" and params["seed"] == 5 and params["model"] == "tiny"
        assert params["num_inference_steps"] == 2 and params["guidance_scale"] == 3.5
        batched = np.asarray(img)
    # The padded last batch and a batch of one give the same image for the same prompt and seed.
    single = ours(["three"], dataclasses.replace(SETTINGS, seed=5))[0]
    assert np.abs(single.astype(int) - batched.astype(int)).max() <= 1


def test_embedding_cache(reference, tmp_path, monkeypatch):
    _, folder = reference
    pipe = FluxPipeline.from_pretrained(
        folder, dtype=jnp.float32, text_dtype=torch.float32, max_sequence_length=T5_LENGTH,
        cache_dir=tmp_path, progress=False,
    )
    first = pipe.encode_prompts(PROMPTS)
    assert len(list(tmp_path.glob("*.npz"))) == 2

    def no_encoding(prompts):
        raise AssertionError(f"cache miss for {prompts}")

    monkeypatch.setattr(pipe.text_encoders, "_encode", no_encoding)
    again = pipe.encode_prompts(PROMPTS[::-1])
    np.testing.assert_array_equal(again.prompt_embeds, first.prompt_embeds[::-1])
    np.testing.assert_array_equal(again.pooled_prompt_embeds, first.pooled_prompt_embeds[::-1])


@pytest.mark.parametrize("size", [(100, 64), (64, 72)])
def test_size_not_multiple_of_16(size):
    with pytest.raises(ValueError, match="multiples of 16"):
        GenerationSettings(height=size[0], width=size[1])


def test_empty_prompt_list(ours, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        ours([], SETTINGS)
    with pytest.raises(ValueError, match="empty"):
        ours.generate_pngs([], SETTINGS, tmp_path)


@pytest.mark.parametrize("part", ["vae", "text_encoder_2", "tokenizer", "transformer"])
def test_missing_model_part_is_named(reference, tmp_path, part):
    _, folder = reference
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / part)
    with pytest.raises(FileNotFoundError, match=part):
        FluxPipeline.from_pretrained(copy, dtype=jnp.float32)


def test_parts_that_do_not_fit_are_refused(reference, ours):
    _, folder = reference
    wide_t5 = tiny_text_encoders(32, 64, max_sequence_length=T5_LENGTH)
    with pytest.raises(PipelineMismatchError, match="joint_attention_dim 32 != T5 width 64"):
        FluxPipeline(ours.transformer, ours.vae, wide_t5)
    vae = load_vae(folder / "vae")
    vae.config = dataclasses.replace(vae.config, latent_channels=16)
    with pytest.raises(PipelineMismatchError, match="in_channels 4"):
        FluxPipeline(ours.transformer, vae, ours.text_encoders)


@pytest.fixture(scope="module")
def w4a4_checkpoint(reference, tmp_path_factory):
    """The tiny transformer converted by convrot-convert (group 16: the tiny widths are 32 and 128)."""
    from convert import convert_checkpoint

    _, folder = reference
    path = tmp_path_factory.mktemp("ckpt") / "tiny-w4a4"
    convert_checkpoint(folder / "transformer", path, group_size=16, progress=False)
    return path


@pytest.mark.slow
def test_generate_from_w4a4_checkpoint(reference, ours, w4a4_checkpoint, tmp_path, capsys):
    """`convrot-flux generate --checkpoint` writes PNGs; the W4A4 result stays near the float one."""
    from flux_flax import cli

    _, folder = reference
    argv = ["generate", "--model", str(folder), "--checkpoint", str(w4a4_checkpoint), "--prompt", PROMPTS[0],
            "--size", f"{SETTINGS.width}x{SETTINGS.height}", "--steps", "2", "--seed", "3", "--out", str(tmp_path),
            "--max-sequence-length", str(T5_LENGTH), "--no-compile-cache"]
    assert cli.main(argv) == 0
    [path] = tmp_path.glob("*.png")
    assert capsys.readouterr().out.strip() == str(path)
    with Image.open(path) as img:
        assert img.text["checkpoint"] == str(w4a4_checkpoint) and img.size == (SETTINGS.width, SETTINGS.height)
        assert img.text["attention"] == "xla"  # the exact default on the CPU

    quantized = FluxPipeline.from_pretrained(folder, checkpoint=w4a4_checkpoint, max_sequence_length=T5_LENGTH,
                                             progress=False)
    assert type(quantized.transformer.transformer_blocks[0].attn.to_qkv).__name__ == "ConvDense4bit"  # fused
    latents = ours.prepare_latents([3], SETTINGS.height, SETTINGS.width)
    final_q = quantized.denoise(latents, quantized.encode_prompts(PROMPTS[:1]), SETTINGS)
    final = ours.denoise(latents, ours.encode_prompts(PROMPTS[:1]), SETTINGS)
    error = np.linalg.norm(np.asarray(final_q) - np.asarray(final)) / np.linalg.norm(np.asarray(final))
    assert 0 < error < 0.05  # 0.012 measured


@pytest.fixture(scope="module")
def t5_checkpoint(reference, tmp_path_factory):
    """The tiny T5 converted by convrot-convert --part text_encoder_2 (W4A16; group 16: widths 32, 64)."""
    from convert import convert_checkpoint

    _, folder = reference
    path = tmp_path_factory.mktemp("t5ckpt") / "tiny-t5-w4a16"
    convert_checkpoint(folder, path, part="text_encoder_2", group_size=16, progress=False)
    return path


@pytest.mark.slow
def test_generate_with_a_4bit_t5_checkpoint(reference, ours, w4a4_checkpoint, t5_checkpoint, tmp_path, capsys):
    """`generate --checkpoint` twice: the W4A4 transformer and the 4-bit JAX T5 from their checkpoints,
    each named on stderr and in the PNG; the 4-bit T5's embeddings stay within the bound of
    test_text_encoders.test_4bit_t5_embeddings (e_max * sqrt(4 * blocks))."""
    from flux_flax import cli
    from flux_flax.policy import t5_default_policy
    from flux_flax.text_loading import load_t5

    _, folder = reference
    argv = ["generate", "--model", str(folder), "--checkpoint", str(w4a4_checkpoint), "--checkpoint",
            str(t5_checkpoint), "--prompt", PROMPTS[0], "--size", f"{SETTINGS.width}x{SETTINGS.height}", "--steps", "2",
            "--out", str(tmp_path), "--max-sequence-length", str(T5_LENGTH), "--no-compile-cache"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"transformer: checkpoint {w4a4_checkpoint} (w4a4 + w4a16, group 16, regular Hadamard)" in err
    assert f"text_encoder_2: checkpoint {t5_checkpoint} (w4a16, group 16, regular Hadamard)" in err
    assert re.search(r"^loaded in \d+\.\d s$", err, re.MULTILINE), err  # before the steps start: load vs the rest
    [path] = tmp_path.glob("*.png")
    with Image.open(path) as img:
        assert img.text["checkpoint"] == str(w4a4_checkpoint)
        assert img.text["text_encoder_2"].startswith(f"checkpoint {t5_checkpoint} (w4a16")

    pipe = FluxPipeline.from_pretrained(folder, checkpoint=[t5_checkpoint], dtype=jnp.float32, text_dtype="float32",
                                        max_sequence_length=T5_LENGTH, progress=False)
    assert pipe.sources["transformer"].endswith("transformer (float32)")
    t5 = pipe.text_encoders.text_encoder_2
    assert type(t5.encoder.block[0].layer[1].DenseReluDense.wo).__name__ == "Dense4bitWeightOnly"
    float_t5 = load_t5(folder / "text_encoder_2", dtype=jnp.float32)
    bound = max(flux_fixtures.int4_weight_errors(float_t5, t5_default_policy(), group_size=16))
    bound *= np.sqrt(4 * float_t5.config.num_layers)
    embeds, float_embeds = pipe.encode_prompts(PROMPTS), ours.encode_prompts(PROMPTS)
    for got, want in zip(embeds.prompt_embeds, float_embeds.prompt_embeds):
        assert 0 < np.linalg.norm(got - want) / np.linalg.norm(want) <= bound
    np.testing.assert_array_equal(embeds.pooled_prompt_embeds, float_embeds.pooled_prompt_embeds)  # CLIP: the folder's
    assert pipe(PROMPTS[:1], SETTINGS).shape == (1, SETTINGS.height, SETTINGS.width, 3)


def test_t5_checkpoint_errors(reference, t5_checkpoint, tmp_path):
    from convert import convert_checkpoint
    from flux_flax.demo_assets import tiny_t5, tiny_t5_tokenizer

    _, folder = reference
    with pytest.raises(ValueError, match="two checkpoints for the text_encoder_2"):
        FluxPipeline.from_pretrained(folder, checkpoint=[t5_checkpoint, t5_checkpoint])
    with pytest.raises(ValueError, match="runs on the JAX text backend only"):
        FluxPipeline.from_pretrained(folder, checkpoint=[t5_checkpoint], text_backend="torch")
    tiny_t5(tiny_t5_tokenizer(), 32, num_layers=3).save_pretrained(tmp_path / "other")
    convert_checkpoint(tmp_path / "other", tmp_path / "ckpt", part="text_encoder_2", group_size=16, progress=False)
    with pytest.raises(PipelineMismatchError, match="num_layers: folder 2 vs checkpoint 3"):
        FluxPipeline.from_pretrained(folder, checkpoint=tmp_path / "ckpt", max_sequence_length=T5_LENGTH)


def test_checkpoint_of_another_model_is_refused(reference, tmp_path):
    from convert import convert_checkpoint

    _, folder = reference
    other = flux_fixtures.diffusers_transformer(FluxConfig.tiny(num_layers=2))
    flux_fixtures.save_diffusers(other, tmp_path / "other")
    convert_checkpoint(tmp_path / "other", tmp_path / "ckpt", group_size=16, progress=False)
    with pytest.raises(PipelineMismatchError, match="num_layers: folder 1 vs checkpoint 2"):
        FluxPipeline.from_pretrained(folder, checkpoint=tmp_path / "ckpt")


def test_latents_of_the_wrong_size_are_refused(ours):
    latents = ours.prepare_latents([0], 64, 64)
    with pytest.raises(ValueError, match="do not fit 2 prompt"):
        ours(PROMPTS, SETTINGS, latents=latents)


def test_pngs_are_never_overwritten(tmp_path):
    image = np.zeros((16, 16, 3), np.uint8)
    paths = [save_png(image + k, tmp_path / "0000-a-cat-s0.png", "a cat", 0, SETTINGS) for k in range(3)]
    assert [p.name for p in paths] == ["0000-a-cat-s0.png", "0000-a-cat-s0-1.png", "0000-a-cat-s0-2.png"]
    for k, path in enumerate(paths):
        with Image.open(path) as img:
            assert np.asarray(img)[0, 0, 0] == k


@pytest.mark.usefixtures("python_sigint_handler")
def test_ctrl_c_while_a_png_is_written_leaves_it_whole(monkeypatch, tmp_path):
    from flux_flax import pipeline

    def metadata_then_ctrl_c(*args, **kwargs):
        info = png_metadata(*args, **kwargs)
        signal.raise_signal(signal.SIGINT)  # the file is open, the image not yet written
        return info

    png_metadata = pipeline.png_metadata
    monkeypatch.setattr(pipeline, "png_metadata", metadata_then_ctrl_c)
    image = np.full((16, 16, 3), 7, np.uint8)
    with pytest.raises(KeyboardInterrupt):
        save_png(image, tmp_path / "a.png", "a cat", 0, SETTINGS)
    with Image.open(tmp_path / "a.png") as img:
        assert np.array_equal(np.asarray(img), image) and img.text["prompt"] == "a cat"


def test_a_failed_png_write_leaves_no_file(monkeypatch, tmp_path):
    def partial_then_disk_full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", partial_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_png(np.zeros((16, 16, 3), np.uint8), tmp_path / "a.png", "a cat", 0, SETTINGS)
    assert not list(tmp_path.iterdir())


def test_nan_output_is_an_error_not_a_black_image(ours, tmp_path):
    broken = nnx.clone(ours.transformer)
    broken.proj_out.bias[...] = jnp.full_like(broken.proj_out.bias[...], jnp.nan)
    pipe = FluxPipeline(broken, ours.vae, ours.text_encoders, progress=False)
    with pytest.raises(NonFiniteOutputError, match="final latents hold NaN or Inf for 1 prompt"):
        pipe.generate_pngs(PROMPTS[:1], SETTINGS, tmp_path)
    assert not list(tmp_path.iterdir())


def test_generate_refuses_a_damaged_checkpoint_in_one_line(reference, w4a4_checkpoint, tmp_path, capsys):
    from flux_flax import cli

    _, folder = reference
    damaged = tmp_path / "damaged"
    shutil.copytree(w4a4_checkpoint, damaged)
    data = max((p for p in damaged.rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    argv = ["generate", "--model", str(folder), "--checkpoint", str(damaged), "--prompt", "a cat",
            "--out", str(tmp_path / "out"), "--no-compile-cache"]
    assert cli.main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "is damaged" in err[0] and data.name in err[0], err
    assert not (tmp_path / "out").exists()


def test_loras_load_unload_without_recompiling_and_in_the_metadata(reference, ours, tmp_path):
    """load_lora / unload_loras on the pipeline: LoRAs change the result, another LoRA of the same
    ranks reuses the compiled loop, unloading gives the base result bit for bit, the PNGs record
    the LoRAs, and a file that does not fit leaves the loaded ones as they were."""
    from flux_flax.lora import LoRAError

    pipe, _ = reference
    shapes = flux_fixtures.linear_shapes(pipe.transformer)
    modules = ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp", "proj_out"]
    for i in range(2):
        flux_fixtures.save_lora(tmp_path / f"{i}.safetensors", shapes, modules, rank=4, seed=i)
    latents = ours.prepare_latents([3], SETTINGS.height, SETTINGS.width)
    embeds = ours.encode_prompts(PROMPTS[:1])
    base = np.asarray(ours.denoise(latents, embeds, SETTINGS))
    try:
        ours.load_lora(tmp_path / "0.safetensors", 0.9)
        first = np.asarray(ours.denoise(latents, embeds, SETTINGS))
        compiled = ours._denoise._cache_size()
        ours.unload_loras()
        ours.load_lora(tmp_path / "1.safetensors", scale=-0.5)
        second = np.asarray(ours.denoise(latents, embeds, SETTINGS))
        assert ours._denoise._cache_size() == compiled
        assert flux_fixtures.relative_error(first, base) > 0.01 and flux_fixtures.relative_error(second, first) > 0.01
        with pytest.raises(LoRAError, match="does not exist"):
            ours.load_lora(tmp_path / "missing.safetensors")
        assert [lora.path.name for lora, _ in ours.loras] == ["1.safetensors"]
        [path] = ours.generate_pngs(PROMPTS[:1], SETTINGS, tmp_path / "png")
        with Image.open(path) as img:
            assert img.text["loras"] == f"{tmp_path / '1.safetensors'}:-0.5"
            assert json.loads(img.text["parameters"])["loras"] == img.text["loras"]
    finally:
        ours.unload_loras()
    np.testing.assert_array_equal(np.asarray(ours.denoise(latents, embeds, SETTINGS)), base)


def test_lora_argument_is_checked_before_loading(tmp_path):
    from flux_flax import cli
    from flux_flax.command_line import UsageError

    lora = tmp_path / "style:v2.safetensors"
    lora.write_bytes(b"")
    assert cli.parse_lora(str(lora)) == (lora, 1.0)
    assert cli.parse_lora(f"{lora}:0.75") == (lora, 0.75)
    assert cli.parse_lora(f"{lora}:-1e-1") == (lora, -0.1)
    with pytest.raises(UsageError, match="missing.safetensors does not exist"):
        cli.parse_lora(str(tmp_path / "missing.safetensors:0.5"))
    with pytest.raises(UsageError, match="finite"):
        cli.parse_lora(f"{lora}:nan")


@pytest.mark.slow
def test_generate_with_loras(reference, tmp_path, capsys):
    """`convrot-flux generate --lora FILE:SCALE` (twice) writes a PNG recording both."""
    from flux_flax import cli

    pipe, folder = reference
    shapes = flux_fixtures.linear_shapes(pipe.transformer)
    for i in range(2):
        flux_fixtures.save_lora(tmp_path / f"{i}.safetensors", shapes, ["x_embedder"], rank=2 + i, seed=i)
    argv = ["generate", "--model", str(folder), "--prompt", PROMPTS[0], "--size", f"{SETTINGS.width}x{SETTINGS.height}",
            "--steps", "2", "--out", str(tmp_path / "out"), "--max-sequence-length", str(T5_LENGTH),
            "--lora", f"{tmp_path / '0.safetensors'}:0.5", "--lora", str(tmp_path / "1.safetensors"),
            "--no-compile-cache"]
    assert cli.main(argv) == 0
    [path] = (tmp_path / "out").glob("*.png")
    with Image.open(path) as img:
        assert img.text["loras"] == f"{tmp_path / '0.safetensors'}:0.5, {tmp_path / '1.safetensors'}:1"
