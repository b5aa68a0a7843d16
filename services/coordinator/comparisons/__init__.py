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

Modules: `records` (Task, Label, Progress, the errors, validation), `files`
(tasks.jsonl, labels.jsonl, the round's lock), `store` (ComparisonStore).
"""

from __future__ import annotations

from alignd.services.coordinator.comparisons.records import (
    Label,
    LabelError,
    Progress,
    StoreBusyError,
    Task,
    UnknownTaskError,
    task_id_for,
)
from alignd.services.coordinator.comparisons.store import ComparisonStore

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
