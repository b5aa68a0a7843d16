"""Records out: atomic JSONL writes (optionally gzip), an in-memory `datasets.Dataset`, and the train/eval split
by prompt.

The file formats and the validation rules are in the package docstring (`alignd.data`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from alignd.atomic import atomic_writer


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


def prompt_key(prompt: Any) -> str:
    """A prompt as a string key: text as it is, a conversation as its canonical JSON (conversations are lists,
    which cannot key a dict or a set)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _default_key(record: Any) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        return prompt_key(record["prompt"])
    return prompt_key(record.prompt)


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
