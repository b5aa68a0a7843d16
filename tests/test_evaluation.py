"""Evaluation statistics and the run report: Wilson and bootstrap win-rate intervals, t quantiles,
KL summary, alignment tax, report.json schema and the Markdown report."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from statistics import NormalDist

import pytest

from alignd.evaluation import (
    REPORT_KEYS,
    SCHEMA_VERSION,
    KLSummary,
    MeanCI,
    WinRate,
    alignment_tax,
    build_report_json,
    kl_summary,
    mean_with_ci,
    render_markdown,
    t_cdf,
    t_quantile,
    wilson_interval,
    win_rate,
    win_rate_from_preferences,
)
from alignd.evaluation.stats import _t_quantile_expansion


def wilson_by_hand(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval written out independently of the module."""
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n), (centre + spread) / (1 + z * z / n)


def outcomes(wins: int, ties: int, losses: int) -> tuple[list[float], list[float]]:
    """Scores for A and B on wins + ties + losses prompts with those outcomes."""
    a = [1.0] * wins + [0.5] * ties + [0.0] * losses
    return a, [0.5] * len(a)


# --- win rates -------------------------------------------------------------------------


def test_wilson_60_of_100_matches_the_formula():
    a, b = outcomes(60, 0, 40)
    wr = win_rate(a, b)
    assert (wr.wins, wr.ties, wr.losses, wr.n, wr.comparisons) == (60, 0, 40, 100, 100)
    assert wr.rate == 0.6 and wr.method == "wilson" and wr.confidence == 0.95
    lo, hi = wilson_by_hand(60, 100)
    assert wr.lower == pytest.approx(lo, abs=1e-4) and wr.upper == pytest.approx(hi, abs=1e-4)
    assert round(wr.lower, 3) == 0.502 and round(wr.upper, 3) == 0.691
    assert (round(wr.lower, 4), round(wr.upper, 4)) == (round(lo, 4), round(hi, 4))


@pytest.mark.parametrize("successes,n,confidence", [(7, 20, 0.95), (33.5, 41, 0.9), (1, 3, 0.99), (480, 500, 0.95)])
def test_wilson_interval_matches_the_formula(successes, n, confidence):
    assert wilson_interval(successes, n, confidence) == pytest.approx(
        wilson_by_hand(successes, n, confidence), abs=1e-12
    )


def test_ties_count_half_and_n_is_unchanged():
    a, b = outcomes(50, 20, 30)
    wr = win_rate(a, b)
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (50, 20, 30, 100)
    assert wr.rate == pytest.approx(0.6)
    assert (wr.lower, wr.upper) == pytest.approx(wilson_by_hand(60, 100), abs=1e-12)
    # a tolerance turns near-equal scores into ties
    wr = win_rate([1.0, 1.05, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0], tie_tolerance=0.1)
    assert (wr.wins, wr.ties, wr.losses) == (1, 2, 1) and wr.rate == 0.5
    wr = win_rate([1.0, 1.05, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0])
    assert (wr.wins, wr.ties, wr.losses) == (2, 1, 1) and wr.rate == 0.625


def test_several_samples_per_prompt_compare_all_pairs():
    # prompt 0: A's [3, 1] vs B's [2, 2]: 2 wins of 4 pairs; prompt 1: [1, 1] vs [1, 0]: 2 ties + 2 wins
    wr = win_rate([[3.0, 1.0], [1.0, 1.0]], [[2.0, 2.0], [1.0, 0.0]])
    assert wr.n == 2 and wr.comparisons == 8
    assert wr.wins == pytest.approx(0.5 + 0.5) and wr.ties == pytest.approx(0.5) and wr.losses == pytest.approx(0.5)
    assert wr.wins + wr.ties + wr.losses == pytest.approx(wr.n)
    assert wr.rate == pytest.approx((0.5 + 0.75) / 2)
    assert (wr.lower, wr.upper) == pytest.approx(wilson_by_hand(1.25, 2), abs=1e-12)
    # numbers and lists mix; unequal sample counts are fine
    assert win_rate([2.0, [1.0, 3.0, 5.0]], [[1.0], 4.0]).rate == pytest.approx((1 + 1 / 3) / 2)


