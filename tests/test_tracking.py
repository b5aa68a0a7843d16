"""Experiment tracking (services/coordinator/tracking.py), read back through each tool's own reader: TensorBoard's
event accumulator, MLflow's client on its file store, W&B's offline run directory. The pipeline's end-to-end run
(tests/test_pipeline_run.py) checks every step of a real run the same way (read_tensorboard, read_mlflow).
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from alignd.config import CoordinatorTrackingConfig, PipelineConfig, TrackingConfig
from alignd.runtime.errors import FailedPrecondition
from alignd.services.coordinator.tracking import STATE_FILE, Tracker, scalars

ROWS = [
    {"step": 1, "time": 1.0, "mean_score": 0.25, "reference_kl": 0.0, "phase_seconds": {"generate": 1.5}},
    {"step": 2, "time": 2.0, "mean_score": 0.5, "reference_kl": 0.01, "phase_seconds": {"generate": 1.25}},
    {"step": 3, "time": 3.0, "mean_score": float("nan"), "reference_kl": 0.02, "phase_seconds": {"generate": 1.0}},
]
REPORT = {"win_rates": {"gold": {"rate": 0.75, "lower": 0.6, "n": 64}}, "kl_to_reference": {"per_token": 0.05}}


def read_tensorboard(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the run's TensorBoard event files, read by TensorBoard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_mlflow(run_dir) -> tuple[object, str]:
    """(MlflowClient on the run directory's file store, the run's MLflow run id)."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as the coordinator sets it for its file store
    run_id = json.loads((run_dir / STATE_FILE).read_text())["mlflow_run_id"]
    return MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri()), run_id


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def make(run_dir, backends, **where) -> Tracker:
    return Tracker(run_dir, TrackingConfig(backends=backends), CoordinatorTrackingConfig(**where), run_name="r1")


def test_scalars_flatten_finite_numbers():
    assert scalars({"a": 1, "b": {"c": 2.5, "d": "x", "e": float("inf")}, "f": True}) == {
        "a": 1.0,
        "b/c": 2.5,
        "f": 1.0,
    }


def test_run_config_accepts_a_list_or_a_mapping():
    assert TrackingConfig.model_validate(["mlflow", "tensorboard", "mlflow"]).backends == ["mlflow", "tensorboard"]
    assert TrackingConfig.model_validate({"backends": [], "experiment": "exp-1"}).experiment == "exp-1"
    assert TrackingConfig().backends == ["tensorboard"]  # on by default
    with pytest.raises(ValueError, match="neptune"):
        TrackingConfig.model_validate(["neptune"])


def test_pipeline_tracking_sets_the_ppo_stage_s():
    base = {
        "demonstrations": "d.jsonl",
        "gold": {"name": "vader"},
        "second_judge": {"name": "textblob"},
        "ppo": {"prompts": {"path": "p.txt"}},
        "evaluation": {"prompts": {"path": "e.txt"}},
    }
    cfg = PipelineConfig.model_validate({**base, "tracking": ["mlflow"]})
    assert cfg.ppo.tracking.backends == ["mlflow"]


def test_every_backend_records_steps_stages_config_and_report(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "report.md").write_text("# report\n")
    t = make(run_dir, ["tensorboard", "mlflow", "wandb"], wandb_mode="offline")
    assert [b.name for b in t.backends] == ["tensorboard", "mlflow", "wandb"]
    t.run_config("ppo: {steps: 3}\nseed: 7\n")
    t.stage("sft", {"seconds": 12.5})
    for row in ROWS:
        t.step_metrics(row["step"], row)
    t.stage("ppo", {"seconds": 30.0})
    t.report(REPORT, [run_dir / "report.md", run_dir / "missing.png"])
    t.close()

    tb = read_tensorboard(run_dir)
    assert tb["mean_score"][:2] == [(1, 0.25), (2, 0.5)] and len(tb["mean_score"]) == 2  # NaN is not a point
    assert tb["phase_seconds/generate"] == [(1, 1.5), (2, 1.25), (3, 1.0)]
    assert tb["stage/sft/seconds"] == [(0, 12.5)] and tb["stage/ppo/seconds"] == [(3, 30.0)]
    assert tb["report/win_rates/gold/rate"] == [(3, 0.75)]

    client, run_id = read_mlflow(run_dir)
    assert history(client, run_id, "reference_kl") == [(1, 0.0), (2, 0.01), (3, 0.02)]
    assert history(client, run_id, "report.win_rates.gold.lower") == [(3, 0.6)]
    run = client.get_run(run_id)
    assert run.data.params == {"ppo.steps": "3", "seed": "7"} and run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id)] == ["report.md"]

    # W&B offline: one run directory, its records file holding the logged series (wandb 0.31 reads these files
    # only in its Go core, through `wandb sync`; the keys are stored as they are).
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")
    data = records.read_bytes()
    for key in (b"reference_kl", b"phase_seconds/generate", b"report/win_rates/gold/rate", b"stage/sft/seconds"):
        assert key in data, key


def test_a_resumed_run_continues_its_mlflow_run_and_logs_its_config_once(tmp_path):
    t = make(tmp_path, ["mlflow"])
    t.run_config("seed: 1\n")
    t.step_metrics(1, ROWS[0])
    t.close()
    again = make(tmp_path, ["mlflow"])
    again.run_config("seed: 2\n")  # a resume logs nothing new (MLflow refuses to change a param)
    again.step_metrics(2, ROWS[1])
    again.close()
    client, run_id = read_mlflow(tmp_path)
    assert history(client, run_id, "mean_score") == [(1, 0.25), (2, 0.5)]
    assert client.get_run(run_id).data.params == {"seed": "1"}
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_a_failing_backend_is_dropped_and_the_others_go_on(tmp_path):
    t = make(tmp_path, ["tensorboard", "mlflow"])

    def broken(values, step):
        raise OSError("store unreachable")

    t.backends[1].metrics = broken
    t.step_metrics(1, ROWS[0])  # does not raise
    assert [b.name for b in t.backends] == ["tensorboard"]
    t.step_metrics(2, ROWS[1])
    t.close()
    assert read_tensorboard(tmp_path)["mean_score"] == [(1, 0.25), (2, 0.5)]


def test_a_missing_package_refuses_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    with pytest.raises(FailedPrecondition, match=r"mlflow needs mlflow-skinny \(pip install 'alignd\[tracking\]'\)"):
        make(tmp_path, ["mlflow"])
