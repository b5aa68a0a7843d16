"""Comparison labeling rounds: pending tasks out, rankings in, every accepted ranking durable (no torch, no grpc).

One `ComparisonStore` is one labeling round of the `rm` stage (an RM
retraining round gets its own directory, e.g. `RUN_DIR/labels/round-N`). The
coordinator creates the round from the K samples per prompt of the policy;
labelers, external ones through the coordinator's RPCs or programmatic ones
(`alignd.labelers.SimulatedLabeler`) through `label_with`, fetch pending tasks
and submit rankings; once the round is labelled, `export_comparisons` writes
the rankings file that the learner's TrainRewardModel reads.

Files (in `dir`):

  tasks.jsonl   the round's tasks, one per line:
                  {"task_id": str, "prompt": str, "completions": [str, ...]}
                written once, atomically (temp file, fsync, rename, fsync of
                the directory) by `create_round`; never modified.
  labels.jsonl  the accepted rankings, append-only, one per line:
                  {"task_id", "labeler", "prompt", "completions", "ranking", "time"}
                a superset of the rankings format of `alignd.data` (extra
                fields are ignored there), so the file itself loads with
                `alignd.data.load_comparisons`. `ranking` lists completion
                indices best first; `time` is the acceptance time (Unix seconds).
  .lock         flock'ed while a store is open: one writer per round.

Durability. `submit` writes the record's line with a single append, fsyncs the
file (and the directory when the file was just created) and only then updates
memory and returns: a ranking whose `submit` returned survives a SIGKILL of the
coordinator, and a power loss too as far as fsync reaches. Submits are
serialised by a lock, so at most one line, the last, can be incomplete after a
crash: on open, a last line without its newline, or one that is not valid
JSON, is a torn append; it is truncated away (fsync'ed) and logged with a
warning (`dropped_tail_bytes` holds its size). Its submit never returned, so
no accepted ranking is lost; the labeler's retry of that call is accepted
anew. Any other malformed line, or a record that contradicts tasks.jsonl, is
corruption and raises `alignd.data.DataError` (`path:line: problem`). A write
that fails in the running process (disk full) is truncated back before the
error propagates, so a failed submit never leaves a partial line behind.

Leases. `pending(limit, labeler)` leases the tasks it returns to that labeler
for `lease_s` seconds, so two external labelers are not handed the same task
(with `labels_per_task` > 1, a task is handed to as many labelers as it still
needs labels). Leases are kept in memory only: a restart drops them. That is
safe: a lease only steers which tasks `pending` hands out, `submit` never
checks it, so a restart can at worst hand a task that someone is still working
on to a second labeler; both rankings are then accepted (as labels of two
labelers), nothing is rejected or lost. A labeler that gives a task up calls
`release`; a lease also expires by itself.

Several labels per task. Records are keyed by (task_id, labeler): a labeler
submitting the same ranking again gets the stored record back (idempotent, a
safe retry); a different ranking for a task it already labelled is refused
(`LabelError`, code "already_exists"). Different labelers may label the same
task, which gives the data for labeler agreement (`agreement`). A task counts
as labelled when it has `labels_per_task` labels; `export_comparisons` writes
the rankings of one labeler, of some, or of all.

Errors. Bad requests raise `LabelError` (a ValueError) with `field` (the
request field at fault), `code` (a gRPC status name in lower case:
"not_found", "invalid_argument", "already_exists", "failed_precondition") and
a message naming the field; an unknown task is an `UnknownTaskError`, which is
also a KeyError. A servicer maps `code` to the gRPC status.

Thread safety: every method takes the store's lock; a servicer calls it from
any number of gRPC threads.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from alignd.atomic import fsync_dir
from alignd.data import DEFAULT_MAX_K, DataError, write_jsonl_atomic
from alignd.labelers import Labeler

__all__ = [
    "ComparisonStore",
    "Label",
    "LabelError",
    "Progress",
    "StoreBusyError",
    "Task",
    "UnknownTaskError",
    "task_id_for",
]

_log = logging.getLogger("alignd.coordinator.comparisons")

TASKS_FILE = "tasks.jsonl"
LABELS_FILE = "labels.jsonl"
LOCK_FILE = ".lock"
DEFAULT_LEASE_S = 600.0
MAX_LABELER_NAME = 256


class LabelError(ValueError):
    """A labeling request was refused. str(): `field: problem`; `code` is the gRPC status name in lower case."""

    def __init__(self, field: str, problem: str, code: str = "invalid_argument"):
        self.field = field
        self.problem = problem
        self.code = code
        super().__init__(f"{field}: {problem}")

    def __str__(self) -> str:  # KeyError (of UnknownTaskError) would repr() the message
        return f"{self.field}: {self.problem}"

    def __reduce__(self):
        return (type(self), (self.field, self.problem, self.code))


class UnknownTaskError(LabelError, KeyError):
    """The task id is not in this round (or no round was created)."""

    def __init__(self, field: str, problem: str, code: str = "not_found"):
        super().__init__(field, problem, code)


class StoreBusyError(RuntimeError):
    """Another ComparisonStore (in this or another process) has the round's directory open."""


