"""Random-weight FLUX transformers (and T5 encoders) for tests, demos and benchmarks (no model hub
is needed to exercise the converter or the pipeline at FLUX.1-dev size): a folder in diffusers
layout (bf16 safetensors, sharded as on the Hub when asked), written quickly and in bounded memory;
or a model built on the device block by block (`random_transformer`, `random_t5`), quantized as it
grows; and text encoder folders in transformers' layout (`write_random_text_encoder`), torch-free.

safetensors' own writers (`save_file`) take every tensor in memory at once and the float RNGs run
at well under 1 GB/s; a FLUX.1-dev-size file is 23.8 GB. So the tensors are streamed into the file
one at a time (the format: an 8-byte little-endian header length, a JSON header with each tensor's
dtype, shape and byte range, then the raw data), cut from one pool of random bf16 values at random
offsets. The values are finite, of magnitude 2^-15 .. 2^-7 (weights of a trained model's order),
with random signs.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path

import dataclasses

import jax
import numpy as np
from flax import nnx

from convrot_jax import QuantPolicy
from flux_flax.config import FluxConfig
from flux_flax.layers import Dtype
from flux_flax.quantize import quantize_model
from flux_flax.t5 import T5Block, T5Config, T5EncoderModel
from flux_flax.text_loading import WEIGHTS, torch_key
from flux_flax.transformer import FluxSingleTransformerBlock, FluxTransformer2DModel, FluxTransformerBlock, param_paths

POOL_ELEMENTS = 1 << 25  # 64 MiB of bf16
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def _random_pool(seed: int) -> np.ndarray:
    """uint16 bit patterns of finite bf16 values: sign and 7 mantissa bits random, exponent 112..119."""
    bits = np.random.default_rng(seed).integers(0, 1 << 16, size=POOL_ELEMENTS, dtype=np.uint16)
    return (bits & 0x83FF) | 0x3800


def write_random_safetensors(path: str | Path, shapes: Mapping[str, tuple[int, ...]], *, seed: int = 0) -> int:
    """Writes bf16 tensors of the given shapes with random values to `path`; returns its size."""
    pool = _random_pool(seed)
    rng = np.random.default_rng(seed + 1)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for shape in shapes.values():
            left = math.prod(shape)
            start = int(rng.integers(POOL_ELEMENTS))
            while left:
                n = min(left, POOL_ELEMENTS - start)
                f.write(memoryview(pool[start : start + n]))
                left, start = left - n, 0
    return 8 + len(text) + offset


def write_random_diffusers_dir(
    directory: str | Path,
    config: FluxConfig,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    shard_bytes: int | None = None,
    seed: int = 0,
) -> list[Path]:
    """A diffusers transformer folder (config.json + safetensors, sharded with an index when
    `shard_bytes` is given, as diffusers' `save_pretrained(max_shard_size=...)`); returns the files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_json = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1", **config.to_dict()}
    (directory / "config.json").write_text(json.dumps(config_json, indent=2))
    if shard_bytes is None:
        path = directory / "diffusion_pytorch_model.safetensors"
        write_random_safetensors(path, shapes, seed=seed)
        return [path]
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for key, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = shape
        size += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_random_safetensors(directory / name, shard, seed=seed + 2 * i)
        weight_map.update(dict.fromkeys(shard, name))
        files.append(directory / name)
    total = sum(2 * math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return files


def random_transformer(config: FluxConfig, *, dtype: Dtype, quantize: str | None = None,
                       seed: int = 0) -> FluxTransformer2DModel:
    """A random FLUX transformer (flax's initialisers) built block by block on the default device
    (block i of each kind seeded by `seed` and its index, so every call with the same seed holds
    the same weights): ~25 s at FLUX.1-dev's size on the H200, quantization included, where one
    jitted constructor of the whole model takes minutes. With `quantize` (the W4A4
    implementation: "auto", "xla", "pallas"), every layer `flux_default_policy()` marks is
    quantized as soon as its block exists, so the float model never sits in memory whole, as when
    a converted checkpoint is loaded. Unfused (what checkpoints hold)."""
    shell = dataclasses.replace(config, num_layers=0, num_single_layers=0)
    model = nnx.jit(lambda: FluxTransformer2DModel(shell, dtype=dtype, rngs=nnx.Rngs(seed)))()
    model.config = config
    dims = (config.inner_dim, config.num_attention_heads, config.attention_head_dim)
    make_double = nnx.jit(lambda key: FluxTransformerBlock(*dims, dtype=dtype, rngs=nnx.Rngs(key)))
    make_single = nnx.jit(lambda key: FluxSingleTransformerBlock(*dims, dtype=dtype, rngs=nnx.Rngs(key)))
    blocks = [(model.transformer_blocks, make_double, 1000 + i) for i in range(config.num_layers)]
    blocks += [(model.single_transformer_blocks, make_single, 2000 + i) for i in range(config.num_single_layers)]
    if quantize:
        quantize_model(model, implementation=quantize)  # the embedders and norm_out
    for blocks_list, make, block_seed in blocks:
        blocks_list.append(make(jax.random.fold_in(jax.random.key(seed), block_seed)))
        if quantize:
            quantize_model(model, implementation=quantize)  # only the new block's float layers are left
    return model


def random_t5(config: T5Config, *, dtype: Dtype, policy: QuantPolicy | None = None,
              implementation: str = "auto") -> T5EncoderModel:
    """A random T5 encoder built block by block on the default device (block i seeded by i). With
    `policy` (e.g. `t5_default_policy()`), each block's linears are quantized as soon as it exists,
    so the float encoder never sits in memory whole (`implementation`: of the W4A4 layers, if any)."""
    model = nnx.jit(lambda: T5EncoderModel(dataclasses.replace(config, num_layers=0), dtype=dtype, rngs=nnx.Rngs(0)))()
    model.config = config
    makers = {first: nnx.jit(lambda key, first=first: T5Block(config, has_relative_attention_bias=first, dtype=dtype,
                                                               rngs=nnx.Rngs(key)))
              for first in (True, False)}
    for i in range(config.num_layers):
        model.encoder.block.append(makers[i == 0](jax.random.key(3000 + i)))
        if policy is not None:
            quantize_model(model, policy, implementation=implementation)
    return model


def write_random_text_encoder(folder: str | Path, model: nnx.Module, config_json: Mapping, *, seed: int = 0) -> Path:
    """A transformers-layout folder (config.json + model.safetensors of random bf16 values, see
    `write_random_safetensors`) holding the weights of `model`, a Flax text encoder (abstract is
    enough: only its shapes are read), under transformers' keys; `config_json` is the config.json
    (e.g. `{"model_type": "t5", **T5Config(...).to_dict()}`). Returns the weights file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(config_json), indent=2))
    shapes = {}
    for path, var in param_paths(model):
        key, transpose = torch_key(path)
        shapes[key] = tuple(reversed(var.shape)) if transpose else tuple(var.shape)
    write_random_safetensors(folder / WEIGHTS, shapes, seed=seed)
    return folder / WEIGHTS
