"""Streaming conversion of a FLUX.1 transformer, or of its T5 text encoder (`text_encoder_2`), from
PyTorch safetensors to a ConvRot Orbax checkpoint (one checkpoint per part, `flux_flax.checkpoint.PARTS`).

One tensor at a time: read it (`flux_flax.safetensors_io`), cast it to the model dtype (bf16), and
for a Linear weight that the policy (the part's default: `flux_default_policy`,
`t5_default_policy`) quantizes, rotate, quantize and pack it exactly as `flux_flax.quantize_model`
would in memory (`convrot_jax.quantize_weight`, on the default jax
device: the GPU when there is one); then hand it to the checkpoint writer and let it go. The
source files are memory-mapped, and mapped pages count as resident memory, so the source is
re-opened every `chunk_bytes` of input to unmap what was read: peak host memory is a few chunks
plus the largest tensor's working set, whatever the checkpoint's size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from convrot_jax import QuantPolicy, quantize_weight
from convrot_jax.hadamard import check_group_size
from flux_flax.checkpoint import (
    DEFAULT_FLUSH_BYTES,
    MODEL_DTYPE,
    PARTS,
    CheckpointWriter,
    StatePath,
    abstract_model,
    check_destination,
    checkpoint_metadata,
    quantize_settings,
    state_key,
)
from flux_flax.config import FluxConfig
from flux_flax.errors import CheckpointError
from flux_flax.loading import abstract_transformer, diffusers_key, expected_shapes
from flux_flax.paths import user_path
from flux_flax.safetensors_io import FluxCheckpoint, open_checkpoint, open_weight_files
from flux_flax.t5 import T5Config, T5EncoderModel
from flux_flax.text_loading import INDEX, WEIGHTS, plan_weights, read_config, t5_file_key
from flux_flax.transformer import linear_paths, param_paths

FORMATS: tuple[str, ...] = ("auto", "diffusers", "bfl")
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}  # the float dtypes the model takes
QUANTIZED = ("w4a4", "w4a16")
# One compiled program per weight shape. Every step is an exactly rounded float32 op in a fixed
# order (convrot_jax.quant), so the codes equal those of the eager `quantize_model` bit for bit.
_quantize_weight = jax.jit(quantize_weight, static_argnames=("group_size", "hadamard", "scale_group"))


class DtypeMismatchError(CheckpointError):
    """A tensor is stored in a dtype the model cannot take (not a float)."""


class NonFiniteWeightError(CheckpointError):
    """A source tensor holds NaN or Inf values: every image made with it would be black."""


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    """What a conversion did: tensor counts, sizes (source files in; checkpoint directory out, as
    written by Orbax with its zstd compression; the arrays' own bytes before compression)."""

    output: Path
    tensors_quantized: int
    tensors_kept: int
    bytes_in: int
    bytes_out: int
    array_bytes: int
    seconds: float

    @property
    def compression_ratio(self) -> float:
        return self.bytes_in / self.bytes_out

    def __str__(self) -> str:
        size = lambda n: tqdm.format_sizeof(n, "B", 1024)  # noqa: E731
        return (
            f"converted {self.tensors_quantized + self.tensors_kept} tensors "
            f"({self.tensors_quantized} quantized to int4, {self.tensors_kept} kept) in {self.seconds:.1f} s: "
            f"{size(self.bytes_in)} in, {size(self.bytes_out)} out ({size(self.array_bytes)} of arrays before "
            f"compression), {self.compression_ratio:.2f}x smaller -> {self.output}"
        )


def sha256_file(path: Path, block: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _quantization(policy: QuantPolicy, group_size: int, hadamard: str, scale_group: int | None) -> dict[str, Any]:
    check_group_size(group_size, hadamard)
    return {"group_size": group_size, "hadamard": hadamard, "scale_group": scale_group, "policy": policy.to_dict()}


def _plan(
    float_model: nnx.Module, config: FluxConfig, quantization: dict[str, Any] | None
) -> tuple[dict[str, str], dict[str, jax.ShapeDtypeStruct], dict[str, StatePath]]:
    """({Linear layer path: treatment}, {state key: abstract leaf}, {state key: state path}) of
    the model the checkpoint will hold; `float_model` is the abstract bf16 model."""
    policy = None if quantization is None else QuantPolicy.from_dict(quantization["policy"])
    treatments = {
        path: "bf16" if policy is None else policy.treatment(path) for path, _ in linear_paths(float_model)
    }
    state = nnx.state(abstract_model(config, quantization))
    leaves, paths = {}, {}
    for path, variable in nnx.to_flat_state(state):
        leaves[state_key(path)] = variable.get_value()
        paths[state_key(path)] = path
    return treatments, leaves, paths


@jax.jit
def _count_nonfinite(tensor: jax.Array) -> jax.Array:
    return jnp.size(tensor) - jnp.count_nonzero(jnp.isfinite(tensor))


def _check_finite(source: Path, key: str, tensor: jax.Array) -> None:
    bad = int(_count_nonfinite(tensor))
    if bad:
        raise NonFiniteWeightError(
            f"{source}: tensor {key} holds {bad} NaN/Inf value(s) of {tensor.size}; every image made with it "
            "would be black (allow_nonfinite=True / --allow-nonfinite converts it anyway)"
        )


Target = tuple[str, str, bool]  # a source tensor's (layer path, parameter name, transpose) in the float model


def _convert_tensor(
    tensor: jax.Array, target: Target, treatments: dict[str, str], settings: dict[str, Any]
) -> tuple[bool, dict[str, jax.Array]]:
    """One source tensor (PyTorch layout) -> (quantized?, {state key: array})."""
    layer, leaf, transpose = target
    tensor = tensor.astype(MODEL_DTYPE)
    if leaf == "kernel" and treatments.get(layer) in QUANTIZED:
        qw = _quantize_weight(tensor, **settings)
        return True, {f"{layer}.packed": qw.packed, f"{layer}.scales": qw.scales}
    return False, {f"{layer}.{leaf}": tensor.T if transpose else tensor}


def _target(path: str, transpose: bool) -> Target:
    layer, _, leaf = path.rpartition(".")
    return layer, leaf, transpose


def _stream(
    open_source: Callable[[], FluxCheckpoint], keys: Sequence[str], chunk_bytes: int
) -> Iterator[tuple[str, jax.Array, int]]:
    """(key, tensor, stored bytes) one at a time, re-opening the source every `chunk_bytes` read
    so that the pages mapped so far are released."""
    i = 0
    while i < len(keys):
        with open_source() as checkpoint:
            read = 0
            while i < len(keys) and (read == 0 or read < chunk_bytes):
                tensor = checkpoint.read(keys[i])
                nbytes = tensor.size * tensor.dtype.itemsize
                read += nbytes
                yield keys[i], tensor, nbytes
                i += 1


def _check_layout(checkpoint: FluxCheckpoint, format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format != "auto" and checkpoint.layout != format:
        raise CheckpointError(f"{checkpoint.source} is a {checkpoint.layout} checkpoint, not {format} (--format)")


def _check_dtypes(checkpoint: FluxCheckpoint, keys: Sequence[str]) -> None:
    for key in keys:
        dtype = checkpoint.info(key).dtype
        if dtype not in ITEMSIZE:
            raise DtypeMismatchError(
                f"{checkpoint.source}: tensor {key} is stored as {dtype}, the model expects a float "
                f"({'/'.join(ITEMSIZE)}; converted to bf16)"
            )


@dataclasses.dataclass(frozen=True)
class _Source:
    """A checked source: how to (re)open it, the model it fills (abstract, float), and each tensor to
    read (file key, in order) with its place in that model."""

    open: Callable[[], FluxCheckpoint]
    config: FluxConfig | T5Config
    float_model: nnx.Module
    targets: dict[str, Target]
    stored_bytes: int
    files: list[Path]
    layout: str
    root: Path  # the files' names in the metadata are relative to it


def _stored_bytes(checkpoint: FluxCheckpoint, keys: Sequence[str]) -> int:
    return sum(math.prod(checkpoint.info(k).shape) * ITEMSIZE[checkpoint.info(k).dtype] for k in keys)


def _transformer_source(src: Path, format: str, config: FluxConfig | None) -> _Source:
    """A FLUX transformer: diffusers folder, pipeline root or black-forest-labs file (keys, shapes and
    dtypes checked)."""
    with open_checkpoint(src) as checkpoint:
        _check_layout(checkpoint, format)
        if config is None:
            config = FluxConfig.from_diffusers_config(checkpoint.diffusers_config())
        float_model = abstract_transformer(config, dtype=MODEL_DTYPE)
        checkpoint.validate(expected_shapes(float_model))
        keys = checkpoint.keys()
        _check_dtypes(checkpoint, keys)
        targets = {key: _target(path, transpose) for path, _ in param_paths(float_model)
                   for key, transpose in [diffusers_key(path)]}
        return _Source(lambda: open_checkpoint(src), config, float_model, {k: targets[k] for k in keys},
                       _stored_bytes(checkpoint, keys), checkpoint.files, checkpoint.layout,
                       src if src.is_dir() else src.parent)


def _t5_source(src: Path, config: T5Config | None) -> _Source:
    """A T5 encoder: a transformers folder (config.json + model.safetensors, or shards + index) or a
    pipeline root holding one in text_encoder_2/ (keys, shapes and dtypes checked as `load_t5` does)."""
    if not src.is_dir():
        raise CheckpointError(f"{src}: the T5 encoder converts from a folder: a pipeline root holding text_encoder_2/, "
                              "or that folder (config.json + model.safetensors or shards)")
    folder = src / "text_encoder_2" if (src / "text_encoder_2").is_dir() else src
    if config is None:
        config = T5Config.from_dict(read_config(folder))
    float_model = nnx.eval_shape(lambda: T5EncoderModel(config, dtype=MODEL_DTYPE, rngs=nnx.Rngs(0)))
    open_source = lambda: open_weight_files(folder, WEIGHTS, INDEX)  # noqa: E731
    with open_source() as files:
        plan = plan_weights(float_model, files, t5_file_key)
        targets = {key: _target(path, transpose) for path, (key, transpose) in plan.items()}
        return _Source(open_source, config, float_model, targets, _stored_bytes(files, list(targets)), files.files,
                       "transformers", src)


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    part: str = "transformer",
    format: str = "auto",
    group_size: int = 256,
    hadamard: str = "regular",
    scale_group: int | None = None,
    policy: QuantPolicy | None = None,
    quantize: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    config: FluxConfig | T5Config | None = None,
    chunk_bytes: int = DEFAULT_FLUSH_BYTES,
    allow_nonfinite: bool = False,
) -> ConversionSummary:
    """Converts one part of FLUX.1 into a ConvRot checkpoint directory at `out`: the transformer
    (`part="transformer"`: a diffusers folder, pipeline root, or black-forest-labs file; `format`
    "auto" detects) or the T5 text encoder (`part="text_encoder_2"`: a pipeline root or its
    text_encoder_2/ folder, in transformers' layout, sharded or not).

    Layers are treated per `policy` (default: the part's, `flux_default_policy()` or
    `t5_default_policy()`) with the given rotation and scale settings; `quantize=False` writes every
    tensor in bf16. The input is checked in full (keys, shapes, dtypes) before anything is written,
    a tensor holding NaN or Inf is refused unless `allow_nonfinite`, and `out` only appears once
    complete. Raises `flux_flax.errors.CheckpointError` subclasses for bad input, and
    `CheckpointExistsError` if `out` exists and not `overwrite`, or is not a convrot-jax
    checkpoint, or is or holds the source.
    """
    start = time.perf_counter()
    if part not in PARTS:
        raise ValueError(f"part must be one of {tuple(PARTS)}, got {part!r}")
    if part != "transformer" and format != "auto":
        raise ValueError(f"format {format!r} is a transformer layout; the {part} converts from transformers' layout")
    src, out = user_path(src), user_path(out)
    check_destination(out, overwrite=overwrite, sources=[src])
    policy = policy or PARTS[part].default_policy()
    quantization = _quantization(policy, group_size, hadamard, scale_group) if quantize else None
    source = _transformer_source(src, format, config) if part == "transformer" else _t5_source(src, config)
    treatments, leaves, paths = _plan(source.float_model, source.config, quantization)
    settings = quantize_settings(quantization) if quantization else {}
    keys = list(source.targets)

    quantized = kept = 0
    written: set[str] = set()
    # Hash the sources while converting; a daemon thread, so that an error does not wait for it.
    hashes: dict[Path, str] = {}
    files = source.files
    hasher = threading.Thread(target=lambda: hashes.update((f, sha256_file(f)) for f in files), daemon=True)
    hasher.start()
    with CheckpointWriter(out, overwrite=overwrite, flush_bytes=chunk_bytes, sources=[src, *files]) as writer:
        with tqdm(total=source.stored_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="convrot-convert",
                  disable=not progress, dynamic_ncols=True) as bar:
            for n, (key, tensor, nbytes) in enumerate(_stream(source.open, keys, chunk_bytes), 1):
                if not allow_nonfinite:
                    _check_finite(src, key, tensor)
                was_quantized, produced = _convert_tensor(tensor, source.targets[key], treatments, settings)
                del tensor
                for skey, value in produced.items():
                    want = leaves.get(skey)
                    if want is None:
                        raise CheckpointError(f"{key}: no place for {skey} in the model")
                    if value.shape != want.shape:
                        raise CheckpointError(f"{key}: made {skey} of shape {value.shape}, the model's is {want.shape}")
                    writer.add(paths[skey], value.astype(want.dtype))
                    written.add(skey)
                quantized += was_quantized
                kept += not was_quantized
                bar.update(nbytes)
                bar.set_postfix_str(f"tensors {n}/{len(keys)}", refresh=False)
        unwritten = sorted(set(leaves) - written)
        if unwritten:
            raise CheckpointError(f"no source tensor for {len(unwritten)} model entries (first: {unwritten[0]})")
        hasher.join()
        if len(hashes) != len(files):
            raise CheckpointError(f"could not hash every source file: {[str(f) for f in files if f not in hashes]}")
        source_metadata = {
            "layout": source.layout,
            "files": [
                {"name": str(f.relative_to(source.root)), "bytes": f.stat().st_size, "sha256": digest}
                for f, digest in hashes.items()
            ],
        }
        writer.commit(checkpoint_metadata(source.config, quantization, source_metadata))
    bytes_in = sum(f.stat().st_size for f in files)
    bytes_out = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return ConversionSummary(out, quantized, kept, bytes_in, bytes_out, writer.bytes_written,
                             time.perf_counter() - start)
