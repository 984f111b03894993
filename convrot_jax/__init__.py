"""ConvRot in JAX: regular-Hadamard grouped rotation + W4A4 int4 quantization (arXiv 2512.03673)."""

from convrot_jax.hadamard import regular_hadamard, rotate, sylvester_hadamard
from convrot_jax.layers import ConvDense4bit, Dense4bitWeightOnly, QuantizedParam
from convrot_jax.linear import int4_weight_only_linear
from convrot_jax.lora import (
    LoRALinear,
    LoRAParam,
    LowRank,
    LowRankFactors,
    attach_lora,
    detach_lora,
    set_lora_fusion,
)
from convrot_jax.ops import quantize_activation, w4a4_linear
from convrot_jax.policy import QuantPolicy
from convrot_jax.prologue import GeluTanh, LayerNormModulation
from convrot_jax.quant import (
    QuantizedWeight,
    dequantize_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
)

__version__ = "0.1.0"

__all__ = [
    "ConvDense4bit",
    "Dense4bitWeightOnly",
    "GeluTanh",
    "LayerNormModulation",
    "LoRALinear",
    "LoRAParam",
    "LowRank",
    "LowRankFactors",
    "QuantPolicy",
    "QuantizedParam",
    "QuantizedWeight",
    "attach_lora",
    "dequantize_weight",
    "detach_lora",
    "int4_weight_only_linear",
    "pack_int4",
    "quantize_activation",
    "quantize_weight",
    "regular_hadamard",
    "rotate",
    "set_lora_fusion",
    "sylvester_hadamard",
    "unpack_int4",
    "w4a4_linear",
]
