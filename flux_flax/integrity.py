"""Integrity of a checkpoint directory: SHA-256 digests of every file in it, written last and
checked before loading, so that a missing, truncated or altered file (arrays or settings) is
refused with its name instead of loading into wrong weights or a raw storage-layer traceback.

Files are hashed in chunks of `CHUNK_BYTES`, each chunk on its own thread (hashlib releases the
GIL), so verifying a FLUX.1-dev checkpoint runs at the disk's speed rather than one core's.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from flux_flax.errors import CheckpointDamagedError

MANIFEST = "convrot-integrity.json"
CHUNK_BYTES = 64 << 20
MANIFEST_VERSION = 1


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def _chunk_digest(path: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        remaining = length
        while remaining:
            block = f.read(min(remaining, 16 << 20))
            if not block:
                break  # the file shrank under us: the digest will not match
            h.update(block)
            remaining -= len(block)
    return h.hexdigest()


def _digests(root: Path, sizes: dict[str, int]) -> dict[str, list[str]]:
    """{relative file name: [SHA-256 of each CHUNK_BYTES chunk]} for the files and sizes given."""
    jobs = {
        (name, offset): (root / name, offset, min(CHUNK_BYTES, size - offset))
        for name, size in sizes.items()
        for offset in range(0, max(size, 1), CHUNK_BYTES)
    }
    workers = min(32, (os.cpu_count() or 1) + 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {key: pool.submit(_chunk_digest, *args) for key, args in jobs.items()}
        out: dict[str, list[str]] = {name: [] for name in sizes}
        for (name, _), future in sorted(futures.items()):
            out[name].append(future.result())
    return out


def write_manifest(root: str | os.PathLike) -> Path:
    """Hashes every file under `root` and writes the manifest beside them; returns its path."""
    root = Path(root)
    sizes = {str(p.relative_to(root)): p.stat().st_size for p in _files(root)}
    manifest = {
        "version": MANIFEST_VERSION,
        "chunk_bytes": CHUNK_BYTES,
        "files": {name: {"bytes": sizes[name], "sha256": digests} for name, digests in _digests(root, sizes).items()},
    }
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


def verify_manifest(root: str | os.PathLike, *, digests: bool = True, under: str = "") -> None:
    """Raises `CheckpointDamagedError` naming the checkpoint and the first file that is missing,
    of another size, or (with `digests`) whose contents differ from what was written. Only the
    files whose relative name starts with `under` are checked; files added after writing are
    ignored. Without digests it only stats the files (microseconds, for loads that skip hashing),
    and a missing or unreadable manifest is no error: that caller asked not to verify."""
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("version") != MANIFEST_VERSION or manifest.get("chunk_bytes") != CHUNK_BYTES:
            raise ValueError(f"unknown manifest version {manifest.get('version')}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        if not digests:
            return
        if isinstance(e, FileNotFoundError):
            raise CheckpointDamagedError(f"checkpoint {root} is damaged: its integrity manifest {MANIFEST} is missing") from None
        raise CheckpointDamagedError(f"checkpoint {root} is damaged: {MANIFEST} is unreadable ({e})") from None
    files = {name: entry for name, entry in files.items() if name.startswith(under)}
    for name, entry in sorted(files.items()):
        path = root / name
        if not path.is_file():
            raise CheckpointDamagedError(f"checkpoint {root} is damaged: file {name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointDamagedError(
                f"checkpoint {root} is damaged: file {name} has {size} bytes, {entry['bytes']} were written"
            )
    if not digests:
        return
    actual = _digests(root, {name: entry["bytes"] for name, entry in files.items()})
    for name, entry in sorted(files.items()):
        if actual[name] != entry["sha256"]:
            raise CheckpointDamagedError(
                f"checkpoint {root} is damaged: file {name} was altered after writing (SHA-256 mismatch); "
                "convert the source weights again"
            )
