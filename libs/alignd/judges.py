"""Text judges: functions of (prompt, completion) -> score, used as the gold
scorer of simulated labelers and as evaluation judges (`pipeline.gold`,
`pipeline.second_judge`). Pure Python; the coordinator runs them.

Real-model presets use lexicon sentiment judges (VADER, AFINN) from their
registry packages; the tiny preset uses character statistics, which a tiny
model can learn.
"""

from __future__ import annotations

import importlib
from typing import Callable

Judge = Callable[..., float]


def char_fraction(prompt: str, completion: str, *, chars: str) -> float:
    """Fraction of the completion's characters that are in `chars` (0 for an empty completion)."""
    if not completion:
        return 0.0
    wanted = set(chars)
    return sum(1 for c in completion if c in wanted) / len(completion)


def distinct_char_fraction(prompt: str, completion: str, *, chars: str) -> float:
    """Share of the characters of `chars` that occur in the completion (an independent second judge)."""
    if not chars:
        raise ValueError("chars must not be empty")
    return len(set(chars) & set(completion)) / len(set(chars))


BUILTIN: dict[str, Judge] = {"char_fraction": char_fraction, "distinct_char_fraction": distinct_char_fraction}


def resolve(name: str, args: dict | None = None) -> Callable[[str, str], float]:
    """The judge `name` with its keyword arguments bound."""
    if name in BUILTIN:
        fn = BUILTIN[name]
    elif ":" in name:
        module, attr = name.split(":", 1)
        fn = getattr(importlib.import_module(module), attr, None)
        if not callable(fn):
            raise ValueError(f"{name!r} is not a callable")
    else:
        raise ValueError(f"unknown judge {name!r}: use one of {sorted(BUILTIN)} or 'package.module:function'")
    kwargs = dict(args or {})
    return lambda prompt, completion: float(fn(prompt, completion, **kwargs))
