"""`ComparisonStore`: one labeling round, durable; see the package docs (`alignd.services.coordinator.comparisons`).

The store keeps the round in memory (tasks, accepted labels by task and by
labeler, in-memory leases), hands out and leases pending tasks, accepts
rankings through `LabelsFile.append` and answers progress, agreement and
export. Records and validation are in `records.py`, the files in `files.py`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from alignd.data import DEFAULT_MAX_K, DataError, write_jsonl_atomic
from alignd.labelers import Labeler
from alignd.services.coordinator.comparisons.files import (
    LABELS_FILE,
    TASKS_FILE,
    LabelsFile,
    lock_round,
    read_tasks,
)
from alignd.services.coordinator.comparisons.records import (
    Label,
    LabelError,
    Progress,
    Task,
    UnknownTaskError,
    as_task,
    check_labeler,
    check_lease,
    check_ranking,
    check_task,
    label_from_json,
)

DEFAULT_LEASE_S = 600.0


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
        self.lease_s = check_lease(lease_s)
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
        self._file = LabelsFile(self.labels_path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = lock_round(self.dir)
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # --- opening --------------------------------------------------------------

    def _load(self) -> None:
        for task in read_tasks(self.tasks_path):
            self._index[task.task_id] = len(self._tasks)
            self._tasks[task.task_id] = task
            self._incomplete[task.task_id] = None
        if self.labels_path.exists():
            if not self._tasks:
                raise DataError(
                    self.labels_path, None, f"labels without a round: {self.tasks_path} is missing or empty"
                )
            self._load_labels()
            self._file.open()

    def _load_labels(self) -> None:
        for n, line in enumerate(self._file.read_lines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                label = label_from_json(obj, self._tasks, TASKS_FILE)
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

    @property
    def dropped_tail_bytes(self) -> int:
        """Size of a torn last line of labels.jsonl removed on open (0: none)."""
        return self._file.dropped_tail_bytes

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
            self._file.close()
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
        items = [as_task(t, i) for i, t in enumerate(tasks)]
        if not items:
            raise LabelError("tasks", "a round needs at least one task")
        seen: dict[str, int] = {}
        for i, t in enumerate(items):
            check_task(t, self.max_k, f"tasks[{i}]")
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
            labeler = check_labeler(labeler)
        lease = self.lease_s if lease_s is None else check_lease(lease_s)
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
        labeler = check_labeler(labeler)
        with self._lock:
            self._task(task_id)
            return self._drop_lease(task_id, labeler)

    def _drop_lease(self, task_id: str, labeler: str) -> bool:
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
        labeler = check_labeler(labeler)
        with self._lock:
            self._check_open()
            task = self._task(task_id)
            ranking_t = check_ranking(ranking, task.k)
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
            self._file.append(json.dumps(label.to_json(), ensure_ascii=False).encode("utf-8") + b"\n")
            self._add(label)
            self._drop_lease(task_id, labeler)
            return label

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
        name = check_labeler(getattr(labeler, "name", None))
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
