"""What a generation asks for, validated in one place and without jax, so that the command line
can refuse a bad request at once, before any model loads."""

from __future__ import annotations

import dataclasses
import math

# The transformer's attention implementations (convrot_jax.ops.ATTENTION_IMPLEMENTATIONS, named
# here too so that the command line checks --attention before jax loads; a test keeps them equal).
ATTENTION_CHOICES: tuple[str, ...] = ("cudnn", "xla", "mosaic_bf16", "sage8", "sage8_fp8", "sage_qk8", "int8")
VAE_SCALE_FACTOR = 8  # the FLUX VAE downsamples 8x; packing 2x2 makes the image side a multiple of 16
SEED_LIMIT = 2**32  # jax.random.key takes a uint32 seed


def check_image_size(height: int, width: int) -> None:
    """FLUX needs both sides to be positive multiples of 16 (8x VAE, then 2x2 packing)."""
    multiple = 2 * VAE_SCALE_FACTOR
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(
            f"image size {width}x{height} (WxH) is not allowed: both sides must be positive multiples of {multiple}"
        )


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """What to sample. `seed` is the first image's seed; image k of a request uses `seed + k`.
    Every field is checked here: a step count under 1, a NaN or infinite guidance scale, or a size
    FLUX cannot take raises `ValueError` naming it."""

    height: int = 1024
    width: int = 1024
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    seed: int = 0

    def __post_init__(self):
        check_image_size(self.height, self.width)
        if self.num_inference_steps < 1:
            raise ValueError(f"the number of denoising steps must be at least 1, got {self.num_inference_steps}")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"the guidance scale must be a finite number, got {self.guidance_scale}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"the seed must be in [0, 2**32), got {self.seed}")
