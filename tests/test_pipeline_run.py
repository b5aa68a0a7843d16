"""The whole pipeline (sft -> rm -> ppo -> evaluate -> report) through every
real service, with `alignd run` on the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignd.data import load_comparisons

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_alignd_run_tiny_pipeline_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, ALIGND_CACHE=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-m", "alignd.cli", "run", "--config", str(ROOT / "configs" / "tiny_pipeline.yaml"),
         "--run-dir", str(run_dir), "--set", "pipeline.ppo.steps=4"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["state"] == "succeeded" and state["step"] == 4
    art = state["artifacts"]
    assert art["done"] == ["sft", "rm", "ppo", "evaluate", "report"]
    # SFT: the policy and the reference now serve the SFT model (version 1), RM round 0 trained from it.
    assert (Path(art["sft_dir"]) / "config.json").exists() and (Path(art["rm_dir"]) / "config.json").exists()
    # Labels: two simulated labelers ranked every task; their agreement is near the calibrated 73%.
    tasks = (run_dir / "rm-round-0" / "tasks.jsonl").read_text().splitlines()
    labels = (run_dir / "rm-round-0" / "labels.jsonl").read_text().splitlines()
    assert len(labels) == 2 * len(tasks) > 0
    comps, _ = load_comparisons(run_dir / "rm-round-0" / "comparisons.jsonl")
    assert len(comps) == len(tasks) and all(2 <= c.k <= 4 for c in comps)
    assert 0.6 <= art["labeler_agreement"]["agreement"] <= 0.86
    # PPO ran on the SFT policy: versions continue from the SFT version.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["policy_version"] for r in rows] == [art["sft_version"] + i for i in range(1, 5)]
    # The report: both judges' win rates with intervals, RM accuracy, agreement.
    report = json.loads((run_dir / "report.json").read_text())
    for judge in ("gold", "second"):
        w = report["win_rates"][judge]
        assert 0 <= w["lower"] <= w["rate"] <= w["upper"] <= 1 and w["n"] == 16
    assert 0 <= report["rm_accuracy_per_round"][0]["accuracy"] <= 1
    assert set(report["wall_seconds_per_stage"]) == {"sft", "rm", "ppo", "evaluate"}  # report: written during its own stage
    md = (run_dir / "report.md").read_text()
    assert "Win rate vs SFT (gold)" in md
    assert "win rate vs SFT (gold):" in out.stdout
