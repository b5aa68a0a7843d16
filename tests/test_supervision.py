"""Supervision of the local stack while a run goes on: `alignd ppo` on the tiny job, with kill -9 of the reward
role, of the coordinator, of the policy and of the learner mid-run. The launcher restarts each on its own ports,
the coordinator resumes the run from its durable state, the restarted policy is re-synced to the current weights
before its rollouts are used, the restarted learner resumes from its last checkpoint and the unfinished step is
replayed, and the run ends with exactly the configured steps, each applied once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from alignd.runtime.client import make_channel
from alignd.runtime.tokens import operator_credentials
from alignd.v1 import coordinator_pb2, coordinator_pb2_grpc

from conftest import dump_stack, stop_launcher
from helpers import tiny_ppo_argv, wait_until

pytestmark = pytest.mark.slow

STEPS = 16  # the last kill (step 11) leaves several steps: a kill while the stack stops is not restarted
WAIT_S = 300.0


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
        with make_channel(
            stack["services"]["coordinator"]["address"], credentials=operator_credentials(stack["auth"]["tokens_file"])
        ) as ch:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            return stub.GetRun(coordinator_pb2.GetRunRequest(run_id="ppo"), timeout=10).run.step
    except Exception:  # noqa: BLE001 - the run may not exist yet, or the coordinator is restarting
        return -1


def test_ppo_run_survives_kill9_of_reward_coordinator_policy_and_learner(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, ALIGND_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        tiny_ppo_argv(run_dir, f"run.steps={STEPS}", "stack.restart.backoff_initial_seconds=0.2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        killed = {}
        for role, at_step in (("reward", 3), ("coordinator", 6), ("policy", 9), ("learner", 11)):
            wait_until(f"step {at_step}", lambda: _step(run_dir) >= at_step or proc.poll() is not None, WAIT_S)
            assert proc.poll() is None, f"the run ended before the kill of {role}"
            pid = _stack(run_dir)["services"][role]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed[role] = pid
            wait_until(
                f"{role} restarted",
                lambda: (
                    proc.poll() is not None
                    or (_stack(run_dir) or {}).get("services", {}).get(role, {}).get("restarts", 0) >= 1
                ),
                WAIT_S,
            )
        out, _ = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, out[-3000:]
        stack = _stack(run_dir)
        for role, pid in killed.items():
            svc = stack["services"][role]
            assert svc["pid"] != pid and svc["restarts"] == 1 and svc["last_exit_code"] == -signal.SIGKILL
            assert f"alignd: {role} exited with code -9; restarted on {svc['address']} (restart 1)" in out
        assert stack["services"]["reference"]["restarts"] == 0
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # the configured steps, each once
        learner_log = (run_dir / "logs" / "learner.log").read_text()
        events = [json.loads(x) for x in learner_log.splitlines() if x.startswith("{")]
        applied = [e["step"] for e in events if e["event"] == "step_applied"]
        assert len(applied) == len(set(applied)), applied  # no step applied twice
        # The restarted learner restored its last checkpoint (written before each step's answer) and applied
        # exactly the steps after it; a step checkpointed just before the kill is restored, not applied again.
        restored = [e["step"] for e in events if e["event"] == "checkpoint_restored"]
        # Killed once the run reported step 11, whose answer came after its checkpoint: restored from 11 or later.
        assert len(restored) == 1 and 11 <= restored[0] <= STEPS, restored
        after = [
            e["step"]
            for e in events[[e["event"] for e in events].index("checkpoint_restored") :]
            if e["event"] == "step_applied"
        ]
        assert after == list(range(restored[0] + 1, STEPS + 1)), after
        assert set(applied) | set(restored) == set(range(1, STEPS + 1))
        coordinator_log = (run_dir / "logs" / "coordinator.log").read_text()
        assert '"event": "run_resuming"' in coordinator_log
        # The restarted policy came back at its configured weights. Whether the kill landed before the step's
        # weight push (which then waits for the replica: role_unavailable on PushWeights) or after it (the next
        # rollouts are stale: role_resync), no step used rollouts of older weights than the previous step pushed.
        assert '"event": "role_resync"' in coordinator_log or '"call": "PushWeights"' in coordinator_log
        for prev, row in zip(rows, rows[1:]):
            assert row["rollout_policy_version"] == prev["policy_version"], (prev, row)
    except BaseException:
        dump_stack(run_dir)
        raise
    finally:
        stop_launcher(proc)
