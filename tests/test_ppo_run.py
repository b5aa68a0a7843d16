"""PPO runs through every real service: the tiny preset learns, and runs
survive kill -9 of the coordinator or of the learner."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alignd.v1 import coordinator_pb2, coordinator_pb2_grpc
from conftest import start_role, stop_role

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
RUN_WAIT_S = 600


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_alignd_ppo_tiny_preset_raises_reward(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, ALIGND_CACHE=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-m", "alignd.cli", "ppo", "--config", str(ROOT / "configs" / "tiny.yaml"),
         "--run-dir", str(run_dir), "--set", "run.steps=20"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    for r in rows:
        assert {"step", "mean_score", "approx_kl", "kl_coef", "policy_version"} <= set(r)
        assert set(r["phase_seconds"]) == {"generate", "score", "reference", "train", "sync_weights"}
        assert math.isfinite(r["reference_kl"]) and math.isfinite(r["approx_kl"])
        assert r["policy_version"] == r["step"]
    assert abs(rows[0]["reference_kl"]) < 1e-5  # step 1: policy == reference
    first, last = statistics.fmean(r["mean_score"] for r in rows[:5]), statistics.fmean(r["mean_score"] for r in rows[-5:])
    assert last > first + 0.02, (first, last)
    assert "succeeded: 20 steps" in out.stdout


def _stack(tiny_models, work: Path, steps_dir: Path):
    """policy, reward (token-set function), reference, learner as separate processes."""
    lm, rm = str(tiny_models["lm"]), str(tiny_models["reward"])
    servers = {
        "policy": start_role("policy", {"model": {"path": lm}, "torch_threads": 1}, work / "policy"),
        "reference": start_role("reference", {"model": {"path": lm}, "torch_threads": 1}, work / "reference"),
        "reward": start_role(
            "reward",
            {"model": {"path": lm}, "torch_threads": 1,
             "function": {"name": "token_fraction", "args": {"token_ids": list(range(35, 67))}}},
            work / "reward",
        ),
    }
    learner_cfg = {
        "model": {"path": lm}, "value_head_on_policy": True, "torch_threads": 1,
        "ppo": {"minibatches": 2}, "optimizer": {"lr": 1e-3, "warmup_steps": 0},
        "checkpoint_dir": str(steps_dir), "policy_addresses": [servers["policy"].address],
    }
    servers["learner"] = start_role("learner", learner_cfg, work / "learner")
    coord_cfg = {
        "policy_addresses": [servers["policy"].address], "reward_addresses": [servers["reward"].address],
        "reference_addresses": [servers["reference"].address], "learner_address": servers["learner"].address,
        "runs_dir": str(work / "runs"), "recovery_timeout_seconds": 300,
    }
    return servers, learner_cfg, coord_cfg


def _run_config(steps: int) -> str:
    return yaml.safe_dump({
        "steps": steps, "prompts_per_step": 8, "prompts": {"path": str(ROOT / "configs" / "tiny_prompts.txt")},
        "sampling": {"max_new_tokens": 8, "ignore_eos": True}, "seed": 1,
    })


def _wait_run(channel, run_id: str, until) -> coordinator_pb2.Run:
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    deadline = time.monotonic() + RUN_WAIT_S
    while time.monotonic() < deadline:
        run = stub.GetRun(coordinator_pb2.GetRunRequest(run_id=run_id), timeout=30).run
        if until(run):
            return run
        time.sleep(0.2)  # polling the run's state (a condition), not synchronising on time
    raise TimeoutError(f"run {run_id} did not reach the condition")


def _applied_steps(log: str) -> list[int]:
    return [json.loads(line)["step"] for line in log.splitlines() if '"event": "step_applied"' in line]


def test_coordinator_kill9_resumes_without_applying_a_step_twice(tiny_models, tmp_path):
    servers, _, coord_cfg = _stack(tiny_models, tmp_path, tmp_path / "ckpt")
    coord = start_role("coordinator", coord_cfg, tmp_path / "coordinator")
    try:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(coord.channel)
        stub.StartRun(coordinator_pb2.StartRunRequest(run_id="r1", config_yaml=_run_config(8)), timeout=60)
        _wait_run(coord.channel, "r1", lambda r: r.step >= 3)
        coord.proc.send_signal(signal.SIGKILL)
        coord.proc.wait()
        coord.channel.close()
        coord = start_role("coordinator", coord_cfg, tmp_path / "coordinator2")  # same runs_dir: resumes r1
        run = _wait_run(coord.channel, "r1", lambda r: r.state != coordinator_pb2.RUN_STATE_RUNNING)
        assert run.state == coordinator_pb2.RUN_STATE_SUCCEEDED, run.error
        assert run.step == 8
        rows = read_metrics(tmp_path / "runs" / "r1" / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, 9))
        applied = _applied_steps(servers["learner"].log())
        assert sorted(applied) == list(range(1, 9)), applied  # every step trained exactly once
        assert '"event": "run_resuming"' in coord.log()
    finally:
        stop_role(coord)
        for s in servers.values():
            stop_role(s)


def test_learner_kill9_restarts_from_checkpoint_and_step_is_replayed(tiny_models, tmp_path):
    servers, learner_cfg, coord_cfg = _stack(tiny_models, tmp_path, tmp_path / "ckpt")
    coord = start_role("coordinator", coord_cfg, tmp_path / "coordinator")
    try:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(coord.channel)
        stub.StartRun(coordinator_pb2.StartRunRequest(run_id="r2", config_yaml=_run_config(8)), timeout=60)
        _wait_run(coord.channel, "r2", lambda r: r.step >= 3)
        learner = servers["learner"]
        learner.proc.send_signal(signal.SIGKILL)
        learner.proc.wait()
        learner.channel.close()
        port = int(learner.address.rsplit(":", 1)[1])
        servers["learner"] = start_role("learner", {**learner_cfg, "server": {"port": port}}, tmp_path / "learner2")
        run = _wait_run(coord.channel, "r2", lambda r: r.state != coordinator_pb2.RUN_STATE_RUNNING)
        assert run.state == coordinator_pb2.RUN_STATE_SUCCEEDED, run.error
        rows = read_metrics(tmp_path / "runs" / "r2" / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, 9))
        log2 = servers["learner"].log()
        assert '"event": "checkpoint_restored"' in log2
        restored = [json.loads(x)["step"] for x in log2.splitlines() if '"event": "checkpoint_restored"' in x][0]
        # After the restart the learner applied exactly the steps after its checkpoint.
        assert _applied_steps(log2) == list(range(restored + 1, 9))
        assert '"event": "role_unavailable"' in coord.log()
    finally:
        stop_role(coord)
        for s in servers.values():
            stop_role(s)
