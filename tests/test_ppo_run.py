"""A PPO run through every real service: the tiny preset learns, and a second run of the same seed gives
the same metrics. (kill -9 of each role mid-run: tests/test_supervision.py and tests/test_chaos.py.)"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
from pathlib import Path

import pytest

from helpers import tiny_ppo_argv

pytestmark = pytest.mark.slow


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tiny_ppo(run_dir: Path, env: dict, *overrides: str) -> subprocess.CompletedProcess:
    """`alignd ppo` of the tiny job into run_dir, run to its end: it must succeed."""
    out = subprocess.run(tiny_ppo_argv(run_dir, *overrides), capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_alignd_ppo_tiny_preset_raises_reward(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, ALIGND_CACHE=str(tmp_path / "cache"))
    out = tiny_ppo(run_dir, env, "run.steps=20")
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    for r in rows:
        assert {"step", "mean_score", "approx_kl", "kl_coef", "policy_version"} <= set(r)
        assert set(r["phase_seconds"]) == {"generate", "score", "reference", "rollout", "train", "sync_weights"}
        assert math.isfinite(r["reference_kl"]) and math.isfinite(r["approx_kl"])
        assert r["policy_version"] == r["step"]
    assert abs(rows[0]["reference_kl"]) < 1e-5  # step 1: policy == reference
    assert all(r["old_logprobs_from_rollout"] for r in rows)  # fp32, temperature 1: the rollouts' are exact
    first, last = (
        statistics.fmean(r["mean_score"] for r in rows[:5]),
        statistics.fmean(r["mean_score"] for r in rows[-5:]),
    )
    assert last > first + 0.02, (first, last)
    assert "succeeded: 20 steps" in out.stdout

    # Determinism (issue 7): the same preset and seed, run again for 3 steps, gives exactly the same metrics
    # (every field but the timings): same prompts, same samples, same scores, same updates.
    tiny_ppo(tmp_path / "again", env, "run.steps=3")
    timing = {"time", "phase_seconds", "tokens_per_second", "iteration_seconds"}
    rows2 = read_metrics(tmp_path / "again" / "metrics.jsonl")
    assert len(rows2) == 3
    for a, b in zip(rows, rows2):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}


def test_async_rollouts_tiny_preset(tmp_path):
    """run.async_rollouts: the next step's rollouts are made while the learner trains, one version old (exactly:
    recorded per step: the staleness is planned, not raced, so runs are reproducible), their PPO ratio taken against
    the sampling policy's log-probs. (That async learns as well as on-policy: bench/async_tiny.py, which runs the
    whole tiny pipeline both ways.)"""
    env = dict(os.environ, ALIGND_CACHE=str(tmp_path / "cache"))

    def run(name: str, steps: int) -> list[dict]:
        tiny_ppo(
            tmp_path / name,
            env,
            f"run.steps={steps}",
            "run.async_rollouts=true",
            # Generation slower than a training step (as on GPUs): each push is staged while the policy generates.
            "stack.policy.server.fault_injection.delay_seconds=1.5",
            "stack.policy.server.fault_injection.methods=[Generate]",
        )
        return read_metrics(tmp_path / name / "metrics.jsonl")

    rows = run("async", 8)
    assert [r["step"] for r in rows] == list(range(1, 9))
    # Steps 1 and 2 are sampled by the initial weights; from then on step s by the weights of step s - 2.
    assert [r["staleness"] for r in rows] == [0] + [1] * 7
    assert [r["rollout_policy_version"] for r in rows] == [0, 0] + list(range(1, 7))
    for r in rows:
        assert r["policy_version"] == r["step"]
        phases = {
            "generate",
            "score",
            "reference",
            "rollout",
            "wait_rollout",
            "train",
            "wait_generation",
            "sync_weights",
        }
        assert phases <= set(r["phase_seconds"]) <= phases | {"stage_weights"}
        # A staged push only commits on the replica (nothing sent twice); an unstaged one commits nothing.
        assert r["weights_committed_replicas"] == (1 if "stage_weights" in r["phase_seconds"] else 0)
        assert r["stale_fraction"] == (1.0 if r["staleness"] else 0.0)
        # Stale samples keep the rollouts' log-probs as the old ones (ppo.off_policy: behaviour); current ones too,
        # being exact (untruncated sampling at the learner's temperature and dtype).
        assert r["old_logprobs_from_rollout"] is True
    assert abs(rows[0]["reference_kl"]) < 1e-5
    assert len({r["mean_score"] for r in rows}) > 1 and all(math.isfinite(r["policy_loss"]) for r in rows)
    # run.stage_weights: with the next generation still running when a step's training ends (a 1.5 s delay against
    # training steps of a fraction of a second), the weights are staged; the last step has no next generation.
    staged = ["stage_weights" in r["phase_seconds"] for r in rows]
    assert sum(staged[:-1]) >= 5 and not staged[-1], staged


def test_alignd_ppo_tiny_preset_raises_reward_on_vllm(tmp_path):
    """The same job with the policy on vLLM (stack.policy.engine=vllm): the mean reward rises as on the
    transformers engine and step 1's policy is the reference. On CPU in float32, vLLM's log-probs are within the
    tolerance of the learner's (bench/results/vllm_logprobs.json), so they serve as the old log-probs as the
    transformers engine's do (on GPUs the learner recomputes them; docs/vllm.md)."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, ALIGND_CACHE=str(tmp_path / "cache"))
    out = tiny_ppo(run_dir, env, "run.steps=20", "stack.policy.engine=vllm")
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert abs(rows[0]["reference_kl"]) < 1e-5
    assert all(r["policy_version"] == r["step"] for r in rows)
    first, last = (
        statistics.fmean(r["mean_score"] for r in rows[:5]),
        statistics.fmean(r["mean_score"] for r in rows[-5:]),
    )
    assert last > first + 0.02, (first, last)
    assert "succeeded: 20 steps" in out.stdout
    assert all(r["old_logprobs_from_rollout"] for r in rows)

    # The same job with the learner broadcasting the weights over a gloo group (learner.weight_sync: collective)
    # instead of through shared memory: the same weights arrive, so every step's metrics are the same.
    again = tmp_path / "collective"
    tiny_ppo(again, env, "run.steps=3", "stack.policy.engine=vllm", "stack.learner.weight_sync=collective")
    skip = {"time", "phase_seconds", "tokens_per_second", "iteration_seconds", "weight_sync_bytes"}
    rows2 = read_metrics(again / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k not in skip} for r in rows2] == [
        {k: v for k, v in r.items() if k not in skip} for r in rows[:3]
    ]
    assert all(r["weight_sync_bytes"] > 0 for r in rows2)  # sent over the group, not through /dev/shm
    learner_log = "".join(p.read_text() for p in (again / "logs").glob("learner*.log"))
    assert learner_log.count('"event": "weight_group_formed"') == 1 and "weight_sync_fallback" not in learner_log
