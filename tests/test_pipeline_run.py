"""The whole pipeline (sft -> rm -> ppo -> evaluate -> report) through every
real service, with `alignd run` on the tiny preset."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alignd.data import load_comparisons

from test_tracking import history, read_mlflow, read_tensorboard

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _run(*args, env=None, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "alignd.cli", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_alignd_run_tiny_preset_meets_the_bar(tmp_path):
    """The tiny preset, as the README runs it: PPO beats SFT on the gold judge (95% lower bound above 50%) and
    the reward model's held-out accuracy is above 60% in every round."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, ALIGND_CACHE=str(tmp_path / "cache"))
    tracking = ("--set", "pipeline.tracking=[tensorboard,mlflow]")
    out = _run("--preset", "tiny", "--run-dir", str(run_dir), *tracking, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # Its output is a pipe here: progress comes as plain lines within 80 columns, never a carriage return.
    assert "\r" not in out.stdout
    progress = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert [p.split("] ", 1)[1].split()[:2] for p in progress if " done in " in p] == [
        [stage, "done"] for stage in ("sft", "rm", "ppo", "rm", "ppo", "evaluate", "report")
    ]
    assert all(len(line) <= 80 for line in progress)
    # Progress inside a job (GetJobProgress, polled): each line whole within the 80 columns, not cut mid-number.
    for line in progress:
        if " epoch " in line:
            m = re.search(r"(SFT|round \d: RM) epoch (\d+)/(\d+), step (\d+)/(\d+)$", line)
            assert m and int(m[2]) <= int(m[3]) and int(m[4]) <= int(m[5]), line
    state = json.loads((run_dir / "state.json").read_text())
    assert state["state"] == "succeeded" and state["step"] == 40
    pipeline = state["pipeline"]
    assert pipeline["done"] == ["sft", "rm", "ppo", "evaluate", "report"]
    assert (Path(pipeline["sft_dir"]) / "config.json").exists() and (Path(pipeline["rm_dir"]) / "config.json").exists()

    # Labeling round 0 (SFT samples) and one retraining round at step 20 (samples of the step-20 policy).
    rounds = pipeline["rm_rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and [r["step"] for r in rounds] == [0, 20]
    assert rounds[1]["reward_version"] == rounds[0]["reward_version"] + 1  # the reward service reloaded, version bumped
    for r in (0, 1):
        tasks = (run_dir / f"rm-round-{r}" / "tasks.jsonl").read_text().splitlines()
        labels = (run_dir / f"rm-round-{r}" / "labels.jsonl").read_text().splitlines()
        assert len(labels) == 2 * len(tasks) > 0  # two simulated labelers ranked every task
    # The round-1 RM trains on the comparisons of both rounds.
    comps0, _ = load_comparisons(run_dir / "rm-round-0" / "comparisons.jsonl")
    comps_all, _ = load_comparisons(run_dir / "rm-round-1" / "comparisons_all.jsonl")
    assert len(comps_all) == rounds[1]["comparisons"] > len(comps0) == rounds[0]["comparisons"]
    assert all(2 <= c.k <= 6 for c in comps_all)
    assert 0.6 <= pipeline["labeler_agreement"]["agreement"] <= 0.86

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert [r["policy_version"] for r in rows] == [pipeline["sft_version"] + i for i in range(1, 41)]

    # The bar: gold win rate's lower bound above 50%, RM accuracy above 60% in every round.
    report = json.loads((run_dir / "report.json").read_text())
    gold = report["win_rates"]["gold"]
    assert gold["n"] == 128 and gold["lower"] > 0.5, gold
    for r in report["rm_accuracy_per_round"]:
        assert r["accuracy"] > 0.6, report["rm_accuracy_per_round"]
    w = report["win_rates"]["second"]
    assert 0 <= w["lower"] <= w["rate"] <= w["upper"] <= 1
    # Alignment tax measured on the held-out text (PPO without ptx in this preset).
    tax = report["alignment_tax"]["without_ptx"]
    assert tax["absolute"] == pytest.approx(tax["after"] - tax["before"]) and tax["before"] > 0
    assert report["alignment_tax"]["with_ptx"] is None
    assert set(report["wall_seconds_per_stage"]) == {"sft", "rm", "ppo", "evaluate"}
    md = (run_dir / "report.md").read_text()
    assert "Win rate vs SFT (gold)" in md and "![" in md
    for png in ("reward_kl", "win_rates", "rm_accuracy", "phase_seconds"):
        assert (run_dir / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{png}.png" in md
    assert "win rate vs SFT (gold):" in out.stdout and "RM held-out accuracy: round 0" in out.stdout

    # Every step's metrics, each stage's results and the report's figures, in TensorBoard's and MLflow's own
    # readers (tests/test_tracking.py).
    tb = read_tensorboard(run_dir)
    assert tb["mean_score"] == [(r["step"], pytest.approx(r["mean_score"])) for r in rows]
    client, run_id = read_mlflow(run_dir)
    assert history(client, run_id, "reference_kl") == [(r["step"], pytest.approx(r["reference_kl"])) for r in rows]
    assert [v for _, v in history(client, run_id, "stage.rm.accuracy")] == pytest.approx([rounds[0]["accuracy"]])
    assert history(client, run_id, "report.win_rates.gold.rate") == [(40, pytest.approx(gold["rate"]))]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"report.json", "report.md", "reward_kl.png"}
    assert client.get_run(run_id).data.params["kind"] == "pipeline"

    # The same command again resumes the run from its directory: it is finished, so nothing runs again.
    again = _run("--preset", "tiny", "--run-dir", str(run_dir), *tracking, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "state.json").read_text())["pipeline"]["rm_rounds"] == rounds
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 40


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"prompt": "p"}', "completion"),
        ('{"prompt": "p", "completion": ""}', "empty"),
        ("not json", "JSON"),
    ],
)
def test_bad_demonstrations_refuse_the_run_with_file_and_line(tmp_path, line, problem):
    good = (ROOT / "configs" / "tiny_demos.jsonl").read_text().splitlines()
    demos = tmp_path / "demos.jsonl"
    demos.write_text("\n".join(good[:3] + [line] + good[3:]) + "\n")
    out = _run(
        "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--set", f"pipeline.demonstrations={demos}", timeout=120
    )
    assert out.returncode == 2
    assert f"{demos}:4:" in out.stderr and problem in out.stderr, out.stderr
    assert not (tmp_path / "run" / "stack.json").exists()  # refused before any role started
