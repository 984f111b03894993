"""Loading FLUX's text encoders (CLIP-L from `text_encoder/`, T5-XXL from `text_encoder_2/`) from a
diffusers folder into the Flax NNX ports (`flux_flax.clip`, `flux_flax.t5`): the model is built
abstractly (`nnx.eval_shape`), checked against the safetensors headers (keys, shapes, float
dtypes) and filled one tensor at a time through `flux_flax.safetensors_io`'s reader.

A parameter's dotted NNX path is its transformers state-dict key, up to the leaf name
(`kernel` = `weight.T`, `embedding` / `scale` = `weight`). Keys transformers itself accepts are
accepted too: CLIP files written by transformers 4 (`text_model.` prefix, a `position_ids`
buffer), and T5's tied embedding stored as `shared.weight`, `encoder.embed_tokens.weight` or both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from flux_flax.clip import CLIPTextConfig, CLIPTextModel
from flux_flax.errors import CheckpointError, MissingKeyError, ShapeMismatchError, UnexpectedKeyError
from flux_flax.layers import Dtype
from flux_flax.safetensors_io import FluxCheckpoint, open_weight_files
from flux_flax.t5 import T5Config, T5EncoderModel
from flux_flax.transformer import param_paths

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
_LEAVES = {"kernel": "weight", "embedding": "weight", "scale": "weight"}


def torch_key(param_path: str) -> tuple[str, bool]:
    """An NNX parameter path -> (transformers state-dict key, whether to transpose):
    "encoder.layers.0.mlp.fc1.kernel" -> ("encoder.layers.0.mlp.fc1.weight", True)."""
    module, _, leaf = param_path.rpartition(".")
    return f"{module}.{_LEAVES.get(leaf, leaf)}", leaf == "kernel"


def _clip_file_key(key: str) -> str | None:
    """A CLIP file key -> the model's key (None: ignored, as transformers ignores it)."""
    key = key.removeprefix("text_model.")
    return None if key == "embeddings.position_ids" else key


_T5_EMBEDDING = ("shared.weight", "encoder.embed_tokens.weight")


def t5_file_key(key: str) -> str | None:
    """A T5 file key -> the encoder's key (None: a full T5's decoder, ignored)."""
    if key.startswith("decoder.") or key == "lm_head.weight":  # T5EncoderModel ignores a full T5's decoder
        return None
    return "shared.weight" if key in _T5_EMBEDDING else key


def plan_weights(model: nnx.Module, files: FluxCheckpoint, file_key: Callable[[str], str | None]) -> dict[str, tuple[str, bool]]:
    """Checks `files` against `model` -> {parameter path: (file key, transpose)}, reading only headers.

    `file_key` maps a file's key to the model's (None: skip it). Raises `MissingKeyError`,
    `UnexpectedKeyError`, `ShapeMismatchError` (naming the keys, the shapes and the folder or
    file) or `CheckpointError` for a tensor that is not floating point. `model` may be abstract."""
    sources: dict[str, str] = {}
    for key in files.keys():
        mapped = file_key(key)
        if mapped is not None and (mapped not in sources or key == mapped):  # an exact name wins over an alias
            sources[mapped] = key
    params = {}
    for path, var in param_paths(model):
        key, transpose = torch_key(path)
        params[file_key(key) or key] = (path, tuple(var.shape), transpose)  # a tied module may be reached under its alias
    missing = [k for k in params if k not in sources]
    if missing:
        raise MissingKeyError(missing, _where(files))
    unexpected = [sources[k] for k in sources if k not in params]
    if unexpected:
        raise UnexpectedKeyError(unexpected, _where(files))
    mismatched, not_float = {}, []
    for key, (_, shape, transpose) in params.items():
        info = files.info(sources[key])
        expected = tuple(reversed(shape)) if transpose else shape
        if info.shape != expected:
            mismatched[sources[key]] = (expected, info.shape)
        if info.dtype not in FLOAT_DTYPES:
            not_float.append(f"{sources[key]} ({info.dtype})")
    if mismatched:
        raise ShapeMismatchError(mismatched, _where(files))
    if not_float:
        raise CheckpointError(f"{_where(files)}: tensor(s) not floating point: {', '.join(not_float)}")
    return {path: (sources[key], transpose) for key, (path, _, transpose) in params.items()}


def load_weights(model: nnx.Module, files: FluxCheckpoint, file_key: Callable[[str], str | None]) -> None:
    """Checks `files` against `model` (`plan_weights`) and fills every parameter in place, cast to
    its dtype. `model` may be abstract."""
    plan = plan_weights(model, files, file_key)
    for path, var in param_paths(model):
        key, transpose = plan[path]
        tensor = files.read(key)
        var.set_value((tensor.T if transpose else tensor).astype(var.dtype))


def _where(files: FluxCheckpoint) -> str:
    return str(files.files[0]) if len(files.files) == 1 else f"{files.source} ({len(files.files)} shards)"


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"text encoder config missing: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def _load(folder: str | Path, config_class, model_class, file_key: Callable[[str], str | None], dtype: Dtype):
    """A text model from a transformers folder (config.json + model.safetensors, or shards + index),
    built abstractly and filled one tensor at a time."""
    folder = Path(folder)
    config = config_class.from_dict(read_config(folder))
    model = nnx.eval_shape(lambda: model_class(config, dtype=dtype, rngs=nnx.Rngs(0)))
    with open_weight_files(folder, WEIGHTS, INDEX) as files:
        load_weights(model, files, file_key)
    return model


def load_clip(folder: str | Path, *, dtype: Dtype = jnp.bfloat16) -> CLIPTextModel:
    """CLIP text model from a transformers folder (config.json + model.safetensors or shards + index)."""
    return _load(folder, CLIPTextConfig, CLIPTextModel, _clip_file_key, dtype)


def load_t5(folder: str | Path, *, dtype: Dtype = jnp.bfloat16) -> T5EncoderModel:
    """T5 encoder from a transformers folder (config.json + model.safetensors or shards + index).
    In float16 the FFN output projections stay float32, as transformers keeps them."""
    return _load(folder, T5Config, T5EncoderModel, t5_file_key, dtype)
