"""`alignd ppo --config FILE` (`run_ppo`) and `alignd run` (`run_pipeline`): a run on the local stack, with a
progress line.

Starts the stack of the job file, sends its `run:` (PPO) or `pipeline:` section to the
coordinator (StartRun), follows the run until it ends, prints a summary and
stops the stack. The run's state.json and metrics.jsonl are written in the
run directory; the roles' logs under RUN_DIR/logs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import grpc

from alignd.config import PPOJobConfig, dump_yaml, load_config
from alignd.local_stack import ChildDied, LocalStack, report_death, report_restart
from alignd.progress import RunProgress
from alignd.runs_client import TERMINAL
from alignd.runtime.client import make_channel
from alignd.v1 import coordinator_pb2, coordinator_pb2_grpc

COORDINATOR_RESTART_GRACE_S = 120.0  # GetRun may find the coordinator down this long while it restarts
POLL_SECONDS = 0.5


def load_job(config: str, overrides: list[str] | None, *, resolve_prefixes: bool = True) -> PPOJobConfig:
    """A PPO job file with its prompts path resolved as load_pipeline_job resolves a pipeline's."""
    from alignd.datapaths import resolve_run_paths

    job = load_config(PPOJobConfig, config, overrides)
    resolve_run_paths(job.run, base=Path(config).resolve().parent, prefixes=resolve_prefixes)
    return job


def load_pipeline_job(config: str, overrides: list[str] | None, *, resolve_prefixes: bool = True):
    """A pipeline job file with its data paths resolved: relative ones against the file's directory, and
    `preset:`/`cache:` ones on this machine unless resolve_prefixes=False (`alignd runs start` leaves those to the
    coordinator that reads the files: alignd.datapaths)."""
    from alignd.config import PipelineJobConfig
    from alignd.datapaths import resolve_run_paths

    job = load_config(PipelineJobConfig, config, overrides)
    resolve_run_paths(job.pipeline, base=Path(config).resolve().parent, prefixes=resolve_prefixes)
    return job


def data_dirs(job, pipeline: bool) -> list[str]:
    """The directories of the files a job reads (roots of the stack's roles: alignd.runtime.paths)."""
    if pipeline:
        pl = job.pipeline
        files = [pl.demonstrations, pl.ppo.prompts.path, pl.evaluation.prompts.path, pl.evaluation.heldout_text]
    else:
        files = [job.run.prompts.path]
    return sorted({str(Path(f).resolve().parent) for f in files if f})


def run_ppo(config: str, overrides: list[str] | None, run_dir: Path) -> int:
    """`alignd ppo`: the PPO run of a job file (stack + run) on its local stack; the exit status."""
    job = load_job(config, overrides)
    return _run_on_stack(job, run_yaml=dump_yaml(job.run), run_dir=run_dir, pipeline=False)


def run_pipeline(config: str, overrides: list[str] | None, run_dir: Path) -> int:
    """`alignd run`: the whole pipeline of a job file (stack + pipeline) on its local stack; the exit status.

    Bad data refuses the run (exit 2) before any role starts; the same --run-dir resumes a run."""
    job = load_pipeline_job(config, overrides)
    run_yaml = dump_yaml(job.pipeline)
    if not _pipeline_data_ok(job):
        return 2
    return _run_on_stack(job, run_yaml=run_yaml, run_dir=run_dir, pipeline=True)


def _pipeline_data_ok(job) -> bool:
    """Checks the pipeline's data files: False (the error on stderr) when one is bad; prints the skipped lines."""
    from alignd.data import DataError, check_pipeline_data

    try:
        reports, _ = check_pipeline_data(job.pipeline)
    except DataError as err:
        print(
            f"alignd: bad data, the run does not start: {err}\n"
            "  (fix the line, or set pipeline.skip_bad_lines=true to skip bad lines, counted in the report)",
            file=sys.stderr,
        )
        return False
    for name, r in reports.items():
        if r["skipped"]:
            print(f"{name}: skipped {r['skipped']} bad line(s) of {r['path']}, first: {r['problems'][0]}", flush=True)
    return True


def _run_on_stack(job, *, run_yaml: str, run_dir: Path, pipeline: bool) -> int:
    """Starts the job's stack, runs `run_yaml` on its coordinator until the run ends, stops the stack, prints the
    summary; 1 when a role died for good or the run did not succeed."""
    started = time.monotonic()
    try:
        stack = LocalStack(job.stack, run_dir, data_dirs=data_dirs(job, pipeline)).__enter__()
    except ChildDied as err:
        report_death(err)
        return 1
    try:
        followed = _start_and_follow(stack, run_yaml=run_yaml, run_dir=run_dir, pipeline=pipeline, started=started)
    finally:
        stack.stop()
    if followed is None:
        return 1
    run, t0 = followed
    state = TERMINAL[run.state]
    _print_metrics_summary(run_dir, state=state, t0=t0)
    if pipeline:
        _print_report_summary(run_dir)
    if state != "succeeded":
        print(f"run {state}: {run.error}", file=sys.stderr)
        return 1
    return 0


