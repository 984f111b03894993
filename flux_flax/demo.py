"""`convrot-flux demo`: the whole text-to-image path on a small random-weight FLUX, offline, on the
CPU in about a minute. It samples the same prompt and seed with the bf16 transformer and with its
ConvRot W4A4 version, writes both PNGs, and reports how far apart they are and the weight memory.

The weights are random (nothing is downloaded), so the images show texture, not a picture: the
point is the machinery and the W4A4-vs-bf16 figures. The model is `FluxConfig.small()`, whose
linear layers are multiples of 256 wide so every layer the policy marks W4A4 is quantized.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from convrot_jax import QuantPolicy
from flux_flax.config import FluxConfig
from flux_flax.demo_assets import tiny_jax_text_encoders
from flux_flax.policy import flux_default_policy
from flux_flax.pipeline import FluxPipeline, GenerationSettings, image_filename, save_png, to_uint8
from flux_flax.quantize import quantize_model
from flux_flax.transformer import FluxTransformer2DModel, linear_paths
from flux_flax.vae import AutoencoderKLDecoder, VAEConfig

MODEL_SEED = 0  # the random weights are fixed: only --seed changes the image


@dataclasses.dataclass(frozen=True)
class DemoReport:
    """The demo's figures: paths written, output differences, weight memory, wall times."""

    bf16_png: Path
    w4a4_png: Path
    latent_relative_l2: float  # ||x_w4a4 - x_bf16|| / ||x_bf16|| on the final latents
    image_psnr_db: float  # PSNR of the W4A4 image against the bf16 one
    image_max_abs_diff: int  # in 0..255 levels
    bf16_weight_bytes: int  # the whole transformer
    w4a4_weight_bytes: int
    bf16_quantized_layers_bytes: int  # only the layers the policy quantizes, before and after
    w4a4_quantized_layers_bytes: int
    bf16_seconds: float  # sampling + decode, compilation included
    w4a4_seconds: float
    quantize_seconds: float

    def lines(self) -> list[str]:
        mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
        return [
            f"bf16 image:  {self.bf16_png}  ({self.bf16_seconds:.1f} s with compilation)",
            f"W4A4 image:  {self.w4a4_png}  ({self.w4a4_seconds:.1f} s with compilation; quantizing took {self.quantize_seconds:.1f} s)",
            f"W4A4 vs bf16, final latents: relative L2 error {self.latent_relative_l2:.4f}",
            f"W4A4 vs bf16, images: PSNR {self.image_psnr_db:.1f} dB, max |diff| {self.image_max_abs_diff}/255",
            f"transformer weights: bf16 {mib(self.bf16_weight_bytes)} -> W4A4 {mib(self.w4a4_weight_bytes)}"
            f" ({self.bf16_weight_bytes / self.w4a4_weight_bytes:.2f}x smaller)",
            f"  of which quantized layers: {mib(self.bf16_quantized_layers_bytes)} -> {mib(self.w4a4_quantized_layers_bytes)}"
            f" ({self.bf16_quantized_layers_bytes / self.w4a4_quantized_layers_bytes:.2f}x smaller)",
        ]


def weight_bytes(model: nnx.Module, prefixes: tuple[str, ...] = ("",)) -> int:
    """Bytes of the model's arrays whose dotted path starts with one of `prefixes`."""
    total = 0
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        name = ".".join(str(p) for p in path)
        if name.startswith(prefixes):
            total += variable.get_value().nbytes
    return total


def quantized_layer_prefixes(model: nnx.Module, policy: QuantPolicy) -> tuple[str, ...]:
    """"path." of every Linear the policy quantizes (W4A4 or W4A16)."""
    return tuple(f"{path}." for path, _ in linear_paths(model) if policy.treatment(path) != "bf16")


