"""Evaluation statistics and the run report (standard library only: no torch, no grpc, no numpy).

The coordinator imports this module, so it stays light. It turns what the
evaluate stage measured into the headline numbers of a run and writes them as
`report.json` (`build_report_json`) and a readable `report.md`
(`render_markdown`).

Win rates
---------
`win_rate(scores_a, scores_b)` compares policy A (the final policy) with
policy B (the SFT policy) on the same held-out prompts, as judged by one judge
(the gold scorer, or a second independent judge). Element i of each list is the
judge's score of that policy's response to prompt i: a number, or a list of
numbers when several responses were sampled per prompt. The two lists must
have the same length (one entry per prompt, same order).

* Per prompt, every response of A is compared with every response of B (all
  k_a x k_b pairs; with one response each that is one comparison). A pair is a
  tie when |a - b| <= tie_tolerance, a win for A when a > b otherwise, else a
  loss. The prompt's outcome is the fraction of its pairs won plus half the
  fraction tied, a number in [0, 1]; all-pairs is the U-statistic estimate of
  P(A beats B) for that prompt, with less variance than pairing sample j with
  sample j.
* `wins`, `ties`, `losses` are the per-prompt fractions summed over prompts
  (whole numbers with one response each), so wins + ties + losses == n, the
  number of prompts.
* Ties count as half a win and n is unchanged: rate = (wins + ties / 2) / n,
  the mean prompt outcome.

The interval is over prompts (the unit that was sampled), at `confidence`:

* method="wilson" (default): the Wilson score interval with successes
  wins + ties / 2 out of n. It is closed-form and deterministic, keeps to
  [0, 1], behaves at small n and at rates near 0 or 1 (all wins out of 50 gives
  [0.929, 1], where the Wald interval collapses to [1, 1]) and has close to
  nominal coverage. A prompt outcome is a number in [0, 1] with mean p, whose
  variance is at most p (1 - p), the Bernoulli variance the interval assumes;
  half-counted ties and several samples per prompt only lower the variance,
  so there the interval is conservative (a bit wide), never too narrow.
* method="bootstrap": a percentile bootstrap over prompts: `n_bootstrap`
  resamples of the n prompt outcomes with replacement (a `random.Random(seed)`,
  so the same inputs give the same interval), the interval between the
  (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the resampled
  means. It uses the outcomes' actual spread, but is Monte-Carlo noisy and
  degenerate when all outcomes are equal (all wins gives [1, 1]), which is why
  it is not the default.

`win_rate_from_preferences` is the same for a judge that states a preference
per prompt (1: A better, 0: B better, 0.5: tie) instead of scoring each
response.

Other statistics
----------------
* `mean_with_ci(values)`: mean with a Student-t interval (sample standard
  deviation, n - 1 degrees of freedom). `t_quantile(p, df)` inverts the
  Student-t CDF (regularized incomplete beta function, bisection); closed forms
  for df = 1 and 2; a Cornish-Fisher expansion around the normal quantile for
  df > 1e4, where it is exact to double precision.
* `wilson_interval(successes, n)`: the interval above, for any proportion
  (e.g. RM accuracy on n held-out comparisons).
* `kl_summary(rows)`: rows of per-token KL(policy || reference) estimates,
  one row per response; mean per token (all tokens pooled) and per sequence
  (mean over responses of the row sums).
* `alignment_tax(loss_before, loss_after)`: the change of the LM loss on
  held-out plain text across PPO (after - before; positive is a tax) and the
  same relative to the loss before.

report.json schema (version 1)
------------------------------
`build_report_json` returns a dict of JSON types only (strings as keys, no
tuples, non-finite numbers written as null), so
`json.loads(json.dumps(report)) == report`. Every key below is always present;
a quantity that was not measured is null (or an empty list/dict)::

    schema_version: 1
    meta: {str: any JSON}                     # run id, models, seeds ... (free-form)
    win_rates: {judge: WinRate}               # policy vs SFT, one entry per judge
      WinRate = {wins, losses, ties, n, rate, lower, upper, method, confidence, comparisons}
    acceptance: {primary_judge, min_rate, min_lower, secondary_min_rate,
                 primary_ok: bool, secondary_ok: {judge: bool}, passed: bool}
    rm_accuracy_per_round: [{round, accuracy, n, lower, upper, breakdown}]   # n/lower/upper null when n unknown
      breakdown: alignd.rm_breakdown.breakdown of the held-out pairs | null (e.g. external labelers)
    labeler_agreement: {agreement, stderr, temperature, pairs} | null
    kl_to_reference: {per_token, per_sequence, sequences, tokens} | null
    reward: {sft: MeanCI | null, final: MeanCI | null}
      MeanCI = {mean, lower, upper, n, std, confidence}           # lower/upper/std null when n == 1
    alignment_tax: {without_ptx: Tax | null, with_ptx: Tax | null}
      Tax = {before, after, absolute, relative}                    # relative null when before == 0
    wall_seconds_per_stage: {stage: seconds}
    figures: {title: relative path}          # images next to the report

`acceptance` checks the win rates against the run's bar: the primary judge's
rate >= min_rate with its lower bound > min_lower, and every other judge's
rate >= secondary_min_rate; `passed` needs the primary judge and at least one
other judge.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "AlignmentTax",
    "KLSummary",
    "MeanCI",
    "WinRate",
    "acceptance",
    "alignment_tax",
    "build_report_json",
    "kl_summary",
    "mean_with_ci",
    "normal_quantile",
    "plots_markdown",
    "render_markdown",
    "t_cdf",
    "t_quantile",
    "wilson_interval",
    "win_rate",
    "win_rate_from_preferences",
]

SCHEMA_VERSION = 1

METHODS = ("wilson", "bootstrap")

# Paper figures (Ouyang et al. 2022) shown next to ours in the Markdown report.
PAPER_RM_ACCURACY = 0.724  # training labelers (69.6% held-out labelers)
PAPER_LABELER_AGREEMENT = 0.73

# Alt text of the run's PNG plots (alignd.plots writes them into plots/) in report.md,
# by file name; another file's alt text is its name without the suffix.
PLOT_TITLES = {
    "reward_kl.png": "reward and KL",
    "win_rates.png": "win rates",
    "rm_accuracy.png": "RM accuracy",
    "phase_seconds.png": "phase seconds",
}


# --- checks -----------------------------------------------------------------------


def _finite(x: Any, what: str) -> float:
    if isinstance(x, bool):
        raise TypeError(f"{what} must be a number, not a bool")
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, not {x!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, not {x!r}")
    return v


def _check_confidence(confidence: float) -> float:
    c = _finite(confidence, "confidence")
    if not 0.0 < c < 1.0:
        raise ValueError(f"confidence must be in (0, 1), not {confidence!r}")
    return c


# --- quantiles ----------------------------------------------------------------------


def normal_quantile(p: float) -> float:
    """The standard normal quantile (inverse CDF) at p in (0, 1)."""
    p = _finite(p, "p")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), not {p!r}")
    return statistics.NormalDist().inv_cdf(p)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes betacf)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 20001):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _reg_inc_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _check_df(df: float) -> float:
    d = _finite(df, "df")
    if d <= 0:
        raise ValueError(f"degrees of freedom must be > 0, not {df!r}")
    return d


def t_cdf(t: float, df: float) -> float:
    """The Student-t CDF with df degrees of freedom (df > 0, need not be whole)."""
    df = _check_df(df)
    t = float(t)
    if math.isnan(t):
        raise ValueError("t must not be NaN")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _reg_inc_beta(df / (df + t * t), 0.5 * df, 0.5)  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def _t_quantile_expansion(p: float, df: float) -> float:
    """Cornish-Fisher expansion of the t quantile in 1/df (Abramowitz & Stegun 26.7.5); error O(df^-5)."""
    z = normal_quantile(p)
    z2 = z * z
    g1 = z * (z2 + 1.0) / 4.0
    g2 = z * ((5.0 * z2 + 16.0) * z2 + 3.0) / 96.0
    g3 = z * (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) / 384.0
    g4 = z * ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) / 92160.0
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


_LARGE_DF = 1e4


def t_quantile(p: float, df: float) -> float:
    """The Student-t quantile (inverse CDF) at p in (0, 1) with df > 0 degrees of freedom.

    Exact closed forms for df = 1 and 2; the Cornish-Fisher expansion for
    df > 1e4; otherwise bisection on `t_cdf` (incomplete beta) to about
    1e-13 relative. E.g. t_quantile(0.975, 9) = 2.2622.
    """
    p = _finite(p, "p")
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), not {p!r}")
    df = _check_df(df)
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if df == 1.0:
        return math.tan(math.pi * (p - 0.5))
    if df == 2.0:
        return (2.0 * p - 1.0) / math.sqrt(2.0 * p * (1.0 - p))
    if df > _LARGE_DF:
        return _t_quantile_expansion(p, df)
    lo, hi = 0.0, max(1.0, 2.0 * normal_quantile(p))
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
        if hi > 1e300:  # p this close to 1 with tiny df: the quantile overflows
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


# --- proportions and win rates ------------------------------------------------------


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for the proportion successes / n (successes may be fractional)."""
    confidence = _check_confidence(confidence)
    if isinstance(n, bool) or int(n) != n or n <= 0:
        raise ValueError(f"n must be a whole number > 0, not {n!r}")
    n = int(n)
    s = _finite(successes, "successes")
    if not 0.0 <= s <= n:
        raise ValueError(f"successes must be in [0, n={n}], not {successes!r}")
    p = s / n
    z = normal_quantile(0.5 + confidence / 2.0)
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    lower = 0.0 if p == 0.0 else max(0.0, centre - half)
    upper = 1.0 if p == 1.0 else min(1.0, centre + half)
    return lower, upper


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default 'linear' method)."""
    pos = q * (len(sorted_values) - 1)
    i = math.floor(pos)
    j = min(i + 1, len(sorted_values) - 1)
    return sorted_values[i] + (pos - i) * (sorted_values[j] - sorted_values[i])


def _bootstrap_interval(
    outcomes: Sequence[float], confidence: float, n_bootstrap: int, seed: int
) -> tuple[float, float]:
    if isinstance(n_bootstrap, bool) or int(n_bootstrap) != n_bootstrap or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be a whole number >= 1, not {n_bootstrap!r}")
    rng = random.Random(seed)
    n = len(outcomes)
    means = sorted(math.fsum(rng.choices(outcomes, k=n)) / n for _ in range(int(n_bootstrap)))
    alpha = 1.0 - confidence
    return _percentile(means, alpha / 2.0), _percentile(means, 1.0 - alpha / 2.0)


@dataclass(frozen=True)
class WinRate:
    """Policy A against policy B by one judge (see the module docstring for the counting)."""

    wins: float  # prompts (fractions of a prompt with several samples) where A won
    losses: float
    ties: float
    n: int  # prompts
    rate: float  # (wins + ties / 2) / n
    lower: float  # the `confidence` interval of rate
    upper: float
    method: str  # "wilson" | "bootstrap"
    confidence: float = 0.95
    comparisons: int = 0  # response pairs compared (n with one response per prompt)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WinRate:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def __str__(self) -> str:
        return (
            f"{100 * self.rate:.1f}% [{100 * self.lower:.1f}%, {100 * self.upper:.1f}%] "
            f"({_count(self.wins)} W / {_count(self.ties)} T / {_count(self.losses)} L of {self.n}, "
            f"{round(100 * self.confidence)}% {self.method})"
        )


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}"


def _whole(x: float) -> float:
    """Counts as ints when whole (single-sample comparisons), so report.json reads 60, not 60.0."""
    r = round(x)
    return int(r) if abs(x - r) < 1e-9 else x


def _win_rate_from_triples(
    triples: Sequence[tuple[float, float, float]],
    comparisons: int,
    confidence: float,
    method: str,
    n_bootstrap: int,
    seed: int,
) -> WinRate:
    confidence = _check_confidence(confidence)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    n = len(triples)
    if n == 0:
        raise ValueError("no prompts to compare (n = 0): a win rate needs at least one prompt")
    wins = math.fsum(t[0] for t in triples)
    ties = math.fsum(t[1] for t in triples)
    losses = math.fsum(t[2] for t in triples)
    outcomes = [w + t / 2.0 for w, t, _ in triples]
    successes = min(float(n), max(0.0, wins + ties / 2.0))
    rate = successes / n
    if method == "wilson":
        lower, upper = wilson_interval(successes, n, confidence)
    else:
        lower, upper = _bootstrap_interval(outcomes, confidence, n_bootstrap, seed)
    return WinRate(
        wins=_whole(wins),
        losses=_whole(losses),
        ties=_whole(ties),
        n=n,
        rate=rate,
        lower=lower,
        upper=upper,
        method=method,
        confidence=confidence,
        comparisons=comparisons,
    )


def _samples(x: Any, what: str) -> list[float]:
    if isinstance(x, (str, bytes)):
        raise TypeError(f"{what} must be a number or a list of numbers, not {x!r}")
    if isinstance(x, Iterable):
        values = [_finite(v, f"{what}[{j}]") for j, v in enumerate(x)]
        if not values:
            raise ValueError(f"{what} is an empty list of samples")
        return values
    return [_finite(x, what)]


def win_rate(
    scores_a: Sequence[float | Sequence[float]],
    scores_b: Sequence[float | Sequence[float]],
    *,
    tie_tolerance: float = 0.0,
    confidence: float = 0.95,
    method: str = "wilson",
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> WinRate:
    """Win rate of A over B on the same prompts: scores_a[i], scores_b[i] are one judge's scores of
    each policy's response(s) to prompt i (a number, or a list with several samples per prompt).

    Ties (|a - b| <= tie_tolerance) count half, n stays the number of prompts; the interval is
    Wilson (default) or a seeded percentile bootstrap over prompts. Raises ValueError on no prompts,
    lists of different lengths or non-finite scores.
    """
    tol = _finite(tie_tolerance, "tie_tolerance")
    if tol < 0:
        raise ValueError(f"tie_tolerance must be >= 0, not {tie_tolerance!r}")
    scores_a, scores_b = list(scores_a), list(scores_b)
    if len(scores_a) != len(scores_b):
        raise ValueError(
            f"scores_a has {len(scores_a)} prompts but scores_b has {len(scores_b)}: one entry per prompt each"
        )
    triples: list[tuple[float, float, float]] = []
    comparisons = 0
    for i, (xa, xb) in enumerate(zip(scores_a, scores_b)):
        sa, sb = _samples(xa, f"scores_a[{i}]"), _samples(xb, f"scores_b[{i}]")
        w = t = 0
        for a in sa:
            for b in sb:
                if abs(a - b) <= tol:
                    t += 1
                elif a > b:
                    w += 1
        pairs = len(sa) * len(sb)
        comparisons += pairs
        triples.append((w / pairs, t / pairs, (pairs - w - t) / pairs))
    return _win_rate_from_triples(triples, comparisons, confidence, method, n_bootstrap, seed)


def win_rate_from_preferences(
    preferences: Sequence[float | Sequence[float]],
    *,
    confidence: float = 0.95,
    method: str = "wilson",
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> WinRate:
    """Win rate from a judge's per-prompt preferences: 1 (A better), 0 (B better), 0.5 (tie),
    or a list of such judgments per prompt. Counting and intervals as in `win_rate`."""
    triples: list[tuple[float, float, float]] = []
    comparisons = 0
    for i, x in enumerate(preferences):
        judgments = _samples(x, f"preferences[{i}]")
        for j, v in enumerate(judgments):
            if v not in (0.0, 0.5, 1.0):
                raise ValueError(f"preferences[{i}] judgment {j} must be 1 (A), 0 (B) or 0.5 (tie), not {v!r}")
        k = len(judgments)
        comparisons += k
        w, t = judgments.count(1.0), judgments.count(0.5)
        triples.append((w / k, t / k, (k - w - t) / k))
    return _win_rate_from_triples(triples, comparisons, confidence, method, n_bootstrap, seed)


# --- means, KL, alignment tax ---------------------------------------------------------


@dataclass(frozen=True)
class MeanCI:
    """A mean with its Student-t interval; lower, upper and std are None for a single value."""

    mean: float
    lower: float | None
    upper: float | None
    n: int
    std: float | None  # sample standard deviation (n - 1)
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_with_ci(values: Iterable[float], confidence: float = 0.95) -> MeanCI:
    """Mean of values with the t interval mean +- t((1 + confidence) / 2, n - 1) * s / sqrt(n)."""
    confidence = _check_confidence(confidence)
    xs = [_finite(v, f"values[{i}]") for i, v in enumerate(values)]
    n = len(xs)
    if n == 0:
        raise ValueError("mean_with_ci needs at least one value")
    mean = math.fsum(xs) / n
    if n == 1:
        return MeanCI(mean=mean, lower=None, upper=None, n=1, std=None, confidence=confidence)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return MeanCI(mean=mean, lower=mean - half, upper=mean + half, n=n, std=std, confidence=confidence)


@dataclass(frozen=True)
class KLSummary:
    """KL(policy || reference) over responses: per token (tokens pooled) and per sequence (row sums)."""

    per_token: float
    per_sequence: float
    sequences: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kl_summary(per_token_kl_rows: Iterable[Sequence[float]]) -> KLSummary:
    """Summarize per-token KL estimates, one row per response (response tokens only, no padding).

    per_token = sum of all values / number of tokens; per_sequence = mean over rows of the row sum
    (an empty row is a sequence with KL 0). Raises ValueError with no rows, no tokens or a
    non-finite value.
    """
    sums: list[float] = []
    tokens = 0
    for i, row in enumerate(per_token_kl_rows):
        values = [_finite(v, f"row {i} token {j}") for j, v in enumerate(row)]
        sums.append(math.fsum(values))
        tokens += len(values)
    if not sums:
        raise ValueError("kl_summary needs at least one row")
    if tokens == 0:
        raise ValueError("kl_summary: every row is empty (no tokens)")
    total = math.fsum(sums)
    return KLSummary(per_token=total / tokens, per_sequence=total / len(sums), sequences=len(sums), tokens=tokens)


@dataclass(frozen=True)
class AlignmentTax:
    """LM loss on held-out plain text before and after PPO; absolute = after - before (positive: a tax)."""

    before: float
    after: float
    absolute: float
    relative: float | None  # absolute / before; None when before == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def alignment_tax(loss_before: float, loss_after: float) -> AlignmentTax:
    """The alignment tax: after - before, and relative to before (e.g. 0.05 is a 5% higher loss)."""
    before = _finite(loss_before, "loss_before")
    after = _finite(loss_after, "loss_after")
    absolute = after - before
    return AlignmentTax(
        before=before, after=after, absolute=absolute, relative=absolute / before if before != 0 else None
    )


# --- report.json ------------------------------------------------------------------------


def _jsonable(x: Any, where: str) -> Any:
    """Plain JSON types: dicts with str keys, lists, str, int, float (finite, else None), bool, None."""
    if x is None or isinstance(x, (bool, str, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "to_dict"):
        return _jsonable(x.to_dict(), where)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, not {k!r}")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(x)]
    try:
        return _jsonable(float(x), where)  # numbers from elsewhere (Decimal, numpy scalars if any)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: {type(x).__name__} is not JSON-serializable") from None


def _as_dict(x: Any) -> dict[str, Any]:
    if hasattr(x, "to_dict"):
        return dict(x.to_dict())
    if isinstance(x, Mapping):
        return dict(x)
    raise TypeError(f"expected a dataclass from alignd.evaluation or a mapping, not {type(x).__name__}")


def _win_rate_entry(judge: str, wr: WinRate | Mapping[str, Any]) -> dict[str, Any]:
    d = _as_dict(wr)
    missing = [k for k in ("wins", "losses", "ties", "n", "rate", "lower", "upper", "method") if k not in d]
    if missing:
        raise ValueError(f"win_rates[{judge!r}] lacks {missing}")
    d.setdefault("confidence", 0.95)
    d.setdefault("comparisons", d["n"])
    return {k: d[k] for k in WinRate.__dataclass_fields__}


def _rm_round(i: int, entry: float | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(entry, Mapping):
        if "accuracy" not in entry:
            raise ValueError(f"rm_accuracy_per_round[{i}] lacks 'accuracy'")
        acc = _finite(entry["accuracy"], f"rm_accuracy_per_round[{i}].accuracy")
        n = entry.get("n")
        rnd = entry.get("round", i)
        breakdown = entry.get("breakdown")
    else:
        acc, n, rnd, breakdown = _finite(entry, f"rm_accuracy_per_round[{i}]"), None, i, None
    if not 0.0 <= acc <= 1.0:
        raise ValueError(f"rm_accuracy_per_round[{i}]: accuracy must be in [0, 1], not {acc!r}")
    lower = upper = None
    if n is not None:
        n = int(n)
        lower, upper = wilson_interval(acc * n, n)
    return {
        "round": rnd,
        "accuracy": acc,
        "n": n,
        "lower": lower,
        "upper": upper,
        "breakdown": dict(breakdown) if breakdown is not None else None,
    }


def _labeler_agreement(x: Any) -> dict[str, Any] | None:
    if x is None:
        return None
    keys = ("agreement", "stderr", "temperature", "pairs")
    if isinstance(x, Mapping):
        if "agreement" not in x:
            raise ValueError("labeler_agreement lacks 'agreement'")
        return {k: x.get(k) for k in keys}
    if hasattr(x, "agreement"):  # alignd.labelers.Calibration
        pairs = getattr(x, "pairs", None)
        repeats = getattr(x, "repeats", None)
        return {
            "agreement": x.agreement,
            "stderr": getattr(x, "stderr", None),
            "temperature": getattr(x, "temperature", None),
            "pairs": pairs * repeats if pairs is not None and repeats is not None else pairs,
        }
    return {"agreement": _finite(x, "labeler_agreement"), "stderr": None, "temperature": None, "pairs": None}


def _reward_entry(name: str, x: Any) -> dict[str, Any] | None:
    if x is None:
        return None
    if isinstance(x, (MeanCI, Mapping)):
        d = _as_dict(x)
        if "mean" not in d:
            raise ValueError(f"reward[{name!r}] lacks 'mean'")
        return {k: d.get(k) for k in MeanCI.__dataclass_fields__}
    if isinstance(x, (list, tuple)):
        return mean_with_ci(x).to_dict()
    return {
        "mean": _finite(x, f"reward[{name!r}]"),
        "lower": None,
        "upper": None,
        "n": None,
        "std": None,
        "confidence": None,
    }


def _tax_entry(name: str, x: Any) -> dict[str, Any] | None:
    if x is None:
        return None
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return alignment_tax(*x).to_dict()
    d = _as_dict(x)
    if "before" in d and "after" in d and "absolute" not in d:
        return alignment_tax(d["before"], d["after"]).to_dict()
    missing = [k for k in AlignmentTax.__dataclass_fields__ if k not in d]
    if missing:
        raise ValueError(f"alignment_tax[{name!r}] lacks {missing}")
    return {k: d[k] for k in AlignmentTax.__dataclass_fields__}


def _check_relative_path(title: str, path: Any) -> str:
    p = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(p, str) or not p:
        raise TypeError(f"figure {title!r}: the path must be a non-empty string")
    if os.path.isabs(p) or p.startswith(("/", "\\")) or "://" in p or p.split("/")[0].endswith(":"):
        raise ValueError(f"figure {title!r}: {p!r} must be a path relative to the report")
    return p.replace(os.sep, "/")


def acceptance(
    win_rates: Mapping[str, Mapping[str, Any]],
    *,
    primary_judge: str = "gold",
    min_rate: float = 0.6,
    min_lower: float = 0.5,
    secondary_min_rate: float = 0.5,
) -> dict[str, Any]:
    """The run's bar on the win rates (the `acceptance` block of report.json)."""
    primary = win_rates.get(primary_judge)
    primary_ok = bool(primary is not None and primary["rate"] >= min_rate and primary["lower"] > min_lower)
    secondary_ok = {j: bool(w["rate"] >= secondary_min_rate) for j, w in win_rates.items() if j != primary_judge}
    return {
        "primary_judge": primary_judge,
        "min_rate": min_rate,
        "min_lower": min_lower,
        "secondary_min_rate": secondary_min_rate,
        "primary_ok": primary_ok,
        "secondary_ok": secondary_ok,
        "passed": primary_ok and bool(secondary_ok) and all(secondary_ok.values()),
    }


