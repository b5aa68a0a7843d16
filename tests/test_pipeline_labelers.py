"""External labelers through the coordinator's RPCs, and a coordinator killed
with SIGKILL during the `rm` stage: the restarted coordinator resumes the run in
that stage and no accepted ranking is lost. Real roles on loopback (LocalStack),
the tiny pipeline preset with external labelers."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import grpc
import pytest

from alignd import judges, labelers
from alignd.config import dump_yaml
from alignd.local_stack import LocalStack
from alignd.ppo_cli import data_dirs, load_pipeline_job
from alignd.runtime.client import make_channel
from alignd.v1 import coordinator_pb2 as cpb
from alignd.v1 import coordinator_pb2_grpc

from helpers import wait_until

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
RUN_ID = "ext"
WAIT_S = 300.0


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def _lease(stub, labeler: str, n: int = 100):
    try:
        return stub.LeaseComparisonTasks(
            cpb.LeaseComparisonTasksRequest(run_id=RUN_ID, labeler=labeler, max_tasks=n), timeout=30
        )
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.FAILED_PRECONDITION:  # the round is not open yet
            run = stub.GetRun(cpb.GetRunRequest(run_id=RUN_ID), timeout=30).run
            assert run.state in (cpb.RUN_STATE_PENDING, cpb.RUN_STATE_RUNNING), run.error
            return None
        raise


def _ended(stub, run_id: str):
    """The run once it is no longer pending or running."""
    return wait_until(
        f"run {run_id} to end",
        lambda: (
            (r := stub.GetRun(cpb.GetRunRequest(run_id=run_id)).run).state
            not in (cpb.RUN_STATE_PENDING, cpb.RUN_STATE_RUNNING)
            and r
        ),
        WAIT_S,
        poll=0.1,
    )


def test_external_labelers_and_coordinator_sigkill_in_rm_stage(tmp_path):
    # One malformed demonstration, skipped by pipeline.skip_bad_lines and counted in the report.
    demos = tmp_path / "demos.jsonl"
    good = (ROOT / "configs" / "tiny_demos.jsonl").read_text().splitlines()
    demos.write_text("\n".join(good[:5] + ['{"prompt": "no completion"}'] + good[5:]) + "\n")
    job = load_pipeline_job(
        str(ROOT / "configs" / "tiny_pipeline.yaml"),
        [
            f"pipeline.demonstrations={demos}",
            "pipeline.skip_bad_lines=true",
            "pipeline.rm_job=launcher",  # the RM trains in its own process (`alignd job train-rm`), not in the learner
            "pipeline.labeling.labelers=external",
            "pipeline.labeling.prompts_per_round=12",
            "pipeline.labeling.k=4",
            "pipeline.rm_retrain.every_steps=0",
            "pipeline.ppo.steps=2",
            "pipeline.ppo.prompts_per_step=8",
            "pipeline.evaluation.max_prompts=8",
        ],
    )
    run_dir = tmp_path / "runs-elsewhere" / RUN_ID  # outside the coordinator's RUNS_DIR: found again through its link
    gold = judges.resolve("char_fraction", {"chars": "aeiou"})
    human = labelers.SimulatedLabeler(gold, 0.05, seed=7, name="alice")
    with LocalStack(job.stack, tmp_path / "stack", data_dirs=data_dirs(job, pipeline=True)) as stack:
        ch = make_channel(
            stack.describe()["services"]["coordinator"]["address"], credentials=stack.operator_credentials()
        )
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        # No such run; then the run, before its round is open.
        code, msg = _code(
            lambda: stub.LeaseComparisonTasks(cpb.LeaseComparisonTasksRequest(run_id="nope", labeler="alice"))
        )
        assert code == grpc.StatusCode.NOT_FOUND
        stub.StartRun(
            cpb.StartRunRequest(run_id=RUN_ID, config_yaml=dump_yaml(job.pipeline), run_dir=str(run_dir)), timeout=60
        )

        first = wait_until("the rm stage's labeling round", lambda: _lease(stub, "alice"), WAIT_S, poll=0.1)
        tasks = list(first.tasks)
        assert first.progress.round == 0 and first.progress.tasks == len(tasks) >= 6 and first.progress.labelled == 0
        assert stub.GetRun(cpb.GetRunRequest(run_id=RUN_ID)).run.stage == "rm"
        # GetRun shows what the stage waits for (the CLI's progress bar).
        run = wait_until(
            "the labeling progress",
            lambda: (
                (r := stub.GetRun(cpb.GetRunRequest(run_id=RUN_ID)).run).stage_detail.endswith("external labelers")
                and r
            ),
            WAIT_S,
            poll=0.1,
        )
        assert f"0/{len(tasks)} tasks ranked" in run.stage_detail and 0.2 <= run.stage_fraction < 0.6
        # A second labeler gets none of alice's leased tasks.
        assert _lease(stub, "bob").tasks == []

        # Bad requests name their field.
        t0 = tasks[0]
        for req, want, field in [
            (
                cpb.SubmitRankingRequest(run_id=RUN_ID, task_id=t0.task_id, ranking=list(range(len(t0.completions)))),
                grpc.StatusCode.INVALID_ARGUMENT,
                "labeler",
            ),
            (
                cpb.SubmitRankingRequest(
                    run_id=RUN_ID, task_id=t0.task_id, labeler="alice", ranking=[0, 0, 1, 2][: len(t0.completions)]
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "ranking",
            ),
            (
                cpb.SubmitRankingRequest(run_id=RUN_ID, task_id="no-such-task", labeler="alice", ranking=[0, 1]),
                grpc.StatusCode.NOT_FOUND,
                "task_id",
            ),
        ]:
            code, msg = _code(lambda: stub.SubmitRanking(req, timeout=30))
            assert code == want and field in msg, (code, msg)
        code, msg = _code(
            lambda: stub.LeaseComparisonTasks(
                cpb.LeaseComparisonTasksRequest(run_id=RUN_ID, labeler="alice", max_tasks=5000)
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_tasks" in msg

        # alice ranks half the tasks; each ranking is accepted (durable) when the call returns.
        accepted = {}
        half = tasks[: len(tasks) // 2]
        for t in half:
            ranking = human.rank(t.prompt, list(t.completions))
            resp = stub.SubmitRanking(
                cpb.SubmitRankingRequest(run_id=RUN_ID, task_id=t.task_id, labeler="alice", ranking=ranking), timeout=30
            )
            accepted[t.task_id] = list(ranking)
        assert resp.progress.labelled == len(half) and resp.progress.rankings == len(half)

        # kill -9 the coordinator in the middle of the rm stage.
        coord = stack.children["coordinator"]
        os.kill(coord.proc.pid, signal.SIGKILL)
        coord.exited.wait(30)
        assert coord.proc.returncode == -signal.SIGKILL
        ch.close()
        labels = [json.loads(x) for x in (run_dir / "rm-round-0" / "labels.jsonl").read_text().splitlines()]
        assert {x["task_id"]: x["ranking"] for x in labels} == accepted

        # A new coordinator resumes the run in the rm stage, with every accepted ranking.
        stack.restart("coordinator")
        ch = make_channel(
            stack.describe()["services"]["coordinator"]["address"], credentials=stack.operator_credentials()
        )
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        again = wait_until("the resumed labeling round", lambda: _lease(stub, "alice"), WAIT_S, poll=0.1)
        run = stub.GetRun(cpb.GetRunRequest(run_id=RUN_ID)).run
        assert run.stage == "rm" and run.state == cpb.RUN_STATE_RUNNING
        assert again.progress.labelled == len(half) and again.progress.rankings == len(half)
        assert {t.task_id for t in again.tasks} == {t.task_id for t in tasks} - set(accepted)
        # A retried submit of an accepted ranking is a no-op; a different ranking for it is refused.
        t = half[0]
        stub.SubmitRanking(
            cpb.SubmitRankingRequest(run_id=RUN_ID, task_id=t.task_id, labeler="alice", ranking=accepted[t.task_id]),
            timeout=30,
        )
        other = list(reversed(accepted[t.task_id]))
        code, msg = _code(
            lambda: stub.SubmitRanking(
                cpb.SubmitRankingRequest(run_id=RUN_ID, task_id=t.task_id, labeler="alice", ranking=other), timeout=30
            )
        )
        assert code == grpc.StatusCode.ALREADY_EXISTS and "ranking" in msg
        for t in again.tasks:
            ranking = human.rank(t.prompt, list(t.completions))
            stub.SubmitRanking(
                cpb.SubmitRankingRequest(run_id=RUN_ID, task_id=t.task_id, labeler="alice", ranking=ranking), timeout=30
            )
            accepted[t.task_id] = list(ranking)

        run = _ended(stub, RUN_ID)
        assert run.state == cpb.RUN_STATE_SUCCEEDED, run.error
        assert run.step == 2
        # After the round: no labeling round is open.
        code, msg = _code(
            lambda: stub.LeaseComparisonTasks(cpb.LeaseComparisonTasksRequest(run_id=RUN_ID, labeler="alice"))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        ch.close()

    # Every accepted ranking, once each, went into the RM's training data.
    comps = [json.loads(x) for x in (run_dir / "rm-round-0" / "comparisons.jsonl").read_text().splitlines()]
    assert sorted((c["task_id"], tuple(c["ranking"])) for c in comps) == sorted(
        (k, tuple(v)) for k, v in accepted.items()
    )
    state = json.loads((run_dir / "state.json").read_text())
    assert state["pipeline"]["done"] == ["sft", "rm", "ppo", "evaluate", "report"]
    assert state["pipeline"]["rm_rounds"][0]["comparisons"] == len(accepted)
    # The RM job ran through the launcher: its request and log are in the run directory, its model was served.
    assert (run_dir / "jobs" / "rm-ext-rm-0.request.json").exists() and (run_dir / "jobs" / "rm-ext-rm-0.log").exists()
    assert (Path(state["pipeline"]["rm_dir"]) / "alignd_job.json").exists()
    meta = json.loads((run_dir / "report.json").read_text())["meta"]
    assert meta["labelers"] == "external"
    assert meta["skipped_data_lines"] == {"demonstrations": 1, "prompts": 0, "evaluation_prompts": 0}
    assert state["pipeline"]["data"]["demonstrations"]["problems"][0].startswith(f"{demos}:6:")


def test_stop_run_stops_a_pipeline_in_its_rm_and_ppo_stages_and_it_resumes(tmp_path):
    """StopRun ends a pipeline run *stopped*, as it does a plain PPO run (it was recorded *failed*), whether it waits
    for external labelers or runs PPO steps; StartRun of the same run then goes on where it stopped."""
    base = [
        "pipeline.rm_retrain.every_steps=0",
        "pipeline.labeling.prompts_per_round=12",
        "pipeline.labeling.k=4",
        "pipeline.evaluation.max_prompts=8",
    ]
    ext = load_pipeline_job(
        str(ROOT / "configs" / "tiny_pipeline.yaml"), [*base, "pipeline.labeling.labelers=external"]
    )
    ppo = load_pipeline_job(str(ROOT / "configs" / "tiny_pipeline.yaml"), [*base, "pipeline.ppo.steps=400"])
    runs = tmp_path / "runs"
    runs.mkdir()
    with LocalStack(ppo.stack, tmp_path / "stack", data_dirs=[*data_dirs(ppo, pipeline=True), str(runs)]) as stack:
        ch = make_channel(
            stack.describe()["services"]["coordinator"]["address"], credentials=stack.operator_credentials()
        )
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)

        # Waiting for external labelers in the rm stage.
        stub.StartRun(
            cpb.StartRunRequest(run_id="stop-rm", config_yaml=dump_yaml(ext.pipeline), run_dir=str(runs / "stop-rm")),
            timeout=60,
        )
        wait_until("the labeling round to open", lambda: _lease_of(stub, "stop-rm"), WAIT_S, poll=0.1)
        stub.StopRun(cpb.StopRunRequest(run_id="stop-rm"), timeout=30)
        run = _ended(stub, "stop-rm")
        assert (run.state, run.stage, run.error) == (cpb.RUN_STATE_STOPPED, "rm", ""), (run.state, run.stage, run.error)
        assert json.loads((runs / "stop-rm" / "state.json").read_text())["state"] == "stopped"

        # In the ppo stage, twice: the second StartRun resumes from the step the first stop left.
        req = cpb.StartRunRequest(
            run_id="stop-ppo", config_yaml=dump_yaml(ppo.pipeline), run_dir=str(runs / "stop-ppo")
        )
        steps = []
        for _ in range(2):
            stub.StartRun(req, timeout=60)
            after = steps[-1] if steps else 0
            wait_until(
                "a ppo step",
                lambda: (r := stub.GetRun(cpb.GetRunRequest(run_id="stop-ppo")).run).stage == "ppo" and r.step > after,
                WAIT_S,
                poll=0.1,
            )
            stub.StopRun(cpb.StopRunRequest(run_id="stop-ppo"), timeout=30)
            run = _ended(stub, "stop-ppo")
            assert (run.state, run.stage, run.error) == (cpb.RUN_STATE_STOPPED, "ppo", ""), (
                run.state,
                run.stage,
                run.error,
            )
            assert after < run.step < 400
            steps.append(run.step)
        state = json.loads((runs / "stop-ppo" / "state.json").read_text())
        assert state["state"] == "stopped" and state["pipeline"]["done"] == ["sft", "rm"]
        rows = [json.loads(x) for x in (runs / "stop-ppo" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, steps[-1] + 1))  # resumed, not restarted: each step once
        ch.close()


def _lease_of(stub, run_id: str):
    try:
        return stub.LeaseComparisonTasks(
            cpb.LeaseComparisonTasksRequest(run_id=run_id, labeler="alice", max_tasks=1), timeout=30
        ).tasks
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.FAILED_PRECONDITION:  # not open yet
            return None
        raise