def build_demo_pipeline(*, dtype=jnp.bfloat16, progress: bool = True) -> FluxPipeline:
    """FluxConfig.small() with random weights, tiny random CLIP/T5 of its widths, a tiny random VAE."""
    config = FluxConfig.small()
    rngs = nnx.Rngs(MODEL_SEED)
    transformer = FluxTransformer2DModel(config, dtype=dtype, rngs=rngs)
    vae = AutoencoderKLDecoder(VAEConfig.tiny(latent_channels=config.in_channels // 4), dtype=jnp.float32, rngs=rngs)
    text = tiny_jax_text_encoders(config.pooled_projection_dim, config.joint_attention_dim, max_sequence_length=128,
                              seed=MODEL_SEED)
    return FluxPipeline(transformer, vae, text, progress=progress)


def _sample(pipe: FluxPipeline, prompt: str, settings: GenerationSettings) -> tuple[np.ndarray, np.ndarray, float]:
    start = time.perf_counter()
    embeds = pipe.encode_prompts([prompt])
    latents = pipe.denoise(pipe.prepare_latents([settings.seed], settings.height, settings.width), embeds, settings)
    image = to_uint8(pipe.decode(latents, settings.height, settings.width))[0]
    return np.asarray(latents, np.float32), image, time.perf_counter() - start


def run_demo(
    out_dir: str | Path = "demo_out",
    *,
    prompt: str = "a photo of a cat sitting on a red chair next to the window",
    settings: GenerationSettings = GenerationSettings(height=256, width=256, num_inference_steps=4, seed=0),
    progress: bool = True,
) -> DemoReport:
    """Samples `prompt` with the bf16 demo model, quantizes it with ConvRot (W4A4 token linears,
    W4A16 modulation, per the default policy), samples again, writes both PNGs to `out_dir`."""
    out_dir = Path(out_dir)
    pipe = build_demo_pipeline(progress=progress)
    bf16_bytes = weight_bytes(pipe.transformer)
    ref_latents, ref_image, bf16_seconds = _sample(pipe, prompt, settings)
    policy = flux_default_policy()
    quantized = quantized_layer_prefixes(pipe.transformer, policy)
    float_quantized_bytes = weight_bytes(pipe.transformer, quantized)

    start = time.perf_counter()
    nnx.jit(functools.partial(quantize_model, policy=policy))(pipe.transformer)  # in place; jit: 4x faster on CPU
    quantize_seconds = time.perf_counter() - start
    q_latents, q_image, w4a4_seconds = _sample(pipe, prompt, settings)

    err = q_image.astype(np.float64) - ref_image
    mse = float(np.mean(err**2))
    name = image_filename(0, prompt, settings.seed)
    meta = {"model": "convrot-flux demo: random-weight FluxConfig.small()"}
    bf16_png = save_png(ref_image, out_dir / name.replace(".png", "-bf16.png"), prompt, settings.seed, settings,
                        **meta, quantization="none (bf16)")
    w4a4_png = save_png(q_image, out_dir / name.replace(".png", "-w4a4.png"), prompt, settings.seed, settings,
                        **meta, quantization="ConvRot W4A4 (regular Hadamard, group 256), policy flux_default")
    return DemoReport(
        bf16_png=bf16_png,
        w4a4_png=w4a4_png,
        latent_relative_l2=float(np.linalg.norm(q_latents - ref_latents) / np.linalg.norm(ref_latents)),
        image_psnr_db=float("inf") if mse == 0 else 10 * np.log10(255**2 / mse),
        image_max_abs_diff=int(np.abs(err).max()),
        bf16_weight_bytes=bf16_bytes,
        w4a4_weight_bytes=weight_bytes(pipe.transformer),
        bf16_quantized_layers_bytes=float_quantized_bytes,
        w4a4_quantized_layers_bytes=weight_bytes(pipe.transformer, quantized),
        bf16_seconds=bf16_seconds,
        w4a4_seconds=w4a4_seconds,
        quantize_seconds=quantize_seconds,
    )
