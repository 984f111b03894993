"""Sequence parallel sampling (`FluxPipeline(parallel="sequence")`, `convrot-flux generate --parallel
sequence`) on 4 CPU devices forced by XLA_FLAGS, in subprocesses so that the other tests keep one
device; and the same over two processes of 2 devices each joined by `jax.distributed` (several
hosts, emulated on this one: CPU collectives through gloo instead of NCCL, no network between
machines). Token counts are ragged: 7 text and 6 image tokens over 2 and 4 devices."""

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flux_fixtures
from flux_flax import cli
from flux_flax.config import FluxConfig
from flux_flax.pipeline import device_mesh
from flux_flax.sequence_parallel import TokenLayout, check_heads

STEPS, T5_LENGTH, HEIGHT, WIDTH = 2, 7, 32, 48
TOKENS = T5_LENGTH + (HEIGHT // 16) * (WIDTH // 16)
HEADS = 4  # the tiny config with 4 heads (of 16), so that they divide over 4 devices

# Prints {"attention": {n: [max error on real tokens, max |padding output|]}}: the sequence-parallel
# attention on n devices against one direct call on the same q, k, v. Then denoises with the tiny
# FLUX on one device (a batch of 2: the first sample is the reference for a batch of 1, as each
# sample's latents depend on its own inputs only), sequence parallel on 4 and on 2 devices and on a
# 2 (data) x 2 (sequence) mesh, batches of 1 and 2 (2 only on 2 devices: each compilation costs
# seconds): {"mesh,batch": latents}. Then records the error of a model whose heads do not divide by 4.
SAMPLER = f"""
import functools
import json
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P
from flux_flax import sequence_parallel as sp
from flux_flax.config import FluxConfig
from flux_flax.demo_assets import tiny_text_encoders
from flux_flax.pipeline import FluxPipeline
from flux_flax.settings import GenerationSettings
from flux_flax.text import PromptEmbeds
from flux_flax.transformer import FluxTransformer2DModel
from flux_flax.vae import AutoencoderKLDecoder, VAEConfig

T, I, B, H, D = {T5_LENGTH}, {TOKENS - T5_LENGTH}, 2, {HEADS}, 16
rng = np.random.default_rng(0)
attend = functools.partial(jax.nn.dot_product_attention, implementation="xla")
q, k, v = (jnp.asarray(rng.standard_normal((B, T + I, H, D)), jnp.float32) for _ in range(3))
direct = jax.jit(attend)(q, k, v)
results = {{"attention": {{}}}}
for n in (2, 4):
    layout = sp.TokenLayout(T, I, n)

    def device_major(x):  # [text, image] -> each padded, then [text slice j, image slice j] for each j
        text = sp.pad_tokens(x[:, :T], 1, n).reshape(B, n, -1, *x.shape[2:])
        image = sp.pad_tokens(x[:, T:], 1, n).reshape(B, n, -1, *x.shape[2:])
        return jnp.concatenate([text, image], axis=2).reshape(B, -1, *x.shape[2:])

    def local(q, k, v):
        with sp.token_layout(layout):
            return sp.attention(attend, q, k, v)

    mesh = Mesh(np.array(jax.devices()[:n]).reshape(1, n), (sp.DATA, sp.SEQUENCE))
    run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(None, sp.SEQUENCE), out_specs=P(None, sp.SEQUENCE)))
    out = run(device_major(q), device_major(k), device_major(v))
    real = np.asarray(device_major(jnp.ones_like(q))) > 0
    results["attention"][n] = [float(jnp.abs(jnp.where(real, out - device_major(direct), 0)).max()),
                               float(jnp.abs(jnp.where(real, 0, out)).max())]

config = FluxConfig.tiny(num_attention_heads=H)
text = tiny_text_encoders(config.pooled_projection_dim, config.joint_attention_dim, max_sequence_length=T)
settings = GenerationSettings(height={HEIGHT}, width={WIDTH}, num_inference_steps={STEPS}, seed=0)
embeds = PromptEmbeds(rng.standard_normal((2, T, config.joint_attention_dim), np.float32),
                      rng.standard_normal((2, config.pooled_projection_dim), np.float32))


def pipeline(config, **parallel):
    rngs = nnx.Rngs(0)
    transformer = FluxTransformer2DModel(config, dtype=jnp.float32, rngs=rngs)
    vae = AutoencoderKLDecoder(VAEConfig.tiny(latent_channels=config.in_channels // 4), dtype=jnp.float32, rngs=rngs)
    return FluxPipeline(transformer, vae, text, progress=False, **parallel)


for name, parallel, batches in (("1", {{}}, (2,)), ("2", dict(devices=2, parallel="sequence"), (2,)),
                                ("2x2", dict(devices=4, parallel="sequence", sequence_devices=2), (1, 2)),
                                ("4", dict(devices=4, parallel="sequence"), (1, 2))):
    pipe = pipeline(config, **parallel)
    latents = pipe.prepare_latents(range(2), settings.height, settings.width)
    for batch in batches:
        part = PromptEmbeds(embeds.prompt_embeds[:batch], embeds.pooled_prompt_embeds[:batch])
        results[f"{{name}},{{batch}}"] = np.asarray(pipe.denoise(latents[:batch], part, settings)).tolist()
try:
    pipeline(FluxConfig.tiny(), devices=4, parallel="sequence")
except ValueError as error:
    results["heads_error"] = str(error)
print(json.dumps(results))
"""


# Process argv[2] of 2 (2 CPU devices each, coordinator on port argv[3]): denoises one prompt on its
# own first device, then sequence parallel over all 4 devices of both processes, and generates a
# PNG into argv[1] (the whole pipeline: text encoders, denoising, VAE); prints {"one": latents,
# "four": latents, "pngs": paths written}.
TWO_PROCESSES = f"""
import json
import sys
import jax
jax.distributed.initialize(f"localhost:{{sys.argv[3]}}", num_processes=2, process_id=int(sys.argv[2]))
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flux_flax.config import FluxConfig
from flux_flax.demo_assets import tiny_text_encoders
from flux_flax.pipeline import FluxPipeline
from flux_flax.settings import GenerationSettings
from flux_flax.text import PromptEmbeds
from flux_flax.transformer import FluxTransformer2DModel
from flux_flax.vae import AutoencoderKLDecoder, VAEConfig

config = FluxConfig.tiny(num_attention_heads={HEADS})
text = tiny_text_encoders(config.pooled_projection_dim, config.joint_attention_dim, max_sequence_length={T5_LENGTH})
settings = GenerationSettings(height={HEIGHT}, width={WIDTH}, num_inference_steps={STEPS}, seed=0)
rng = np.random.default_rng(0)
embeds = PromptEmbeds(rng.standard_normal((1, {T5_LENGTH}, config.joint_attention_dim), np.float32),
                      rng.standard_normal((1, config.pooled_projection_dim), np.float32))
results = {{}}
for name, devices in (("one", None), ("four", 4)):
    rngs = nnx.Rngs(0)
    transformer = FluxTransformer2DModel(config, dtype=jnp.float32, rngs=rngs)
    vae = AutoencoderKLDecoder(VAEConfig.tiny(latent_channels=config.in_channels // 4), dtype=jnp.float32, rngs=rngs)
    pipe = FluxPipeline(transformer, vae, text, progress=False, devices=devices, parallel="sequence")
    latents = pipe.prepare_latents([0], settings.height, settings.width)
    results[name] = np.asarray(pipe.denoise(latents, embeds, settings)).tolist()
results["pngs"] = [str(p) for p in pipe.generate_pngs(["one"], settings, sys.argv[1])]
print(json.dumps(results))
"""




@pytest.mark.slow
def test_sequence_parallel_equals_one_device():
    run = flux_fixtures.run_with_4_devices(["-c", SAMPLER])
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.splitlines()[-1])
    # The all-to-alls and the reordering only move data: each head's attention runs over the same
    # real keys in the same order as one direct call, so bit for bit; the padding's outputs are 0.
    assert results.pop("attention") == {"2": [0.0, 0.0], "4": [0.0, 0.0]}
    assert results.pop("heads_error") == ("sequence parallel over 4 devices splits the attention heads across them, "
                                          "but the model's 2 heads do not divide by 4")
    latents = {key: np.asarray(value, np.float32) for key, value in results.items()}
    # Against one device: every per-token op is the same, but XLA compiles the sharded program with
    # other fusions (and GEMMs with fewer rows), so the float32 rounding may differ. Each step adds
    # at most one forward's bound (the step size is at most 1).
    tolerance = STEPS * flux_fixtures.model_tolerance(FluxConfig.tiny(num_attention_heads=HEADS), TOKENS)
    for batch in (1, 2):
        reference = latents["1,2"][:batch]
        for mesh in ("2", "4", "2x2") if batch == 2 else ("4", "2x2"):
            out = latents[f"{mesh},{batch}"]
            assert out.shape == reference.shape and np.isfinite(out).all(), (mesh, batch)
            assert flux_fixtures.relative_error(out, reference) <= tolerance, (mesh, batch)
    # Between sequence-parallel runs the per-token arithmetic is the same program on fewer or more
    # rows; at the tests' widths XLA:CPU sums each row in an order independent of the row count (as
    # tests/test_modulation.py relies on), so 4 devices give 2 devices' bits.
    np.testing.assert_array_equal(latents["4,2"], latents["2,2"])


