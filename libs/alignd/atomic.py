"""Crash-safe writes (stdlib only): readers see the old content or the new, never a torn file or directory.

Every write goes to a temp file in the same directory, is fsync'ed, renamed
over the target, and the directory is fsync'ed so that the rename itself
survives a power loss. A failure midway (disk full, an exception) removes the
temp file and leaves the previous version in place. Directories (a model, a
job's output, a checkpoint) are written under a temporary name, fsync'ed file
by file and published by one rename (`publish_dir`). Every durable write of
alignd goes through this module.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file's data, or a directory's entries (making a rename or a new entry in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_path  # a directory: its renames and new entries


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under `root` (before it is published by a rename)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


@contextmanager
def atomic_writer(path: str | os.PathLike, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into; on a normal exit it is fsync'ed and renamed over `path`
    (and the directory fsync'ed), on an exception removed, leaving the old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    with atomic_writer(path, mode) as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    write_bytes_atomic(path, json.dumps(data, indent=2).encode())


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike, *, replace: bool = False) -> Path:
    """Publishes a directory written under the temporary name `tmp` (in the same parent) as `final`: every file
    fsync'ed, one rename, the parent fsync'ed. With `replace` an existing `final` is removed first (a reader then
    finds nothing for a moment, never a mix); without it `final` must not exist."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    if replace and final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final
