"""FLUX.1 in Flax NNX: the transformer (mirroring diffusers' names one to one), its loaders, its
checkpoints and its ConvRot quantization, the VAE decoder, the text encoders (CLIP-L and T5-XXL
ported to Flax NNX, or transformers' PyTorch models) and the pipeline.

    model = flux_flax.load_transformer("FLUX.1-dev/transformer")        # bf16
    flux_flax.quantize_model(model)                                    # W4A4 per flux_default_policy()
    flux_flax.fuse_projections(model)                                  # q/k/v (+ MLP in) as one GEMM
    flux_flax.fuse_producers(model)                                    # GELUs computed in the quantizer
    out = model(latents, t5, clip_pooled, t, img_ids, txt_ids, guidance)

Exports resolve on first use, so that `convrot-flux` checks its arguments before jax, flax and
torch load (they take seconds to import).
"""

import importlib

_EXPORTS = {
    "FluxConfig": "flux_flax.config",
    "fuse_projections": "flux_flax.fusion",
    "fuse_producers": "flux_flax.producers",
    "abstract_transformer": "flux_flax.loading",
    "diffusers_key": "flux_flax.loading",
    "expected_shapes": "flux_flax.loading",
    "load_transformer": "flux_flax.loading",
    "load_weights": "flux_flax.loading",
    "load_checkpoint": "flux_flax.checkpoint",
    "flux_default_policy": "flux_flax.policy",
    "quantize_model": "flux_flax.quantize",
    "GenerationSettings": "flux_flax.settings",
    "FluxSingleTransformerBlock": "flux_flax.transformer",
    "FluxTransformer2DModel": "flux_flax.transformer",
    "FluxTransformerBlock": "flux_flax.transformer",
    "linear_paths": "flux_flax.transformer",
    "param_paths": "flux_flax.transformer",
    "FluxPipeline": "flux_flax.pipeline",
    "NonFiniteOutputError": "flux_flax.pipeline",
    "PromptEncoder": "flux_flax.text",
    "TextEncoders": "flux_flax.text",
    "JaxTextEncoders": "flux_flax.text_jax",
    "CLIPTextModel": "flux_flax.clip",
    "CLIPTextConfig": "flux_flax.clip",
    "T5EncoderModel": "flux_flax.t5",
    "T5Config": "flux_flax.t5",
    "load_clip": "flux_flax.text_loading",
    "load_t5": "flux_flax.text_loading",
    "AutoencoderKLDecoder": "flux_flax.vae",
    "load_vae": "flux_flax.vae",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flux_flax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
