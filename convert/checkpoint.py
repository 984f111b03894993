"""Quantized FLUX checkpoints on disk: an Orbax PyTree of the model's NNX state plus JSON metadata.

Writing streams: `CheckpointWriter` hands the state to Orbax in batches (Orbax partial saves) so
that host memory never holds the whole output, all inside a temporary sibling directory that is
renamed onto the destination only once everything, metadata included, is on disk. An interrupted
conversion therefore leaves nothing at the destination. Reading builds the model abstractly
(`nnx.eval_shape`: no weights are initialised), checks the metadata and the stored shapes against
it, and restores straight into the abstract state.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx

from convert.errors import CheckpointError
from convrot_jax import QuantPolicy
from flux_flax.config import FluxConfig
from flux_flax.quantize import quantize_model
from flux_flax.transformer import FluxTransformer2DModel

FORMAT = "convrot-jax/flux-transformer"
FORMAT_VERSION = 1
MODEL_DTYPE = jnp.bfloat16
# Orbax writes a batch once this many bytes are pending: large enough to amortise a save call,
# small enough to keep host memory far below the checkpoint's size.
DEFAULT_FLUSH_BYTES = 64 << 20

StatePath = tuple[str | int, ...]
Sharding = jax.sharding.Sharding | Callable[[StatePath, jax.ShapeDtypeStruct], jax.sharding.Sharding]


class CheckpointExistsError(CheckpointError):
    """The destination exists and overwriting was not asked for."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's metadata or arrays do not match what the caller or the metadata expects."""


def quantize_settings(quantization: Mapping[str, Any]) -> dict[str, Any]:
    """`quantize_model`'s keyword arguments from a metadata "quantization" entry."""
    return {name: quantization[name] for name in ("group_size", "hadamard", "scale_group")}


def abstract_model(config: FluxConfig, quantization: Mapping[str, Any] | None) -> nnx.Module:
    """The (quantized) transformer with `jax.ShapeDtypeStruct` leaves: shapes only, no weights.

    `quantization` is the metadata's "quantization" entry (settings and policy), or None for bf16.
    """

    def build() -> nnx.Module:
        model = FluxTransformer2DModel(config, dtype=MODEL_DTYPE, rngs=nnx.Rngs(0))
        if quantization is None:
            return model
        policy = QuantPolicy.from_dict(quantization["policy"])
        return quantize_model(model, policy, **quantize_settings(quantization))

    return nnx.eval_shape(build)


def state_key(path: StatePath) -> str:
    """One state path as a readable dotted key (e.g. "transformer_blocks.0.attn.to_q.packed")."""
    return ".".join(str(p) for p in path)


