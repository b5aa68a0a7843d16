"""The coordinator role: `alignd serve coordinator --config FILE`. Imports no torch.

It owns runs: StartRun validates a PPO run configuration and starts its loop
(services/coordinator/loop.py) on a background thread; the run's state lives
in RUNS_DIR/<run_id>/ (state.json, metrics.jsonl). On start-up the
coordinator resumes every run that was pending or running when it stopped.
One run is active at a time (the learner is shared).
"""

from __future__ import annotations

import re
import threading
import uuid
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from alignd import __version__
from alignd.config import ConfigError, CoordinatorConfig, PipelineConfig
from alignd.data import DataError
from alignd.datapaths import resolve_run_paths
from alignd.runtime.auth import CLIENT, PRINCIPAL
from alignd.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from alignd.runtime.logging import get_logger
from alignd.runtime.paths import is_owned, mark_owned
from alignd.runtime.role import RoleApp
from alignd.runtime.scopes import ADMIN
from alignd.runtime.server import ServiceHost
from alignd.services.coordinator import run_files
from alignd.services.coordinator.clients import RoleClients
from alignd.services.coordinator.comparisons import ComparisonStore, LabelError
from alignd.services.coordinator.loop import PPORun, RunThread
from alignd.services.coordinator.pipeline import PipelineRun, parse_run_config
from alignd.services.coordinator.runs import ACTIVE, RunRecord
from alignd.services.coordinator.step_metrics import PHASES
from alignd.v1 import coordinator_pb2, coordinator_pb2_grpc

