"""Training data files: demonstrations, comparisons, prompts and pretraining text (no torch).

Formats (one JSON object per line; `.gz` files are read transparently, detected
by their magic bytes; extra fields are ignored):

  demonstrations (SFT)  {"prompt": str, "completion": str}
  rankings (RM)         {"prompt": str, "completions": [str, ...], "ranking": [int, ...]}
                        K = len(completions), 2 <= K <= max_k (9 by default);
                        `ranking` lists completion *indices* from best to worst
                        and must be a permutation of range(K): completions
                        ["a", "b", "c"] with ranking [2, 0, 1] mean c > a > b.
  pairwise (RM)         {"prompt": str, "chosen": str, "rejected": str}
                        becomes a K = 2 Comparison with ranking [0, 1].
  HH-RLHF (RM)          {"chosen": TRANSCRIPT, "rejected": TRANSCRIPT}
                        (Anthropic's hh-rlhf): each transcript is split at its
                        last "\\n\\nAssistant:"; the prompt is the part up to and
                        including that marker, which must be identical in both
                        transcripts, and the completions are the two final
                        replies (with their leading space, as in the data).
  prompts               {"prompt": str} JSONL (the field is configurable), or any
                        other file as plain text, one prompt per line.

TRL's conversational forms are read too (docs/chat.md): a prompt may be a
conversation, an array of {"role", "content"} messages (roles system, user,
assistant, tool) that does not end with the assistant; a completion (or
chosen / rejected) may be a one-message array with the assistant's reply.
Besides: demonstrations {"messages": [..., assistant reply]}, and the
"conversation" comparison format {"chosen": [whole conversation], "rejected":
[whole conversation]} (TRL's implicit prompt: the two agree up to their last
assistant reply, which are the completions). A conversational prompt stays a
list of messages in the records; each role renders it with its chat template.
  pretraining text      {"text": str} JSONL, or plain text, one document per line.

`load_comparisons(format="auto")` picks the format per file from the first
valid record (completions/ranking -> rankings; chosen/rejected with a prompt
-> pairwise; without, as strings -> HH-RLHF, as message arrays ->
conversation) and holds every later line to it.

Validation. Every problem is a `DataError` whose message is `path:line: problem`
(1-based physical line numbers; blank lines are skipped but counted): invalid
UTF-8, invalid JSON, a line that is not an object, a missing or non-string
field, an empty prompt or completion, K < 2 or K > max_k, a ranking that is not
a permutation of range(K), a line in another format than the file's, HH-RLHF
transcripts without an Assistant turn, ending with a Human turn or differing
before the last Assistant reply. By default the first problem raises, so a run
refuses to start on bad data; with `skip_bad=True` the line is dropped, counted
in `LoadReport.skipped` and its message kept in `LoadReport.problems`. A file
that cannot be opened (message `path: problem`, no line), one that breaks while
being read (a truncated gzip: `path:line: ...`) and a file that yields no
records at all always raise.

Decisions:
  * Duplicate completions in one record (a ranking that lists the same text
    twice, chosen == rejected) are an error, not a warning: the record states
    A > A, its pair has no preference signal (the Bradley-Terry loss of an
    identical pair is the constant log 2 with zero gradient) and it nearly
    always means a pipeline bug. `skip_bad=True` drops such lines.
  * "Empty" means "" for completions and whitespace-only for prompts. A
    completion that is only whitespace is accepted with a warning in
    `LoadReport.warnings`: real data has them (in the HH-RLHF harmless-base
    sample 3 of 1,000 chosen replies are a single space: the crowdworker
    preferred the assistant saying nothing), and that is a preference signal.
  * Reading goes through the json module line by line, not through
    `datasets.load_dataset("json", ...)`: the latter cannot say which line is
    malformed (pyarrow reports "row N" of a block for invalid JSON), silently
    fills missing fields with None, coerces mixed types and writes a cache
    under ~/.cache/huggingface. Records are validated while streaming;
    `to_hf_dataset(records)` builds an in-memory `datasets.Dataset` for
    downstream users (`datasets` is imported only there).

Layout: `records` (DataError, Demonstration, Comparison, LoadReport), `reading` (lines, JSON, field checks,
the skip/raise policy), `comparisons` (the reward-model formats, `load_comparisons`), `loaders`
(demonstrations, prompts, pretraining text, `check_pipeline_data`), `writing` (atomic JSONL, `to_hf_dataset`,
`split_train_eval`). Every name is importable from `alignd.data`.
"""

from __future__ import annotations

from alignd.data.comparisons import ASSISTANT as ASSISTANT
from alignd.data.comparisons import HUMAN as HUMAN
from alignd.data.comparisons import ComparisonFormat as ComparisonFormat
from alignd.data.comparisons import load_comparisons, split_hh_transcript
from alignd.data.loaders import check_pipeline_data as check_pipeline_data
from alignd.data.loaders import load_demonstrations, load_prompts, load_texts
from alignd.data.records import DEFAULT_MAX_K, Comparison, DataError, Demonstration, LoadReport
from alignd.data.records import MAX_REPORTED as MAX_REPORTED
from alignd.data.writing import split_train_eval, to_hf_dataset, write_jsonl_atomic

# ASSISTANT, HUMAN, ComparisonFormat, MAX_REPORTED and check_pipeline_data (the `X as X` imports) are
# importable from here too, outside __all__ as before the split.
__all__ = [
    "Comparison",
    "DataError",
    "Demonstration",
    "LoadReport",
    "DEFAULT_MAX_K",
    "load_comparisons",
    "load_demonstrations",
    "load_prompts",
    "load_texts",
    "split_hh_transcript",
    "split_train_eval",
    "to_hf_dataset",
    "write_jsonl_atomic",
]
