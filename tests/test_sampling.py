"""flux_flax.sampling against diffusers' FlowMatchEulerDiscreteScheduler and FluxPipeline helpers."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift

from flux_flax import sampling

# The scheduler configs shipped with FLUX.1-dev and FLUX.1-schnell (scheduler/scheduler_config.json).
DEV_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
    base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def diffusers_schedule(config: dict, steps: int, image_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """What FluxPipeline.__call__ hands the scheduler: linspace sigmas and mu from the sequence length."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(
        sigmas=np.linspace(1.0, 1 / steps, steps), mu=diffusers_calculate_shift(image_seq_len)
    )
    return scheduler.sigmas.numpy(), scheduler.timesteps.numpy()


@pytest.mark.parametrize("size", [(256, 256), (512, 768), (1024, 1024), (1360, 768), (2048, 2048)])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_dev_schedule_matches_diffusers(size, steps):
    h, w = size
    seq_len = (h // 16) * (w // 16)
    ref_sigmas, ref_timesteps = diffusers_schedule(DEV_SCHEDULER, steps, seq_len)
    sigmas = sampling.flux_sigmas(steps, seq_len, dynamic_shift=True)
    assert sigmas.dtype == np.float32 and sigmas.shape == (steps + 1,)
    np.testing.assert_allclose(sigmas, ref_sigmas, rtol=1e-6, atol=0)
    np.testing.assert_allclose(sigmas[:-1] * 1000, ref_timesteps, rtol=1e-6, atol=0)


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_schnell_schedule_matches_diffusers(steps):
    ref_sigmas, ref_timesteps = diffusers_schedule(SCHNELL_SCHEDULER, steps, 4096)
    sigmas = sampling.flux_sigmas(steps, 4096, dynamic_shift=False)
    np.testing.assert_allclose(sigmas, ref_sigmas, rtol=1e-6, atol=0)
    np.testing.assert_allclose(sigmas[:-1] * 1000, ref_timesteps, rtol=1e-6, atol=0)


def test_shift_moves_steps_towards_noise():
    """The dev shift is a real change: larger images spend longer at high noise."""
    small = sampling.flux_sigmas(28, 256)
    large = sampling.flux_sigmas(28, 4096)
    assert np.all(large[1:-1] > small[1:-1])
    assert sampling.calculate_shift(256) == pytest.approx(0.5)
    assert sampling.calculate_shift(4096) == pytest.approx(1.15)


def test_euler_step_matches_scheduler_step():
    steps, seq_len = 4, 64
    scheduler = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=diffusers_calculate_shift(seq_len))
    sigmas = sampling.flux_sigmas(steps, seq_len)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, seq_len, 64, generator=gen)
    ref, ours = x.clone(), np.asarray(x)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(2, seq_len, 64, generator=gen)
        ref = scheduler.step(v, t, ref, return_dict=False)[0]
        ours = sampling.euler_step(ours, np.asarray(v), sigmas[i], sigmas[i + 1])
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(64, 64), (128, 96), (48, 160)])
def test_pack_unpack_and_ids_match_fluxpipeline(size):
    h, w = size
    c, lh, lw = sampling.latent_shape(h, w)
    latents = torch.randn(2, c, lh, lw, generator=torch.Generator().manual_seed(1))
    ref_packed = FluxPipeline._pack_latents(latents, 2, c, lh, lw)
    packed = sampling.pack_latents(np.asarray(latents))
    np.testing.assert_array_equal(np.asarray(packed), ref_packed.numpy())

    ref_unpacked = FluxPipeline._unpack_latents(ref_packed, h, w, sampling.VAE_SCALE_FACTOR)
    unpacked = sampling.unpack_latents(packed, h, w)
    np.testing.assert_array_equal(np.asarray(unpacked), ref_unpacked.numpy())
    np.testing.assert_array_equal(np.asarray(unpacked), latents.numpy())

    ref_ids = FluxPipeline._prepare_latent_image_ids(2, lh // 2, lw // 2, "cpu", torch.float32)
    np.testing.assert_array_equal(sampling.latent_image_ids(h, w), ref_ids.numpy())
    assert sampling.text_ids(7).shape == (7, 3) and not sampling.text_ids(7).any()


@pytest.mark.parametrize("size", [(1000, 1024), (1024, 8), (0, 64), (-16, 64)])
def test_bad_image_size_is_refused(size):
    with pytest.raises(ValueError, match="multiples of 16"):
        sampling.check_image_size(*size)
