"""Reading a data file line by line: gzip detected by its magic bytes, UTF-8 and JSON per line with the
physical line number, field checks, and the loader state that raises or skips a bad line and fills the report.

The file formats and the validation rules are in the package docstring (`alignd.data`).
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alignd.data.records import MAX_REPORTED, DataError, LoadReport


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


def _completion(ld: _Loader, line: int, v: str, *, name: str) -> str:
    if v == "":
        raise _Bad(f"{name} is empty")
    if not v.strip():
        ld.warn(line, f"{name} is only whitespace ({v!r})")
    return v


_CHAT_ROLES = ("system", "user", "assistant", "tool")


def _messages(v: Any, key: str) -> list[dict[str, str]]:
    """A conversation in TRL's conversational format: a non-empty array of {"role", "content"} objects."""
    if not isinstance(v, list):
        raise _Bad(f"field {key!r} must be a string or an array of messages, got {_json_type(v)}")
    if not v:
        raise _Bad(f"field {key!r} is an empty conversation")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise _Bad(f"{key}[{i}] must be a message object {{'role', 'content'}}, got {_json_type(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in _CHAT_ROLES:
            raise _Bad(f"{key}[{i}].role must be one of {', '.join(_CHAT_ROLES)}, got {json.dumps(role)[:40]}")
        if not isinstance(content, str):
            raise _Bad(f"{key}[{i}].content must be a string, got {_json_type(content)}")
        out.append({"role": role, "content": content})
    return out


def _prompt_messages(conv: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    if conv[-1]["role"] == "assistant":
        raise _Bad(f"field {key!r} ends with an assistant message: a prompt is what the assistant answers")
    if not any(m["content"].strip() for m in conv):
        raise _Bad(f"field {key!r} is empty")
    return conv


def _prompt_or_messages(obj: dict, key: str = "prompt") -> str | list[dict[str, str]]:
    """A prompt: a string, or a conversation (TRL's conversational format) that does not end with the assistant."""
    if isinstance(obj.get(key), list):
        return _prompt_messages(_messages(obj[key], key), key)
    return _prompt(obj, key)


def _reply_text(obj: dict, key: str) -> str:
    """A completion: a string, or (conversational) a one-message array with the assistant's reply."""
    v = obj.get(key)
    if not isinstance(v, list):
        return _text(obj, key)
    conv = _messages(v, key)
    if len(conv) != 1 or conv[0]["role"] != "assistant":
        raise _Bad(f"field {key!r} must hold one assistant message (the reply), got {len(conv)} message(s)")
    return conv[0]["content"]


def _split_conversation(conv: list[dict[str, str]], key: str) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, the final assistant reply) of a whole conversation."""
    if conv[-1]["role"] != "assistant":
        raise _Bad(f"field {key!r} must end with an assistant message (the reply)")
    if len(conv) < 2:
        raise _Bad(f"field {key!r} has no prompt before its assistant reply")
    return _prompt_messages(conv[:-1], key), conv[-1]["content"]
