"""FLUX flow-matching sampler: the sigma schedule (dev's resolution-dependent shift, schnell's
plain one), the Euler step, 2x2 latent packing and the RoPE position ids.

Every function mirrors a diffusers helper (`FlowMatchEulerDiscreteScheduler.set_timesteps` /
`.step`, `FluxPipeline._pack_latents` / `_unpack_latents` / `_prepare_latent_image_ids`,
`calculate_shift`) so that the JAX pipeline reproduces diffusers' numbers; tests check each one.
Latent images are NCHW here, as in diffusers, so the same initial noise can be fed to both.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flux_flax.settings import VAE_SCALE_FACTOR, check_image_size
from flux_flax.transformer import FluxTransformer2DModel, Modulation

NUM_TRAIN_TIMESTEPS = 1000


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX.1-dev's `mu`: linear in the number of packed image tokens, 0.5 at 256 and 1.15 at 4096."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """Exponential time shift `e^mu / (e^mu + (1/t - 1))`: more steps at high noise for large images."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def flux_sigmas(num_inference_steps: int, image_seq_len: int, *, dynamic_shift: bool = True) -> np.ndarray:
    """The sampler's sigmas, float32, length `num_inference_steps + 1` (the last one is 0).

    `dynamic_shift=True` is FLUX.1-dev's schedule (shifted by `calculate_shift(image_seq_len)`);
    False is FLUX.1-schnell's (its scheduler has no dynamic shifting and shift 1: unshifted).
    Timesteps fed to the transformer are `sigmas[:-1]` (diffusers' `timesteps / 1000`).
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).astype(np.float32)
    if dynamic_shift:
        sigmas = time_shift(calculate_shift(image_seq_len), sigmas).astype(np.float32)
    return np.append(sigmas, np.float32(0.0))


def euler_step(latents: jnp.ndarray, noise_pred: jnp.ndarray, sigma, sigma_next) -> jnp.ndarray:
    """One flow-matching Euler step `x + (sigma_next - sigma) * v`, computed in float32."""
    dt = jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32)
    return latents.astype(jnp.float32) + dt * noise_pred.astype(jnp.float32)


def steps_modulation(model: FluxTransformer2DModel, sigmas: jax.Array, pooled: jax.Array,
                     guidance: jax.Array | None = None) -> Modulation:
    """Every step's AdaLN modulation, before the loop: `model.modulation` on the steps x batch
    rows (step-major) of (timestep, pooled text, guidance), so each modulation layer runs once per
    generation as one GEMM (M = steps x batch) rather than once per step; each vector comes back
    as (steps, batch, k * dim). These are the per-step values up to the GEMMs' summation order
    over K, which may depend on M (`FluxTransformer2DModel.modulation` says where).

    Memory: steps x batch x (19 x 2 x 6 + 38 x 3 + 2) x 3072 values for FLUX.1, in the model dtype:
    about 59 MB in bf16 at 28 steps and batch 1 (2.1 MB a step and image), beside weights of
    several GB."""
    batch = pooled.shape[0]
    steps = sigmas.shape[0] - 1
    timestep = jnp.repeat(sigmas[:-1].astype(jnp.float32), batch)
    if guidance is not None:
        guidance = jnp.tile(jnp.broadcast_to(jnp.asarray(guidance), (batch,)), steps)
    modulation = model.modulation(timestep, jnp.tile(pooled, (steps, 1)), guidance)
    return jax.tree.map(lambda m: m.reshape(steps, batch, *m.shape[1:]), modulation)


def denoise(model: FluxTransformer2DModel, latents: jax.Array, prompt_embeds: jax.Array, pooled: jax.Array,
            img_ids: jax.Array, txt_ids: jax.Array, sigmas: jax.Array, guidance: jax.Array | None = None,
            on_step: Callable[[jax.Array], None] | None = None, *, precompute_modulation: bool = True) -> jax.Array:
    """The whole Euler loop as one `lax.fori_loop` (call it inside jit: one compiled program for
    every step). `model` is the FLUX transformer; latents are packed (B, tokens, C) and carried in
    float32; pooled (B, P); guidance (B,) or None; `sigmas` has one more entry than there are
    steps. `on_step`, when given, is a host callback fed a value of each step's output (so it runs
    after the step), e.g. a progress bar.

    With `precompute_modulation` (default) every step's AdaLN modulation is computed before the
    loop (`steps_modulation`) and step i reads row i, so the loop body runs no modulation layer
    and no time/text embedding; False computes them inside each step (the plain forward), with
    the same result up to the GEMMs' summation order (bit for bit at the tests' widths on
    XLA:CPU, in bf16 with its excess precision off: tests/test_modulation.py)."""
    batch = latents.shape[0]
    modulations = steps_modulation(model, sigmas, pooled, guidance) if precompute_modulation else None

    def step(i, latents):
        timestep = jnp.full((batch,), sigmas[i], jnp.float32)
        modulation = None if modulations is None else jax.tree.map(lambda m: m[i], modulations)
        noise_pred = model(latents, prompt_embeds, pooled, timestep, img_ids, txt_ids, guidance, modulation=modulation)
        latents = euler_step(latents, noise_pred, sigmas[i], sigmas[i + 1])
        if on_step is not None:
            jax.debug.callback(on_step, latents[0, 0, 0])
        return latents

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1, step, latents.astype(jnp.float32))


def latent_shape(height: int, width: int, num_channels: int = 16) -> tuple[int, int, int]:
    """The unpacked latent's (C, H/8, W/8) for an image of `height` x `width` pixels (multiples of 16)."""
    check_image_size(height, width)
    return num_channels, height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR


def pack_latents(latents: jnp.ndarray) -> jnp.ndarray:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): every 2x2 patch becomes one token (`_pack_latents`)."""
    b, c, h, w = latents.shape
    latents = latents.reshape(b, c, h // 2, 2, w // 2, 2)
    latents = latents.transpose(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(latents: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """(B, tokens, 4C) -> (B, C, H/8, W/8) for an image of `height` x `width` (`_unpack_latents`)."""
    b, _, channels = latents.shape
    h = 2 * (height // (VAE_SCALE_FACTOR * 2))
    w = 2 * (width // (VAE_SCALE_FACTOR * 2))
    latents = latents.reshape(b, h // 2, w // 2, channels // 4, 2, 2)
    latents = latents.transpose(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def latent_image_ids(height: int, width: int) -> np.ndarray:
    """RoPE ids of the packed image tokens, (H/16 * W/16, 3) float32: (0, row, column) per token."""
    h, w = height // (VAE_SCALE_FACTOR * 2), width // (VAE_SCALE_FACTOR * 2)
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def text_ids(seq_len: int) -> np.ndarray:
    """RoPE ids of the text tokens: all zeros, (seq_len, 3) float32."""
    return np.zeros((seq_len, 3), np.float32)
