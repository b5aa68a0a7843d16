"""Which of a run's files GetRunFiles may hand out, and their bytes in chunks (what `alignd runs report` fetches).

A run directory also holds model directories, checkpoints and, for `alignd run`, the local stack's credentials:
only the outputs below can be read, matched segment by segment (`*` never crosses a `/`), as regular files inside
the run directory (a symlink is never followed). Each file is read whole at the time of the call, so its size and
SHA-256 describe one version even while the run appends to it (metrics.jsonl).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from alignd.runtime.errors import InvalidArgument, NotFound, ResourceExhausted

# What a caller with the `runs` scope may read, relative to the run directory.
OUTPUTS = (
    "report.md",
    "report.json",
    "evaluation.json",
    "eval_*.jsonl",
    "metrics.jsonl",
    "plots/*",
    "config.yaml",
    "state.json",
    "tracking.json",
    "rm-round-*/*.jsonl",
    "tensorboard/*",
)
# The report and what it shows: the default of a request that names no paths.
REPORT = ("report.md", "report.json", "evaluation.json", "metrics.jsonl", "plots/*")
CHUNK_BYTES = 1 << 20
MAX_CALL_BYTES = 256 << 20  # one call's files together (read into memory): a report is a few MB
MAX_PATHS = 64
MAX_PATH_CHARS = 256


def _segments_match(path: PurePosixPath, pattern: PurePosixPath) -> bool:
    return len(path.parts) == len(pattern.parts) and all(fnmatchcase(p, q) for p, q in zip(path.parts, pattern.parts))


def _is_output(rel: PurePosixPath) -> bool:
    return any(_segments_match(rel, PurePosixPath(o)) for o in OUTPUTS)


def _wild(segment: str) -> bool:
    return any(c in segment for c in "*?[")


def check_pattern(pattern: str, index: int) -> PurePosixPath:
    """A requested path or pattern, relative and inside the outputs (InvalidArgument naming paths[index])."""
    field = f"paths[{index}]"
    if not pattern or len(pattern) > MAX_PATH_CHARS or not pattern.isprintable():
        raise InvalidArgument(field, f"must be 1-{MAX_PATH_CHARS} printable characters")
    p = PurePosixPath(pattern)
    if "\\" in pattern or any(seg in ("", ".", "..") for seg in pattern.split("/")):
        raise InvalidArgument(field, f"{pattern!r}: a path relative to the run directory, without '.' or '..'")
    # (select only ever reads outputs; this names a pattern that could match none of them)
    if not any(
        len(p.parts) == len(PurePosixPath(o).parts)
        and all(_wild(a) or fnmatchcase(a, b) for a, b in zip(p.parts, PurePosixPath(o).parts))
        for o in OUTPUTS
    ):
        raise InvalidArgument(field, f"{pattern!r} is not one of the run's outputs ({', '.join(OUTPUTS)})")
    return p


@dataclass(frozen=True)
class RunFile:
    rel: str  # '/'-separated, relative to the run directory
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _walk(root: Path, depth: int):
    """Regular files under `root` down to `depth` segments, as relative PurePosixPaths; symlinks are skipped."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for e in entries:
        if e.is_symlink():
            continue
        if e.is_file(follow_symlinks=False):
            yield PurePosixPath(e.name)
        elif depth > 1 and e.is_dir(follow_symlinks=False):
            for sub in _walk(Path(e.path), depth - 1):
                yield PurePosixPath(e.name) / sub


def select(run_dir: Path, patterns: list[str]) -> list[PurePosixPath]:
    """The run's output files the request names (REPORT when it names none), sorted, each once. A name without a
    wildcard that matches nothing is NotFound; a pattern with one may match nothing."""
    if len(patterns) > MAX_PATHS:
        raise InvalidArgument("paths", f"{len(patterns)} paths; at most {MAX_PATHS}")
    checked = [check_pattern(p, i) for i, p in enumerate(patterns)] or [PurePosixPath(r) for r in REPORT]
    files = [f for f in _walk(run_dir, max(len(o.split("/")) for o in OUTPUTS)) if _is_output(f)]
    chosen: set[PurePosixPath] = set()
    for i, pat in enumerate(checked):
        hits = [f for f in files if _segments_match(f, pat)]
        if not hits and patterns and not _wild(str(pat)):
            raise NotFound(f"paths[{i}]: the run has no file {str(pat)!r}")
        chosen.update(hits)
    return sorted(chosen)


def read(run_dir: Path, rels: list[PurePosixPath], *, max_bytes: int = MAX_CALL_BYTES) -> list[RunFile]:
    """The files' bytes, each read once (a file removed meanwhile is left out); ResourceExhausted past max_bytes."""
    out, total = [], 0
    for rel in rels:
        path = run_dir / rel
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except (FileNotFoundError, OSError):
            continue
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                continue
            data = f.read(max_bytes - total + 1)
        total += len(data)
        if total > max_bytes:
            raise ResourceExhausted(
                f"the files asked for hold more than {max_bytes} bytes (at {rel}); ask for fewer paths per call"
            )
        out.append(RunFile(str(rel), data))
    return out


def chunks(files: list[RunFile], *, chunk_bytes: int = CHUNK_BYTES):
    """(path, offset, data, size, sha256 on the last chunk) for each file in order; an empty file is one chunk."""
    for f in files:
        size = len(f.data)
        offsets = range(0, size, chunk_bytes) if size else [0]
        for offset in offsets:
            end = min(size, offset + chunk_bytes)
            yield f.rel, offset, f.data[offset:end], size, (f.sha256 if end == size else "")
