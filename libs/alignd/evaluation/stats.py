"""Evaluation statistics (standard library only): win rates with Wilson or bootstrap intervals, Student t
quantiles, means with intervals, KL summaries, the alignment tax. The method is described in alignd.evaluation."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

METHODS = ("wilson", "bootstrap")


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
    outcomes: Sequence[float], *, confidence: float, n_bootstrap: int, seed: int
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
    *,
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
        lower, upper = _bootstrap_interval(outcomes, confidence=confidence, n_bootstrap=n_bootstrap, seed=seed)
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
    return _win_rate_from_triples(
        triples, comparisons, confidence=confidence, method=method, n_bootstrap=n_bootstrap, seed=seed
    )


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
    return _win_rate_from_triples(
        triples, comparisons, confidence=confidence, method=method, n_bootstrap=n_bootstrap, seed=seed
    )


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