def test_token_layout_pads_each_stream_to_equal_slices():
    layout = TokenLayout(text_tokens=7, image_tokens=6, devices=4)
    assert (layout.local_text, layout.local_image) == (2, 2)
    assert (TokenLayout(512, 4096, 8).local_text, TokenLayout(512, 4096, 8).local_image) == (64, 512)


def test_heads_not_dividing_is_a_clear_error():
    check_heads(24, 8)
    with pytest.raises(ValueError, match="the model's 24 heads do not divide by 5"):
        check_heads(24, 5)


@pytest.mark.parametrize("args, message", [
    ((2, "tensor"), "parallel must be one of ('data', 'sequence'), got 'tensor'"),
    ((4, "data", 2), "sequence_devices applies to parallel='sequence' only"),
    ((4, "sequence", 3), "sequence_devices must divide devices (4), got 3"),
    ((8, "sequence"), "asked for 8 devices, but this machine has only 1 local cpu device"),
])
def test_bad_mesh_settings_are_clear_errors(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        device_mesh(*args)


@pytest.mark.parametrize("extra, message", [
    (["--process-id", "1"], "--process-id needs --distributed"),
    (["--distributed", "--num-processes", "2", "--process-id", "2"], "--process-id must be in [0, --num-processes), got 2"),
    (["--devices", "4", "--sequence-devices", "2"], "--sequence-devices needs --parallel sequence"),
    (["--devices", "4", "--parallel", "sequence", "--sequence-devices", "3"],
     "--sequence-devices must divide --devices (4), got 3"),
    (["--devices", "4", "--parallel", "sequence", "--sequence-devices", "0"],
     "--sequence-devices must divide --devices (4), got 0"),
])
def test_bad_sequence_settings_are_usage_errors(tmp_path, capsys, extra, message):
    # Checked before jax loads: the empty model folder is never read.
    code = cli.main(["generate", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "out"), *extra])
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_sequence_parallel_over_two_processes(tmp_path):
    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    processes = [flux_fixtures.run_with_devices(["-c", TWO_PROCESSES, str(tmp_path), str(i), str(port)], devices=2)
                 for i in (0, 1)]
    try:
        outputs = [process.communicate(timeout=300) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-3000:]
    first, second = (json.loads(stdout.splitlines()[-1]) for stdout, _ in outputs)
    # Both processes hold the same (replicated) result, within the one-device bound of its own run.
    np.testing.assert_array_equal(np.asarray(first["four"]), np.asarray(second["four"]))
    tolerance = STEPS * flux_fixtures.model_tolerance(FluxConfig.tiny(num_attention_heads=HEADS), TOKENS)
    assert flux_fixtures.relative_error(first["four"], first["one"]) <= tolerance
    # Process 0 alone writes.
    assert second["pngs"] == [] and [Path(p) for p in first["pngs"]] == list(tmp_path.glob("*.png"))
    with Image.open(first["pngs"][0]) as image:
        assert json.loads(image.text["parameters"])["parallel"] == "sequence"
