"""Streaming reader for FLUX.1 transformer checkpoints in safetensors, in either layout:

- diffusers: a transformer directory (`config.json` + `diffusion_pytorch_model.safetensors`, or
  shards with `diffusion_pytorch_model.safetensors.index.json`), a pipeline root holding one in
  `transformer/`, or a single diffusers-keyed .safetensors file;
- black-forest-labs: one file (`flux1-dev.safetensors`), keys mapped by `flux_flax.keymaps`.

Keys are always diffusers names. Listing keys, shapes and dtypes reads only the headers; `read`
fetches one tensor (fused bfl tensors: only the rows asked for), so peak host memory stays near
the largest single tensor. Tensors come back as jax arrays (safetensors' "flax" framework holds
bf16 without torch).

    with open_checkpoint("FLUX.1-dev/transformer") as ckpt:
        ckpt.validate(expected_shapes)           # raises MissingKeyError, ShapeMismatchError, ...
        for key in ckpt.keys():
            w = ckpt.read(key)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
from safetensors import SafetensorError, safe_open

from flux_flax.errors import (
    CheckpointError,
    MissingKeyError,
    NotAFluxCheckpointError,
    ShapeMismatchError,
    UnexpectedKeyError,
)
from flux_flax.keymaps import TensorSource, bfl_to_diffusers, is_bfl

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"

_DTYPES = {"BF16": jnp.bfloat16, "F16": jnp.float16, "F32": jnp.float32, "F64": jnp.float64}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A tensor's shape and safetensors dtype name ("BF16", "F32", ...), read from the header."""

    shape: tuple[int, ...]
    dtype: str


def _is_diffusers(keys) -> bool:
    return "x_embedder.weight" in keys and any(k.startswith("transformer_blocks.") for k in keys)


class FluxCheckpoint:
    """An open FLUX.1 transformer checkpoint. Use `open_checkpoint(path)` to make one; close it
    (or use it as a context manager) to release the memory-mapped files."""

    def __init__(self, source: Path, layout: str, key_files: Mapping[str, Path], config: dict | None):
        self.source = source
        self.layout = layout  # "diffusers" or "bfl"
        self._config = config
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}
        raw: dict[str, tuple[Path, TensorInfo]] = {}
        try:
            for key, file in key_files.items():
                handle = self._open(file)
                try:
                    tslice = handle.get_slice(key)
                except SafetensorError:
                    raise MissingKeyError([key], f"{file} (listed in its index)") from None
                raw[key] = (file, TensorInfo(tuple(tslice.get_shape()), tslice.get_dtype()))
        except BaseException:
            self.close()
            raise
        self._raw = raw
        if layout == "bfl":
            try:
                sources, unused = bfl_to_diffusers({k: info.shape for k, (_, info) in raw.items()})
            except KeyError as e:
                self.close()
                raise NotAFluxCheckpointError(f"{source}: black-forest-labs layout without {e}") from None
            self._sources = sources
            self._unmapped = unused
        else:
            self._sources = {k: TensorSource(k) for k in raw}
            self._unmapped = []

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="flax"))
            except (SafetensorError, OSError) as e:
                raise NotAFluxCheckpointError(f"{file} is not a readable safetensors file: {e}") from None
        return self._handles[file]

    @property
    def files(self) -> list[Path]:
        """The safetensors files this checkpoint reads (one, or the shards), sorted."""
        return sorted({file for file, _ in self._raw.values()})

    # Listing (headers only).
    def keys(self) -> list[str]:
        """All tensor keys, diffusers names, plus any bfl key with no diffusers name (as is)."""
        return [*self._sources, *self._unmapped]

    def info(self, key: str) -> TensorInfo:
        """Shape (after any split) and dtype of one tensor, without reading it."""
        if key in self._unmapped:
            return self._raw[key][1]
        src = self._sources.get(key)
        if src is None:
            raise MissingKeyError([key], str(self.source))
        raw = self._raw[src.key][1]
        return TensorInfo(src.shape(raw.shape), raw.dtype)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """{key: shape} for every tensor."""
        return {k: self.info(k).shape for k in self.keys()}

    # Reading.
    def read(self, key: str) -> jax.Array:
        """One tensor by diffusers key, in its stored dtype, PyTorch layout (out, in)."""
        src = self._sources.get(key)
        if src is None:
            if key in self._unmapped:
                return self._handles[self._raw[key][0]].get_tensor(key)
            raise MissingKeyError([key], str(self.source))
        file = self._raw[src.key][0]
        tslice = self._handles[file].get_slice(src.key)
        tensor = tslice[:] if src.start is None else tslice[src.start:src.stop]
        if src.swap_halves:
            first, second = jnp.split(tensor, 2, axis=0)
            tensor = jnp.concatenate([second, first], axis=0)
        return tensor

    # Checking.
    def validate(self, expected: Mapping[str, tuple[int, ...]]) -> None:
        """Checks the keys and shapes against a model's {diffusers key: PyTorch-layout shape}.
        Raises MissingKeyError, UnexpectedKeyError or ShapeMismatchError (naming keys and shapes)."""
        have = self.keys()
        missing = [k for k in expected if k not in self._sources]
        if missing:
            raise MissingKeyError(missing, str(self.source))
        unexpected = [k for k in have if k not in expected]
        if unexpected:
            raise UnexpectedKeyError(unexpected, str(self.source))
        mismatched = {k: (tuple(s), self.info(k).shape) for k, s in expected.items() if tuple(s) != self.info(k).shape}
        if mismatched:
            raise ShapeMismatchError(mismatched, str(self.source))

    def diffusers_config(self) -> dict:
        """diffusers' transformer config: config.json where the checkpoint has one, otherwise
        inferred from tensor shapes (`infer_diffusers_config`)."""
        return dict(self._config) if self._config is not None else infer_diffusers_config(self.shapes(), str(self.source))

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "FluxCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def infer_diffusers_config(shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> dict:
    """A diffusers FluxTransformer2DModel config from {diffusers key: shape}. patch_size is 1 (all
    FLUX.1 models); axes_dims_rope cannot be seen in weights: it is FLUX.1's (16, 56, 56) when the
    head size is 128, otherwise the caller must pass a config."""
    try:
        inner, in_channels = shapes["x_embedder.weight"]
        head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
        config = {
            "patch_size": 1,
            "in_channels": in_channels,
            "num_layers": len({k.split(".")[1] for k in shapes if k.startswith("transformer_blocks.")}),
            "num_single_layers": len({k.split(".")[1] for k in shapes if k.startswith("single_transformer_blocks.")}),
            "attention_head_dim": head_dim,
            "num_attention_heads": inner // head_dim,
            "joint_attention_dim": shapes["context_embedder.weight"][1],
            "pooled_projection_dim": shapes["time_text_embed.text_embedder.linear_1.weight"][1],
            "guidance_embeds": any(k.startswith("time_text_embed.guidance_embedder.") for k in shapes),
        }
        out_channels = shapes["proj_out.weight"][0]
    except KeyError as e:
        raise NotAFluxCheckpointError(f"{source}: cannot infer a FLUX config, no tensor {e}") from None
    if out_channels != in_channels:
        config["out_channels"] = out_channels
    if head_dim != 128:
        raise CheckpointError(
            f"{source}: head size {head_dim} is not FLUX.1's 128, so the RoPE axes cannot be inferred: pass a config"
        )
    config["axes_dims_rope"] = [16, 56, 56]
    return config


