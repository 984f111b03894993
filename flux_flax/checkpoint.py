"""Quantized FLUX checkpoints on disk: an Orbax PyTree of the model's NNX state, JSON metadata and
an integrity manifest (`flux_flax.integrity`). One checkpoint holds one part of the pipeline
(`PARTS`: the transformer, or the T5 text encoder `text_encoder_2`), named in its metadata.

Writing streams: `CheckpointWriter` hands the state to Orbax in batches (Orbax partial saves) so
that host memory never holds the whole output, all inside a temporary sibling directory that is
renamed onto the destination only once everything, metadata and manifest included, is on disk.
An interrupted conversion therefore leaves nothing at the destination, and the next writer to the
same destination removes a temporary directory whose process is gone. Only a convrot-jax
checkpoint is ever replaced, never a user's other files nor the source. Reading verifies the
manifest, builds the model abstractly (`nnx.eval_shape`: no weights are initialised), checks the
metadata and the stored shapes against it, and restores straight into the abstract state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx

from convrot_jax import QuantPolicy
from convrot_jax.lora import carries_loras
from flux_flax import interrupts
from flux_flax.command_line import package_version
from flux_flax.config import FluxConfig
from flux_flax.errors import CheckpointDamagedError, CheckpointError, CheckpointExistsError, CheckpointMismatchError
from flux_flax.integrity import MANIFEST, verify_manifest, write_manifest
from flux_flax.paths import user_path
from flux_flax.policy import flux_default_policy, t5_default_policy
from flux_flax.quantize import quantize_model
from flux_flax.t5 import T5Config, T5EncoderModel
from flux_flax.transformer import FluxTransformer2DModel


@dataclasses.dataclass(frozen=True)
class Part:
    """A model a checkpoint can hold: the diffusers folder it stands in for (`name`), the metadata
    format naming it, its config class (`from_dict` / `to_dict`), its model class (built as
    `model_class(config, dtype=..., rngs=...)`) and its default quantization policy."""

    name: str
    format: str
    config_class: type
    model_class: type
    default_policy: Callable[[], QuantPolicy]


PARTS: dict[str, Part] = {part.name: part for part in (
    Part("transformer", "convrot-jax/flux-transformer", FluxConfig, FluxTransformer2DModel, flux_default_policy),
    Part("text_encoder_2", "convrot-jax/t5-encoder", T5Config, T5EncoderModel, t5_default_policy),
)}
_FORMATS = {part.format: part for part in PARTS.values()}
FORMAT = PARTS["transformer"].format
FORMAT_VERSION = 2  # 2: integrity manifest (the T5 format began at 2, with the same layout)
MODEL_DTYPE = jnp.bfloat16
# Orbax writes a batch once this many bytes are pending: large enough to amortise a save call,
# small enough to keep host memory far below the checkpoint's size.
DEFAULT_FLUSH_BYTES = 64 << 20
ORBAX_METADATA = "_CHECKPOINT_METADATA"
TMP_MARKER = ".convrot-tmp-"
OWNER_FILE = "owner.json"
# A temporary directory without an owner file is taken as abandoned after this long.
UNOWNED_GRACE_SECONDS = 60

StatePath = tuple[str | int, ...]
Sharding = jax.sharding.Sharding | Callable[[StatePath, jax.ShapeDtypeStruct], jax.sharding.Sharding]

log = logging.getLogger(__name__)


def quantize_settings(quantization: Mapping[str, Any]) -> dict[str, Any]:
    """`quantize_model`'s keyword arguments from a metadata "quantization" entry."""
    return {name: quantization[name] for name in ("group_size", "hadamard", "scale_group")}


def part_of(config: Any) -> Part:
    """The part whose config class `config` is (a FluxConfig: the transformer; a T5Config: text_encoder_2)."""
    for part in PARTS.values():
        if isinstance(config, part.config_class):
            return part
    raise TypeError(f"no checkpoint part for a {type(config).__name__} (known: {', '.join(PARTS)})")