@dataclass(frozen=True)
class Task:
    """A prompt and its K completions to rank."""

    task_id: str
    prompt: str
    completions: tuple[str, ...]

    @property
    def k(self) -> int:
        return len(self.completions)

    def to_json(self) -> dict:
        return {"task_id": self.task_id, "prompt": self.prompt, "completions": list(self.completions)}


@dataclass(frozen=True)
class Label:
    """An accepted ranking: completion indices of the task, best first."""

    task_id: str
    labeler: str
    prompt: str
    completions: tuple[str, ...]
    ranking: tuple[int, ...]
    time: float

    def to_json(self) -> dict:
        return {
            "task_id": self.task_id,
            "labeler": self.labeler,
            "prompt": self.prompt,
            "completions": list(self.completions),
            "ranking": list(self.ranking),
            "time": self.time,
        }


@dataclass(frozen=True)
class Progress:
    total: int  # tasks in the round
    labelled: int  # tasks with at least labels_per_task labels
    labels: int  # accepted rankings, all labelers
    leased: int  # tasks with an active lease

    @property
    def done(self) -> bool:
        return self.total > 0 and self.labelled >= self.total

    @property
    def fraction(self) -> float:
        return self.labelled / self.total if self.total else 0.0


def task_id_for(prompt: str, completions: Sequence[str]) -> str:
    """A content-derived task id: the same prompt and completions give the same id in any process."""
    h = hashlib.sha256(b"alignd.coordinator.comparisons.task.v1")
    for text in (prompt, *completions):
        b = text.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return "t-" + h.hexdigest()[:20]


def _as_task(item: Any, index: int) -> Task:
    """Task from a Task, a dict ({"task_id"?, "prompt", "completions"}), an object with
    .prompt/.completions (alignd.data.Comparison) or a (prompt, completions) pair; ids derived when absent."""
    where = f"tasks[{index}]"
    task_id: Any = None
    if isinstance(item, Task):
        task_id, prompt, comps = item.task_id, item.prompt, item.completions
    elif isinstance(item, dict):
        task_id, prompt, comps = item.get("task_id"), item.get("prompt"), item.get("completions")
    elif hasattr(item, "prompt") and hasattr(item, "completions"):
        task_id, prompt, comps = getattr(item, "task_id", None), item.prompt, item.completions
    else:
        try:
            prompt, comps = item
        except (TypeError, ValueError):
            raise LabelError(
                where, f"expected a Task, a dict or a (prompt, completions) pair, got {type(item).__name__}"
            ) from None
    if not isinstance(prompt, str) or not prompt.strip():
        raise LabelError(f"{where}.prompt", "must be a non-empty string")
    if isinstance(comps, str) or not isinstance(comps, (list, tuple)):
        raise LabelError(f"{where}.completions", f"must be a list of strings, got {type(comps).__name__}")
    for i, c in enumerate(comps):
        if not isinstance(c, str) or c == "":
            raise LabelError(f"{where}.completions", f"completion {i} must be a non-empty string")
    if task_id is None:
        task_id = task_id_for(prompt, comps)
    if not isinstance(task_id, str) or not task_id:
        raise LabelError(f"{where}.task_id", "must be a non-empty string")
    return Task(task_id, prompt, tuple(comps))