def _header_keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="flax") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise NotAFluxCheckpointError(f"{file} is not a readable safetensors file: {e}") from None


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NotAFluxCheckpointError(f"cannot read {file}: {e}") from None


def _key_files(root: Path, weights: str, index_name: str) -> dict[str, Path]:
    """{key: file} of a folder's weights: one `weights` file, or the shards its `index_name` lists."""
    index = root / index_name
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise NotAFluxCheckpointError(f"{index} has no weight_map")
        key_files = {k: root / f for k, f in weight_map.items()}
        absent = sorted({str(f) for f in key_files.values() if not f.exists()})
        if absent:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {absent}")
        return key_files
    if (root / weights).exists():
        return {k: root / weights for k in _header_keys(root / weights)}
    raise NotAFluxCheckpointError(f"{root} has neither {weights} nor {index_name}")


def open_weight_files(root: str | Path, weights: str, index_name: str) -> FluxCheckpoint:
    """Any model's safetensors weights in a folder (one `weights` file, or shards listed by
    `index_name`), keys as stored: the same reader (headers at open, one tensor per `read`, the
    same errors naming file and key) for models other than the FLUX transformer, e.g. the text
    encoders (`model.safetensors`, `model.safetensors.index.json`)."""
    root = Path(root)
    return FluxCheckpoint(root, "diffusers", _key_files(root, weights, index_name), None)


def _open_diffusers_dir(root: Path) -> FluxCheckpoint:
    config = _read_json(root / "config.json")
    if config.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel":
        raise NotAFluxCheckpointError(f"{root}/config.json is for {config['_class_name']}, not FluxTransformer2DModel")
    key_files = _key_files(root, DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX)
    if not _is_diffusers(key_files):
        raise NotAFluxCheckpointError(f"{root}: tensors are not a FLUX transformer's (e.g. {sorted(key_files)[:5]})")
    return FluxCheckpoint(root, "diffusers", key_files, config)


def open_checkpoint(path: str | Path) -> FluxCheckpoint:
    """Opens a FLUX.1 transformer checkpoint, detecting its layout (see the module docstring).
    Raises FileNotFoundError if `path` does not exist, NotAFluxCheckpointError if it is not a
    FLUX.1 transformer in a layout this reader knows."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.is_dir():
        if (path / "config.json").exists():
            return _open_diffusers_dir(path)
        if (path / "transformer" / "config.json").exists():
            return _open_diffusers_dir(path / "transformer")
        raise NotAFluxCheckpointError(
            f"{path} is neither a diffusers transformer directory (config.json + safetensors) nor a pipeline root "
            "with transformer/"
        )
    if re.search(r"\.index\.json$", path.name):
        return open_checkpoint(path.parent)
    keys = _header_keys(path)
    if is_bfl(keys):
        return FluxCheckpoint(path, "bfl", {k: path for k in keys}, None)
    if _is_diffusers(keys):
        return FluxCheckpoint(path, "diffusers", {k: path for k in keys}, None)
    raise NotAFluxCheckpointError(
        f"{path} is not a FLUX.1 transformer: no black-forest-labs (img_in, double_blocks.*) or diffusers "
        f"(x_embedder, transformer_blocks.*) keys; first keys: {sorted(keys)[:5]}"
    )
