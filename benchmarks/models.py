"""diffusers' PyTorch FLUX transformer of a `FluxConfig`'s shape with random weights, and the fp8
recipe Hopper users run on it, for the peer rows of the benchmarks (the JAX models:
`flux_flax.random_weights.random_transformer`)."""

from __future__ import annotations

from flux_flax import FluxConfig


def torch_transformer(config: FluxConfig, device: str):
    """diffusers' FluxTransformer2DModel of `config`'s shape in bf16 with diffusers' own random
    initialisation, made on `device` (seconds on a GPU), in eval mode without gradients."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = FluxTransformer2DModel(
                patch_size=1, in_channels=config.in_channels, num_layers=config.num_layers,
                num_single_layers=config.num_single_layers, attention_head_dim=config.attention_head_dim,
                num_attention_heads=config.num_attention_heads, joint_attention_dim=config.joint_attention_dim,
                pooled_projection_dim=config.pooled_projection_dim, guidance_embeds=config.guidance_embeds,
                axes_dims_rope=tuple(config.axes_dims_rope))
        finally:
            torch.set_default_dtype(torch.float32)
    return model.eval().requires_grad_(False)


def quantize_fp8_peer(model) -> None:
    """The fp8 peer, in place: fused QKV projections, then torchao's float8 dynamic row-wise W8A8
    (`Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`), the recipe flux-fast and
    diffusers-torchao publish (without FA3); the caller compiles it. Needs torchao."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    model.fuse_qkv_projections()
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def torch_weight_bytes(model, measured: bool = False) -> int:
    """Parameter bytes; `measured` (after torchao swapped in its fp8 tensor subclasses, whose
    element sizes say nothing of their storage): the GPU memory allocated now, which the caller
    knows to be the model's alone."""
    import torch

    if measured and torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return sum(p.numel() * p.element_size() for p in model.parameters())
