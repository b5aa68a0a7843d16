"""Reward-model data: the rankings, pairwise and HH-RLHF formats, one per file (detected from the first valid
record with format="auto"), each line validated into a Comparison.

The file formats and the validation rules are in the package docstring (`alignd.data`).
"""

from __future__ import annotations

import json
import os
from typing import Literal

from alignd.data.reading import (
    _Bad,
    _completion,
    _iter_objects,
    _json_type,
    _Loader,
    _messages,
    _prompt_or_messages,
    _reply_text,
    _split_conversation,
    _text,
)
from alignd.data.records import _FORMAT_NAMES, DEFAULT_MAX_K, Comparison, LoadReport

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"

ComparisonFormat = Literal["auto", "rankings", "pairwise", "hh", "conversation"]


def _line_format(obj: dict) -> str | None:
    if "completions" in obj or "ranking" in obj:
        return "rankings"
    if "chosen" in obj or "rejected" in obj:
        if "prompt" in obj:
            return "pairwise"
        return "conversation" if isinstance(obj.get("chosen"), list) else "hh"
    return None


def _check_distinct(completions: list[str]) -> None:
    seen: dict[str, int] = {}
    for i, c in enumerate(completions):
        if c in seen:
            raise _Bad(f"completions {seen[c]} and {i} are identical (a ranking of a text against itself)")
        seen[c] = i


def _ranking_record(ld: _Loader, n: int, obj: dict, *, max_k: int) -> Comparison:
    prompt = _prompt_or_messages(obj)
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
        _completion(ld, n, c, name=f"completions[{i}]")
    _check_distinct(comps)
    return Comparison(prompt, list(comps), list(ranking))


def _pairwise_record(ld: _Loader, n: int, obj: dict) -> Comparison:
    prompt = _prompt_or_messages(obj)
    chosen = _completion(ld, n, _reply_text(obj, "chosen"), name="field 'chosen'")
    rejected = _completion(ld, n, _reply_text(obj, "rejected"), name="field 'rejected'")
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
    chosen = _completion(ld, n, chosen, name="the 'chosen' reply")
    rejected = _completion(ld, n, rejected, name="the 'rejected' reply")
    if chosen == rejected:
        raise _Bad("'chosen' and 'rejected' transcripts are identical")
    return Comparison(p_c, [chosen, rejected], [0, 1])


def _conversation_record(ld: _Loader, n: int, obj: dict) -> Comparison:
    """TRL's implicit-prompt preference format: two whole conversations that differ in their last assistant
    reply only."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise _Bad(f"missing field {key!r}")
    p_c, chosen = _split_conversation(_messages(obj["chosen"], "chosen"), "chosen")
    p_r, rejected = _split_conversation(_messages(obj["rejected"], "rejected"), "rejected")
    if p_c != p_r:
        at = next((i for i, (a, b) in enumerate(zip(p_c, p_r)) if a != b), min(len(p_c), len(p_r)))
        raise _Bad(f"'chosen' and 'rejected' differ before their last assistant reply (at message {at})")
    chosen = _completion(ld, n, chosen, name="the 'chosen' reply")
    rejected = _completion(ld, n, rejected, name="the 'rejected' reply")
    if chosen == rejected:
        raise _Bad("'chosen' and 'rejected' are identical")
    return Comparison(p_c, [chosen, rejected], [0, 1])


def load_comparisons(
    path: str | os.PathLike,
    *,
    skip_bad: bool = False,
    format: ComparisonFormat = "auto",
    max_k: int = DEFAULT_MAX_K,
) -> tuple[list[Comparison], LoadReport]:
    """Reward-model data: rankings, pairwise or HH-RLHF transcripts (one format per file; see module docs)."""
    if format not in ("auto", "rankings", "pairwise", "hh", "conversation"):
        raise ValueError(f"format must be 'auto', 'rankings', 'pairwise', 'hh' or 'conversation', not {format!r}")
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
                rec = _ranking_record(ld, n, obj, max_k=max_k)
            elif fmt == "pairwise":
                rec = _pairwise_record(ld, n, obj)
            elif fmt == "conversation":
                rec = _conversation_record(ld, n, obj)
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
