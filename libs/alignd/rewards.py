"""Programmatic rewards the reward role can serve instead of a model's head.

Configure with `reward.function: {name: token_fraction, args: {token_ids: [..]}}`
(or `name: package.module:function` for your own). A reward function takes
(prompt token ids, response token ids, tokenizer, **args) and returns a float.
Used for rule-based rewards, gold judges and tests; the RPC contract and
batching are the same as for a reward model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

RewardFn = Callable[..., float]


def token_fraction(prompt: Sequence[int], response: Sequence[int], tokenizer, *, token_ids: Sequence[int]) -> float:
    """Fraction of response tokens that are in `token_ids` (a reward that favours some tokens)."""
    targets = set(token_ids)
    return sum(1 for t in response if t in targets) / max(1, len(response))


def response_length(prompt: Sequence[int], response: Sequence[int], tokenizer, *, target: int) -> float:
    """-|len(response) - target| / target: prefers responses of `target` tokens."""
    return -abs(len(response) - target) / max(1, target)


BUILTIN: dict[str, RewardFn] = {"token_fraction": token_fraction, "response_length": response_length}


def resolve(name: str) -> RewardFn:
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"unknown reward function {name!r}: use one of {sorted(BUILTIN)} or 'package.module:function'")
    module, attr = name.split(":", 1)
    fn = getattr(importlib.import_module(module), attr, None)
    if not callable(fn):
        raise ValueError(f"{name!r} is not a callable")
    return fn