def _check_task(task: Task, max_k: int | None, where: str) -> None:
    if task.k < 2 or (max_k is not None and task.k > max_k):
        raise LabelError(f"{where}.completions", f"K = {task.k} completions; a task needs 2..{max_k} (max_k)")
    seen: dict[str, int] = {}
    for i, c in enumerate(task.completions):
        if c in seen:
            raise LabelError(
                f"{where}.completions", f"completions {seen[c]} and {i} are identical; deduplicate the samples"
            )
        seen[c] = i


def _check_ranking(ranking: Any, k: int) -> tuple[int, ...]:
    if isinstance(ranking, (str, bytes)) or not isinstance(ranking, (list, tuple)):
        raise LabelError("ranking", f"must be a list of completion indices, got {type(ranking).__name__}")
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
        raise LabelError("ranking", f"must be a list of integer completion indices, got {list(ranking)!r:.120}")
    if sorted(ranking) != list(range(k)):
        raise LabelError(
            "ranking",
            f"{list(ranking)} is not a permutation of 0..{k - 1} (indices into the {k} completions, best first)",
        )
    return tuple(int(r) for r in ranking)


def _check_labeler(labeler: Any) -> str:
    if not isinstance(labeler, str) or not labeler.strip():
        raise LabelError("labeler", "must be a non-empty string (the labeler's name)")
    if len(labeler) > MAX_LABELER_NAME:
        raise LabelError("labeler", f"name is longer than {MAX_LABELER_NAME} characters")
    return labeler


