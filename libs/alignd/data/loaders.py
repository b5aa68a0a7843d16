"""SFT demonstrations, prompts and pretraining text (JSONL or plain text), and the check of a pipeline's data
files before a run starts.

The file formats and the validation rules are in the package docstring (`alignd.data`).
"""

from __future__ import annotations

import os
from pathlib import Path

from alignd.data.reading import (
    _Bad,
    _completion,
    _iter_lines,
    _iter_objects,
    _Loader,
    _messages,
    _prompt,
    _prompt_or_messages,
    _reply_text,
    _split_conversation,
)
from alignd.data.records import Demonstration, LoadReport


def load_demonstrations(path: str | os.PathLike, *, skip_bad: bool = False) -> tuple[list[Demonstration], LoadReport]:
    """SFT demonstrations: `{"prompt", "completion"}` per line, or TRL's conversational forms (`{"messages"}`
    ending with the assistant's reply; `{"prompt": [messages], "completion": [assistant message]}`)."""
    ld = _Loader(path, skip_bad)
    ld.report.format = "demonstrations"
    out: list[Demonstration] = []
    for n, obj in _iter_objects(ld.path):
        try:
            if isinstance(obj, _Bad):
                raise obj
            if "messages" in obj and "prompt" not in obj:  # TRL's conversational language modeling format
                prompt, reply = _split_conversation(_messages(obj["messages"], "messages"), "messages")
                name = "the last assistant message"
            else:
                prompt, reply = _prompt_or_messages(obj), _reply_text(obj, "completion")
                name = "field 'completion'"
            completion = _completion(ld, n, reply, name=name)
        except _Bad as b:
            ld.bad(n, str(b))
            continue
        ld.accept()
        out.append(Demonstration(prompt, completion))
    ld.finish(out, "demonstrations")
    return out, ld.report


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz"))


def _load_strings(
    path: str | os.PathLike, field_name: str, *, skip_bad: bool, what: str, messages: bool = False
) -> tuple[list, LoadReport]:
    ld = _Loader(path, skip_bad)
    out: list = []
    if _is_jsonl(ld.path):
        ld.report.format = "jsonl"
        for n, obj in _iter_objects(ld.path):
            try:
                if isinstance(obj, _Bad):
                    raise obj
                out.append(_prompt_or_messages(obj, field_name) if messages else _prompt(obj, field_name))
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
) -> tuple[list[str | list[dict[str, str]]], LoadReport]:
    """Prompts: `.jsonl` (`{field: str}` or, conversational, `{field: [messages]}` per line) or plain text, one
    prompt per non-blank line."""
    return _load_strings(path, field, skip_bad=skip_bad, what="prompts", messages=True)


def load_texts(path: str | os.PathLike, field: str = "text", skip_bad: bool = False) -> tuple[list[str], LoadReport]:
    """Pretraining documents (PPO-ptx): `.jsonl` (`{field: str}` per line) or plain text, one document per
    non-blank line."""
    return _load_strings(path, field, skip_bad=skip_bad, what="documents")


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