REPORT_KEYS = (
    "schema_version",
    "meta",
    "win_rates",
    "acceptance",
    "rm_accuracy_per_round",
    "labeler_agreement",
    "kl_to_reference",
    "reward",
    "alignment_tax",
    "wall_seconds_per_stage",
    "figures",
)


def build_report_json(
    *,
    win_rates: Mapping[str, WinRate | Mapping[str, Any]],
    rm_accuracy_per_round: Sequence[float | Mapping[str, Any]] = (),
    labeler_agreement: Any = None,
    kl_to_reference: KLSummary | Mapping[str, Any] | None = None,
    reward: Mapping[str, Any] | None = None,
    alignment_tax: Mapping[str, Any] | None = None,
    wall_seconds_per_stage: Mapping[str, float] | None = None,
    figures: Mapping[str, str] | None = None,
    meta: Mapping[str, Any] | None = None,
    primary_judge: str = "gold",
    min_rate: float = 0.6,
    min_lower: float = 0.5,
    secondary_min_rate: float = 0.5,
) -> dict[str, Any]:
    """Assemble report.json (schema version 1; see the module docstring).

    win_rates: judge -> WinRate (or its dict), the final policy against the SFT policy.
    rm_accuracy_per_round: per RM round, the held-out accuracy as a number, or a dict
        {"accuracy", "n" (held-out comparisons: adds a Wilson interval), "round"}.
    labeler_agreement: a number, an `alignd.labelers.Calibration`, or a dict with "agreement".
    kl_to_reference: a KLSummary (or its dict).
    reward: {"sft": ..., "final": ...}, each a MeanCI, a list of rewards, a number or None.
    alignment_tax: {"without_ptx": ..., "with_ptx": ...}, each an AlignmentTax, a
        (loss_before, loss_after) pair, a dict with before/after, or None.
    wall_seconds_per_stage: stage -> seconds (sft, rm, ppo, evaluate, ...).
    figures: title -> image path relative to the report.
    meta: free-form JSON-able run description.
    """
    if not isinstance(win_rates, Mapping):
        raise TypeError("win_rates must be a mapping judge -> WinRate")
    wr = {str(j): _win_rate_entry(str(j), w) for j, w in win_rates.items()}
    rounds = [_rm_round(i, e) for i, e in enumerate(rm_accuracy_per_round)]
    kl = None
    if kl_to_reference is not None:
        d = _as_dict(kl_to_reference)
        kl = {k: d.get(k) for k in KLSummary.__dataclass_fields__}
    reward = dict(reward or {})
    unknown = set(reward) - {"sft", "final"}
    if unknown:
        raise ValueError(f"reward: unknown keys {sorted(unknown)} (expected 'sft', 'final')")
    taxes = dict(alignment_tax or {})
    unknown = set(taxes) - {"with_ptx", "without_ptx"}
    if unknown:
        raise ValueError(f"alignment_tax: unknown keys {sorted(unknown)} (expected 'without_ptx', 'with_ptx')")
    stages = {}
    for stage, secs in (wall_seconds_per_stage or {}).items():
        s = _finite(secs, f"wall_seconds_per_stage[{stage!r}]")
        if s < 0:
            raise ValueError(f"wall_seconds_per_stage[{stage!r}] must be >= 0, not {secs!r}")
        stages[str(stage)] = s
    report = {
        "schema_version": SCHEMA_VERSION,
        "meta": dict(meta or {}),
        "win_rates": wr,
        "acceptance": acceptance(
            wr,
            primary_judge=primary_judge,
            min_rate=min_rate,
            min_lower=min_lower,
            secondary_min_rate=secondary_min_rate,
        ),
        "rm_accuracy_per_round": rounds,
        "labeler_agreement": _labeler_agreement(labeler_agreement),
        "kl_to_reference": kl,
        "reward": {
            "sft": _reward_entry("sft", reward.get("sft")),
            "final": _reward_entry("final", reward.get("final")),
        },
        "alignment_tax": {
            "without_ptx": _tax_entry("without_ptx", taxes.get("without_ptx")),
            "with_ptx": _tax_entry("with_ptx", taxes.get("with_ptx")),
        },
        "wall_seconds_per_stage": stages,
        "figures": {str(t): _check_relative_path(str(t), p) for t, p in (figures or {}).items()},
    }
    out = _jsonable(report, "report")
    json.dumps(out, allow_nan=False)  # strict JSON, or fail here rather than in the reader
    return out


