"""Calibration of the simulated labeler's temperature to a target agreement (no torch, no grpc, no numpy).

InstructGPT's labelers agreed with each other on about 73% of pairwise
comparisons. `calibrate_temperature(gold, items)` finds the temperature at
which two independent simulated labelers agree `target` of the time on
`items` (the policy's samples that will be labeled):

  * method="analytic" (default): bisection on log T over the exact expected
    agreement (`expected_agreement`). It is a continuous function, strictly decreasing from
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

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from alignd.labelers.agreement import Item, _count_agreed, _gaps, _mean_pair_agreement, _positions, _score_items
from alignd.labelers.simulated import GoldScorer, _derive_seed, _gumbels, _keys, _order

PAPER_AGREEMENT = 0.73  # InstructGPT (Ouyang et al. 2022): training labelers agreed 72.6 +- 1.5%


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


def _bisect_log(f: Callable[[float], float], target: float, t0: float, *, rel: float, max_steps: int = 200) -> float:
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


def _check_calibration_args(tol: float, method: str, seeds: tuple[int, int]) -> tuple[int, int]:
    """Checks `calibrate_temperature`'s tolerance, method and seeds; returns the seeds as ints."""
    if not 0.0 < tol < 0.5:
        raise ValueError(f"tol must be in (0, 0.5), not {tol}")
    if method not in ("analytic", "empirical"):
        raise ValueError(f"method must be 'analytic' or 'empirical', not {method!r}")
    seeds = (int(seeds[0]), int(seeds[1]))
    if seeds[0] == seeds[1]:
        raise ValueError(f"the two labelers need different seeds, got {seeds}")
    return seeds


def _check_reachable(gaps: Sequence[float], target: float) -> int:
    """Raises ValueError unless two simulated labelers agree on `target` of the pairs with these gold-score gaps at
    some temperature: no pairs, a target outside (1/2, 1), or one at or above the agreement at T = 0. Returns the
    number of tied pairs (gap 0)."""
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
    return tied


def _repeats_for(measure: _Measure, temperature: float, repeats: int, *, se_goal: float, max_repeats: int) -> int:
    """Repeats (from `repeats` up) so the standard error of the agreement measured at `temperature` is at most
    se_goal, capped by max_repeats (what max_pairs allows)."""
    while True:
        _, se = measure.at(temperature, repeats)
        if se <= se_goal or repeats >= max_repeats:
            return repeats
        need = repeats * (se / se_goal) ** 2 if math.isfinite(se) else 2 * repeats + 1
        repeats = min(max_repeats, max(repeats + 1, math.ceil(need * 1.1)))


def calibrate_temperature(
    gold: GoldScorer,
    items: Iterable[Item],
    target: float = PAPER_AGREEMENT,
    *,
    seeds: tuple[int, int] = (1, 2),
    tol: float = 0.01,
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
    seeds = _check_calibration_args(tol, method, seeds)
    kept, scores = _score_items(gold, items)
    gaps = _gaps(scores)
    tied = _check_reachable(gaps, target)
    n_pairs = len(gaps)

    nonzero = sorted(d for d in gaps if d > 0.0)
    t0 = nonzero[len(nonzero) // 2]  # the median gap: agreement ~ 0.5 + 0.5 tanh(1/2)^2 ~ 0.61 there
    measure = _Measure(kept, scores, seeds)
    max_repeats = max(1, max_pairs // n_pairs)
    se_goal = tol / 3.0

    def repeats_for(temperature: float, repeats: int) -> int:
        return _repeats_for(measure, temperature, repeats, se_goal=se_goal, max_repeats=max_repeats)

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
