"""FLUX.1 in Flax NNX: the transformer (mirroring diffusers' names one to one), its loaders and
its ConvRot quantization.

    model = flux_flax.load_transformer("FLUX.1-dev/transformer")        # bf16
    flux_flax.quantize_model(model)                                    # W4A4 per docs/design.md §2
    flux_flax.fuse_projections(model)                                  # q/k/v (+ MLP in) as one GEMM
    out = model(latents, t5, clip_pooled, t, img_ids, txt_ids, guidance)
"""

from flux_flax.config import FluxConfig
from flux_flax.fusion import fuse_projections
from flux_flax.loading import abstract_transformer, diffusers_key, expected_shapes, load_transformer, load_weights
from flux_flax.quantize import quantize_model
from flux_flax.transformer import (
    FluxSingleTransformerBlock,
    FluxTransformer2DModel,
    FluxTransformerBlock,
    linear_paths,
    param_paths,
)

# The pipeline pulls in torch and transformers (text encoders): resolved on first use only.
_LAZY = {
    "FluxPipeline": "flux_flax.pipeline",
    "GenerationSettings": "flux_flax.pipeline",
    "TextEncoders": "flux_flax.text",
    "AutoencoderKLDecoder": "flux_flax.vae",
    "load_vae": "flux_flax.vae",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'flux_flax' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "AutoencoderKLDecoder",
    "FluxConfig",
    "FluxPipeline",
    "FluxSingleTransformerBlock",
    "FluxTransformer2DModel",
    "FluxTransformerBlock",
    "GenerationSettings",
    "TextEncoders",
    "abstract_transformer",
    "diffusers_key",
    "expected_shapes",
    "fuse_projections",
    "linear_paths",
    "load_transformer",
    "load_vae",
    "load_weights",
    "param_paths",
    "quantize_model",
]
