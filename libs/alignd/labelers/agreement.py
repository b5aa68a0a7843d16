"""Agreement between labelers: measured on items (`agreement`), and exact for two simulated labelers
(`pair_agreement`, `expected_agreement`; the formula is in `alignd.labelers.simulated`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import combinations
from typing import Any

from alignd.labelers.simulated import GoldScorer, Labeler, _check_temperature, _score

Item = Any  # (prompt, completions) or anything with .prompt and .completions (e.g. alignd.data.Comparison)


def _unpack(item: Item) -> tuple[str, list[str]]:
    if hasattr(item, "prompt") and hasattr(item, "completions"):
        return item.prompt, list(item.completions)
    prompt, completions = item
    if isinstance(completions, str):
        raise TypeError("an item's completions must be a list of strings, not a string")
    return prompt, list(completions)


def _positions(ranking: Sequence[int], k: int, who: str) -> list[int]:
    if sorted(ranking) != list(range(k)):
        raise ValueError(f"{who} returned {list(ranking)}, not a permutation of range({k})")
    pos = [0] * k
    for p, i in enumerate(ranking):
        pos[i] = p
    return pos


def _count_agreed(pos_a: Sequence[int], pos_b: Sequence[int]) -> int:
    return sum((pos_a[i] < pos_a[j]) == (pos_b[i] < pos_b[j]) for i, j in combinations(range(len(pos_a)), 2))


def agreement(labeler_a: Labeler, labeler_b: Labeler, items: Iterable[Item]) -> float:
    """Fraction of all pairs (C(K, 2) per item, pooled over items) that both labelers order the same way.

    Items are (prompt, completions) pairs or objects with `.prompt` and
    `.completions` (such as `alignd.data.Comparison`); items with K < 2 have no
    pairs. This is how labeler agreement is measured in InstructGPT (~73%).
    """
    agreed = total = 0
    for item in items:
        prompt, completions = _unpack(item)
        k = len(completions)
        if k < 2:
            continue
        pos_a = _positions(labeler_a.rank(prompt, completions), k, getattr(labeler_a, "name", "labeler_a"))
        pos_b = _positions(labeler_b.rank(prompt, completions), k, getattr(labeler_b, "name", "labeler_b"))
        agreed += _count_agreed(pos_a, pos_b)
        total += k * (k - 1) // 2
    if total == 0:
        raise ValueError("no pairs to compare: every item has fewer than 2 completions")
    return agreed / total


def pair_agreement(gap: float, temperature: float) -> float:
    """Probability that two independent Bradley-Terry labelers order a pair with score gap `gap` the same way.

    p^2 + (1 - p)^2 with p = sigmoid(gap / T), computed as 1/2 + tanh^2(gap / 2T) / 2
    (no overflow). T = 0: 1 for a nonzero gap, 1/2 for a tie; T = inf: 1/2.
    """
    t = _check_temperature(temperature)
    d = abs(float(gap))
    if math.isnan(d):
        raise ValueError("gap must be a number")
    if d == 0.0 or math.isinf(t):
        return 0.5
    if t == 0.0:
        return 1.0
    x = d / (2.0 * t)
    return 0.5 + 0.5 * math.tanh(x) ** 2


def _gaps(score_lists: Iterable[Sequence[float]]) -> list[float]:
    return [abs(s[i] - s[j]) for s in score_lists for i, j in combinations(range(len(s)), 2)]


def _mean_pair_agreement(gaps: Sequence[float], temperature: float) -> float:
    return math.fsum(pair_agreement(d, temperature) for d in gaps) / len(gaps)


def expected_agreement(gold: GoldScorer, items: Iterable[Item], temperature: float) -> float:
    """Expected pairwise agreement of two independent simulated labelers at `temperature` on `items` (exact)."""
    gaps = _gaps(_score_items(gold, items)[1])
    if not gaps:
        raise ValueError("no pairs to compare: every item has fewer than 2 completions")
    return _mean_pair_agreement(gaps, temperature)


def _score_items(gold: GoldScorer, items: Iterable[Item]) -> tuple[list[tuple[str, list[str]]], list[list[float]]]:
    """(items with K >= 2, their gold scores); each distinct (prompt, completion) is scored once."""
    cache: dict[tuple[str, str], float] = {}
    kept, scores = [], []
    for item in items:
        prompt, completions = _unpack(item)
        if len(completions) < 2:
            continue
        row = []
        for c in completions:
            key = (prompt, c)
            if key not in cache:
                cache[key] = _score(gold, prompt, c)
            row.append(cache[key])
        kept.append((prompt, completions))
        scores.append(row)
    return kept, scores
