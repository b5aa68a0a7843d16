"""bench/presets.py: the README's preset tables are generated from the committed bench/results/presets.json, and the
figures it keeps per seed are the report's own."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from alignd import evaluation

ROOT = Path(__file__).resolve().parent.parent


def _presets():
    spec = importlib.util.spec_from_file_location("bench_presets", ROOT / "bench" / "presets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_tables_match_the_committed_results():
    """`bench/presets.py --readme` leaves the README unchanged: its tables are the results file's, not typed."""
    presets = _presets()
    data = json.loads(presets.RESULTS.read_text())
    readme = presets.README.read_text()
    assert readme == presets.rewrite_readme(readme, data), (
        "README preset tables differ from bench/results/presets.json: run bench/presets.py --readme"
    )
    for name in ("tiny", "smollm2"):
        assert f"<!-- presets:{name}:begin -->" in readme, f"the README has no table for the {name} preset"


def test_readme_plot_is_the_recorded_runs():
    """The plot in the README is the one `bench/presets.py --plot` copied from a measured run: same bytes."""
    import hashlib

    presets = _presets()
    data = json.loads(presets.RESULTS.read_text())
    readme = presets.README.read_text()
    plots = [(name, e["readme_plot"]) for name, e in data["presets"].items() if "readme_plot" in e]
    assert plots, "no preset records the README's plot (bench/presets.py --preset NAME --plot SEED)"
    for name, p in plots:
        assert f"]({p['file']})" in readme, (name, p["file"])
        assert hashlib.sha256((ROOT / p["file"]).read_bytes()).hexdigest() == p["sha256"], p["file"]
        assert p["seed"] in [r["seed"] for r in data["presets"][name]["seeds"]]


def test_headline_reads_the_report_and_the_summary_spreads_over_seeds():
    presets = _presets()

    def prefs(wins, losses, ties):
        return evaluation.win_rate_from_preferences([1.0] * wins + [0.0] * losses + [0.5] * ties)

    def report(wins, losses, ties, second_wins, kl, seconds):
        return evaluation.build_report_json(
            win_rates={"vader": prefs(wins, losses, ties), "textblob": prefs(second_wins, 100 - second_wins, 0)},
            rm_accuracy_per_round=[{"accuracy": 0.6, "n": 70}],
            labeler_agreement=0.72,
            kl_to_reference={"per_token": kl},
            reward={"sft": [0.1, 0.2], "final": [0.5, 0.6]},
            alignment_tax={"without_ptx": (5.0, 5.25)},
            wall_seconds_per_stage={"sft": seconds, "ppo": 2 * seconds},
            primary_judge="vader",
            meta={"ppo_steps": 30},
        )

    a = presets.headline(report(70, 20, 10, 60, 0.1, 100.0), 400.0)
    b = presets.headline(report(40, 50, 10, 40, 0.3, 200.0), 700.0)
    assert a["judges"] == {"gold": "vader", "second": "textblob"}
    assert a["gold"]["rate"] == 0.75 and a["gold"]["wins"] == 70 and a["second"]["rate"] == 0.6
    assert a["passed"] and not b["passed"]  # b: 45% gold
    assert a["alignment_tax"]["absolute"] == 0.25 and a["kl_per_token"] == 0.1 and a["stage_seconds"]["ppo"] == 200.0
    rows = [{"seed": 0, **a}, {"seed": 1, **b}]
    s = presets.summarise(rows)
    assert s["gold_rate"]["mean"] == (0.75 + 0.45) / 2 and s["gold_rate"]["min"] == 0.45
    assert abs(s["gold_rate"]["std"] - 0.3 / 2**0.5) < 1e-12  # sample standard deviation of two values
    assert s["stage_seconds.ppo"]["mean"] == 300.0 and not s["all_passed"]
    md = presets.render(
        "demo",
        {
            "commit": "0123456789",
            "dirty": False,
            "date": "2026-12-07",
            "machine": {"cpus": 2},
            "seeds": rows,
            "summary": s,
        },
    )
    assert "| 0 | 75.0% [" in md and "PASS" in md and "| 1 | 45.0% [" in md and "FAIL" in md and "`0123456`" in md
    assert "not all PASS" in md
    # Rows measured at two commits (bench/presets.py --merge) say which seed ran where; a chat template is named.
    rows2 = [{**rows[0], "commit": "aaaaaaa111"}, {**rows[1], "commit": "bbbbbbb222"}]
    rows2[0]["chat_template"], rows2[0]["system_prompt"] = "model 872be49dbb63aaaa", "Continue the passage."
    md2 = presets.render(
        "demo",
        {
            "commit": "bbbbbbb222",
            "commits": ["aaaaaaa111", "bbbbbbb222"],
            "dirty": False,
            "date": "2026-12-07",
            "machine": {"cpus": 2},
            "seeds": rows2,
            "summary": s,
        },
    )
    assert "commits `aaaaaaa`, `bbbbbbb` (seed by seed: 0 at `aaaaaaa`, 1 at `bbbbbbb`)" in md2
    assert 'chat template (model, sha256 `872be49dbb63`), system prompt "Continue the passage."' in md2