def _nest(flat: Mapping[StatePath, Any]) -> dict:
    """{("a", 0, "b"): x} -> {"a": {"0": {"b": x}}}: Orbax's tree keys are strings."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[str(path[-1])] = value
    return tree


def _lookup(tree: Mapping, path: StatePath) -> Any:
    for p in path:
        tree = tree[str(p)]
    return tree


class CheckpointWriter:
    """Writes a checkpoint to `path` piece by piece; nothing appears at `path` before `commit`.

    Use as a context manager: leaving it by an exception removes the temporary directory. A
    process killed midway leaves only a hidden `.<name>.convrot-tmp-*` sibling, never a
    checkpoint at `path`.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, flush_bytes: int = DEFAULT_FLUSH_BYTES):
        self.path = Path(path).absolute()
        self.overwrite = overwrite
        self.flush_bytes = flush_bytes
        check_destination(self.path, overwrite=overwrite)
        self.tmp = self.path.parent / f".{self.path.name}.convrot-tmp-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir(parents=True)
        self._session = self.tmp / "checkpoint"
        self._pending: dict[StatePath, jax.Array] = {}
        self._pending_bytes = 0
        self._in_flight: ocp.AsyncResponse | None = None
        self.bytes_written = 0

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, path: StatePath, value: jax.Array) -> None:
        """Queues one state leaf; queued leaves go to disk once `flush_bytes` are pending."""
        if path in self._pending:
            raise CheckpointError(f"state entry {state_key(path)} written twice")
        nbytes = value.size * value.dtype.itemsize
        if self._pending and self._pending_bytes + nbytes > self.flush_bytes:
            self._flush()
        self._pending[path] = value
        self._pending_bytes += nbytes

    def _flush(self, custom_metadata: dict | None = None) -> None:
        """Starts writing the queued leaves in the background, once the previous batch is written:
        reading and quantizing the next batch overlaps the write of this one."""
        self._wait()
        self._in_flight = ocp.partial.save_async(self._session, _nest(self._pending), custom_metadata=custom_metadata)
        self.bytes_written += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def _wait(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            in_flight.result()

    def commit(self, metadata: Mapping[str, Any]) -> Path:
        """Writes the last leaves with `metadata`, finalizes, and renames the result onto `path`."""
        if not self._pending:
            raise CheckpointError("nothing to commit: no state entries were added")
        self._flush(custom_metadata=dict(metadata))
        self._wait()
        ocp.partial.finalize(self._session)
        check_destination(self.path, overwrite=self.overwrite)
        if self.path.exists():
            # Move the old checkpoint aside first: a rename does not replace a non-empty directory.
            os.rename(self.path, self.tmp / "replaced")
        os.rename(self._session, self.path)
        shutil.rmtree(self.tmp)
        return self.path

    def abort(self) -> None:
        """Removes everything written so far (after the write in flight, if any, has ended)."""
        with contextlib.suppress(Exception):
            self._wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def check_destination(path: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuses an existing destination unless `overwrite` (then only if it is a directory)."""
    path = Path(path)
    if not path.exists():
        return
    if not overwrite:
        raise CheckpointExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    if not path.is_dir():
        raise CheckpointExistsError(f"{path} exists and is not a directory; refusing to replace it")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a convrot checkpoint, after checking its format and version."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    try:
        metadata = ocp.metadata(path).custom_metadata or {}
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is not a readable Orbax checkpoint ({type(e).__name__}: {e})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a convrot-jax FLUX checkpoint (metadata format {metadata.get('format')!r})"
        )
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{path}: checkpoint format version {metadata.get('format_version')}, this convrot-jax reads "
            f"version {FORMAT_VERSION}; convert the source weights again"
        )
    return metadata


def _check_expected(path: Path, metadata: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    quantization = metadata.get("quantization")
    settings = quantize_settings(quantization) if quantization else {}
    for name, want in expected.items():
        if want is None:
            continue
        have = metadata["model_config"] if name == "model config" else settings.get(name)
        if have != want:
            raise CheckpointMismatchError(f"{path}: checkpoint {name} is {have}, expected {want}")


def _with_sharding(path: StatePath, leaf: jax.ShapeDtypeStruct, sharding: Sharding | None) -> jax.ShapeDtypeStruct:
    if sharding is None:
        target = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    elif isinstance(sharding, jax.sharding.Sharding):
        target = sharding
    else:
        target = sharding(path, leaf)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    sharding: Sharding | None = None,
    config: FluxConfig | None = None,
    group_size: int | None = None,
    hadamard: str | None = None,
) -> tuple[nnx.Module, dict[str, Any]]:
    """Loads a checkpoint written by `convert_checkpoint` -> (model, metadata).

    The model is built abstractly from the metadata (no random initialisation) and the arrays are
    restored straight into it, placed by `sharding`: None (the default device), one
    `jax.sharding.Sharding` for every leaf, or a function (state path, abstract leaf) -> Sharding.
    `config`, `group_size` and `hadamard`, when given, must match the checkpoint's, else
    `CheckpointMismatchError`; so does any stored array whose shape or dtype differs from what the
    metadata's model config implies.
    """
    path = Path(path)
    metadata = read_metadata(path)
    expected_config = None if config is None else config.to_dict()
    _check_expected(path, metadata, {"model config": expected_config, "group_size": group_size, "hadamard": hadamard})
    try:
        model_config = FluxConfig.from_dict(metadata["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointMismatchError(f"{path}: the model config in the metadata is not valid ({e})") from None
    graphdef, abstract_state = nnx.split(abstract_model(model_config, metadata.get("quantization")))
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(abstract_state)}
    _check_stored_arrays(path, flat)
    target = _nest({p: _with_sharding(p, leaf, sharding) for p, leaf in flat.items()})
    restored = ocp.load(path, target)
    for p, variable in nnx.to_flat_state(abstract_state):
        variable.set_value(_lookup(restored, p))
    return nnx.merge(graphdef, abstract_state), metadata


def _check_stored_arrays(path: Path, expected: Mapping[StatePath, jax.ShapeDtypeStruct]) -> None:
    """Every expected leaf is stored with its shape and dtype, and nothing else is stored."""
    stored_tree = ocp.metadata(path).metadata
    stored = {
        tuple(str(k.key) for k in keys): leaf
        for keys, leaf in jax.tree_util.tree_flatten_with_path(stored_tree)[0]
    }
    wanted = {tuple(str(p) for p in path_): leaf for path_, leaf in expected.items()}
    missing = sorted(set(wanted) - set(stored))
    unexpected = sorted(set(stored) - set(wanted))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {'.'.join(missing[0])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {'.'.join(unexpected[0])})")
        raise CheckpointMismatchError(
            f"{path}: stored arrays do not match the model config in the metadata: {', '.join(parts)}"
        )
    for key, want in wanted.items():
        have = stored[key]
        if tuple(have.shape) != tuple(want.shape) or jnp.dtype(have.dtype) != jnp.dtype(want.dtype):
            raise CheckpointMismatchError(
                f"{path}: {'.'.join(key)} is stored as {tuple(have.shape)} {jnp.dtype(have.dtype).name}, "
                f"the metadata's model config needs {tuple(want.shape)} {jnp.dtype(want.dtype).name}"
            )