# --- report.md ---------------------------------------------------------------------------


def _pct(x: Any, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * float(x):.{digits}f}%"


def _num(x: Any, fmt: str = ".4g") -> str:
    return "n/a" if x is None else format(float(x), fmt)


def _signed(x: Any, fmt: str = ".4g") -> str:
    return "n/a" if x is None else format(float(x), "+" + fmt)


def _cell(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _fmt_win_rate(w: Mapping[str, Any]) -> str:
    conf = w.get("confidence") or 0.95
    ci = f"{round(100 * conf)}% CI {_pct(w['lower'])} to {_pct(w['upper'])}"
    return f"{_pct(w['rate'])} ({ci}, n={w['n']}, {w['method']})"


def _fmt_mean(m: Mapping[str, Any] | None) -> str:
    if not m:
        return "n/a"
    s = _num(m.get("mean"))
    if m.get("lower") is not None and m.get("upper") is not None:
        s += f" [{_num(m['lower'])}, {_num(m['upper'])}]"
    if m.get("n") is not None:
        s += f" (n={m['n']})"
    return s


def _fmt_tax(t: Mapping[str, Any] | None) -> str:
    if not t:
        return "n/a"
    s = f"{_signed(t['absolute'])} nats/token ({_num(t['before'])} -> {_num(t['after'])}"
    if t.get("relative") is not None:
        s += f", {_signed(100 * t['relative'], '.2f')}%"
    return s + ")"


def _fence(text: str) -> list[str]:
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]


