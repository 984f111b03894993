"""Swapping a model's float Linear layers for ConvRot int4 ones, per a QuantPolicy: the FLUX
transformer (`flux_default_policy`) or the T5 text encoder (`t5_default_policy`)."""

from __future__ import annotations

import functools

import jax
from flax import nnx

from convrot_jax import ConvDense4bit, Dense4bitWeightOnly, QuantPolicy, quantize_weight
from flux_flax.policy import flux_default_policy
from flux_flax.transformer import linear_paths

# One compiled quantizer per weight shape (a handful in FLUX) instead of op-by-op dispatch.
@functools.partial(jax.jit, static_argnames=("group_size", "hadamard", "scale_group"))
def _quantize_kernel(kernel: jax.Array, *, group_size: int, hadamard: str, scale_group: int | None):
    """An nnx.Linear kernel (in, out) -> QuantizedWeight of its PyTorch-layout weight (out, in)."""
    return quantize_weight(kernel.T, group_size=group_size, hadamard=hadamard, scale_group=scale_group)


def _set_submodule(model: nnx.Module, path: str, module: nnx.Module) -> None:
    *parents, last = path.split(".")
    node = model
    for name in parents:
        node = node[int(name)] if name.isdigit() else getattr(node, name)
    if last.isdigit():
        node[int(last)] = module
    else:
        setattr(node, last, module)


def quantize_model(model: nnx.Module, policy: QuantPolicy | None = None, *, group_size: int = 256,
                   hadamard: str = "regular", scale_group: int | None = None,
                   implementation: str = "auto") -> nnx.Module:
    """Replaces, IN PLACE, each `nnx.Linear` whose dotted path (diffusers' names for the transformer,
    transformers' for T5) the policy (default `flux_default_policy()`) marks "w4a4" by a `ConvDense4bit` and "w4a16" by a
    `Dense4bitWeightOnly`; "bf16" layers keep their float weights. Biases keep their dtype.
    Returns `model`. `group_size`, `hadamard`, `scale_group` are the quantization settings;
    `implementation` picks the W4A4 kernel ("auto", see convrot_jax.ops).

    For an abstract quantized model (to restore a checkpoint into), call it inside
    `nnx.eval_shape`: `nnx.eval_shape(lambda: quantize_model(FluxTransformer2DModel(cfg, rngs=nnx.Rngs(0))))`."""
    policy = policy or flux_default_policy()
    settings = dict(group_size=group_size, hadamard=hadamard, scale_group=scale_group)
    for path, layer in list(linear_paths(model)):
        treatment = policy.treatment(path)
        if treatment == "bf16":
            continue
        try:
            qweight = _quantize_kernel(layer.kernel[...], **settings)
        except ValueError as e:
            raise ValueError(f"cannot quantize {path} (kernel {layer.kernel.shape}): {e}") from None
        bias = None if layer.bias is None else layer.bias[...]
        if treatment == "w4a4":
            new = ConvDense4bit(qweight, bias, implementation=implementation)
        else:
            new = Dense4bitWeightOnly(qweight, bias)
        _set_submodule(model, path, new)
    return model
