"""Experiment tracking of a run: TensorBoard, MLflow and W&B, written by the coordinator (no torch).

What each backend gets (run.tracking names the backends; coordinator.tracking says where MLflow and W&B go):

- the run's configuration, once (TensorBoard: as text; MLflow: flattened params; W&B: the run config);
- every PPO step's numeric metrics (the row of metrics.jsonl), at the step number;
- each pipeline stage's results when it ends (its wall seconds, RM accuracy, ...), under `stage/<name>/...`;
- the report's headline figures (win rates with their bounds, KL, alignment tax), under `report/...`, and the
  report files as artifacts (MLflow, W&B).

A backend that fails while the run goes on is logged (`tracking_failed`) and dropped for the rest of the run:
tracking never fails a training run. A resumed run continues the same MLflow run and W&B run (their ids are kept
in RUN_DIR/tracking.json). TensorBoard writes with tensorboardX (a protobuf writer, no TensorFlow or torch).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alignd.atomic import write_json_atomic
from alignd.runtime.errors import FailedPrecondition
from alignd.runtime.logging import get_logger

_log = get_logger("alignd.coordinator.tracking")

EXTRA_HINT = "pip install 'alignd[tracking]'"
STATE_FILE = "tracking.json"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept as JSON strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def scalars(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested mapping, flattened with "/" (booleans as 0/1)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(scalars(v, f"{key}/"))
        elif isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[key] = float(v)
    return out


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, **_) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError as err:
            raise FailedPrecondition(f"tracking: tensorboard needs tensorboardX ({EXTRA_HINT})") from err
        self.writer = SummaryWriter(logdir=str(run_dir / "tensorboard"), flush_secs=10)

    def config(self, cfg: dict) -> None:
        self.writer.add_text("config", "```yaml\n" + json.dumps(cfg, indent=2) + "\n```", 0)

    def metrics(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def files(self, paths: list[Path]) -> None:
        pass  # TensorBoard shows scalars and text; the report stays in the run directory

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, *, experiment: str, state: dict, uri: str | None, run_name: str, **_) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise FailedPrecondition(f"tracking: mlflow needs mlflow-skinny ({EXTRA_HINT})") from err
        if uri is None:
            # MLflow 3 keeps its file store in maintenance mode behind this opt-in; a local run directory has no
            # database server, and the store is what `mlflow ui --backend-store-uri RUN_DIR/mlruns` reads.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri or (run_dir / "mlruns").resolve().as_uri())
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        run_id = state.get("mlflow_run_id")
        if run_id is None:
            run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            state["mlflow_run_id"] = run_id
        self.run_id = run_id

    def config(self, cfg: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k.replace("/", "."), v, now, step) for k, v in values.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def files(self, paths: list[Path]) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _WandB:
    name = "wandb"

    def __init__(
        self, run_dir: Path, *, experiment: str, state: dict, mode: str, entity: str | None, run_name: str, **_
    ) -> None:
        try:
            import wandb
        except ImportError as err:
            raise FailedPrecondition(f"tracking: wandb needs the wandb package ({EXTRA_HINT})") from err
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        run_id = state.setdefault("wandb_run_id", secrets.token_hex(4))  # W&B run ids: 8 characters
        self.run = wandb.init(
            project=experiment,
            entity=entity,
            id=run_id,
            name=run_name,
            resume="allow",
            mode=mode,
            dir=str(run_dir),
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )

    def config(self, cfg: dict) -> None:
        self.run.config.update(cfg, allow_val_change=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def files(self, paths: list[Path]) -> None:
        for p in paths:
            self.run.save(str(p), base_path=str(p.parent), policy="now")

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


class Tracker:
    """The run's tracking backends. Calls never raise: a failing backend is logged and dropped."""

    def __init__(self, run_dir: Path, cfg, where, *, run_name: str) -> None:
        """cfg: the run's TrackingConfig; where: the coordinator's CoordinatorTrackingConfig. FailedPrecondition
        when a named backend's package is missing (the run does not start)."""
        self.run_dir = Path(run_dir)
        path = self.run_dir / STATE_FILE
        self.state: dict = json.loads(path.read_text()) if path.exists() else {}
        self.step = int(self.state.get("last_step", 0))
        opts = dict(
            experiment=cfg.experiment,
            state=self.state,
            uri=where.mlflow_tracking_uri,
            mode=where.wandb_mode,
            entity=where.wandb_entity,
            run_name=run_name,
        )
        self.backends = [BACKENDS[name](self.run_dir, **opts) for name in cfg.backends]
        self._save()

    def _save(self) -> None:
        write_json_atomic(self.run_dir / STATE_FILE, self.state)

    def _each(self, what: str, call) -> None:
        for b in list(self.backends):
            try:
                call(b)
            except Exception as exc:  # noqa: BLE001 - tracking never fails the run
                _log.warning("tracking_failed", backend=b.name, what=what, error=f"{type(exc).__name__}: {exc}")
                self.backends.remove(b)

    def run_config(self, config_yaml: str) -> None:
        """The run's configuration (StartRun's config_yaml), once per run (not again on a resume)."""
        if self.state.get("config_logged"):
            return
        import yaml

        cfg = yaml.safe_load(config_yaml) or {}
        self._each("config", lambda b: b.config(cfg))
        self.state["config_logged"] = True
        self._save()

    def step_metrics(self, step: int, row: Mapping[str, Any]) -> None:
        values = scalars({k: v for k, v in row.items() if k not in ("step", "time")})
        self._each("step", lambda b: b.metrics(values, step))
        self.step = step
        self.state["last_step"] = step
        self._save()

    def stage(self, name: str, results: Mapping[str, Any]) -> None:
        """A pipeline stage's results, at the last PPO step logged (0 before PPO)."""
        values = scalars(results, f"stage/{name}/")
        self._each("stage", lambda b: b.metrics(values, self.step))

    def report(self, report: Mapping[str, Any], files: list[Path]) -> None:
        keep = {k: report[k] for k in ("win_rates", "kl_to_reference", "alignment_tax", "acceptance") if k in report}
        values = scalars(keep, "report/")
        self._each("report", lambda b: b.metrics(values, self.step))
        self._each("files", lambda b: b.files([p for p in files if p.is_file()]))

    def close(self) -> None:
        self._each("close", lambda b: b.close())
        self.backends = []
