"""Paths a user gives: made absolute once, at the entry point (Orbax needs absolute paths, and
comparing a source with a destination needs canonical ones), and output folders checked before
any work is done."""

from __future__ import annotations

import os
from pathlib import Path


def user_path(path: str | os.PathLike) -> Path:
    """`path` made absolute: `~` expanded, relative to the working directory, symlinks resolved."""
    return Path(path).expanduser().resolve()


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """The absolute path of a folder to write into, which may not exist yet. Raises
    `NotADirectoryError` if it or a parent is a file, `PermissionError` if it cannot be created
    or written, so that a long job does not fail at its end."""
    path = user_path(path)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{what} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path}: {existing} is not writable")
    return path