def abstract_model(config: FluxConfig | T5Config, quantization: Mapping[str, Any] | None) -> nnx.Module:
    """The (quantized) model of `config` (the transformer or T5) with `jax.ShapeDtypeStruct` leaves:
    shapes only, no weights.

    `quantization` is the metadata's "quantization" entry (settings and policy), or None for bf16.
    """
    model_class = part_of(config).model_class

    def build() -> nnx.Module:
        model = model_class(config, dtype=MODEL_DTYPE, rngs=nnx.Rngs(0))
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


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line (storage-layer errors span pages)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _abandoned(tmp: Path) -> bool:
    """Whether a temporary checkpoint directory's writer is gone (its process ended on this host)."""
    try:
        owner = json.loads((tmp / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return time.time() - tmp.stat().st_mtime > UNOWNED_GRACE_SECONDS
    return owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1)))


def remove_abandoned_temporaries(path: Path) -> list[Path]:
    """Removes the temporary directories that interrupted writers of `path` left beside it
    (a killed conversion cannot clean up; a FLUX.1-dev one holds gigabytes); returns them."""
    removed = []
    for tmp in sorted(path.parent.glob(f".{path.name}{TMP_MARKER}*")):
        if tmp.is_dir() and _abandoned(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("removed %s, left by an interrupted conversion to %s", tmp, path)
            removed.append(tmp)
    return removed


class CheckpointWriter:
    """Writes a checkpoint to `path` piece by piece; nothing appears at `path` before `commit`.

    Use as a context manager: leaving it by an exception (KeyboardInterrupt included) removes the
    temporary directory. A process killed midway leaves only a hidden `.<name>.convrot-tmp-*`
    sibling holding its pid, which the next writer to `path` removes. `sources` are paths the
    checkpoint is made from: they are never replaced (see `check_destination`).
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, flush_bytes: int = DEFAULT_FLUSH_BYTES,
                 sources: Iterable[str | os.PathLike] = ()):
        self.path = user_path(path)
        self.overwrite = overwrite
        self.flush_bytes = flush_bytes
        self.sources = tuple(user_path(s) for s in sources)
        check_destination(self.path, overwrite=overwrite, sources=self.sources)
        self.removed_temporaries = remove_abandoned_temporaries(self.path)
        self.tmp = self.path.parent / f".{self.path.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
        self._session = self.tmp / "checkpoint"
        self._pending: dict[StatePath, jax.Array] = {}
        self._pending_bytes = 0
        self._in_flight: ocp.AsyncResponse | None = None
        self.bytes_written = 0

    def __enter__(self) -> "CheckpointWriter":
        # Made here, not in __init__: a signal between the constructor and `with` would leave it.
        try:
            with interrupts.deferred():
                self.tmp.mkdir(parents=True)
                (self.tmp / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
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
        with interrupts.deferred():  # a write started in the background is always one `abort` waits for
            self._in_flight = ocp.partial.save_async(self._session, _nest(self._pending),
                                                     custom_metadata=custom_metadata)
        self.bytes_written += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def _wait(self) -> None:
        if self._in_flight is not None:
            self._in_flight.result()  # forgotten only once ended: a signal in the wait leaves it to `abort`
            self._in_flight = None

    def commit(self, metadata: Mapping[str, Any]) -> Path:
        """Writes the last leaves with `metadata`, finalizes, hashes every file into the integrity
        manifest, and renames the result onto `path` (replacing an earlier convrot checkpoint)."""
        if not self._pending:
            raise CheckpointError("nothing to commit: no state entries were added")
        self._flush(custom_metadata=dict(metadata))
        self._wait()
        ocp.partial.finalize(self._session)
        write_manifest(self._session)
        check_destination(self.path, overwrite=self.overwrite, sources=self.sources)
        interrupts.check()  # a Ctrl-C that a library caught on its way still stops the commit here
        with interrupts.held():  # between the two renames neither checkpoint would be at `path`
            if self.path.exists():
                # Move the old checkpoint aside first: a rename does not replace a non-empty directory.
                os.rename(self.path, self.tmp / "replaced")
            os.rename(self._session, self.path)
            shutil.rmtree(self.tmp)
        return self.path

    def abort(self) -> None:
        """Removes everything written so far (after the write in flight, if any, has ended; a second
        Ctrl-C does not stop the clean-up halfway)."""
        with interrupts.held():
            with contextlib.suppress(Exception):
                self._wait()
            shutil.rmtree(self.tmp, ignore_errors=True)


def checkpoint_metadata(config: FluxConfig | T5Config, quantization: Mapping[str, Any] | None,
                        source: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON metadata every checkpoint carries: format and part, versions, model config, dtype,
    the quantization settings and policy (None: bf16), and where the weights came from."""
    part = part_of(config)
    return {
        "format": part.format,
        "part": part.name,
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "model_config": config.to_dict(),
        "dtype": jnp.dtype(MODEL_DTYPE).name,
        "quantization": None if quantization is None else dict(quantization),
        "source": dict(source),
    }


def save_checkpoint(model: nnx.Module, path: str | os.PathLike, *, quantization: Mapping[str, Any] | None,
                    source: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Writes an in-memory transformer or T5 encoder (bf16, or quantized per `quantization`: the
    settings and policy it was quantized with) as a checkpoint that `load_checkpoint` reads;
    `source` says where its weights came from. Streams leaf by leaf like the converter. A
    checkpoint holds the base model: a model carrying LoRA branches is refused (unload them first)."""
    if carries_loras(model):
        raise CheckpointError("this model carries LoRA branches: unload them before saving (a checkpoint holds "
                              "the base model; LoRAs stay separate files)")
    with CheckpointWriter(path, overwrite=overwrite) as writer:
        for state_path, variable in nnx.to_flat_state(nnx.state(model)):
            writer.add(state_path, variable.get_value())
        return writer.commit(checkpoint_metadata(model.config, quantization, source))


def stored_part(path: str | os.PathLike) -> str | None:
    """The part a directory's Orbax metadata names ("transformer", "text_encoder_2"; any format
    version), read without checking anything else; None if it is not a convrot-jax checkpoint or
    its metadata cannot be read."""
    try:
        metadata = json.loads((Path(path) / ORBAX_METADATA).read_text())
    except (OSError, ValueError):
        return None
    custom = metadata.get("custom_metadata") if isinstance(metadata, dict) else None
    part = _FORMATS.get(custom.get("format")) if isinstance(custom, dict) else None
    return None if part is None else part.name


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory whose Orbax metadata says it is a convrot-jax checkpoint
    (any part, any format version)."""
    return stored_part(path) is not None


def check_destination(path: str | os.PathLike, *, overwrite: bool, sources: Iterable[str | os.PathLike] = ()) -> None:
    """Refuses a destination that is a source or holds one; an existing destination unless
    `overwrite`; and even then anything but a convrot-jax checkpoint directory, or one that lies
    inside a source folder."""
    path = user_path(path)
    sources = [user_path(s) for s in sources]
    for source in sources:
        if path == source or path in source.parents:
            raise CheckpointExistsError(f"refusing to write to {path}: it is or holds the source {source}")
    if not path.exists():
        return
    if not overwrite:
        raise CheckpointExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
    for source in sources:
        if source in path.parents:
            raise CheckpointExistsError(f"refusing to replace {path}: it lies inside the source {source}")
    if not path.is_dir() or not is_checkpoint(path):
        raise CheckpointExistsError(
            f"refusing to replace {path}: it is not a convrot-jax checkpoint (--overwrite replaces only those); "
            "remove it yourself or choose another output"
        )


def checkpoint_part(metadata: Mapping[str, Any]) -> Part:
    """The part a checkpoint's (already read) metadata says it holds."""
    return _FORMATS[metadata["format"]]


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a convrot checkpoint (any part), after checking its format and version."""
    path = user_path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    try:
        metadata = ocp.metadata(path).custom_metadata or {}
    except Exception as e:  # Orbax/TensorStore raise many types for unreadable directories
        raise CheckpointError(f"{path} is not a readable Orbax checkpoint ({_one_line(e)})") from None
    if metadata.get("format") not in _FORMATS:
        raise CheckpointError(
            f"{path} is not a convrot-jax FLUX checkpoint (metadata format {metadata.get('format')!r}; "
            f"known: {', '.join(_FORMATS)})"
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
        target = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's, under jax.distributed
    elif isinstance(sharding, jax.sharding.Sharding):
        target = sharding
    else:
        target = sharding(path, leaf)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target)


ARRAY_FILES = "state/"  # where Orbax writes the PyTree's files (its checkpointable "state")


def load_checkpoint(
    path: str | os.PathLike,
    *,
    sharding: Sharding | None = None,
    config: FluxConfig | T5Config | None = None,
    group_size: int | None = None,
    hadamard: str | None = None,
    verify: bool = True,
    part: str | None = None,
) -> tuple[nnx.Module, dict[str, Any]]:
    """Loads a checkpoint written by `convert_checkpoint` -> (model, metadata): the transformer or
    the T5 encoder, as its metadata says; with `part` ("transformer", "text_encoder_2"), another
    part is refused (`CheckpointMismatchError` naming both).

    With `verify` (the default), every file is first checked against the integrity manifest
    written with it: a missing, truncated or altered file (arrays or settings) raises
    `CheckpointDamagedError` naming it; without, the array files' presence and sizes still are
    (where the manifest is readable). The model is built abstractly from the metadata (no random
    initialisation) and the arrays are restored straight into it, placed by `sharding`: None (the
    default device), one `jax.sharding.Sharding` for every leaf, or a function (state path,
    abstract leaf) -> Sharding. `config`, `group_size` and `hadamard`, when given, must match the
    checkpoint's, else `CheckpointMismatchError`; so does any stored array whose shape or dtype
    differs from what the metadata's model config implies.
    """
    path = user_path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    has_manifest = (path / MANIFEST).is_file()
    # Unverified, the array files are still stat'ed: a missing or truncated one is named here, not by
    # TensorStore, whose failed reads also flood stderr with orbax's event-loop errors.
    if has_manifest:
        verify_manifest(path, digests=verify, under="" if verify else ARRAY_FILES)
    metadata = read_metadata(path)
    if verify and not has_manifest:
        raise CheckpointDamagedError(f"checkpoint {path} is damaged: its integrity manifest {MANIFEST} is missing")
    held = checkpoint_part(metadata)
    if part is not None and held.name != part:
        raise CheckpointMismatchError(f"{path} holds the {held.name} ({held.format}), not the {part}")
    expected_config = None if config is None else config.to_dict()
    _check_expected(path, metadata, {"model config": expected_config, "group_size": group_size, "hadamard": hadamard})
    try:
        model_config = held.config_class.from_dict(metadata["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointMismatchError(f"{path}: the model config in the metadata is not valid ({e})") from None
    graphdef, abstract_state = nnx.split(abstract_model(model_config, metadata.get("quantization")))
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(abstract_state)}
    _check_stored_arrays(path, flat)
    target = _nest({p: _with_sharding(p, leaf, sharding) for p, leaf in flat.items()})
    try:
        restored = ocp.load(path, target)
    except Exception as e:  # TensorStore's errors for a damaged array file span hundreds of lines
        raise CheckpointDamagedError(f"checkpoint {path} is damaged: cannot read its arrays ({_one_line(e)})") from None
    for p, variable in nnx.to_flat_state(abstract_state):
        variable.set_value(_lookup(restored, p))
    return nnx.merge(graphdef, abstract_state), metadata


def _check_stored_arrays(path: Path, expected: Mapping[StatePath, jax.ShapeDtypeStruct]) -> None:
    """Every expected leaf is stored with its shape and dtype, and nothing else is stored."""
    try:
        stored_tree = ocp.metadata(path).metadata
        stored = {
            tuple(str(k.key) for k in keys): leaf
            for keys, leaf in jax.tree_util.tree_flatten_with_path(stored_tree)[0]
        }
    except Exception as e:
        raise CheckpointDamagedError(f"checkpoint {path} is damaged: cannot read its array index ({_one_line(e)})") from None
    if not stored:
        raise CheckpointDamagedError(f"checkpoint {path} is damaged: its array index lists no arrays")
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
