"""Data parallel sampling (`FluxPipeline(devices=N)`, `convrot-flux generate --devices N`) on 4
CPU devices forced by XLA_FLAGS, in subprocesses so that the other tests keep one device."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flux_fixtures
from flux_flax import cli
from flux_flax.config import FluxConfig

STEPS, T5_LENGTH, HEIGHT, WIDTH = 2, 8, 32, 48
TOKENS = T5_LENGTH + (HEIGHT // 16) * (WIDTH // 16)

# One subprocess for both tests below (each start costs the imports and the tiny models' first
# compilations again). Denoises a batch of 4 with the tiny FLUX on 1, 2 and 4 devices and a batch of
# 3 on 2 devices (padded to 4), and decodes the single-device latents on each (those of 3 are the
# first 3 of the batch of 4: each sample's latents depend on its own inputs only); writes 3 PNGs on
# 4 devices into the folder argv[1]. Then a LoRA loaded after the pipeline is built (its factors
# replicated on the mesh), saved to argv[2]: denoises a batch of 2 with the fused model on 1 device
# without and with the LoRA, and on 2 devices with it. Prints {"sampling": {"devices,batch":
# [latents, uint8 images]}, "lora": {"devices,lora|base": latents}} as JSON.
SAMPLER = f"""
import json
import sys
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
sys.path.insert(0, "tests")
import flux_fixtures
from flux_flax.config import FluxConfig
from flux_flax.demo_assets import tiny_text_encoders
from flux_flax.pipeline import FluxPipeline, to_uint8
from flux_flax.settings import GenerationSettings
from flux_flax.text import PromptEmbeds
from flux_flax.transformer import FluxTransformer2DModel
from flux_flax.vae import AutoencoderKLDecoder, VAEConfig

config = FluxConfig.tiny()
text = tiny_text_encoders(config.pooled_projection_dim, config.joint_attention_dim, max_sequence_length={T5_LENGTH})
settings = GenerationSettings(height={HEIGHT}, width={WIDTH}, num_inference_steps={STEPS}, seed=0)
rng = np.random.default_rng(0)
embeds = PromptEmbeds(rng.standard_normal((4, {T5_LENGTH}, config.joint_attention_dim), np.float32),
                      rng.standard_normal((4, config.pooled_projection_dim), np.float32))