def _start_and_follow(
    stack: LocalStack, *, run_yaml: str, run_dir: Path, pipeline: bool, started: float
) -> tuple[coordinator_pb2.Run, float] | None:
    """StartRun on the stack's coordinator, then the run followed to its end: (the last Run, when it started);
    None when a role died for good (reported)."""
    addr = stack.describe()["services"]["coordinator"]["address"]
    print(f"stack up in {time.monotonic() - started:.1f}s; logs in {run_dir / 'logs'}", flush=True)
    with make_channel(addr, credentials=stack.operator_credentials()) as ch:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
        run = stub.StartRun(
            coordinator_pb2.StartRunRequest(
                run_id="pipeline" if pipeline else "ppo", config_yaml=run_yaml, run_dir=str(run_dir)
            ),
            timeout=120,
        ).run
        t0 = time.monotonic()
        progress = RunProgress()
        try:
            run = _follow_run(stack, stub, run, progress=progress)
        finally:
            progress.close(finished=run is not None and run.state == coordinator_pb2.RUN_STATE_SUCCEEDED)
        if run is None:
            return None
    return run, t0


def _follow_run(
    stack: LocalStack,
    stub: coordinator_pb2_grpc.CoordinatorServiceStub,
    run: coordinator_pb2.Run,
    *,
    progress: RunProgress,
) -> coordinator_pb2.Run | None:
    """Polls GetRun until the run ends, showing its progress and restarting roles that die; None when a role died
    for good (reported)."""
    unavailable_since = None  # when GetRun started to find the coordinator down (it is restarting)
    while run.state not in TERMINAL:
        if stack.any_exited.is_set():
            # restarts a role that died, on its ports (stack.restart)
            # (on a terminal the message starts on a line of its own, below the bar)
            newline = "\n" if progress.tty else ""
            death = stack.supervise(lambda role, code: report_restart(stack, role, code, prefix=newline))
            if death is not None:
                print(newline, end="")
                report_death(death)
                return None
        stack.any_exited.wait(timeout=POLL_SECONDS)
        try:
            run = stub.GetRun(coordinator_pb2.GetRunRequest(run_id=run.run_id), timeout=60).run
        except grpc.RpcError as err:
            # The coordinator died: the supervisor restarts it (above), and it resumes the run. Its death may be
            # noticed after the call fails, and the restarted one serves a few seconds after it starts.
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            unavailable_since = unavailable_since or time.monotonic()
            if time.monotonic() - unavailable_since > COORDINATOR_RESTART_GRACE_S:
                raise
            continue
        unavailable_since = None
        progress.update(run)
    return run


def _print_metrics_summary(run_dir: Path, *, state: str, t0: float) -> None:
    """The PPO steps' summary from metrics.jsonl (nothing when the run failed before its first PPO step)."""
    metrics = run_dir / "metrics.jsonl"  # absent when the run failed before its first PPO step
    rows = [json.loads(line) for line in metrics.read_text().split("\n") if line.strip()] if metrics.exists() else []
    if rows:
        first, last = rows[0], rows[-1]
        print(
            f"{state}: {len(rows)} steps in {time.monotonic() - t0:.0f}s; mean reward {first['mean_score']:+.4f} -> "
            f"{last['mean_score']:+.4f}; KL to reference {last['reference_kl']:.4f}; metrics: "
            f"{run_dir / 'metrics.jsonl'}"
        )


def _print_report_summary(run_dir: Path) -> None:
    """The pipeline's headline numbers from report.json (nothing when the run wrote none)."""
    report = run_dir / "report.json"
    if not report.exists():
        return
    for line in report_summary(json.loads(report.read_text())):
        print(line)
    print(f"report: {run_dir / 'report.md'}")


def report_summary(r: dict) -> list[str]:
    """The headline lines of a pipeline's report.json: win rates, RM accuracy, alignment tax, stage times."""
    lines = [
        f"win rate vs SFT ({judge}): {w['rate']:.3f} [{w['lower']:.3f}, {w['upper']:.3f}]"
        for judge, w in r["win_rates"].items()
    ]
    accs = ", ".join(f"round {x['round']} {x['accuracy']:.3f}" for x in r.get("rm_accuracy_per_round", []))
    agree = (r.get("labeler_agreement") or {}).get("agreement")
    lines.append(
        f"RM held-out accuracy: {accs or 'n/a'}; labeler agreement {agree:.3f}"
        if agree is not None
        else f"RM held-out accuracy: {accs or 'n/a'}"
    )
    for key, tax in (r.get("alignment_tax") or {}).items():
        if tax:
            lines.append(
                f"alignment tax ({key.replace('_', ' ')}): {tax['absolute']:+.3f} nats/token "
                f"({tax['before']:.3f} -> {tax['after']:.3f})"
            )
    walls = r.get("wall_seconds_per_stage") or {}
    lines.append("wall seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()))
    return lines