@pytest.mark.parametrize("method", ["wilson", "bootstrap"])
def test_degenerate_inputs_raise(method):
    with pytest.raises(ValueError, match="n = 0"):
        win_rate([], [], method=method)
    with pytest.raises(ValueError, match="one entry per prompt"):
        win_rate([1.0, 2.0], [1.0], method=method)
    with pytest.raises(ValueError, match="finite"):
        win_rate([float("nan")], [1.0], method=method)
    with pytest.raises(ValueError, match="empty"):
        win_rate([[]], [1.0], method=method)
    with pytest.raises(ValueError, match="tie_tolerance"):
        win_rate([1.0], [1.0], tie_tolerance=-1, method=method)
    with pytest.raises(ValueError, match="confidence"):
        win_rate([1.0], [1.0], confidence=1.0, method=method)
    with pytest.raises(ValueError, match="n = 0"):
        win_rate_from_preferences([], method=method)
    with pytest.raises(ValueError, match="method"):
        win_rate([1.0], [0.0], method="wald")
    with pytest.raises(ValueError):
        wilson_interval(1, 0)


def test_all_wins():
    wr = win_rate([1.0] * 50, [0.0] * 50)
    assert wr.rate == 1.0 and wr.upper == 1.0 and wr.lower > 0.9
    assert wr.lower == pytest.approx(wilson_by_hand(50, 50)[0], abs=1e-12)
    none = win_rate([0.0] * 50, [1.0] * 50)
    assert none.rate == 0.0 and none.lower == 0.0 and none.upper < 0.1
    # the bootstrap collapses here (the reason it is not the default)
    boot = win_rate([1.0] * 50, [0.0] * 50, method="bootstrap")
    assert (boot.lower, boot.upper) == (1.0, 1.0)


def test_bootstrap_is_seeded_and_close_to_wilson_for_n_400():
    rng = random.Random(7)
    a = [rng.random() for _ in range(400)]
    b = [x + rng.gauss(-0.1, 0.4) for x in a]  # A wins about 60%
    wilson = win_rate(a, b)
    boot = win_rate(a, b, method="bootstrap", seed=3)
    assert boot.method == "bootstrap" and boot.rate == wilson.rate and 0.55 < wilson.rate < 0.65
    assert boot.lower == pytest.approx(wilson.lower, abs=0.01)
    assert boot.upper == pytest.approx(wilson.upper, abs=0.01)
    assert win_rate(a, b, method="bootstrap", seed=3) == boot
    assert win_rate(a, b, method="bootstrap", seed=4) != boot


def test_preferences():
    wr = win_rate_from_preferences([1, 1, 0, 0.5, [1, 0]])
    assert (wr.wins, wr.ties, wr.losses, wr.n, wr.comparisons) == (2.5, 1, 1.5, 5, 6)
    assert wr.rate == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="0.5"):
        win_rate_from_preferences([0.7])


def test_win_rate_dict_round_trip_and_str():
    wr = win_rate(*outcomes(62, 2, 36))
    assert WinRate.from_dict(json.loads(json.dumps(wr.to_dict()))) == wr
    assert str(wr).startswith("63.0% [")


# --- t quantiles, means ---------------------------------------------------------------------

# two-sided table values (e.g. Abramowitz & Stegun table 26.10), 3 decimals
T_TABLE = [
    (0.975, 1, 12.706),
    (0.975, 2, 4.303),
    (0.975, 3, 3.182),
    (0.975, 5, 2.571),
    (0.975, 9, 2.262),
    (0.975, 10, 2.228),
    (0.975, 29, 2.045),
    (0.975, 30, 2.042),
    (0.975, 60, 2.000),
    (0.975, 120, 1.980),
    (0.95, 10, 1.812),
    (0.95, 20, 1.725),
    (0.995, 5, 4.032),
    (0.995, 30, 2.750),
    (0.9, 4, 1.533),
]


