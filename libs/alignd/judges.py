"""Text judges: functions of (prompt, completion) -> score, used as the gold
scorer of simulated labelers and as evaluation judges (`pipeline.gold`,
`pipeline.second_judge`). Pure Python; the coordinator runs them.

Real-model presets use lexicon sentiment judges (VADER, AFINN) from their
registry packages; the tiny preset uses character statistics, which a tiny
model can learn.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from alignd.chat import prompt_text

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


def vader(prompt: str, completion: str) -> float:
    """VADER's compound sentiment of the completion, in [-1, 1] (PyPI vaderSentiment; the real-model preset's gold)."""
    from alignd.assets import vader_score

    return vader_score(completion)


def textblob(prompt: str, completion: str) -> float:
    """TextBlob's polarity of the completion, in [-1, 1] (another lexicon; the real-model preset's second judge)."""
    from alignd.assets import textblob_score

    return textblob_score(completion)


def afinn(prompt: str, completion: str) -> float:
    """The AFINN-165 word-list score of the completion, squashed into (-1, 1)."""
    from alignd.assets import afinn_score

    return afinn_score(completion)


BUILTIN: dict[str, Judge] = {
    "char_fraction": char_fraction,
    "distinct_char_fraction": distinct_char_fraction,
    "vader": vader,
    "textblob": textblob,
    "afinn": afinn,
}


def resolve(
    name: str, args: dict | None = None, registry: dict | None = None, *, field: str = "judge"
) -> Callable[[str, str], float]:
    """The judge `name` with its keyword arguments bound: a built-in one, or one of `registry` (the coordinator's
    `judges`: {name: JudgePluginConfig}), the only place a "module:function" is imported from. ValueError naming
    `field` otherwise: a run request names judges, never code."""
    registry = registry or {}
    kwargs = dict(args or {})
    if name in BUILTIN:
        fn = BUILTIN[name]
    elif name in registry:
        plugin = registry[name]
        module, attr = plugin.function.split(":", 1)
        fn = getattr(importlib.import_module(module), attr, None)
        if not callable(fn):
            raise ValueError(f"{field}: {name!r} is registered as {plugin.function}, which is not a callable")
        kwargs = {**plugin.args, **kwargs}
    else:
        known = sorted(BUILTIN) + sorted(registry)
        raise ValueError(
            f"{field}: unknown judge {name[:80]!r}: use one of {known}; judges of your own are "
            "registered in the coordinator's configuration (coordinator.judges)"
        )
    # A judge reads text: a conversation's prompt reaches it as its last user message (alignd.conversations).
    return lambda prompt, completion: float(fn(prompt_text(prompt), completion, **kwargs))
