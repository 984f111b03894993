"""FLUX.1 safetensors -> ConvRot Orbax checkpoints, and back into a model.

    summary = convert.convert_checkpoint("FLUX.1-dev/transformer", "flux-dev-w4a4")   # or `convrot-convert`
    model, metadata = convert.load_checkpoint("flux-dev-w4a4")

The exports are resolved on first use: `flux_flax` imports `convert.errors`, and the converter
imports `flux_flax`, so importing them eagerly here would be circular.
"""

import importlib

_EXPORTS = {
    "FORMAT_VERSION": "convert.checkpoint",
    "CheckpointExistsError": "convert.checkpoint",
    "CheckpointMismatchError": "convert.checkpoint",
    "CheckpointWriter": "convert.checkpoint",
    "load_checkpoint": "convert.checkpoint",
    "read_metadata": "convert.checkpoint",
    "ConversionSummary": "convert.convert",
    "DtypeMismatchError": "convert.convert",
    "convert_checkpoint": "convert.convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'convert' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