@pytest.mark.parametrize("p,df,expected", T_TABLE)
def test_t_quantile_against_table(p, df, expected):
    assert round(t_quantile(p, df), 3) == expected
    assert t_quantile(1 - p, df) == pytest.approx(-t_quantile(p, df))
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def t_pdf(x: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def simpson(f, a: float, b: float, intervals: int = 2000) -> float:
    h = (b - a) / intervals
    inner = sum((4 if i % 2 else 2) * f(a + i * h) for i in range(1, intervals))
    return h / 3 * (f(a) + inner + f(b))


def test_t_quantile_closed_forms_and_large_df():
    for p in (0.6, 0.9, 0.975, 0.999):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)))
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)))
    assert t_quantile(0.5, 7) == 0.0
    # the exact routine and the expansion agree where they meet, and the normal is the limit
    for p in (0.9, 0.975, 0.9995):
        for df in (200, 10_000):
            assert _t_quantile_expansion(p, df) == pytest.approx(t_quantile(p, df), abs=1e-9)
    assert t_quantile(0.975, 10_001) < t_quantile(0.975, 10_000) < t_quantile(0.975, 9_999)
    assert t_quantile(0.975, 1e9) == pytest.approx(NormalDist().inv_cdf(0.975), abs=1e-8)
    # fractional df: the Student-t density integrated numerically (Simpson) up to the quantile gives p
    for p, df in ((0.975, 2.5), (0.9, 7.3), (0.995, 40.5)):
        t = t_quantile(p, df)
        assert 0.5 + simpson(lambda x: t_pdf(x, df), 0.0, t) == pytest.approx(p, abs=1e-9)
    with pytest.raises(ValueError):
        t_quantile(1.0, 5)
    with pytest.raises(ValueError):
        t_quantile(0.9, 0)


def test_mean_with_ci():
    values = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0, 3.0, 7.0]
    ci = mean_with_ci(values)
    sd = math.sqrt(sum((v - 5.0) ** 2 for v in values) / 9)
    assert (ci.mean, ci.n) == (5.0, 10) and ci.std == pytest.approx(sd)
    half = 2.2621571628 * sd / math.sqrt(10)
    assert (ci.lower, ci.upper) == pytest.approx((5.0 - half, 5.0 + half), abs=1e-9)
    assert mean_with_ci([1.0, 1.0, 1.0]) == MeanCI(1.0, 1.0, 1.0, 3, 0.0)
    assert mean_with_ci([3.0]) == MeanCI(3.0, None, None, 1, None)
    with pytest.raises(ValueError):
        mean_with_ci([])


# --- KL, alignment tax --------------------------------------------------------------------------


def test_kl_summary():
    kl = kl_summary([[0.1, 0.2, 0.3], [0.4], []])
    assert kl == KLSummary(per_token=pytest.approx(0.25), per_sequence=pytest.approx(1.0 / 3), sequences=3, tokens=4)
    with pytest.raises(ValueError):
        kl_summary([])
    with pytest.raises(ValueError):
        kl_summary([[], []])
    with pytest.raises(ValueError, match="row 1 token 0"):
        kl_summary([[0.1], [float("inf")]])


def test_alignment_tax():
    t = alignment_tax(2.0, 2.1)
    assert t.before == 2.0 and t.after == 2.1
    assert t.absolute == pytest.approx(0.1) and t.relative == pytest.approx(0.05)
    assert alignment_tax(0.0, 0.5).relative is None
    assert alignment_tax(3.0, 2.7).absolute < 0  # PPO-ptx can even lower the loss


# --- report.json and report.md ------------------------------------------------------------------


def full_report() -> dict:
    gold = win_rate(*outcomes(240, 10, 150))  # 61.25%
    judge2 = win_rate(*outcomes(220, 20, 160))  # 57.5%

    class FakeCalibration:  # the attributes of alignd.labelers.Calibration used here
        temperature, agreement, stderr, pairs, repeats = 0.8, 0.731, 0.004, 600, 2

    return build_report_json(
        win_rates={"gold": gold, "judge-2": judge2},
        rm_accuracy_per_round=[{"accuracy": 0.70, "n": 500}, 0.715],
        labeler_agreement=FakeCalibration(),
        kl_to_reference=kl_summary([[0.01, 0.03], [0.02, 0.02]]),
        reward={"sft": [0.0, 0.5, -0.5, 0.2], "final": mean_with_ci([1.0, 1.5, 0.5, 1.2])},
        alignment_tax={"without_ptx": alignment_tax(3.0, 3.3), "with_ptx": (3.0, 3.03)},
        wall_seconds_per_stage={"sft": 12.5, "rm": 30.25, "ppo": 600.0, "evaluate": 7.0},
        figures={"reward curve": "figures/reward.png"},
        meta={"run_id": "r1", "seeds": (1, 2)},
    )


