"""FLUX.1 safetensors -> ConvRot Orbax checkpoints (`convrot-convert`).

    summary = convert.convert_checkpoint("FLUX.1-dev/transformer", "flux-dev-w4a4")
    model, metadata = convert.load_checkpoint("flux-dev-w4a4")      # = flux_flax.load_checkpoint

Exports resolve on first use so that `convrot-convert` checks its arguments before jax loads.
"""

import importlib

_EXPORTS = {
    "ConversionSummary": "convert.convert",
    "DtypeMismatchError": "convert.convert",
    "NonFiniteWeightError": "convert.convert",
    "convert_checkpoint": "convert.convert",
    "FORMAT_VERSION": "flux_flax.checkpoint",
    "load_checkpoint": "flux_flax.checkpoint",
    "read_metadata": "flux_flax.checkpoint",
    "CheckpointDamagedError": "flux_flax.errors",
    "CheckpointError": "flux_flax.errors",
    "CheckpointExistsError": "flux_flax.errors",
    "CheckpointMismatchError": "flux_flax.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'convert' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
