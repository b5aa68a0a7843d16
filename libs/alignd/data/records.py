"""What a data file yields: the records (Demonstration, Comparison), the load report, and DataError
(`path:line: problem`), with the limits they share.

The file formats and the validation rules are in the package docstring (`alignd.data`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import combinations

DEFAULT_MAX_K = 9  # InstructGPT: labelers ranked K = 4..9 completions per prompt
MAX_REPORTED = 1000  # problem / warning messages kept in a report; the counts are exact

_FORMAT_NAMES = {
    "rankings": "rankings",
    "pairwise": "pairwise",
    "hh": "HH-RLHF transcript",
    "conversation": "conversational preference",
}

# A prompt: text, or a conversation in the Hugging Face chat format ([{"role", "content"}, ...], not ending with
# the assistant), which each role renders with its model's chat template (alignd.chat).
Prompt = str | list[dict[str, str]]


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
    prompt: Prompt
    completion: str


@dataclass
class Comparison:
    """A prompt with K >= 2 completions; `ranking` holds completion indices, best first."""

    prompt: Prompt
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
