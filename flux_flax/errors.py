"""Exceptions for reading FLUX checkpoints. All are `ValueError`s, so callers that only care
whether the input was acceptable can catch that."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read as the FLUX.1 transformer that was asked for."""


class NotAFluxCheckpointError(CheckpointError):
    """The file or directory is not a FLUX.1 transformer (diffusers or black-forest-labs layout)."""


class MissingKeyError(CheckpointError):
    """Tensors the model needs are absent. `keys` lists them (diffusers names)."""

    def __init__(self, keys: list[str], source: str = ""):
        self.keys = list(keys)
        shown = ", ".join(self.keys[:10]) + (f", ... ({len(self.keys)} in all)" if len(self.keys) > 10 else "")
        super().__init__(f"missing tensor(s) in {source or 'checkpoint'}: {shown}")


class UnexpectedKeyError(CheckpointError):
    """The checkpoint holds tensors the model has no place for. `keys` lists them."""

    def __init__(self, keys: list[str], source: str = ""):
        self.keys = list(keys)
        shown = ", ".join(self.keys[:10]) + (f", ... ({len(self.keys)} in all)" if len(self.keys) > 10 else "")
        super().__init__(f"unexpected tensor(s) in {source or 'checkpoint'}: {shown}")


class ShapeMismatchError(CheckpointError):
    """A tensor's shape differs from the model's. `mismatches` maps key -> (expected, found)."""

    def __init__(self, mismatches: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], source: str = ""):
        self.mismatches = dict(mismatches)
        lines = [f"{k}: model expects {tuple(e)}, checkpoint has {tuple(f)}" for k, (e, f) in self.mismatches.items()]
        super().__init__(f"shape mismatch in {source or 'checkpoint'}:\n  " + "\n  ".join(lines))


class CheckpointExistsError(CheckpointError):
    """The destination exists and may not be replaced: overwriting was not asked for, or the
    destination is not a convrot-jax checkpoint, or it holds (or is inside) the source."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's metadata or arrays do not match what the caller or the metadata expects."""


class CheckpointDamagedError(CheckpointError):
    """A checkpoint's files are missing, truncated or altered since they were written."""
