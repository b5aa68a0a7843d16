"""The Labeler protocol and the simulated labeler (no torch, no grpc, no numpy).

A gold scorer `gold(prompt, completion) -> float` plus Plackett-Luce noise with
a temperature T: the labeler picks the best completion with probability
proportional to exp(score / T) among all K, then the next best among those
left, and so on. It is sampled with the Gumbel-max trick (sort by
score / T + Gumbel noise, equivalently by score + T * Gumbel). Plackett-Luce is
the K-way generalisation of Bradley-Terry: the marginal probability that
completion i is ranked above j is exactly sigmoid((s_i - s_j) / T), whatever
the other completions. Hence, for a pair with gold gap d, two independent
simulated labelers order it the same way with probability

    p^2 + (1 - p)^2 = 1/2 + tanh^2(d / 2T) / 2,    p = sigmoid(d / T)

(`pair_agreement`), and the expected pairwise agreement over a set of items is
the mean of that over all their C(K, 2) pairs (`expected_agreement`).

T = 0 sorts by gold score (ties in random order); T = inf is a uniformly random
permutation. The noise is a deterministic function of (seed, prompt,
completions) through SHA-256 (not Python's salted `hash`), so a labeler gives
the same ranking for the same inputs whatever the order of calls, in any
process: a resumed run re-labels identically. The noise does not depend on T,
so one labeler at two temperatures uses the same draws (common random numbers).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

GoldScorer = Callable[[str, str], float]
"""(prompt, completion) -> score; higher is better."""

_HASH_DOMAIN = b"alignd.labelers.SimulatedLabeler.v1"


@runtime_checkable
class Labeler(Protocol):
    """Ranks the completions of a prompt: returns completion indices, best first (a permutation of range(K))."""

    name: str

    def rank(self, prompt: str, completions: list[str]) -> list[int]: ...


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if math.isnan(t) or t < 0:
        raise ValueError(f"temperature must be >= 0 (0: sort by gold score, inf: random order), not {temperature!r}")
    return t


def _score(gold: GoldScorer, prompt: str, completion: str) -> float:
    s = float(gold(prompt, completion))
    if not math.isfinite(s):
        raise ValueError(f"gold scorer returned {s} for a completion of prompt {prompt[:40]!r}: scores must be finite")
    return s


def _digest(seed: int, prompt: str, completions: Sequence[str]) -> bytes:
    h = hashlib.sha256(_HASH_DOMAIN)

    def put(text: str) -> None:
        b = text.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)

    put(str(int(seed)))
    put(prompt)
    h.update(len(completions).to_bytes(8, "big"))
    for c in completions:
        put(c)
    return h.digest()


def _gumbels(seed: int, prompt: str, completions: Sequence[str]) -> list[float]:
    """Standard Gumbel noise, one per completion, determined by (seed, prompt, completions)."""
    rng = random.Random(int.from_bytes(_digest(seed, prompt, completions), "big"))
    out = []
    for _ in completions:
        u = rng.random()
        while u == 0.0:  # random() is in [0, 1); log(0) is undefined
            u = rng.random()
        out.append(-math.log(-math.log(u)))
    return out


def _keys(scores: Sequence[float], noise: Sequence[float], temperature: float) -> list[tuple[float, ...]]:
    """Sort keys (descending = best first): score + T * Gumbel, ties broken by the noise, then by index."""
    if math.isinf(temperature):
        return [(g,) for g in noise]
    return [(s + temperature * g, g) for s, g in zip(scores, noise)]


def _order(keys: Sequence[tuple[float, ...]]) -> list[int]:
    return sorted(range(len(keys)), key=keys.__getitem__, reverse=True)  # stable: equal keys keep index order


def _derive_seed(seed: int, repeat: int) -> int:
    """Seed of the `repeat`-th independent copy of a labeler seeded `seed` (repeat 0 is the labeler itself)."""
    if repeat == 0:
        return int(seed)
    d = hashlib.sha256(b"alignd.labelers.repeat\x00" + f"{int(seed)}\x00{repeat}".encode()).digest()
    return int.from_bytes(d[:8], "big")


class SimulatedLabeler:
    """A gold scorer plus Plackett-Luce (K-way Bradley-Terry) noise at `temperature`.

    rank() picks the best completion with probability proportional to
    exp(gold / temperature), then the next among those left, and so on.
    Deterministic in (seed, prompt, completions); see the module docs.
    """

    def __init__(self, gold: GoldScorer, temperature: float, seed: int = 0, *, name: str | None = None):
        if not callable(gold):
            raise TypeError("gold must be a callable (prompt, completion) -> float")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, not {type(seed).__name__}")
        self.gold = gold
        self.temperature = _check_temperature(temperature)
        self.seed = seed
        self.name = name if name is not None else f"simulated(seed={seed}, temperature={self.temperature:.4g})"

    def __repr__(self) -> str:
        return f"SimulatedLabeler(name={self.name!r}, temperature={self.temperature!r}, seed={self.seed!r})"

    def scores(self, prompt: str, completions: Sequence[str]) -> list[float]:
        return [_score(self.gold, prompt, c) for c in completions]

    def noise(self, prompt: str, completions: Sequence[str]) -> list[float]:
        """The Gumbel draws behind this labeler's ranking of these inputs (independent of the temperature)."""
        return _gumbels(self.seed, prompt, completions)

    def rank(self, prompt: str, completions: list[str]) -> list[int]:
        if isinstance(completions, str):
            raise TypeError("completions must be a list of strings, not a string")
        completions = list(completions)
        keys = _keys(self.scores(prompt, completions), self.noise(prompt, completions), self.temperature)
        return _order(keys)
