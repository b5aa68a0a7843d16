"""Crash-safe file writes (stdlib only): readers see the old content or the new, never a torn file.

Every write goes to a temp file in the same directory, is fsync'ed, renamed
over the target, and the directory is fsync'ed so that the rename itself
survives a power loss. A failure midway (disk full, an exception) removes the
temp file and leaves the previous version in place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file's data, or a directory's entries (making a rename or a new entry in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path  # a directory: its renames and new entries


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    write_bytes_atomic(path, json.dumps(data, indent=2).encode())