_log = get_logger("alignd.coordinator")
DEFAULT_LEASE_SECONDS = 600.0
RUN_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class CoordinatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.phase_seconds = Histogram(
            "alignd_coordinator_phase_seconds",
            "Duration of each phase of a PPO iteration, in seconds.",
            ["phase"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=registry,
        )
        for phase in PHASES:
            self.phase_seconds.labels(phase)
        self.steps = Counter("alignd_coordinator_steps_total", "PPO iterations completed.", registry=registry)
        self.rollout_tokens = Counter(
            "alignd_coordinator_rollout_tokens_total", "Response tokens generated for rollouts.", registry=registry
        )
        self.runs = Counter(
            "alignd_coordinator_runs_total", "Runs ended, by final state.", ["state"], registry=registry
        )
        for state in (
            "succeeded",
            "failed",
            "stopped",
        ):  # exported at 0 from the start, so increase() sees the first end
            self.runs.labels(state)
        self.step = Gauge("alignd_coordinator_run_step", "Step of the active run.", registry=registry)
        self.mean_score = Gauge(
            "alignd_coordinator_mean_score", "Mean reward-model score of the last batch.", registry=registry
        )
        self.kl = Gauge(
            "alignd_coordinator_reference_kl",
            "Mean per-token KL(policy || reference) of the last batch.",
            registry=registry,
        )
        self.resyncs = Counter(
            "alignd_coordinator_resyncs_total",
            "Re-syncs of a role found serving older weights than the run expects (a replica that restarted).",
            ["role"],
            registry=registry,
        )
        for role in ("policy", "reward", "reference"):
            self.resyncs.labels(role)
        self.hedged_shards = Counter(
            "alignd_coordinator_hedged_shards_total",
            "Rollout shards sent again because their policy replica was slow.",
            registry=registry,
        )
        self.failed_over_shards = Counter(
            "alignd_coordinator_failed_over_shards_total",
            "Rollout shards sent to another policy replica because theirs was unavailable.",
            registry=registry,
        )
        self.replicas_out = Counter(
            "alignd_coordinator_replicas_out_of_rotation_total",
            "Policy replicas taken out of the rotation, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in ("slow", "unavailable"):
            self.replicas_out.labels(reason)
        self.replicas_in_rotation = Gauge(
            "alignd_coordinator_policy_replicas_in_rotation",
            "Policy replicas serving rollout shards of their own.",
            registry=registry,
        )
        self.policy_lag = Gauge(
            "alignd_coordinator_policy_lag_versions",
            "Staleness of the last step: versions between the weights that sampled its rollouts and the weights "
            "trained "
            "on them (0 on-policy; up to run.max_staleness with async rollouts).",
            registry=registry,
        )


def make_loop(rec: RunRecord, run_cfg, roles: RoleClients, *, metrics) -> RunThread:
    """The thread of a run: a PipelineRun for `kind: pipeline` runs, a plain PPORun otherwise."""
    if isinstance(run_cfg, PipelineConfig):
        return PipelineRun(rec, run_cfg, roles, metrics=metrics)
    return PPORun(rec, run_cfg, roles, metrics=metrics)


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig, runs_dir: Path, metrics: CoordinatorMetrics, *, roots=None) -> None:
        self.cfg = cfg
        self.runs_dir = runs_dir
        self.metrics = metrics
        self.roots = roots  # alignd.runtime.paths.Roots: where run directories and the runs' data may be
        self.lock = threading.Lock()
        self.loops: dict[str, RunThread] = {}
        self.records: dict[str, RunRecord] = {}

    def _load_records(self) -> None:
        if not self.runs_dir.exists():
            return
        for state in sorted(self.runs_dir.glob("*/state.json")):
            rec = RunRecord.load(state.parent)
            self.records[rec.run_id] = rec

    def resume_all(self) -> None:
        self._load_records()
        for rec in self.records.values():
            if rec.state in ACTIVE:
                _log.info("run_resuming", run_id=rec.run_id, step=rec.step, stage=rec.stage)
                loop = make_loop(rec, _run_config(rec.config_yaml), RoleClients(self.cfg), metrics=self.metrics)
                self.loops[rec.run_id] = loop
                loop.start()

    def active(self) -> RunRecord | None:
        for rec in self.records.values():
            if rec.state in ACTIVE:
                return rec
        return None

    def _check_request(self, run_cfg) -> None:
        """Before anything is written: the judges a pipeline names are built-in or registered, and every data path
        of the configuration lies under the roots (InvalidArgument naming the key)."""
        if isinstance(run_cfg, PipelineConfig):
            from alignd import judges

            for key, judge in (("gold.name", run_cfg.gold), ("second_judge.name", run_cfg.second_judge)):
                try:
                    judges.resolve(judge.name, judge.args, self.cfg.judges, field=key)
                except ValueError as err:
                    raise InvalidArgument("config_yaml", str(err)) from None
        if self.roots is None:
            return
        if isinstance(run_cfg, PipelineConfig):
            named = [
                ("demonstrations", run_cfg.demonstrations),
                ("ppo.prompts.path", run_cfg.ppo.prompts.path),
                ("evaluation.prompts.path", run_cfg.evaluation.prompts.path),
                ("evaluation.heldout_text", run_cfg.evaluation.heldout_text),
            ]
        else:
            named = [("prompts.path", run_cfg.prompts.path)]
        for key, value in named:
            if value:
                try:
                    self.roots.check(value, key)
                except InvalidArgument as err:
                    raise InvalidArgument("config_yaml", err.message) from None

    def _check_run_dir(self, run_dir: str) -> Path:
        """The run directory of a request: under the roots, and new, empty, an alignd run or made by alignd."""
        path = self.roots.check(run_dir, "run_dir") if self.roots is not None else Path(run_dir)
        if path.exists() and not path.is_dir():
            raise InvalidArgument("run_dir", "exists and is not a directory")
        if path.is_dir() and not ((path / "state.json").exists() or is_owned(path) or not any(path.iterdir())):
            raise InvalidArgument(
                "run_dir",
                "exists, holds other files and was not made by alignd: choose a new or "
                "empty directory (a run writes state.json, metrics.jsonl and reports into it)",
            )
        return path

    def start_run(self, run_id: str, config_yaml: str, run_dir: str) -> RunRecord:
        try:
            data = yaml.safe_load(config_yaml) if config_yaml.strip() else None
        except yaml.YAMLError as err:
            raise InvalidArgument("config_yaml", f"not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise InvalidArgument("config_yaml", "must be a YAML mapping of the run configuration")
        try:
            run_cfg = parse_run_config(data)
            resolve_run_paths(run_cfg)  # preset: and cache: paths, against this coordinator's installation and cache
        except ConfigError as err:
            raise InvalidArgument("config_yaml", str(err)) from None
        total_steps = run_cfg.ppo.steps if isinstance(run_cfg, PipelineConfig) else run_cfg.steps
        if run_id and not RUN_ID.match(run_id):
            raise InvalidArgument("run_id", f"{run_id!r}: use 1-63 of a-z 0-9 _ . - starting with a letter or digit")
        self._check_request(run_cfg)
        checked = self._check_run_dir(run_dir) if run_dir else None
        with self.lock:
            run_id = run_id or f"run-{uuid.uuid4().hex[:8]}"
            path = checked if checked is not None else self.runs_dir / run_id
            if (path / "state.json").exists():
                return self._restart(path, run_id, config_yaml, run_cfg=run_cfg)
            if run_id in self.records:
                raise AlreadyExists(f"run {run_id} exists in {self.records[run_id].run_dir}")
            if self.active() is not None:
                raise FailedPrecondition(f"run {self.active().run_id} is active; stop it or wait")
            path.mkdir(parents=True, exist_ok=True)
            if not is_owned(path):
                mark_owned(path)
            self._link(run_id, path)
            (path / "config.yaml").write_text(config_yaml)
            rec = RunRecord(
                run_id=run_id,
                run_dir=str(path),
                config_yaml=config_yaml,
                total_steps=total_steps,
                stage="sft" if isinstance(run_cfg, PipelineConfig) else "ppo",
                owner=CLIENT.get() or "",
            )
            try:
                loop = make_loop(rec, run_cfg, RoleClients(self.cfg), metrics=self.metrics)
            except (DataError, ValueError) as err:
                raise InvalidArgument("config_yaml", str(err)) from None
            rec.save()
            self.records[run_id] = rec
            self.loops[run_id] = loop
            loop.start()
            _log.info("run_accepted", run_id=run_id, run_dir=str(path), steps=total_steps, kind=rec.stage)
            return rec

    def _link(self, run_id: str, path: Path) -> None:
        """A run outside RUNS_DIR gets a symlink RUNS_DIR/<run_id> to it, so a restarted coordinator finds and
        resumes it."""
        link = self.runs_dir / run_id
        if link.resolve() == path.resolve():
            return
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(path.resolve(), target_is_directory=True)

    def _restart(self, path: Path, run_id: str, config_yaml: str, *, run_cfg) -> RunRecord:
        """StartRun on a directory that holds the same run (same id and configuration) resumes it from its durable
        state: an unfinished, failed or stopped run goes on where it stopped; a running or finished one is returned."""
        rec = RunRecord.load(path)
        # Compared as data, not text: a newer alignd may dump the same configuration with its keys in another order.
        if rec.run_id != run_id or yaml.safe_load(rec.config_yaml) != yaml.safe_load(config_yaml):
            raise AlreadyExists(
                f"{path} already holds run {rec.run_id!r} with "
                f"{'another configuration' if rec.run_id == run_id else 'another id'}; "
                "use a new run_dir, or the same run_id and configuration to resume it"
            )
        loop = self.loops.get(run_id)
        if rec.state == "succeeded" or (loop is not None and loop.is_alive()):
            return self.records.get(run_id, rec)
        active = self.active()
        if active is not None and active.run_id != run_id:
            raise FailedPrecondition(f"run {active.run_id} is active; stop it or wait")
        rec.state, rec.error = "pending", ""
        loop = make_loop(rec, run_cfg, RoleClients(self.cfg), metrics=self.metrics)
        rec.save()
        self._link(run_id, path)
        self.records[run_id] = rec
        self.loops[run_id] = loop
        _log.info("run_resuming", run_id=run_id, step=rec.step, stage=rec.stage)
        loop.start()
        return rec

    def get(self, run_id: str) -> RunRecord:
        rec = self.records.get(run_id)
        if rec is None:
            raise NotFound(f"no run {run_id!r}")
        return rec

    def stop_run(self, run_id: str) -> RunRecord:
        rec = self.get(run_id)
        who = PRINCIPAL.get()
        if who is not None and rec.owner and who.name != rec.owner and not who.allows(ADMIN):
            raise PermissionDenied(f"run {run_id} was started by {rec.owner!r}; only it or an admin may stop it")
        loop = self.loops.get(run_id)
        if loop is not None:
            loop.stop_requested.set()
        return rec

    # -- external labelers ---------------------------------------------------
    def labeling_round(self, run_id: str) -> tuple[int, ComparisonStore]:
        """The run's open labeling round, or FAILED_PRECONDITION naming the run's stage."""
        rec = self.get(run_id)
        loop = self.loops.get(run_id)
        current = getattr(loop, "labeling", None)
        if current is None or current[1].closed:
            raise FailedPrecondition(f"run {run_id} has no labeling round open (state {rec.state}, stage {rec.stage})")
        return current

    @staticmethod
    def label_call(fn):
        """Maps ComparisonStore errors to gRPC statuses (the message names the request field)."""
        try:
            return fn()
        except LabelError as err:
            raise _status_error(err) from None
        except RuntimeError as err:  # closed between lookup and call: the round just ended
            raise FailedPrecondition(str(err)) from None


def _run_config(config_yaml: str):
    """A stored run's configuration, its prefixed paths resolved as when it was accepted."""
    run_cfg = parse_run_config(yaml.safe_load(config_yaml))
    resolve_run_paths(run_cfg, must_exist=False)
    return run_cfg


def _labeler_is_caller(labeler: str) -> None:
    """A labeler's token labels as itself: `labeler` must be its name (an admin may act for any labeler)."""
    who = PRINCIPAL.get()
    if who is not None and not who.allows(ADMIN) and labeler and labeler != who.name:
        raise PermissionDenied(f"labeler: the credential {who.name!r} labels as itself, not as {labeler[:64]!r}")


def _status_error(err: LabelError) -> Exception:
    """The gRPC-status error for a refused labeling request; the message starts with the request field."""
    if err.code == "invalid_argument":
        return InvalidArgument(err.field, err.problem)
    cls = {"not_found": NotFound, "already_exists": AlreadyExists}.get(err.code, FailedPrecondition)
    return cls(str(err))


def _progress(r: int, store: ComparisonStore) -> coordinator_pb2.LabelingProgress:
    p = store.progress()
    return coordinator_pb2.LabelingProgress(round=r, tasks=p.total, labelled=p.labelled, rankings=p.labels)


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, cfg: CoordinatorConfig, loaded) -> None:
        self.cfg = cfg
        self.loaded = loaded  # Loaded[Coordinator]

    def GetCoordinatorInfo(self, request, context):
        return coordinator_pb2.GetCoordinatorInfoResponse(
            alignd_version=__version__,
            policy_addresses=self.cfg.policy_addresses,
            reward_addresses=self.cfg.reward_addresses,
            reference_addresses=self.cfg.reference_addresses,
            learner_address=self.cfg.learner_address or "",
        )

    def StartRun(self, request, context):
        rec = self.loaded.get().start_run(request.run_id, request.config_yaml, request.run_dir)
        return coordinator_pb2.StartRunResponse(run=rec.to_pb())

    def GetRun(self, request, context):
        return coordinator_pb2.GetRunResponse(run=self.loaded.get().get(request.run_id).to_pb())

    def StopRun(self, request, context):
        return coordinator_pb2.StopRunResponse(run=self.loaded.get().stop_run(request.run_id).to_pb())

    def ListRuns(self, request, context):
        recs = sorted(self.loaded.get().records.values(), key=lambda r: r.created_unix_seconds, reverse=True)
        return coordinator_pb2.ListRunsResponse(runs=[r.to_pb() for r in recs])

    def GetRunFiles(self, request, context):
        rec = self.loaded.get().get(request.run_id)
        run_dir = Path(rec.run_dir)
        # Every file is read (and the request checked) before the first chunk goes out: an error is the call's
        # status, never a stream cut off after some files.
        files = run_files.read(run_dir, run_files.select(run_dir, list(request.paths)))
        _log.info("run_files_sent", run_id=rec.run_id, files=len(files), bytes=sum(len(f.data) for f in files))
        for path, offset, data, size, sha in run_files.chunks(files):
            yield coordinator_pb2.GetRunFilesResponse(path=path, offset=offset, data=data, size=size, sha256=sha)

    def LeaseComparisonTasks(self, request, context):
        c = self.loaded.get()
        _labeler_is_caller(request.labeler)
        if not request.labeler:
            raise InvalidArgument("labeler", "required: who is labelling")
        if request.max_tasks > 1000:
            raise InvalidArgument("max_tasks", f"{request.max_tasks} is above 1000")
        if not (request.lease_seconds >= 0 and request.lease_seconds <= 86400):
            raise InvalidArgument("lease_seconds", f"{request.lease_seconds} is outside [0, 86400]")
        r, store = c.labeling_round(request.run_id)
        lease = request.lease_seconds or DEFAULT_LEASE_SECONDS
        tasks = c.label_call(lambda: store.pending(request.max_tasks or 16, labeler=request.labeler, lease_s=lease))
        return coordinator_pb2.LeaseComparisonTasksResponse(
            tasks=[
                coordinator_pb2.ComparisonTask(task_id=t.task_id, prompt=t.prompt, completions=t.completions)
                for t in tasks
            ],
            progress=_progress(r, store),
        )

    def SubmitRanking(self, request, context):
        c = self.loaded.get()
        _labeler_is_caller(request.labeler)
        if not request.labeler:
            raise InvalidArgument("labeler", "required: who ranked the task")
        if not request.task_id:
            raise InvalidArgument("task_id", "required")
        r, store = c.labeling_round(request.run_id)
        c.label_call(lambda: store.submit(request.task_id, list(request.ranking), request.labeler))
        return coordinator_pb2.SubmitRankingResponse(progress=_progress(r, store))

    def ReleaseComparisonTask(self, request, context):
        c = self.loaded.get()
        _labeler_is_caller(request.labeler)
        if not request.labeler:
            raise InvalidArgument("labeler", "required")
        _, store = c.labeling_round(request.run_id)
        released = c.label_call(lambda: store.release(request.task_id, request.labeler))
        return coordinator_pb2.ReleaseComparisonTaskResponse(released=released)


class CoordinatorApp(RoleApp):
    slug = "coordinator"
    service_names = ["alignd.v1.CoordinatorService"]

    def __init__(self, cfg: CoordinatorConfig, run_dir: Path | None = None) -> None:
        from alignd.runtime.role import Loaded

        self.cfg = cfg
        self.run_dir = run_dir
        self.loaded = Loaded()

    def register(self, host: ServiceHost) -> None:
        self.metrics = CoordinatorMetrics(host.registry)
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
            CoordinatorServicer(self.cfg, self.loaded), host.server
        )

    def load(self) -> None:
        from alignd.runtime.paths import role_roots

        runs_dir = Path(self.cfg.runs_dir) if self.cfg.runs_dir else Path(self.run_dir or ".") / "runs"
        roots = role_roots(self.cfg, self.run_dir, extra=[runs_dir])
        coordinator = Coordinator(self.cfg, runs_dir, self.metrics, roots=roots)
        coordinator.resume_all()
        self.loaded.set(coordinator)


def create(cfg: CoordinatorConfig, run_dir=None) -> CoordinatorApp:
    return CoordinatorApp(cfg, run_dir)