class ComparisonStore:
    """Durable storage of one labeling round; see the module docs.

    dir: the round's directory (created if missing). labels_per_task: labels
    a task needs to count as labelled (1; more to measure agreement).
    lease_s: default lease of `pending`. max_k: the largest K a task may have.
    clock (monotonic, for leases) and wall_clock (the records' `time`) are
    injectable for tests.
    """

    def __init__(
        self,
        dir: str | os.PathLike,
        *,
        labels_per_task: int = 1,
        lease_s: float = DEFAULT_LEASE_S,
        max_k: int = DEFAULT_MAX_K,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(labels_per_task, bool) or not isinstance(labels_per_task, int) or labels_per_task < 1:
            raise ValueError(f"labels_per_task must be an integer >= 1, not {labels_per_task!r}")
        self.lease_s = self._check_lease(lease_s)
        self.labels_per_task = labels_per_task
        self.max_k = max_k
        self.dir = Path(dir)
        self.tasks_path = self.dir / TASKS_FILE
        self.labels_path = self.dir / LABELS_FILE
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # notified on every accepted label and on close
        self._tasks: dict[str, Task] = {}  # in round order
        self._index: dict[str, int] = {}
        self._labels: list[Label] = []  # in acceptance order
        self._by_key: dict[tuple[str, str], Label] = {}
        self._by_task: dict[str, list[Label]] = {}
        self._incomplete: dict[str, None] = {}  # ordered set of task ids still needing labels
        self._leases: dict[str, dict[str, float]] = {}  # task id -> labeler -> expiry (clock)
        self._fd: int | None = None  # labels.jsonl, O_APPEND
        self._size = 0  # bytes of labels.jsonl known to be complete lines
        self.dropped_tail_bytes = 0  # size of a torn last line removed on open
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StoreBusyError(
                f"{self.dir}: the labeling round is open in another ComparisonStore (one writer per round)"
            ) from None
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # --- opening --------------------------------------------------------------

    def _load(self) -> None:
        if self.tasks_path.exists():
            for n, line in enumerate(self.tasks_path.read_bytes().split(b"\n"), start=1):
                if not line.strip():
                    continue
                try:
                    task = _as_task(json.loads(line), n - 1)
                    _check_task(task, None, f"line {n}")  # max_k applies to new rounds only
                except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError, UnicodeDecodeError, LabelError
                    raise DataError(self.tasks_path, n, f"corrupt task record: {err}") from None
                if task.task_id in self._tasks:
                    raise DataError(self.tasks_path, n, f"duplicate task id {task.task_id!r}")
                self._index[task.task_id] = len(self._tasks)
                self._tasks[task.task_id] = task
                self._incomplete[task.task_id] = None
        if self.labels_path.exists():
            if not self._tasks:
                raise DataError(
                    self.labels_path, None, f"labels without a round: {self.tasks_path} is missing or empty"
                )
            self._load_labels()
            self._fd = os.open(self.labels_path, os.O_WRONLY | os.O_APPEND)

    def _load_labels(self) -> None:
        data = self.labels_path.read_bytes()
        lines = data.split(b"\n")
        # lines[-1] is what follows the last newline: b"" when the file ends with a complete line
        complete = lines[:-1]
        good_end = len(data) - len(lines[-1])
        if not lines[-1] and complete and complete[-1].strip():
            # A newline-terminated last line that does not parse (e.g. zeros after a power loss) is torn too:
            # appends are serialised, so only the last line can lack its fsync. With bytes after it, it was
            # fsync'ed before the next append started, and a bad line there is corruption (raised below).
            try:
                json.loads(complete[-1])
            except ValueError:
                good_end -= len(complete[-1]) + 1
                complete = complete[:-1]
        if good_end < len(data):
            self.dropped_tail_bytes = len(data) - good_end
            with open(self.labels_path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
            _log.warning(
                "labels_torn_line_dropped: %s: removed an incomplete last line of %d bytes (an append cut short by a "
                "crash; "
                "its submit never returned)",
                self.labels_path,
                self.dropped_tail_bytes,
            )
        for n, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                label = self._label_from_json(obj)
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(self.labels_path, n, f"corrupt label record: {err}") from None
            old = self._by_key.get((label.task_id, label.labeler))
            if old is not None:
                if old.ranking != label.ranking:
                    raise DataError(
                        self.labels_path,
                        n,
                        f"labeler {label.labeler!r} ranked task {label.task_id!r} twice, differently",
                    )
                continue
            self._add(label)
        self._size = good_end

    def _label_from_json(self, obj: Any) -> Label:
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        task_id = obj.get("task_id")
        task = self._tasks.get(task_id) if isinstance(task_id, str) else None
        if task is None:
            raise ValueError(f"task id {task_id!r} is not in {TASKS_FILE}")
        if obj.get("prompt") != task.prompt or tuple(obj.get("completions") or ()) != task.completions:
            raise ValueError(f"prompt or completions differ from task {task_id!r} in {TASKS_FILE}")
        t = obj.get("time")
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ValueError("field 'time' must be a number")
        # share the task's strings instead of keeping a copy per label
        return Label(
            task_id,
            _check_labeler(obj.get("labeler")),
            task.prompt,
            task.completions,
            _check_ranking(obj.get("ranking"), task.k),
            float(t),
        )

    def _add(self, label: Label) -> None:
        self._labels.append(label)
        self._by_key[(label.task_id, label.labeler)] = label
        have = self._by_task.setdefault(label.task_id, [])
        have.append(label)
        if len(have) >= self.labels_per_task:
            self._incomplete.pop(label.task_id, None)
        with self._changed:  # also called while loading, before anyone waits
            self._changed.notify_all()

    def close(self) -> None:
        """Closes the files and releases the directory; the store is unusable afterwards."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._lock_fd is None

    def wait_until_done(self, timeout: float | None = None) -> bool:
        """Blocks until every task has labels_per_task labels (True), the timeout passes or the store closes (False)."""
        with self._changed:
            return (
                self._changed.wait_for(
                    lambda: (self.has_round and not self._incomplete) or self._lock_fd is None, timeout
                )
                and self._lock_fd is not None
            )

    def __enter__(self) -> ComparisonStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError(f"{self.dir}: the ComparisonStore is closed")

    # --- the round ------------------------------------------------------------

    @property
    def has_round(self) -> bool:
        return bool(self._tasks)

    def create_round(self, tasks: Iterable[Any]) -> bool:
        """Writes tasks.jsonl (atomically) unless the round exists; returns True when it was created.

        tasks: Task objects, dicts {"task_id"?, "prompt", "completions"},
        Comparison-like objects or (prompt, completions) pairs; a missing
        task_id is derived from the content (`task_id_for`). Idempotent: when
        the round exists with the same tasks (ids, prompts and completions, in
        any order), it is kept, labels and all. A round that exists with other
        tasks is refused (LabelError, code "failed_precondition"): a resumed
        coordinator must continue the round it started, not sample a new one.
        """
        items = [_as_task(t, i) for i, t in enumerate(tasks)]
        if not items:
            raise LabelError("tasks", "a round needs at least one task")
        seen: dict[str, int] = {}
        for i, t in enumerate(items):
            _check_task(t, self.max_k, f"tasks[{i}]")
            if t.task_id in seen:
                raise LabelError(
                    f"tasks[{i}].task_id", f"duplicate task id {t.task_id!r} (also tasks[{seen[t.task_id]}])"
                )
            seen[t.task_id] = i
        with self._lock:
            self._check_open()
            if self._tasks:
                if set(seen) != set(self._tasks):
                    missing, extra = set(self._tasks) - set(seen), set(seen) - set(self._tasks)
                    raise LabelError(
                        "tasks",
                        f"{self.dir} already holds a round of {len(self._tasks)} tasks with other task ids "
                        f"({len(missing)} missing, {len(extra)} new); continue that round or use another directory",
                        "failed_precondition",
                    )
                for t in items:
                    if self._tasks[t.task_id] != t:
                        raise LabelError(
                            "tasks",
                            f"task {t.task_id!r} exists in {self.dir} with another prompt or completions",
                            "failed_precondition",
                        )
                return False
            write_jsonl_atomic(self.tasks_path, [t.to_json() for t in items])
            for i, t in enumerate(items):
                self._tasks[t.task_id] = t
                self._index[t.task_id] = i
                self._incomplete[t.task_id] = None
            return True

    def tasks(self) -> list[Task]:
        with self._lock:
            return list(self._tasks.values())

    def task(self, task_id: str) -> Task:
        with self._lock:
            return self._task(task_id)

    def _task(self, task_id: Any) -> Task:
        if not isinstance(task_id, str) or not task_id:
            raise LabelError("task_id", "must be a non-empty string")
        task = self._tasks.get(task_id)
        if task is None:
            if not self._tasks:
                raise UnknownTaskError(
                    "task_id", f"unknown task {task_id!r}: no labeling round has been created in {self.dir}"
                )
            raise UnknownTaskError("task_id", f"unknown task {task_id!r}: not in this labeling round")
        return task

    # --- handing out tasks --------------------------------------------------------

    @staticmethod
    def _check_lease(lease_s: Any) -> float:
        if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or math.isnan(lease_s) or lease_s < 0:
            raise LabelError("lease_s", f"must be a number of seconds >= 0, not {lease_s!r}")
        return float(lease_s)

    def _active_leases(self, task_id: str, now: float) -> dict[str, float]:
        leases = self._leases.get(task_id)
        if not leases:
            return {}
        for who in [w for w, exp in leases.items() if exp <= now]:
            del leases[who]
        if not leases:
            del self._leases[task_id]
            return {}
        return leases

    def pending(self, limit: int | None = None, labeler: str | None = None, lease_s: float | None = None) -> list[Task]:
        """Up to `limit` tasks (round order) that still need labels and that `labeler` has not labelled.

        With a labeler, the tasks are leased to it for `lease_s` seconds (the
        store's default when None; 0 leases nothing): until the lease expires,
        is released or the task is submitted, other labelers are not handed
        the task unless it needs more labels than there are leases on it.
        Asking again returns the labeler's own leased tasks again and renews
        their leases. Without a labeler: the tasks a new labeler would get,
        nothing leased. Leases live in memory only (see the module docs).
        """
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise LabelError("limit", f"must be a positive integer (or None for all), not {limit!r}")
        if labeler is not None:
            labeler = _check_labeler(labeler)
        lease = self.lease_s if lease_s is None else self._check_lease(lease_s)
        out: list[Task] = []
        with self._lock:
            self._check_open()
            now = self._clock()
            for task_id in self._incomplete:
                if limit is not None and len(out) >= limit:
                    break
                if labeler is not None and (task_id, labeler) in self._by_key:
                    continue
                leases = self._active_leases(task_id, now)
                others = sum(1 for who in leases if who != labeler)
                mine = labeler is not None and labeler in leases
                if not mine and self.labels_per_task - len(self._by_task.get(task_id, ())) - others <= 0:
                    continue
                out.append(self._tasks[task_id])
            if labeler is not None and lease > 0:
                for t in out:
                    self._leases.setdefault(t.task_id, {})[labeler] = now + lease
        return out

    def release(self, task_id: str, labeler: str) -> bool:
        """Drops `labeler`'s lease on the task (the labeler skips it); True when there was one."""
        labeler = _check_labeler(labeler)
        with self._lock:
            self._task(task_id)
            leases = self._leases.get(task_id)
            if not leases or labeler not in leases:
                return False
            del leases[labeler]
            if not leases:
                del self._leases[task_id]
            return True

    # --- accepting rankings ---------------------------------------------------------

    def submit(self, task_id: str, ranking: Sequence[int], labeler: str) -> Label:
        """Validates and durably records `labeler`'s ranking of the task; returns the accepted record.

        The line is appended and fsync'ed before this returns. Resubmitting
        the same ranking returns the stored record (nothing is written); a
        different ranking for a task the labeler already ranked raises
        LabelError (code "already_exists"). Leases are not checked: a label is
        never refused because someone else holds the task.
        """
        labeler = _check_labeler(labeler)
        with self._lock:
            self._check_open()
            task = self._task(task_id)
            ranking_t = _check_ranking(ranking, task.k)
            old = self._by_key.get((task_id, labeler))
            if old is not None:
                if old.ranking == ranking_t:
                    return old
                raise LabelError(
                    "ranking",
                    f"labeler {labeler!r} already ranked task {task_id!r} as {list(old.ranking)}; a different ranking "
                    f"({list(ranking_t)}) is refused (accepted rankings are final)",
                    "already_exists",
                )
            label = Label(task_id, labeler, task.prompt, task.completions, ranking_t, float(self._wall_clock()))
            self._append(json.dumps(label.to_json(), ensure_ascii=False).encode("utf-8") + b"\n")
            self._add(label)
            leases = self._leases.get(task_id)
            if leases:
                leases.pop(labeler, None)
                if not leases:
                    del self._leases[task_id]
            return label

    def _append(self, line: bytes) -> None:
        created = False
        if self._fd is None:
            self._fd = os.open(self.labels_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            created = True
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
            if created:
                fsync_dir(self.dir)  # the new file's directory entry is durable too
        except BaseException:
            try:  # never leave a partial line for the next append to follow
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise
        self._size += len(line)

    def label_with(
        self, labeler: Labeler, batch: int = 64, *, limit: int | None = None, lease_s: float | None = None
    ) -> int:
        """Labels the tasks that `labeler` has not labelled yet with `labeler.rank`, through `submit`.

        Fetches `batch` pending tasks at a time (leased to `labeler.name`, so
        external labelers working at the same time get other tasks), stops
        after `limit` new labels (None: when nothing is pending). Every
        ranking is durable when submitted, so after a crash a new store on the
        directory continues where this one stopped, and a deterministic
        labeler (SimulatedLabeler) gives the same labels as an uninterrupted
        run. Returns the number of new labels. Leases still held when
        `labeler.rank` raises are released.
        """
        name = _check_labeler(getattr(labeler, "name", None))
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise LabelError("batch", f"must be a positive integer, not {batch!r}")
        done = 0
        while limit is None or done < limit:
            n = batch if limit is None else min(batch, limit - done)
            tasks = self.pending(n, name, lease_s)
            if not tasks:
                break
            held = [t.task_id for t in tasks]
            try:
                for t in tasks:
                    ranking = labeler.rank(t.prompt, list(t.completions))
                    self.submit(t.task_id, ranking, name)
                    held.remove(t.task_id)
                    done += 1
            finally:
                for task_id in held:
                    self.release(task_id, name)
        return done

    # --- reading -----------------------------------------------------------------

    def labels(self, *, task_id: str | None = None, labeler: str | None = None) -> list[Label]:
        """Accepted rankings in acceptance order, optionally of one task and/or one labeler."""
        with self._lock:
            src = self._by_task.get(task_id, []) if task_id is not None else self._labels
            return [lab for lab in src if labeler is None or lab.labeler == labeler]

    def labelers(self) -> list[str]:
        """Names of the labelers with accepted rankings, in order of their first one."""
        with self._lock:
            return list(dict.fromkeys(lab.labeler for lab in self._labels))

    def progress(self) -> Progress:
        with self._lock:
            now = self._clock()
            leased = sum(1 for task_id in list(self._leases) if self._active_leases(task_id, now))
            total = len(self._tasks)
            return Progress(
                total=total, labelled=total - len(self._incomplete), labels=len(self._labels), leased=leased
            )

    def agreement(self, labeler_a: str, labeler_b: str) -> tuple[float, int]:
        """(fraction of pairs both labelers order the same way, pairs compared) over the tasks both ranked.

        Pairs are all C(K, 2) per task, pooled, as `alignd.labelers.agreement`
        measures it (InstructGPT's labelers agreed on about 73%).
        """
        with self._lock:
            agreed = total = 0
            for task_id in self._by_task:
                a = self._by_key.get((task_id, labeler_a))
                b = self._by_key.get((task_id, labeler_b))
                if a is None or b is None:
                    continue
                pa = {c: p for p, c in enumerate(a.ranking)}
                pb = {c: p for p, c in enumerate(b.ranking)}
                for i, j in combinations(range(len(a.ranking)), 2):
                    agreed += (pa[i] < pa[j]) == (pb[i] < pb[j])
                    total += 1
        if total == 0:
            raise LabelError(
                "labeler", f"labelers {labeler_a!r} and {labeler_b!r} have no task in common", "failed_precondition"
            )
        return agreed / total, total

    def export_comparisons(self, path: str | os.PathLike, labeler: str | Collection[str] | None = None) -> int:
        """Writes accepted rankings as an `alignd.data` rankings JSONL (atomically); returns the records written.

        labeler: None for every labeler's rankings (a task ranked by two
        labelers gives two records), a name, or a collection of names. Records
        are ordered by task (round order), then labeler name, so the file does
        not depend on the order in which rankings arrived. Each line is
        {"prompt", "completions", "ranking", "task_id", "labeler"}. Raises
        LabelError (code "failed_precondition") when there is nothing to export.
        """
        if isinstance(labeler, str):
            wanted: set[str] | None = {labeler}
        elif labeler is None:
            wanted = None
        else:
            wanted = set(labeler)
        with self._lock:
            chosen = [lab for lab in self._labels if wanted is None or lab.labeler in wanted]
            chosen.sort(key=lambda lab: (self._index[lab.task_id], lab.labeler))
            records = [
                {
                    "prompt": lab.prompt,
                    "completions": list(lab.completions),
                    "ranking": list(lab.ranking),
                    "task_id": lab.task_id,
                    "labeler": lab.labeler,
                }
                for lab in chosen
            ]
        if not records:
            who = "any labeler" if wanted is None else f"labeler(s) {sorted(wanted)}"
            raise LabelError("labeler", f"no accepted rankings of {who} in {self.dir} to export", "failed_precondition")
        return write_jsonl_atomic(path, records)
