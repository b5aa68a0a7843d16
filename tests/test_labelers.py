"""Simulated labelers: Plackett-Luce rankings, determinism, agreement and temperature calibration."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest

from alignd.data import Comparison
from alignd.labelers import (
    Calibration,
    Labeler,
    SimulatedLabeler,
    agreement,
    calibrate_temperature,
    expected_agreement,
    pair_agreement,
)

# --- a synthetic gold scorer and item set -----------------------------------------

_VOCAB_RNG = random.Random(1234)
VOCAB = [f"w{i}" for i in range(60)]
WEIGHTS = {w: _VOCAB_RNG.gauss(0.0, 1.0) for w in VOCAB}


def linear_gold(prompt: str, completion: str) -> float:
    """A random linear function of word counts, normalised by length (a 'token_fraction'-style score)."""
    words = completion.split()
    return sum(WEIGHTS[w] for w in words) / math.sqrt(max(1, len(words)))


def make_items(n: int, seed: int, k_range: tuple[int, int] = (4, 7)) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        k = rng.randint(*k_range)
        comps: list[str] = []
        while len(comps) < k:
            c = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(3, 12)))
            if c not in comps:
                comps.append(c)
        items.append((f"prompt {seed}-{i}", comps))
    return items


def gap_gold(gap: float):
    """Gold that scores completion 'a' at `gap` and everything else at 0."""
    return lambda prompt, completion: gap if completion == "a" else 0.0


ITEMS = make_items(600, seed=7)


# --- rankings ---------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1e-9, 0.3, 1.0, 1e9, math.inf])
def test_rankings_are_permutations(temperature):
    lab = SimulatedLabeler(linear_gold, temperature, seed=3)
    for k in range(0, 10):
        comps = [f"w{i} w{(3 * i) % 60}" for i in range(k)]
        r = lab.rank("p", comps)
        assert sorted(r) == list(range(k))
        assert all(isinstance(i, int) for i in r)


def test_protocol_and_name():
    lab = SimulatedLabeler(linear_gold, 1.0, seed=5)
    assert isinstance(lab, Labeler)
    assert "seed=5" in lab.name
    assert SimulatedLabeler(linear_gold, 1.0, seed=5, name="sim-a").name == "sim-a"


def test_deterministic_and_independent_of_call_order():
    items = ITEMS[:80]
    a = SimulatedLabeler(linear_gold, 0.7, seed=11)
    first = [a.rank(p, c) for p, c in items]
    again = [a.rank(p, c) for p, c in items]
    b = SimulatedLabeler(linear_gold, 0.7, seed=11)  # a fresh labeler, items in reverse order
    backwards = [b.rank(p, c) for p, c in reversed(items)][::-1]
    assert first == again == backwards
    # and the same in a fresh interpreter (no dependence on Python's salted hash)
    code = (
        "from alignd.labelers import SimulatedLabeler\n"
        "lab = SimulatedLabeler(lambda p, c: float(len(c)), 2.0, seed=11)\n"
        "print(lab.rank('hello', ['a', 'bb', 'ccc', 'dddd', 'eeeee', 'ffffff']))\n"
    )
    runs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    here = SimulatedLabeler(lambda p, c: float(len(c)), 2.0, seed=11).rank(
        "hello", ["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]
    )
    assert runs == {f"{here}\n"}
    # another seed labels differently somewhere
    other = SimulatedLabeler(linear_gold, 0.7, seed=12)
    assert [other.rank(p, c) for p, c in items] != first


def test_noise_is_shared_across_temperatures():
    """Same seed, different temperature: the same Gumbel draws (common random numbers)."""
    p, c = ITEMS[0]
    assert SimulatedLabeler(linear_gold, 0.1, seed=4).noise(p, c) == SimulatedLabeler(linear_gold, 9.0, seed=4).noise(
        p, c
    )
    assert SimulatedLabeler(linear_gold, 0.1, seed=4).noise(p, c) != SimulatedLabeler(linear_gold, 0.1, seed=5).noise(
        p, c
    )


@pytest.mark.parametrize("temperature", [0.0, 1e-9])
def test_zero_temperature_sorts_by_gold(temperature):
    lab = SimulatedLabeler(linear_gold, temperature, seed=1)
    for p, comps in ITEMS[:100]:
        r = lab.rank(p, comps)
        scores = [linear_gold(p, c) for c in comps]
        assert r == sorted(range(len(comps)), key=lambda i: -scores[i])


def test_zero_temperature_breaks_ties_randomly():
    lab = SimulatedLabeler(lambda p, c: 0.0, 0.0, seed=1)
    firsts = {lab.rank(f"p{i}", ["x", "y"])[0] for i in range(40)}
    assert firsts == {0, 1}


@pytest.mark.parametrize("temperature", [1e9, math.inf])
def test_huge_temperature_is_a_coin_flip_against_gold(temperature):
    gold_order = SimulatedLabeler(linear_gold, 0.0, seed=0, name="gold")
    noisy = SimulatedLabeler(linear_gold, temperature, seed=9)
    items = ITEMS[:400]
    a = agreement(gold_order, noisy, items)
    n_pairs = sum(len(c) * (len(c) - 1) // 2 for _, c in items)
    # pairs within one ranking are correlated: allow a generous 5 x the independent-pairs standard error
    assert abs(a - 0.5) < 5 * math.sqrt(0.25 / n_pairs)


# --- agreement and the analytic pair formula -----------------------------------------


def test_pair_agreement_formula():
    for d, t in [(0.3, 1.0), (2.0, 0.5), (-1.5, 3.0), (1e-3, 1e-3)]:
        p = 1.0 / (1.0 + math.exp(-d / t))
        assert pair_agreement(d, t) == pytest.approx(p * p + (1 - p) ** 2, abs=1e-12)
    assert pair_agreement(0.0, 1.0) == 0.5
    assert pair_agreement(1.0, 0.0) == 1.0
    assert pair_agreement(0.0, 0.0) == 0.5
    assert pair_agreement(1.0, math.inf) == 0.5
    assert pair_agreement(1e308, 1e-300) == 1.0  # no overflow
    assert pair_agreement(1e-300, 1e300) == 0.5
    with pytest.raises(ValueError):
        pair_agreement(1.0, -1.0)


@pytest.mark.parametrize("gap,temperature", [(1.0, 1.0), (0.5, 1.0), (3.0, 2.0)])
def test_analytic_pair_agreement_matches_simulation(gap, temperature):
    n = 6000
    gold = gap_gold(gap)
    a = SimulatedLabeler(gold, temperature, seed=21)
    b = SimulatedLabeler(gold, temperature, seed=22)
    items = [(f"q{i}", ["a", "b"]) for i in range(n)]
    measured = agreement(a, b, items)
    expected = pair_agreement(gap, temperature)
    assert abs(measured - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    # the Bradley-Terry marginal itself: P(a ranked above b) = sigmoid(gap / T)
    wins = sum(a.rank(p, c)[0] == 0 for p, c in items) / n
    p = 1 / (1 + math.exp(-gap / temperature))
    assert abs(wins - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_plackett_luce_pair_marginal_is_bradley_terry_for_k_way_rankings():
    """In a K = 5 ranking, each pair is ordered like a Bradley-Terry comparison (so the expectation holds for K > 2)."""
    scores = {"a": 1.2, "b": 0.4, "c": 0.0, "d": -0.3, "e": -1.0}
    gold = lambda p, c: scores[c]  # noqa: E731
    lab = SimulatedLabeler(gold, 0.8, seed=2)
    n = 4000
    above = 0
    for i in range(n):
        r = lab.rank(f"r{i}", list(scores))
        above += r.index(0) < r.index(4)  # 'a' above 'e'
    p = 1 / (1 + math.exp(-(1.2 - -1.0) / 0.8))
    assert abs(above / n - p) < 4 * math.sqrt(p * (1 - p) / n)

    items = [(f"s{i}", list(scores)) for i in range(1500)]
    measured = agreement(lab, SimulatedLabeler(gold, 0.8, seed=3), items)
    assert abs(measured - expected_agreement(gold, items, 0.8)) < 0.02


def test_agreement_accepts_comparisons_and_validates():
    lab = SimulatedLabeler(linear_gold, 0.0, seed=1)
    items = [Comparison(p, c, list(range(len(c)))) for p, c in ITEMS[:20]]
    assert agreement(lab, SimulatedLabeler(linear_gold, 0.0, seed=2), items) == 1.0
    with pytest.raises(ValueError, match="no pairs"):
        agreement(lab, lab, [("p", ["only one"])])

    class Broken:
        name = "broken"

        def rank(self, prompt, completions):
            return [0, 0]

    with pytest.raises(ValueError, match="broken.*not a permutation"):
        agreement(lab, Broken(), [("p", ["w1", "w2"])])


def test_invalid_arguments():
    with pytest.raises(ValueError):
        SimulatedLabeler(linear_gold, -0.1)
    with pytest.raises(ValueError):
        SimulatedLabeler(linear_gold, math.nan)
    with pytest.raises(ValueError, match="finite"):
        SimulatedLabeler(lambda p, c: math.nan, 1.0).rank("p", ["x", "y"])


# --- calibration ------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration() -> Calibration:
    return calibrate_temperature(linear_gold, ITEMS, target=0.73, seeds=(1, 2), tol=0.01)


def test_calibration_hits_the_target(calibration):
    temperature, measured = calibration  # unpacks as (temperature, agreement)
    assert abs(measured - 0.73) <= 0.02
    assert calibration.expected == pytest.approx(0.73, abs=1e-6)
    assert calibration.stderr <= 0.01 / 3
    assert calibration.pairs == sum(len(c) * (len(c) - 1) // 2 for _, c in ITEMS)
    assert "temperature" in str(calibration)
    # the reported measurement is what the seeded labelers themselves give (first repeat = the items as they are)
    a = SimulatedLabeler(linear_gold, temperature, seed=1)
    b = SimulatedLabeler(linear_gold, temperature, seed=2)
    if calibration.repeats == 1:
        assert agreement(a, b, ITEMS) == pytest.approx(measured, abs=1e-12)
    else:
        assert abs(agreement(a, b, ITEMS) - 0.73) <= 0.03


def test_calibration_holds_with_fresh_seeds_and_fresh_items(calibration):
    t = calibration.temperature
    fresh = agreement(SimulatedLabeler(linear_gold, t, seed=101), SimulatedLabeler(linear_gold, t, seed=202), ITEMS)
    assert abs(fresh - 0.73) <= 0.03
    other_items = make_items(600, seed=99)  # new samples from the same distribution
    fresh2 = agreement(SimulatedLabeler(linear_gold, t, seed=7), SimulatedLabeler(linear_gold, t, seed=8), other_items)
    assert abs(fresh2 - 0.73) <= 0.03


def test_empirical_calibration_agrees_with_analytic(calibration):
    emp = calibrate_temperature(linear_gold, ITEMS, target=0.73, seeds=(1, 2), tol=0.01, method="empirical")
    assert abs(emp.agreement - 0.73) <= 0.01
    assert abs(emp.expected - 0.73) <= 0.02
    assert abs(math.log(emp.temperature / calibration.temperature)) < 0.15


def test_calibration_on_few_items_repeats_until_precise():
    few = ITEMS[:10]
    cal = calibrate_temperature(linear_gold, few, target=0.73, tol=0.02)
    assert cal.repeats > 1
    assert cal.stderr <= 0.02 / 3
    assert abs(cal.agreement - 0.73) <= 0.02


def test_unreachable_targets_raise():
    same = [(f"p{i}", ["x", "y", "z"]) for i in range(50)]
    with pytest.raises(ValueError, match="unreachable.*0.500"):
        calibrate_temperature(lambda p, c: 1.0, same)
    # two scores among K = 4: 4 of 6 pairs differ -> at most (4 + 0.5 * 2) / 6 = 0.833
    coarse = lambda p, c: float(c in ("w", "x"))  # noqa: E731
    items = [(f"p{i}", ["w", "x", "y", "z"]) for i in range(50)]
    calibrate_temperature(coarse, items, target=0.8)  # reachable
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_temperature(coarse, items, target=0.85)
    with pytest.raises(ValueError, match="0.5"):
        calibrate_temperature(linear_gold, ITEMS[:20], target=0.5)
    with pytest.raises(ValueError, match="no pairs"):
        calibrate_temperature(linear_gold, [("p", ["one"])])
    with pytest.raises(ValueError, match="different seeds"):
        calibrate_temperature(linear_gold, ITEMS[:20], seeds=(3, 3))


def test_module_stays_light():
    code = "import sys, alignd.labelers; print(sorted(m for m in ('torch', 'grpc', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
