"""Labelers: who ranks the K completions of a prompt (no torch, no grpc, no numpy).

A labeler turns (prompt, completions) into a ranking, a best-first permutation
of completion indices (the `ranking` of `alignd.data.Comparison`). Two kinds
sit behind the `Labeler` protocol: the simulated labeler here, and external
labels ingested through the coordinator's API (provided by the coordinator).

Simulated labeler
-----------------
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

Calibration
-----------
InstructGPT's labelers agreed with each other on about 73% of pairwise
comparisons. `calibrate_temperature(gold, items)` finds the temperature at
which two independent simulated labelers agree `target` of the time on
`items` (the policy's samples that will be labeled):

  * method="analytic" (default): bisection on log T over the exact expected
    agreement above. It is a continuous function, strictly decreasing from
    its T -> 0 value (1 for pairs with distinct scores, 1/2 for tied pairs)
    to 1/2, so the solution is unique and free of sampling noise.
  * method="empirical": bisection on log T over the measured agreement of
    simulated labelers (seeds derived from `seeds`), with the same noise at
    every T (common random numbers, so the measured curve is a fixed step
    function and the bisection is well defined), with enough repeats that its
    standard error is at most tol / 3.

Either way the agreement of the two seeded labelers is then measured (repeating
the items with derived seeds until the standard error is at most tol / 3) and
reported with the temperature. A target at or above the T -> 0 agreement
(e.g. all completions score the same, or too many ties) or at or below 1/2 is
unreachable and raises ValueError.
"""

from __future__ import annotations

import hashlib
import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "Calibration",
    "GoldScorer",
    "Labeler",
    "SimulatedLabeler",
    "agreement",
    "calibrate_temperature",
    "expected_agreement",
    "pair_agreement",
]

GoldScorer = Callable[[str, str], float]
"""(prompt, completion) -> score; higher is better."""

PAPER_AGREEMENT = 0.73  # InstructGPT (Ouyang et al. 2022): training labelers agreed 72.6 +- 1.5%

_HASH_DOMAIN = b"alignd.labelers.SimulatedLabeler.v1"


@runtime_checkable
class Labeler(Protocol):
    """Ranks the completions of a prompt: returns completion indices, best first (a permutation of range(K))."""

    name: str

    def rank(self, prompt: str, completions: list[str]) -> list[int]: ...


# --- the simulated labeler ----------------------------------------------------


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

    def __init__(self, gold: GoldScorer, temperature: float, seed: int = 0, name: str | None = None):
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


# --- agreement ------------------------------------------------------------------


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


