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
  pretraining text      {"text": str} JSONL, or plain text, one document per line.

`load_comparisons(format="auto")` picks the format per file from the first
valid record (completions/ranking -> rankings; chosen/rejected with a prompt
-> pairwise; without -> HH-RLHF) and holds every later line to it.

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
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from alignd.atomic import atomic_writer

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

DEFAULT_MAX_K = 9  # InstructGPT: labelers ranked K = 4..9 completions per prompt
ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"
MAX_REPORTED = 1000  # problem / warning messages kept in a report; the counts are exact

ComparisonFormat = Literal["auto", "rankings", "pairwise", "hh"]
_FORMAT_NAMES = {"rankings": "rankings", "pairwise": "pairwise", "hh": "HH-RLHF transcript"}


class DataError(ValueError):
    """A data file is unreadable or malformed. str(): `path:line: problem` (`path: problem` without a line)."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str):
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.problem))


@dataclass
class Demonstration:
    prompt: str
    completion: str


@dataclass
class Comparison:
    """A prompt with K >= 2 completions; `ranking` holds completion indices, best first."""

    prompt: str
    completions: list[str]
    ranking: list[int]

    @property
    def k(self) -> int:
        return len(self.completions)

    def pairs(self) -> list[tuple[int, int]]:
        """All C(K, 2) (better, worse) completion-index pairs implied by the ranking."""
        return [(self.ranking[i], self.ranking[j]) for i, j in combinations(range(len(self.ranking)), 2)]


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # `path:line: problem` of skipped lines
    warnings: list[str] = field(default_factory=list)  # `path:line: ...` of accepted but suspicious lines
    format: str | None = None
    warning_count: int = 0

    def summary(self) -> str:
        s = f"{self.path}: loaded {self.loaded}"
        if self.format:
            s += f" ({_FORMAT_NAMES.get(self.format, self.format)})"
        if self.skipped:
            s += f", skipped {self.skipped} bad line(s)"
        if self.warning_count:
            s += f", {self.warning_count} warning(s)"
        return s


# --- reading ---------------------------------------------------------------


class _Bad(Exception):
    """A problem with the current line (becomes a DataError with file and line)."""


def _open_binary(path: Path):
    try:
        f = open(path, "rb")
    except OSError as err:
        raise DataError(path, None, f"cannot read file: {err.strerror or err}") from None
    try:
        magic = f.read(2)
        f.seek(0)
    except OSError as err:
        f.close()
        raise DataError(path, None, f"cannot read file: {err.strerror or err}") from None
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f, mode="rb"), f
    return f, f


def _iter_lines(path: Path) -> Iterator[tuple[int, str | _Bad]]:
    """(line number, text without the newline, or the _Bad decoding problem); skips blank lines.

    Splits on b"\\n" only, so U+2028 and other characters that str.splitlines
    treats as breaks (valid inside JSON strings) never shift line numbers.
    """
    stream, raw = _open_binary(path)
    n = 0
    try:
        while True:
            try:
                data = stream.readline()
            except (OSError, EOFError, zlib.error) as err:
                raise DataError(path, n + 1, f"cannot read file: {err}") from None
            if not data:
                return
            n += 1
            try:
                text = data.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield n, _Bad(f"not valid UTF-8 (byte {err.start})")
                continue
            text = text.rstrip("\r\n")
            if text.strip():
                yield n, text
    finally:
        stream.close()
        raw.close()


def _iter_objects(path: Path) -> Iterator[tuple[int, dict | _Bad]]:
    for n, text in _iter_lines(path):
        if isinstance(text, _Bad):
            yield n, text
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            yield n, _Bad(f"invalid JSON ({err.msg} at column {err.colno})")
            continue
        except RecursionError:
            yield n, _Bad("invalid JSON (nested too deeply)")
            continue
        if not isinstance(obj, dict):
            yield n, _Bad(f"expected a JSON object, got {_json_type(obj)}")
            continue
        yield n, obj


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


class _Loader:
    def __init__(self, path: str | os.PathLike, skip_bad: bool):
        self.path = Path(path)
        self.skip_bad = skip_bad
        self.report = LoadReport(path=str(path))
        self.pending: list[str] = []  # warnings of the line being read, kept only if it is accepted

    def bad(self, line: int, problem: str) -> None:
        self.pending.clear()
        err = DataError(self.report.path, line, problem)
        if not self.skip_bad:
            raise err
        self.report.skipped += 1
        if len(self.report.problems) < MAX_REPORTED:
            self.report.problems.append(str(err))

    def warn(self, line: int, message: str) -> None:
        self.pending.append(f"{self.report.path}:{line}: {message}")

    def accept(self) -> None:
        self.report.warning_count += len(self.pending)
        room = MAX_REPORTED - len(self.report.warnings)
        self.report.warnings.extend(self.pending[: max(0, room)])
        self.pending.clear()

    def finish(self, records: list, what: str) -> None:
        self.report.loaded = len(records)
        if not records:
            detail = (
                f" ({self.report.skipped} bad line(s) skipped, first: {self.report.problems[0]})"
                if self.report.skipped
                else ""
            )
            raise DataError(self.report.path, None, f"no {what}{detail}")


def _text(obj: dict, key: str) -> str:
    if key not in obj:
        raise _Bad(f"missing field {key!r}")
    v = obj[key]
    if not isinstance(v, str):
        raise _Bad(f"field {key!r} must be a string, got {_json_type(v)}")
    return v


def _prompt(obj: dict, key: str = "prompt") -> str:
    v = _text(obj, key)
    if not v.strip():
        raise _Bad(f"field {key!r} is empty")
    return v


def _completion(ld: _Loader, line: int, v: str, name: str) -> str:
    if v == "":
        raise _Bad(f"{name} is empty")
    if not v.strip():
        ld.warn(line, f"{name} is only whitespace ({v!r})")
    return v


# --- demonstrations ----------------------------------------------------------


def load_demonstrations(path: str | os.PathLike, *, skip_bad: bool = False) -> tuple[list[Demonstration], LoadReport]:
    """SFT demonstrations, `{"prompt", "completion"}` per line."""
    ld = _Loader(path, skip_bad)
    ld.report.format = "demonstrations"
    out: list[Demonstration] = []
    for n, obj in _iter_objects(ld.path):
        try:
            if isinstance(obj, _Bad):
                raise obj
            prompt = _prompt(obj)
            completion = _completion(ld, n, _text(obj, "completion"), "field 'completion'")
        except _Bad as b:
            ld.bad(n, str(b))
            continue
        ld.accept()
        out.append(Demonstration(prompt, completion))
    ld.finish(out, "demonstrations")
    return out, ld.report


# --- comparisons -------------------------------------------------------------


def _line_format(obj: dict) -> str | None:
    if "completions" in obj or "ranking" in obj:
        return "rankings"
    if "chosen" in obj or "rejected" in obj:
        return "pairwise" if "prompt" in obj else "hh"
    return None


def _check_distinct(completions: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, c in enumerate(completions):
        if c in seen:
            raise _Bad(f"completions {seen[c]} and {i} are identical (a ranking of a text against itself)")
        seen[c] = i


def _ranking_record(ld: _Loader, n: int, obj: dict, max_k: int) -> Comparison:
    prompt = _prompt(obj)
    if "completions" not in obj:
        raise _Bad("missing field 'completions'")
    comps = obj["completions"]
    if not isinstance(comps, list):
        raise _Bad(f"field 'completions' must be an array of strings, got {_json_type(comps)}")
    k = len(comps)
    if k < 2:
        raise _Bad(f"K = {k} completions; a ranking needs at least 2")
    if k > max_k:
        raise _Bad(f"K = {k} completions; at most {max_k} are allowed (max_k)")
    for i, c in enumerate(comps):
        if not isinstance(c, str):
            raise _Bad(f"completions[{i}] must be a string, got {_json_type(c)}")
    if "ranking" not in obj:
        raise _Bad("missing field 'ranking'")
    ranking = obj["ranking"]
    if not isinstance(ranking, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
        raise _Bad(f"field 'ranking' must be an array of completion indices (integers), got {json.dumps(ranking)[:80]}")
    if sorted(ranking) != list(range(k)):
        raise _Bad(
            f"ranking {ranking} is not a permutation of 0..{k - 1} (indices into the {k} completions, best first)"
        )
    for i, c in enumerate(comps):
        _completion(ld, n, c, f"completions[{i}]")
    _check_distinct(comps)
    return Comparison(prompt, list(comps), list(ranking))


def _pairwise_record(ld: _Loader, n: int, obj: dict) -> Comparison:
    prompt = _prompt(obj)
    chosen = _completion(ld, n, _text(obj, "chosen"), "field 'chosen'")
    rejected = _completion(ld, n, _text(obj, "rejected"), "field 'rejected'")
    if chosen == rejected:
        raise _Bad("'chosen' and 'rejected' are identical")
    return Comparison(prompt, [chosen, rejected], [0, 1])


def split_hh_transcript(text: str, name: str = "transcript") -> tuple[str, str]:
    """(prompt ending in "\\n\\nAssistant:", final reply) of an HH-RLHF transcript; ValueError without a final
    reply."""
    i = text.rfind(ASSISTANT)
    if i < 0:
        raise ValueError(f"{name} has no {ASSISTANT!r} turn")
    cut = i + len(ASSISTANT)
    reply = text[cut:]
    if HUMAN in reply:
        raise ValueError(f"{name} ends with a Human turn, not an Assistant reply")
    return text[:cut], reply


def _hh_record(ld: _Loader, n: int, obj: dict) -> Comparison:
    chosen_t = _text(obj, "chosen")
    rejected_t = _text(obj, "rejected")
    try:
        p_c, chosen = split_hh_transcript(chosen_t, "'chosen' transcript")
        p_r, rejected = split_hh_transcript(rejected_t, "'rejected' transcript")
    except ValueError as err:
        raise _Bad(str(err)) from None
    if p_c != p_r:
        at = next((i for i, (a, b) in enumerate(zip(p_c, p_r)) if a != b), min(len(p_c), len(p_r)))
        raise _Bad(f"'chosen' and 'rejected' transcripts differ before their last Assistant reply (at character {at})")
    if not p_c[: -len(ASSISTANT)].strip():
        raise _Bad("empty prompt: the transcript has nothing before its last Assistant turn")
    chosen = _completion(ld, n, chosen, "the 'chosen' reply")
    rejected = _completion(ld, n, rejected, "the 'rejected' reply")
    if chosen == rejected:
        raise _Bad("'chosen' and 'rejected' transcripts are identical")
    return Comparison(p_c, [chosen, rejected], [0, 1])


def load_comparisons(
    path: str | os.PathLike,
    *,
    skip_bad: bool = False,
    format: ComparisonFormat = "auto",
    max_k: int = DEFAULT_MAX_K,
) -> tuple[list[Comparison], LoadReport]:
    """Reward-model data: rankings, pairwise or HH-RLHF transcripts (one format per file; see module docs)."""
    if format not in ("auto", "rankings", "pairwise", "hh"):
        raise ValueError(f"format must be 'auto', 'rankings', 'pairwise' or 'hh', not {format!r}")
    if max_k < 2:
        raise ValueError(f"max_k must be at least 2, not {max_k}")
    ld = _Loader(path, skip_bad)
    fmt: str | None = None if format == "auto" else format
    fmt_line = 0
    out: list[Comparison] = []
    for n, obj in _iter_objects(ld.path):
        try:
            if isinstance(obj, _Bad):
                raise obj
            own = _line_format(obj)
            if fmt is None:
                if own is None:
                    raise _Bad(
                        "cannot tell the comparison format: expected 'prompt', 'completions', 'ranking' (rankings), "
                        "'prompt', 'chosen', 'rejected' (pairwise) or 'chosen', 'rejected' (HH-RLHF transcripts); "
                        f"found fields {sorted(obj)[:8]}"
                    )
                fmt, fmt_line = own, n
            elif format == "auto" and own is not None and own != fmt and (fmt, own) != ("pairwise", "hh"):
                # (a pairwise line without its prompt looks like HH-RLHF: "missing field 'prompt'" says it better)
                raise _Bad(
                    f"line is in the {_FORMAT_NAMES[own]} format but the file is {_FORMAT_NAMES[fmt]} "
                    f"(from line {fmt_line}); one format per file"
                )
            if fmt == "rankings":
                rec = _ranking_record(ld, n, obj, max_k)
            elif fmt == "pairwise":
                rec = _pairwise_record(ld, n, obj)
            else:
                rec = _hh_record(ld, n, obj)
        except _Bad as b:
            ld.bad(n, str(b))
            continue
        ld.accept()
        out.append(rec)
    ld.report.format = fmt
    ld.finish(out, "comparisons")
    return out, ld.report


# --- prompts and pretraining text --------------------------------------------


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz"))


def _load_strings(path: str | os.PathLike, field_name: str, skip_bad: bool, what: str) -> tuple[list[str], LoadReport]:
    ld = _Loader(path, skip_bad)
    out: list[str] = []
    if _is_jsonl(ld.path):
        ld.report.format = "jsonl"
        for n, obj in _iter_objects(ld.path):
            try:
                if isinstance(obj, _Bad):
                    raise obj
                out.append(_prompt(obj, field_name))
            except _Bad as b:
                ld.bad(n, str(b))
    else:
        ld.report.format = "text"
        for n, text in _iter_lines(ld.path):
            if isinstance(text, _Bad):
                ld.bad(n, str(text))
            else:
                out.append(text)
    ld.finish(out, what)
    return out, ld.report


def load_prompts(
    path: str | os.PathLike, field: str = "prompt", skip_bad: bool = False
) -> tuple[list[str], LoadReport]:
    """Prompts: `.jsonl` (`{field: str}` per line) or plain text, one prompt per non-blank line."""
    return _load_strings(path, field, skip_bad, "prompts")


def load_texts(path: str | os.PathLike, field: str = "text", skip_bad: bool = False) -> tuple[list[str], LoadReport]:
    """Pretraining documents (PPO-ptx): `.jsonl` (`{field: str}` per line) or plain text, one document per
    non-blank line."""
    return _load_strings(path, field, skip_bad, "documents")


# --- writing, datasets, splits ---------------------------------------------------


def _as_dict(record: Any, str_field: str = "prompt") -> dict:
    if is_dataclass(record) and not isinstance(record, type):
        return asdict(record)
    if isinstance(record, dict):
        return record
    if isinstance(record, str):
        return {str_field: record}
    raise TypeError(f"cannot write a {type(record).__name__} as a JSON object")


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[Any], *, str_field: str = "prompt") -> int:
    """Write records (dataclasses, dicts or strings as {str_field: s}) as JSONL: temp file, fsync, rename.

    Readers see the old file or the whole new one, never a part. A name ending
    in `.gz` is gzip-compressed. Returns the number of records written.
    """
    n = 0
    with atomic_writer(path) as raw:
        out = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if str(path).endswith(".gz") else raw
        for rec in records:
            out.write(json.dumps(_as_dict(rec, str_field), ensure_ascii=False).encode("utf-8") + b"\n")
            n += 1
        if out is not raw:
            out.close()
    return n


def to_hf_dataset(records: Sequence[Any], *, str_field: str = "prompt"):
    """An in-memory `datasets.Dataset` of the records (dataclass fields as columns; strings as {str_field})."""
    import datasets  # lazy: heavy, and only downstream trainers need it

    return datasets.Dataset.from_list([_as_dict(r, str_field) for r in records])


def _default_key(record: Any) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        return record["prompt"]
    return record.prompt


def split_train_eval(
    records: Sequence[Any],
    eval_fraction: float,
    seed: int,
    *,
    key: Callable[[Any], str] | None = None,
) -> tuple[list[Any], list[Any]]:
    """(train, eval) split by prompt: every record of one prompt lands on the same side.

    Unique prompts are ordered by sha256(seed, prompt) and the first
    round(eval_fraction * prompts) go to eval (at least one and at most all
    but one when 0 < eval_fraction and there are two or more prompts). The
    split depends only on the set of prompts and the seed, not on record
    order; records keep their order within each side.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), not {eval_fraction}")
    key = key or _default_key
    prompts = list(dict.fromkeys(key(r) for r in records))
    n_eval = round(eval_fraction * len(prompts))
    if eval_fraction > 0 and len(prompts) >= 2:
        n_eval = min(max(n_eval, 1), len(prompts) - 1)
    ordered = sorted(prompts, key=lambda p: hashlib.sha256(f"{seed}\x00{p}".encode("utf-8", "surrogatepass")).digest())
    eval_prompts = set(ordered[:n_eval])
    train = [r for r in records if key(r) not in eval_prompts]
    evals = [r for r in records if key(r) in eval_prompts]
    return train, evals


def check_pipeline_data(cfg, prompts_report=None) -> tuple[dict, list[str]]:
    """Reads a pipeline's data files (cfg: alignd.config.PipelineConfig) as the run will: a malformed line raises
    DataError (`file:line: problem`) so the run refuses to start, unless cfg.skip_bad_lines, which drops and counts
    it. Returns ({file: load report}, the evaluation prompts). prompts_report: the PPO prompts' report when the
    caller loaded them already (`alignd run` checks before any role starts; the coordinator again at the run)."""
    skip = cfg.skip_bad_lines
    _, demos = load_demonstrations(cfg.demonstrations, skip_bad=skip)
    prompts = prompts_report or load_prompts(cfg.ppo.prompts.path, field=cfg.ppo.prompts.field, skip_bad=skip)[1]
    ev = cfg.evaluation
    eval_prompts, evals = load_prompts(ev.prompts.path, field=ev.prompts.field, skip_bad=skip)
    reports = {
        name: {"path": r.path, "loaded": r.loaded, "skipped": r.skipped, "problems": r.problems[:20]}
        for name, r in (("demonstrations", demos), ("prompts", prompts), ("evaluation_prompts", evals))
    }
    return reports, eval_prompts
