"""Durable run records: state.json (replaced atomically) and metrics.jsonl (appended, fsync'ed)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from alignd.atomic import write_bytes_atomic, write_json_atomic
from alignd.services.coordinator.pipeline_state import PipelineState
from alignd.v1 import coordinator_pb2

STATES = {
    "pending": coordinator_pb2.RUN_STATE_PENDING,
    "running": coordinator_pb2.RUN_STATE_RUNNING,
    "succeeded": coordinator_pb2.RUN_STATE_SUCCEEDED,
    "failed": coordinator_pb2.RUN_STATE_FAILED,
    "stopped": coordinator_pb2.RUN_STATE_STOPPED,
}
ACTIVE = ("pending", "running")


@dataclass
class RunRecord:
    run_id: str
    run_dir: str
    config_yaml: str
    total_steps: int
    state: str = "pending"
    stage: str = "ppo"
    step: int = 0
    policy_version: int = 0
    sampler_epoch: int = 0
    sampler_position: int = 0
    created_unix_seconds: float = field(default_factory=time.time)
    error: str = ""
    latest_metrics: dict = field(default_factory=dict)
    pipeline: PipelineState | None = None  # a pipeline run's: stages done, model dirs, versions, stage results
    stage_fraction: float = 0.0  # progress of the current stage, [0, 1]
    stage_detail: str = ""  # what the current stage is doing, for people
    owner: str = ""  # the name of the credential that started the run ("" without authentication): who may stop it

    @property
    def path(self) -> Path:
        return Path(self.run_dir)

    def save(self) -> None:
        data = asdict(replace(self, pipeline=None))
        data["pipeline"] = None if self.pipeline is None else self.pipeline.model_dump(mode="json")
        write_json_atomic(self.path / "state.json", data)

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord:
        """The record in run_dir/state.json; one written before PipelineState (an `artifacts` dict) is migrated."""
        data = json.loads((run_dir / "state.json").read_text())
        artifacts = data.pop("artifacts", None)
        pipeline = data.pop("pipeline", None)
        if pipeline is not None:
            pipeline = PipelineState.model_validate(pipeline)
        elif artifacts:
            pipeline = PipelineState.from_artifacts(artifacts)
        return cls(**data, pipeline=pipeline)

    def to_pb(self) -> coordinator_pb2.Run:
        return coordinator_pb2.Run(
            run_id=self.run_id,
            state=STATES[self.state],
            stage=self.stage,
            step=self.step,
            total_steps=self.total_steps,
            policy_version=self.policy_version,
            latest_metrics={k: float(v) for k, v in self.latest_metrics.items() if isinstance(v, (int, float))},
            error=self.error,
            run_dir=str(self.run_dir),
            created_unix_seconds=self.created_unix_seconds,
            stage_fraction=self.stage_fraction if self.stage != "ppo" else self.step / max(1, self.total_steps),
            stage_detail=self.stage_detail,
        )


class MetricsLog:
    """metrics.jsonl: one JSON object per completed step, durable before the step counts."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drops lines of steps after `step` (written before a crash, not yet committed in state.json)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().split("\n") if line.strip() and json.loads(line)["step"] <= step]
        write_bytes_atomic(self.path, "".join(line + "\n" for line in kept).encode())

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        return read_jsonl(self.path) if self.path.exists() else []


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSONL file the run wrote. Lines end at "\n" only: str.splitlines would also split at
    U+2028 and the other Unicode line breaks, which texts (a completion, a Moby-Dick opening) carry unescaped."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
