"""The records of a labeling round and their validation: tasks, accepted rankings, progress, the refusals.

`Task` (a prompt and its K completions), `Label` (an accepted ranking) and
`Progress` are what `ComparisonStore` hands out; `LabelError` (and
`UnknownTaskError`, `StoreBusyError`) what it raises. The `as_`/`check_`
functions validate what a labeler or a file gives, raising `LabelError`
naming the field at fault.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


def as_task(item: Any, index: int) -> Task:
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


def check_task(task: Task, max_k: int | None, where: str) -> None:
    if task.k < 2 or (max_k is not None and task.k > max_k):
        raise LabelError(f"{where}.completions", f"K = {task.k} completions; a task needs 2..{max_k} (max_k)")
    seen: dict[str, int] = {}
    for i, c in enumerate(task.completions):
        if c in seen:
            raise LabelError(
                f"{where}.completions", f"completions {seen[c]} and {i} are identical; deduplicate the samples"
            )
        seen[c] = i


def check_ranking(ranking: Any, k: int) -> tuple[int, ...]:
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


def check_labeler(labeler: Any) -> str:
    if not isinstance(labeler, str) or not labeler.strip():
        raise LabelError("labeler", "must be a non-empty string (the labeler's name)")
    if len(labeler) > MAX_LABELER_NAME:
        raise LabelError("labeler", f"name is longer than {MAX_LABELER_NAME} characters")
    return labeler


def check_lease(lease_s: Any) -> float:
    if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)) or math.isnan(lease_s) or lease_s < 0:
        raise LabelError("lease_s", f"must be a number of seconds >= 0, not {lease_s!r}")
    return float(lease_s)


def label_from_json(obj: Any, tasks: Mapping[str, Task], tasks_file: str) -> Label:
    """The Label of a labels.jsonl record, checked against the round's tasks (ValueError naming the problem)."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    task_id = obj.get("task_id")
    task = tasks.get(task_id) if isinstance(task_id, str) else None
    if task is None:
        raise ValueError(f"task id {task_id!r} is not in {tasks_file}")
    if obj.get("prompt") != task.prompt or tuple(obj.get("completions") or ()) != task.completions:
        raise ValueError(f"prompt or completions differ from task {task_id!r} in {tasks_file}")
    t = obj.get("time")
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise ValueError("field 'time' must be a number")
    # share the task's strings instead of keeping a copy per label
    return Label(
        task_id,
        check_labeler(obj.get("labeler")),
        task.prompt,
        task.completions,
        check_ranking(obj.get("ranking"), task.k),
        float(t),
    )