def test_report_json_schema_and_round_trip():
    report = full_report()
    assert tuple(report) == REPORT_KEYS and report["schema_version"] == SCHEMA_VERSION == 1
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    gold = report["win_rates"]["gold"]
    assert set(gold) == {"wins", "losses", "ties", "n", "rate", "lower", "upper", "method", "confidence", "comparisons"}
    assert (gold["wins"], gold["ties"], gold["n"], gold["rate"]) == (240, 10, 400, 0.6125)
    assert report["acceptance"]["primary_ok"] and report["acceptance"]["secondary_ok"] == {"judge-2": True}
    assert report["acceptance"]["passed"] is True
    r0, r1 = report["rm_accuracy_per_round"]
    assert (r0["round"], r0["accuracy"], r0["n"]) == (0, 0.70, 500) and r0["lower"] < 0.70 < r0["upper"]
    assert r1 == {"round": 1, "accuracy": 0.715, "n": None, "lower": None, "upper": None, "breakdown": None}
    assert report["labeler_agreement"] == {"agreement": 0.731, "stderr": 0.004, "temperature": 0.8, "pairs": 1200}
    assert report["kl_to_reference"] == {
        "per_token": pytest.approx(0.02),
        "per_sequence": pytest.approx(0.04),
        "sequences": 2,
        "tokens": 4,
    }
    assert set(report["reward"]) == {"sft", "final"} and report["reward"]["final"]["mean"] == pytest.approx(1.05)
    assert (
        report["reward"]["sft"]["n"] == 4 and report["reward"]["sft"]["lower"] < 0.05 < report["reward"]["sft"]["upper"]
    )
    assert report["alignment_tax"]["without_ptx"]["relative"] == pytest.approx(0.1)
    assert report["alignment_tax"]["with_ptx"]["absolute"] == pytest.approx(0.03)
    assert report["wall_seconds_per_stage"] == {"sft": 12.5, "rm": 30.25, "ppo": 600.0, "evaluate": 7.0}
    assert report["meta"] == {"run_id": "r1", "seeds": [1, 2]}


def test_report_json_minimal_and_failing_bar():
    report = build_report_json(win_rates={"gold": win_rate(*outcomes(58, 0, 42))})
    assert tuple(report) == REPORT_KEYS and json.loads(json.dumps(report)) == report
    assert report["labeler_agreement"] is None and report["kl_to_reference"] is None
    assert report["reward"] == {"sft": None, "final": None}
    assert report["alignment_tax"] == {"without_ptx": None, "with_ptx": None}
    assert report["rm_accuracy_per_round"] == [] and report["wall_seconds_per_stage"] == {} and report["figures"] == {}
    # 58% misses the bar, and without a second judge the run cannot pass
    assert report["acceptance"]["primary_ok"] is False and report["acceptance"]["passed"] is False
    strong = build_report_json(win_rates={"gold": win_rate(*outcomes(70, 0, 30))})
    assert strong["acceptance"]["primary_ok"] is True and strong["acceptance"]["passed"] is False
    # a second judge below 50% fails the run
    split = build_report_json(win_rates={"gold": win_rate(*outcomes(70, 0, 30)), "j2": win_rate(*outcomes(45, 0, 55))})
    assert split["acceptance"]["secondary_ok"] == {"j2": False} and split["acceptance"]["passed"] is False
    # non-finite numbers become null (strict JSON)
    nan_kl = build_report_json(win_rates={}, kl_to_reference={"per_token": float("nan"), "per_sequence": 1.0})
    assert nan_kl["kl_to_reference"]["per_token"] is None and json.dumps(nan_kl, allow_nan=False)


def test_report_json_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown keys"):
        build_report_json(win_rates={}, reward={"ppo": 1.0})
    with pytest.raises(ValueError, match="unknown keys"):
        build_report_json(win_rates={}, alignment_tax={"ptx": (1.0, 2.0)})
    with pytest.raises(ValueError, match="relative"):
        build_report_json(win_rates={}, figures={"x": "/abs/plot.png"})
    with pytest.raises(ValueError, match="lacks"):
        build_report_json(win_rates={"gold": {"rate": 0.6}})
    with pytest.raises(ValueError, match="accuracy"):
        build_report_json(win_rates={}, rm_accuracy_per_round=[1.5])


