"""`alignd demo`, the README's main job until the pipeline lands, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_calls_every_role_and_writes_summary(tmp_path):
    run_dir = tmp_path / "demo"
    env = dict(os.environ, ALIGND_CACHE=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-m", "alignd.cli", "demo", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((run_dir / "demo.json").read_text())
    assert len(summary["samples"]) == 6
    assert all(s["tokens"] >= 1 for s in summary["samples"])
    assert len({round(s["score"], 5) for s in summary["samples"]}) > 1
    # Policy == reference at version 0: identical log-probs; after the update they differ.
    assert abs(summary["mean_logratio_policy_reference"]) < 1e-5
    assert summary["mean_logratio_after_update"] > 1e-3
    assert summary["weight_update"]["version"] == 1 and summary["weight_update"]["bytes"] > 0
    assert set(summary["models"]) == {"policy", "reward", "reference", "learner"}
    assert (run_dir / "stack.json").exists() and (run_dir / "logs" / "policy.log").exists()
    assert "stack_ready" in (run_dir / "logs" / "launcher.log").read_text()
    assert "UpdateWeights: version 1" in out.stdout
