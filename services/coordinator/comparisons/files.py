"""The files of a labeling round: tasks.jsonl read, labels.jsonl repaired and appended durably, the round's lock.

The formats and the durability argument are in the package docs
(`alignd.services.coordinator.comparisons`); this module does the I/O:
`read_tasks` (tasks.jsonl, written by `alignd.data.write_jsonl_atomic`),
`LabelsFile` (labels.jsonl: a torn last line truncated away on open, then
one fsync'ed append per accepted ranking) and `lock_round` (the flock that
makes one store the round's only writer).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

from alignd.atomic import fsync_dir
from alignd.data import DataError
from alignd.services.coordinator.comparisons.records import StoreBusyError, Task, as_task, check_task

TASKS_FILE = "tasks.jsonl"
LABELS_FILE = "labels.jsonl"
LOCK_FILE = ".lock"

_log = logging.getLogger("alignd.coordinator.comparisons")


def lock_round(dir: Path) -> int:
    """flock's the round's lock file (one writer per round); returns its descriptor (closing it releases the lock).
    Raises StoreBusyError when another store holds it."""
    fd = os.open(dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreBusyError(
            f"{dir}: the labeling round is open in another ComparisonStore (one writer per round)"
        ) from None
    return fd


def read_tasks(path: Path) -> list[Task]:
    """The round's tasks in round order ([] when the file does not exist); DataError (`path:line: problem`) for a
    corrupt record or a duplicate task id."""
    tasks: list[Task] = []
    seen: set[str] = set()
    if not path.exists():
        return tasks
    for n, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            task = as_task(json.loads(line), n - 1)
            check_task(task, None, f"line {n}")  # max_k applies to new rounds only
        except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError, UnicodeDecodeError, LabelError
            raise DataError(path, n, f"corrupt task record: {err}") from None
        if task.task_id in seen:
            raise DataError(path, n, f"duplicate task id {task.task_id!r}")
        seen.add(task.task_id)
        tasks.append(task)
    return tasks


class LabelsFile:
    """labels.jsonl: its complete lines read once on open (a torn last line dropped), then appended one fsync'ed
    line at a time (O_APPEND; created, and its directory fsync'ed, by the first append when it does not exist)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None  # O_APPEND
        self._size = 0  # bytes known to be complete lines
        self.dropped_tail_bytes = 0  # size of a torn last line removed on open

    def read_lines(self) -> list[bytes]:
        """The file's complete lines (line n of the file is item n - 1), after truncating a torn last line away
        (fsync'ed, logged with a warning): one without its newline, or a newline-terminated last line that is not
        valid JSON."""
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        # lines[-1] is what follows the last newline: b"" when the file ends with a complete line
        complete = lines[:-1]
        good_end = len(data) - len(lines[-1])
        if not lines[-1] and complete and complete[-1].strip():
            # A newline-terminated last line that does not parse (e.g. zeros after a power loss) is torn too:
            # appends are serialised, so only the last line can lack its fsync. With bytes after it, it was
            # fsync'ed before the next append started, and a bad line there is corruption (the caller raises).
            try:
                json.loads(complete[-1])
            except ValueError:
                good_end -= len(complete[-1]) + 1
                complete = complete[:-1]
        if good_end < len(data):
            self._truncate_tail(good_end, len(data) - good_end)
        self._size = good_end
        return complete

    def _truncate_tail(self, good_end: int, dropped: int) -> None:
        self.dropped_tail_bytes = dropped
        with open(self.path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
        _log.warning(
            "labels_torn_line_dropped: %s: removed an incomplete last line of %d bytes (an append cut short by a "
            "crash; "
            "its submit never returned)",
            self.path,
            self.dropped_tail_bytes,
        )

    def open(self) -> None:
        """Opens the existing file for appending (after `read_lines`)."""
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, line: bytes) -> None:
        """Writes `line` with a single append and fsyncs it; a failed write is truncated back before the error
        propagates, so no partial line is left for the next append to follow."""
        created = False
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            created = True
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
            if created:
                fsync_dir(self.path.parent)  # the new file's directory entry is durable too
        except BaseException:
            try:  # never leave a partial line for the next append to follow
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise
        self._size += len(line)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