def test_markdown_has_the_headline_numbers():
    report = full_report()
    samples = [
        {
            "prompt": "Explain the moon landing to a 6 year old.",
            "sft": "The moon is a ```thing``` in the sky | maybe.",
            "final": "People flew to the moon in a rocket in 1969.",
            "scores": {"gold": {"sft": -0.25, "final": 1.75}, "judge-2": {"sft": 0.1, "final": 0.9}},
            "image": "figures/sample1.png",
        }
    ] * 3
    md = render_markdown(report, samples, max_samples=2)
    gold, j2 = report["win_rates"]["gold"], report["win_rates"]["judge-2"]
    for wr in (gold, j2):
        for x in (wr["rate"], wr["lower"], wr["upper"]):
            assert f"{100 * x:.1f}%" in md
    assert "61.2%" in md or "61.3%" in md  # 61.25%
    assert "70.0%" in md and "71.5%" in md  # RM accuracy per round
    assert "73.1%" in md  # labeler agreement
    assert "0.04 nats/sequence" in md and "0.02 nats/token" in md
    assert "+0.3 nats/token" in md and "+10.00%" in md and "+1.00%" in md  # alignment tax without / with ptx
    assert "649.8 s" in md  # total wall time
    assert "PASS" in md
    assert "![reward curve](figures/reward.png)" in md and "![sample 1](figures/sample1.png)" in md
    assert "## Samples (2 of 3)" in md and "### Sample 3" not in md
    assert "gold: 1.75" in md and "gold: -0.25" in md
    assert "````text" in md  # a longer fence around text that holds ```
    assert "| judge-2 |" in md


def test_markdown_of_a_partial_report():
    md = render_markdown({"schema_version": 1, "win_rates": {}}, None)
    assert md.startswith("# alignd run report") and "n/a" in md


def test_module_stays_light():
    code = "import sys, alignd.evaluation; print(sorted(m for m in ('torch', 'grpc', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_markdown_plots_section():
    report = build_report_json(
        win_rates={"gold": win_rate([1.0, 1.0, 0.0], [0.5, 0.5, 0.5])},
        figures={"reward curve": "plots/reward_kl.png"},
    )
    samples = [{"prompt": "p", "sft": "a", "final": "b"}]
    md = render_markdown(report, samples, plots=["plots/reward_kl.png", "plots/win_rates.png", "plots/my_extra.png"])
    assert "## Plots" in md and md.index("## Figures") < md.index("## Plots") < md.index("## Samples")
    assert "![win rates](plots/win_rates.png)" in md and "![my extra](plots/my_extra.png)" in md
    assert md.count("(plots/reward_kl.png)") == 1  # already among the figures
    assert render_markdown(report, samples) == render_markdown(report, samples, plots=None)
    with pytest.raises(ValueError, match="relative"):
        render_markdown(report, plots=["/abs/reward_kl.png"])


def test_report_schema_is_what_build_report_json_writes():
    """alignd.evaluation.Report (pydantic) has report.json's keys, accepts what build_report_json writes and refuses
    a field it does not know, so the schema cannot drift from the writer unnoticed."""
    import pydantic

    from alignd.evaluation import Report

    assert tuple(Report.model_fields) == REPORT_KEYS
    a, b = outcomes(7, 2, 1)
    report = build_report_json(
        win_rates={"gold": win_rate(a, b)},
        rm_accuracy_per_round=[{"accuracy": 0.7, "n": 40}],
        labeler_agreement=0.73,
        reward={"sft": [0.1, 0.3], "final": [0.5, 0.9]},
        alignment_tax={"without_ptx": (5.0, 5.2)},
        meta={"anything": {"goes": [1, 2]}},
    )
    parsed = Report.model_validate_json(json.dumps(report))
    assert parsed.win_rates["gold"].wins == 7 and parsed.rm_accuracy_per_round[0].n == 40
    drifted = json.loads(json.dumps(report))
    drifted["win_rates"]["gold"]["median"] = 0.5
    with pytest.raises(pydantic.ValidationError, match="median"):
        Report.model_validate(drifted)
    drifted = json.loads(json.dumps(report))
    del drifted["acceptance"]["passed"]
    with pytest.raises(pydantic.ValidationError, match="passed"):
        Report.model_validate(drifted)