def _clip(text: Any, limit: int) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[: max(0, limit - 3)].rstrip() + "..."


def _plot_lines(plots: Sequence[str | os.PathLike[str]], skip: Iterable[str] = ()) -> list[str]:
    skip = set(skip)
    lines: list[str] = []
    for p in plots:
        rel = _check_relative_path("plot", p)
        if rel in skip:
            continue
        skip.add(rel)
        name = rel.rsplit("/", 1)[-1]
        alt = PLOT_TITLES.get(name, name.rsplit(".", 1)[0].replace("_", " "))
        lines += [f"![{_cell(alt)}]({rel})", ""]
    return ["## Plots", ""] + lines if lines else []


def plots_markdown(plots: Sequence[str | os.PathLike[str]]) -> str:
    """The "## Plots" section of report.md embedding images by path relative to the report.

    Alt text from PLOT_TITLES by file name. Empty when `plots` is.
    """
    return "\n".join(_plot_lines(plots)).rstrip() + "\n" if plots else ""


def render_markdown(
    report: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]] | None = None,
    *,
    title: str = "alignd run report",
    max_samples: int = 5,
    max_chars: int = 800,
    plots: Sequence[str | os.PathLike[str]] | None = None,
) -> str:
    """A readable Markdown report from a `build_report_json` dict (text only; images by relative path).

    samples: dicts {"prompt", "sft", "final", "scores": {judge: {"sft": x, "final": y}},
    "image": optional relative path}: the SFT policy's and the final policy's responses to
    a held-out prompt with each judge's scores. The first `max_samples` are shown, each text
    cut to `max_chars` characters. Sections that the report does not have read "n/a".
    plots: image paths relative to the report (as `alignd.plots.render_plots` writes them,
    e.g. "plots/reward_kl.png"), shown in a "## Plots" section before the samples; a path
    already among the report's figures is not shown twice.
    """
    win_rates: Mapping[str, Any] = report.get("win_rates") or {}
    acc: Mapping[str, Any] = report.get("acceptance") or {}
    rounds: Sequence[Mapping[str, Any]] = report.get("rm_accuracy_per_round") or []
    agreement = report.get("labeler_agreement")
    kl = report.get("kl_to_reference")
    reward = report.get("reward") or {}
    taxes = report.get("alignment_tax") or {}
    stages: Mapping[str, float] = report.get("wall_seconds_per_stage") or {}
    figures: Mapping[str, str] = report.get("figures") or {}
    primary = acc.get("primary_judge", "gold")

    out: list[str] = [f"# {title}", ""]
    meta = report.get("meta") or {}
    if meta:
        out += [", ".join(f"{k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in meta.items()), ""]

    # headline
    rows: list[list[str]] = []
    for judge in sorted(win_rates, key=lambda j: (j != primary, j)):
        rows.append([f"Win rate vs SFT ({judge})", _fmt_win_rate(win_rates[judge])])
    if rounds:
        last = rounds[-1]
        rows.append(
            [
                f"RM accuracy (round {last['round']}, held-out)",
                f"{_pct(last['accuracy'])} (paper {_pct(PAPER_RM_ACCURACY)})",
            ]
        )
    if agreement:
        rows.append(
            [
                "Simulated-labeler agreement",
                f"{_pct(agreement['agreement'])} (paper ~{_pct(PAPER_LABELER_AGREEMENT, 0)})",
            ]
        )
    if kl:
        rows.append(
            ["KL to reference", f"{_num(kl['per_sequence'])} nats/sequence, {_num(kl['per_token'])} nats/token"]
        )
    if reward.get("sft") or reward.get("final"):
        rows.append(["Reward (SFT -> final)", f"{_fmt_mean(reward.get('sft'))} -> {_fmt_mean(reward.get('final'))}"])
    for key, label in (("without_ptx", "PPO"), ("with_ptx", "PPO-ptx")):
        if taxes.get(key):
            rows.append([f"Alignment tax ({label})", _fmt_tax(taxes[key])])
    if stages:
        rows.append(["Wall time, all stages", f"{sum(stages.values()):.1f} s"])
    if acc:
        rows.append(["Acceptance", "PASS" if acc.get("passed") else "FAIL"])
    out += ["## Headline", ""] + _table(["metric", "value"], rows) + [""]

    # win rates
    out += ["## Win rates against the SFT policy", ""]
    if win_rates:
        out += _table(
            ["judge", "win rate", "CI", "wins", "ties", "losses", "n", "interval"],
            [
                [
                    j,
                    _pct(w["rate"]),
                    f"{_pct(w['lower'])} to {_pct(w['upper'])}",
                    _count(w["wins"]),
                    _count(w["ties"]),
                    _count(w["losses"]),
                    w["n"],
                    f"{round(100 * (w.get('confidence') or 0.95))}% {w['method']}",
                ]
                for j, w in sorted(win_rates.items(), key=lambda jw: (jw[0] != primary, jw[0]))
            ],
        )
        out += ["", "Ties count as half a win; n is the number of held-out prompts."]
        if acc:
            out += [
                "",
                f"Bar: {primary} win rate >= {_pct(acc.get('min_rate'), 0)} with the lower bound above "
                f"{_pct(acc.get('min_lower'), 0)} ({'met' if acc.get('primary_ok') else 'not met'}); every other judge "
                f">= {_pct(acc.get('secondary_min_rate'), 0)} ("
                + (
                    ", ".join(f"{j}: {'met' if ok else 'not met'}" for j, ok in (acc.get("secondary_ok") or {}).items())
                    or "no other judge"
                )
                + ").",
            ]
    else:
        out += ["n/a"]
    out += [""]

    # RM accuracy
    out += ["## Reward model accuracy on held-out comparisons", ""]
    if rounds:
        out += _table(
            ["round", "accuracy", "95% CI", "n"],
            [
                [
                    r["round"],
                    _pct(r["accuracy"]),
                    "n/a" if r.get("lower") is None else f"{_pct(r['lower'])} to {_pct(r['upper'])}",
                    r.get("n") or "n/a",
                ]
                for r in rounds
            ],
        )
        broken = [r for r in rounds if r.get("breakdown")]
        if broken:
            labels = (
                ("rm_vs_labeler", "RM vs the labels it trained on, all pairs"),
                ("rm_vs_labeler_gold_untied", "... pairs the gold judge orders"),
                ("rm_vs_labeler_gold_tied", "... pairs the gold judge ties (coin flips for the labelers)"),
                ("rm_vs_labeler_when_labelers_agree", "... pairs the labelers agree on"),
                ("gold_vs_labeler", "the gold judge vs the same labels (an RM's ceiling)"),
                ("rm_vs_gold", "RM vs the gold judge, pairs it orders"),
                ("labeler_vs_gold", "labeler vs the gold judge, pairs it orders"),
                ("labelers_agreement", "labelers with each other"),
            )
            out += ["", "Where the RM errs (held-out pairs; alignd.rm_breakdown):", ""]
            out += _table(
                ["pairs"] + [f"round {r['round']}" for r in broken],
                [
                    [text]
                    + [f"{_pct(r['breakdown'][key]['accuracy'])} (n = {r['breakdown'][key]['n']})" for r in broken]
                    for key, text in labels
                ]
                + [["gold ties, share of pairs"] + [_pct(r["breakdown"]["gold_tie_fraction"]) for r in broken]],
            )
    else:
        out += ["n/a"]
    out += [""]

    # other numbers
    out += ["## KL, reward and alignment tax", ""]
    out += _table(
        ["quantity", "value"],
        [
            ["KL to reference per sequence", _num(kl["per_sequence"]) if kl else "n/a"],
            ["KL to reference per token", _num(kl["per_token"]) if kl else "n/a"],
            ["Reward, SFT policy", _fmt_mean(reward.get("sft"))],
            ["Reward, final policy", _fmt_mean(reward.get("final"))],
            ["Alignment tax, PPO", _fmt_tax(taxes.get("without_ptx"))],
            ["Alignment tax, PPO-ptx", _fmt_tax(taxes.get("with_ptx"))],
            [
                "Simulated-labeler agreement",
                "n/a"
                if not agreement
                else _pct(agreement["agreement"])
                + ("" if agreement.get("stderr") is None else f" +- {_pct(agreement['stderr'])}")
                + ("" if agreement.get("temperature") is None else f" at T={_num(agreement['temperature'])}"),
            ],
        ],
    )
    out += ["", "Alignment tax: LM loss on held-out plain text after PPO minus before (positive: worse).", ""]

    if stages:
        out += ["## Wall time per stage", ""]
        out += _table(
            ["stage", "seconds"],
            [[s, f"{v:.1f}"] for s, v in stages.items()] + [["total", f"{sum(stages.values()):.1f}"]],
        )
        out += [""]

    if figures:
        out += ["## Figures", ""]
        for t, p in figures.items():
            out += [f"![{_cell(t)}]({_check_relative_path(t, p)})", ""]

    if plots:
        out += _plot_lines(plots, skip=(_check_relative_path(t, p) for t, p in figures.items()))

    if samples:
        shown = list(samples)[: max(0, max_samples)]
        out += [f"## Samples ({len(shown)} of {len(samples)})", ""]
        for i, s in enumerate(shown, 1):
            out += [f"### Sample {i}", "", "**Prompt**", ""] + _fence(_clip(s.get("prompt"), max_chars)) + [""]
            scores: Mapping[str, Mapping[str, Any]] = s.get("scores") or {}
            for key, label in (("sft", "SFT policy"), ("final", "final policy")):
                judged = ", ".join(f"{j}: {_num(sc.get(key))}" for j, sc in scores.items() if sc.get(key) is not None)
                out += (
                    [f"**{label}**" + (f" ({judged})" if judged else ""), ""]
                    + _fence(_clip(s.get(key), max_chars))
                    + [""]
                )
            if s.get("image"):
                out += [f"![sample {i}]({_check_relative_path(f'sample {i}', s['image'])})", ""]
    return "\n".join(out).rstrip() + "\n"
