"""Streaming conversion of a FLUX.1 transformer from PyTorch safetensors to a ConvRot Orbax checkpoint.

One tensor at a time: read it (`flux_flax.safetensors_io`), cast it to the model dtype (bf16), and
for a Linear weight that the policy quantizes, rotate, quantize and pack it exactly as
`flux_flax.quantize_model` would in memory (`convrot_jax.quantize_weight`, on the default jax
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
from collections.abc import Iterator, Sequence
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
from flux_flax.loading import abstract_transformer, expected_shapes
from flux_flax.paths import user_path
from flux_flax.policy import flux_default_policy
from flux_flax.safetensors_io import FluxCheckpoint, open_checkpoint
from flux_flax.transformer import linear_paths

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


def _convert_tensor(
    key: str, tensor: jax.Array, treatments: dict[str, str], settings: dict[str, Any]
) -> tuple[bool, dict[str, jax.Array]]:
    """One source tensor (diffusers key, PyTorch layout) -> (quantized?, {state key: array})."""
    layer, _, param = key.rpartition(".")
    tensor = tensor.astype(MODEL_DTYPE)
    treatment = treatments.get(layer)
    if treatment is None or param != "weight":
        return False, {key: tensor}
    if treatment in QUANTIZED:
        qw = _quantize_weight(tensor, **settings)
        return True, {f"{layer}.packed": qw.packed, f"{layer}.scales": qw.scales}
    return False, {f"{layer}.kernel": tensor.T}


def _stream(
    src: str | os.PathLike, keys: Sequence[str], chunk_bytes: int
) -> Iterator[tuple[str, jax.Array, int]]:
    """(key, tensor, stored bytes) one at a time, re-opening the source every `chunk_bytes` read
    so that the pages mapped so far are released."""
    i = 0
    while i < len(keys):
        with open_checkpoint(src) as checkpoint:
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


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str = "auto",
    group_size: int = 256,
    hadamard: str = "regular",
    scale_group: int | None = None,
    policy: QuantPolicy | None = None,
    quantize: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    config: FluxConfig | None = None,
    chunk_bytes: int = DEFAULT_FLUSH_BYTES,
    allow_nonfinite: bool = False,
) -> ConversionSummary:
    """Converts a FLUX.1 transformer checkpoint (diffusers folder, pipeline root, or black-forest-labs
    file; `format` "auto" detects) into a ConvRot checkpoint directory at `out`.

    Layers are treated per `policy` (default `flux_flax.flux_default_policy()`) with the given
    rotation and scale settings; `quantize=False` writes every tensor in bf16. The input is checked
    in full (keys, shapes, dtypes) before anything is written, a tensor holding NaN or Inf is
    refused unless `allow_nonfinite`, and `out` only appears once complete. Raises
    `flux_flax.errors.CheckpointError` subclasses for bad input, and `CheckpointExistsError` if
    `out` exists and not `overwrite`, or is not a convrot-jax checkpoint, or is or holds the source.
    """
    start = time.perf_counter()
    src, out = user_path(src), user_path(out)
    check_destination(out, overwrite=overwrite, sources=[src])
    policy = policy or flux_default_policy()
    quantization = _quantization(policy, group_size, hadamard, scale_group) if quantize else None

    with open_checkpoint(src) as checkpoint:
        _check_layout(checkpoint, format)
        if config is None:
            config = FluxConfig.from_diffusers_config(checkpoint.diffusers_config())
        float_model = abstract_transformer(config, dtype=MODEL_DTYPE)
        checkpoint.validate(expected_shapes(float_model))
        keys = checkpoint.keys()
        _check_dtypes(checkpoint, keys)
        files = checkpoint.files
        layout = checkpoint.layout
        infos = {k: checkpoint.info(k) for k in keys}
    total_in = sum(math.prod(info.shape) * ITEMSIZE[info.dtype] for info in infos.values())
    treatments, leaves, paths = _plan(float_model, config, quantization)
    settings = quantize_settings(quantization) if quantization else {}

    quantized = kept = 0
    written: set[str] = set()
    # Hash the sources while converting; a daemon thread, so that an error does not wait for it.
    hashes: dict[Path, str] = {}
    hasher = threading.Thread(target=lambda: hashes.update((f, sha256_file(f)) for f in files), daemon=True)
    hasher.start()
    with CheckpointWriter(out, overwrite=overwrite, flush_bytes=chunk_bytes, sources=[src, *files]) as writer:
        with tqdm(total=total_in, unit="B", unit_scale=True, unit_divisor=1024, desc="convrot-convert",
                  disable=not progress, dynamic_ncols=True) as bar:
            for n, (key, tensor, nbytes) in enumerate(_stream(src, keys, chunk_bytes), 1):
                if not allow_nonfinite:
                    _check_finite(src, key, tensor)
                was_quantized, produced = _convert_tensor(key, tensor, treatments, settings)
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
        root = src if src.is_dir() else src.parent
        source = {
            "layout": layout,
            "files": [
                {"name": str(f.relative_to(root)), "bytes": f.stat().st_size, "sha256": digest}
                for f, digest in hashes.items()
            ],
        }
        metadata = checkpoint_metadata(config, quantization, source)
        writer.commit(metadata)
    bytes_in = sum(f.stat().st_size for f in files)
    bytes_out = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return ConversionSummary(out, quantized, kept, bytes_in, bytes_out, writer.bytes_written,
                             time.perf_counter() - start)