# --- calibration ----------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Result of `calibrate_temperature`; unpacks as (temperature, agreement).

    agreement: measured pairwise agreement of two simulated labelers at
    `temperature` (seeds `seeds`, plus `repeats - 1` copies with derived seeds
    when the items alone were too few), with its standard error `stderr`.
    expected: the exact expected agreement at `temperature`.
    """

    temperature: float
    agreement: float
    stderr: float
    expected: float
    target: float
    method: str
    pairs: int  # pairs per repeat (all C(K, 2) pairs of the items)
    repeats: int
    tied_pairs: int  # pairs whose completions have the same gold score (1/2 agreement at any temperature)

    def __iter__(self) -> Iterator[float]:
        return iter((self.temperature, self.agreement))

    def __str__(self) -> str:
        return (
            f"temperature {self.temperature:.4g}: two simulated labelers agree on {100 * self.agreement:.1f}% "
            f"(+- {100 * self.stderr:.1f}%) of {self.pairs} pairs x {self.repeats} repeat(s); expected "
            f"{100 * self.expected:.1f}%, target {100 * self.target:.1f}% ({self.method})"
        )


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


class _Measure:
    """Pairwise agreement of two seeded simulated labelers on fixed items at any temperature.

    Unit (item, repeat r) uses the labelers' seeds derived with `_derive_seed(seed, r)`;
    the noise of each unit is drawn once and reused at every temperature.
    """

    def __init__(self, items: list[tuple[str, list[str]]], scores: list[list[float]], seeds: tuple[int, int]):
        self.items, self.scores, self.seeds = items, scores, seeds
        self.units: list[tuple[list[float], list[float], list[float]]] = []  # (scores, noise a, noise b)
        self.repeats = 0

    def ensure(self, repeats: int) -> None:
        while self.repeats < repeats:
            r = self.repeats
            sa, sb = (_derive_seed(s, r) for s in self.seeds)
            for (prompt, comps), sc in zip(self.items, self.scores):
                self.units.append((sc, _gumbels(sa, prompt, comps), _gumbels(sb, prompt, comps)))
            self.repeats += 1

    def at(self, temperature: float, repeats: int) -> tuple[float, float]:
        """(agreement, standard error) over the first `repeats` repeats."""
        self.ensure(repeats)
        n_units = repeats * len(self.items)
        agreed, sizes = [], []
        for sc, ga, gb in self.units[:n_units]:
            k = len(sc)
            pa = _positions(_order(_keys(sc, ga, temperature)), k, "a")
            pb = _positions(_order(_keys(sc, gb, temperature)), k, "b")
            agreed.append(_count_agreed(pa, pb))
            sizes.append(k * (k - 1) // 2)
        total = sum(sizes)
        a = sum(agreed) / total
        if n_units < 2:
            return a, math.inf
        # ratio estimator over independent units (pairs within one ranking are correlated)
        mean_size = total / n_units
        var = math.fsum((x - a * m) ** 2 for x, m in zip(agreed, sizes)) / (n_units * (n_units - 1))
        return a, math.sqrt(var) / mean_size


def _bisect_log(f: Callable[[float], float], target: float, t0: float, rel: float, max_steps: int = 200) -> float:
    """A temperature where decreasing f crosses target: bracket by factors of 4 from t0, then bisect on log T."""
    lo = hi = t0
    steps = 0
    while f(lo) <= target:
        lo /= 4.0
        steps += 1
        if steps > max_steps or lo == 0.0:
            raise ValueError(
                f"cannot bracket the target agreement {target}: still not above it at temperature {lo:.3g}"
            )
    steps = 0
    while f(hi) >= target:
        hi *= 4.0
        steps += 1
        if steps > max_steps or math.isinf(hi):
            raise ValueError(
                f"cannot bracket the target agreement {target}: still not below it at temperature {hi:.3g}"
            )
    while hi / lo > 1.0 + rel:
        mid = math.sqrt(lo * hi)
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def calibrate_temperature(
    gold: GoldScorer,
    items: Iterable[Item],
    target: float = PAPER_AGREEMENT,
    seeds: tuple[int, int] = (1, 2),
    tol: float = 0.01,
    *,
    method: Literal["analytic", "empirical"] = "analytic",
    max_pairs: int = 2_000_000,
) -> Calibration:
    """The temperature at which two independent simulated labelers agree on `target` of the pairs of `items`.

    `items`: the samples to be labeled, (prompt, completions) pairs or
    Comparison-like objects. Returns a `Calibration`, which unpacks as
    (temperature, measured agreement). The measurement uses labelers seeded
    `seeds` on the items, repeated with derived seeds until its standard error
    is at most tol / 3 (or `max_pairs` pairs have been compared; then a
    warning). See the module docs for the two methods.

    Raises ValueError when the target is unreachable: not above 1/2 (the
    agreement at infinite temperature), or not below the agreement at
    temperature 0 (1/2 on tied pairs, 1 on the others), e.g. when all
    completions score the same or too many tie.
    """
    if not 0.0 < tol < 0.5:
        raise ValueError(f"tol must be in (0, 0.5), not {tol}")
    if method not in ("analytic", "empirical"):
        raise ValueError(f"method must be 'analytic' or 'empirical', not {method!r}")
    seeds = (int(seeds[0]), int(seeds[1]))
    if seeds[0] == seeds[1]:
        raise ValueError(f"the two labelers need different seeds, got {seeds}")
    kept, scores = _score_items(gold, items)
    gaps = _gaps(scores)
    if not gaps:
        raise ValueError("no pairs to compare: every item has fewer than 2 completions")
    n_pairs = len(gaps)
    tied = sum(1 for d in gaps if d == 0.0)
    at_zero = (n_pairs - tied + 0.5 * tied) / n_pairs  # the agreement at T -> 0, the most that is reachable
    if not 0.5 < target < 1.0:
        raise ValueError(
            f"target agreement must be in (0.5, 1): two labelers agree on 1/2 of the pairs by chance; got {target}"
        )
    if target >= at_zero:
        raise ValueError(
            f"target agreement {target:.3f} is unreachable on these items: even at temperature 0 (ranking by gold "
            f"score) two simulated labelers agree on only {at_zero:.3f} of the {n_pairs} pairs, because {tied} "
            f"pair(s) have equal gold scores (a coin flip at any temperature); the gold scorer does not separate "
            f"the completions enough"
        )

    nonzero = sorted(d for d in gaps if d > 0.0)
    t0 = nonzero[len(nonzero) // 2]  # the median gap: agreement ~ 0.5 + 0.5 tanh(1/2)^2 ~ 0.61 there
    measure = _Measure(kept, scores, seeds)
    max_repeats = max(1, max_pairs // n_pairs)
    se_goal = tol / 3.0

    def repeats_for(temperature: float, repeats: int) -> int:
        """Repeats so the standard error at `temperature` is at most se_goal (capped by max_pairs)."""
        while True:
            _, se = measure.at(temperature, repeats)
            if se <= se_goal or repeats >= max_repeats:
                return repeats
            need = repeats * (se / se_goal) ** 2 if math.isfinite(se) else 2 * repeats + 1
            repeats = min(max_repeats, max(repeats + 1, math.ceil(need * 1.1)))

    expected_at = lambda t: _mean_pair_agreement(gaps, t)  # noqa: E731
    if method == "analytic":
        temperature = _bisect_log(expected_at, target, t0, rel=1e-9)
        repeats = repeats_for(temperature, 1)
    else:
        # analytic start for the repeat count, then re-check it at the empirical solution
        repeats = repeats_for(_bisect_log(expected_at, target, t0, rel=1e-6), 1)
        while True:
            temperature = _bisect_log(lambda t: measure.at(t, repeats)[0], target, t0, rel=1e-6)
            more = repeats_for(temperature, repeats)
            if more == repeats:
                break
            repeats = more
    measured, se = measure.at(temperature, repeats)
    if se > se_goal:
        warnings.warn(
            f"labeler calibration: the measured agreement has a standard error of {se:.4f} > tol/3 = {se_goal:.4f} "
            f"after {repeats} repeats of {n_pairs} pairs (max_pairs={max_pairs}); label more items for a tighter check",
            stacklevel=2,
        )
    return Calibration(
        temperature=temperature,
        agreement=measured,
        stderr=se,
        expected=expected_at(temperature),
        target=target,
        method=method,
        pairs=n_pairs,
        repeats=repeats,
        tied_pairs=tied,
    )
