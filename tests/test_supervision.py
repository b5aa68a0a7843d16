"""Supervision of the local stack while a run goes on: `alignd ppo` on the tiny job, with kill -9 of the reward
role, of the coordinator and of the policy mid-run. The launcher restarts each on its own ports, the coordinator
resumes the run from its durable state, the restarted policy is re-synced to the current weights before its
rollouts are used, and the run ends with exactly the configured steps, each applied once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignd.runtime.client import make_channel
from alignd.v1 import coordinator_pb2, coordinator_pb2_grpc
from conftest import stop_launcher

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
WAIT_S = 300.0


def _until(what: str, fn, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)  # polling a condition (a file, the run's state), not synchronising on time
    raise TimeoutError(what)


def _stack(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "stack.json").read_text())
    except (OSError, ValueError):
        return None


def _step(run_dir: Path) -> int:
    stack = _stack(run_dir)
    if stack is None:
        return -1
    try:
        with make_channel(stack["services"]["coordinator"]["address"]) as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            return stub.GetRun(coordinator_pb2.GetRunRequest(run_id="ppo"), timeout=10).run.step
    except Exception:  # noqa: BLE001 - the run may not exist yet, or the coordinator is restarting
        return -1


def test_ppo_run_survives_kill9_of_reward_coordinator_and_policy(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, ALIGND_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignd.cli", "ppo", "--config", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(run_dir),
         "--set", f"run.steps={STEPS}", "--set", "stack.restart.backoff_initial_seconds=0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        killed = {}
        for role, at_step in (("reward", 3), ("coordinator", 6), ("policy", 9)):
            _until(f"step {at_step}", lambda: _step(run_dir) >= at_step)
            pid = _stack(run_dir)["services"][role]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed[role] = pid
            _until(f"{role} restarted", lambda: (_stack(run_dir) or {}).get("services", {}).get(role, {}).get("restarts") == 1)
        out, _ = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, out[-3000:]
        stack = _stack(run_dir)
        for role, pid in killed.items():
            svc = stack["services"][role]
            assert svc["pid"] != pid and svc["restarts"] == 1 and svc["last_exit_code"] == -signal.SIGKILL
            assert f"alignd: {role} exited with code -9; restarted on {svc['address']} (restart 1)" in out
        assert all(stack["services"][r]["restarts"] == 0 for r in ("reference", "learner"))
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # the configured steps, each once
        learner_log = (run_dir / "logs" / "learner.log").read_text()
        applied = [json.loads(x)["step"] for x in learner_log.splitlines() if '"event": "step_applied"' in x]
        assert sorted(applied) == list(range(1, STEPS + 1)), applied  # no step applied twice
        coordinator_log = (run_dir / "logs" / "coordinator.log").read_text()
        assert '"event": "run_resuming"' in coordinator_log
        # The restarted policy came back at its configured weights. Whether the kill landed before the step's
        # weight push (which then waits for the replica: role_unavailable on PushWeights) or after it (the next
        # rollouts are stale: policy_resync), no step used rollouts of older weights than the previous step pushed.
        assert '"event": "policy_resync"' in coordinator_log or '"call": "PushWeights"' in coordinator_log
        for prev, row in zip(rows, rows[1:]):
            assert row["rollout_policy_version"] == prev["policy_version"], (prev, row)
    finally:
        stop_launcher(proc)