def pipeline(devices, fused=False):
    rngs = nnx.Rngs(0)
    transformer = FluxTransformer2DModel(config, dtype=jnp.float32, rngs=rngs)
    if fused:
        transformer = transformer.fuse_qkv_projections()
    vae = AutoencoderKLDecoder(VAEConfig.tiny(latent_channels=config.in_channels // 4), dtype=jnp.float32, rngs=rngs)
    return FluxPipeline(transformer, vae, text, progress=False, devices=devices)


sampling, single = {{}}, None
for devices in (1, 2, 4):
    pipe = pipeline(devices)
    latents = pipe.prepare_latents(range(4), settings.height, settings.width)
    for batch in ((4, 3) if devices == 2 else (4,)):
        part = PromptEmbeds(embeds.prompt_embeds[:batch], embeds.pooled_prompt_embeds[:batch])
        out = pipe.denoise(latents[:batch], part, settings)
        single = out if single is None else single
        images = to_uint8(pipe.decode(single[:batch], settings.height, settings.width))
        sampling[f"{{devices}},{{batch}}"] = [np.asarray(out).tolist(), images.tolist()]
pipe.generate_pngs(["one", "two", "three"], settings, sys.argv[1], batch_size=4)

d, mlp = config.inner_dim, 4 * config.inner_dim
flux_fixtures.save_lora(sys.argv[2], {{"transformer_blocks.0.attn.to_q": (d, d), "single_transformer_blocks.0.proj_mlp":
                                      (d, mlp)}}, ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"],
                        rank=4, seed=0)
lora = {{}}
pair = PromptEmbeds(embeds.prompt_embeds[:2], embeds.pooled_prompt_embeds[:2])
for devices in (1, 2):
    pipe = pipeline(devices, fused=True)
    latents = pipe.prepare_latents(range(2), settings.height, settings.width)
    if devices == 1:  # the base only once: it shows that the LoRA changes the result
        lora["1,base"] = np.asarray(pipe.denoise(latents, pair, settings)).tolist()
    pipe.load_lora(sys.argv[2], 0.8)
    leaf = jax.tree.leaves(nnx.state(pipe.transformer.transformer_blocks[0].attn.to_qkv.lora))[0]
    assert len(leaf.sharding.device_set) == devices, leaf.sharding
    lora[f"{{devices}},lora"] = np.asarray(pipe.denoise(latents, pair, settings)).tolist()
print(json.dumps({{"sampling": sampling, "lora": lora}}))
"""


@pytest.fixture(scope="module")
def sampled(tmp_path_factory) -> tuple[dict, Path]:
    """SAMPLER's results (both parts) and the folder of its PNGs: one subprocess for the module
    (the two tests stand next to each other, so that xdist gives them to one worker)."""
    out = tmp_path_factory.mktemp("pngs")
    lora = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    run = flux_fixtures.run_with_4_devices(["-c", SAMPLER, str(out), str(lora)])
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1]), out


@pytest.mark.slow
def test_data_parallel_equals_one_device(sampled):
    results = {key: [np.asarray(latents, np.float32), np.asarray(images, np.uint8)]
               for key, (latents, images) in sampled[0]["sampling"].items()}
    # Not bit for bit: XLA:CPU picks its GEMM blocking by the GEMM's shape (M = batch x tokens), so
    # a shard of 2 sums in another order than a batch of 4 (about 1e-6 apart measured). Each step
    # adds at most one forward's float32 rounding bound (the step size is at most 1).
    tolerance = STEPS * flux_fixtures.model_tolerance(FluxConfig.tiny(), TOKENS)
    for key in ("2,4", "4,4", "2,3"):  # 3 on 2 devices: padded to 4, the padding dropped
        batch = int(key.split(",")[1])
        reference = [r[:batch] for r in results["1,4"]]  # the first `batch` samples of one device's batch of 4
        latents, images = results[key]
        assert latents.shape == reference[0].shape and images.shape == reference[1].shape
        assert flux_fixtures.relative_error(latents, reference[0]) <= tolerance, key
        assert np.abs(images.astype(int) - reference[1]).max() <= 1, key
    pngs = sorted(sampled[1].glob("*.png"))
    assert [p.name[:4] for p in pngs] == ["0000", "0001", "0002"]
    with Image.open(pngs[2]) as png:
        assert json.loads(png.text["parameters"])["devices"] == "4" and png.text["prompt"] == "three"


@pytest.mark.slow
def test_lora_on_two_devices_equals_one_device(sampled):
    results = {k: np.asarray(v, np.float32) for k, v in sampled[0]["lora"].items()}
    dim = FluxConfig.tiny().inner_dim  # the two LoRA layers add a reduction of K + r = dim + 4 each
    tolerance = STEPS * (flux_fixtures.model_tolerance(FluxConfig.tiny(), TOKENS) + flux_fixtures.F32_EPS * 2 * (dim + 4))
    assert flux_fixtures.relative_error(results["2,lora"], results["1,lora"]) <= tolerance
    assert flux_fixtures.relative_error(results["1,lora"], results["1,base"]) > 0.01


def test_devices_below_one_is_a_usage_error(tmp_path, capsys):
    # A usage error, whatever the devices: in this process.
    code = cli.main(["generate", "--model", str(tmp_path), "--prompt", "x", "--devices", "0", "--out",
                     str(tmp_path / "out"), "--no-compile-cache"])
    assert code == 2 and "--devices must be at least 1, got 0" in capsys.readouterr().err


def test_more_devices_than_exist_is_a_clear_error(tmp_path):
    # Checked before the model loads: the empty folder is never read.
    run = flux_fixtures.run_with_4_devices(["-m", "flux_flax.cli", "generate", "--model", str(tmp_path),
                                            "--prompt", "x", "--devices", "9", "--out", str(tmp_path / "out"),
                                            "--no-compile-cache"])
    assert run.returncode == 1, run.stderr
    assert "asked for 9 devices, but this machine has only 4 local cpu device(s)" in run.stderr.splitlines()[-1]
