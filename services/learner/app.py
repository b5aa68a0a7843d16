"""The learner role: `alignd serve learner --config FILE`."""

from __future__ import annotations

from pathlib import Path

from alignd.config import LearnerConfig
from alignd.models.app import ModelRoleApp
from alignd.models.handle import set_torch_threads
from alignd.runtime.server import ServiceHost
from alignd.services.learner.learner import Learner
from alignd.services.learner.servicer import LearnerMetrics, LearnerServicer
from alignd.v1 import learner_pb2_grpc


class LearnerApp(ModelRoleApp):
    slug = "learner"
    role_service = "alignd.v1.LearnerService"
    accepts_updates = False  # the learner owns the weights it trains

    def __init__(self, cfg: LearnerConfig, run_dir: Path | None = None) -> None:
        super().__init__(cfg)
        self.cfg: LearnerConfig = cfg
        self.run_dir = run_dir

    def register_role(self, host: ServiceHost) -> None:
        self.metrics = LearnerMetrics(host.registry)
        from alignd.services.learner.jobs import Jobs

        learner_pb2_grpc.add_LearnerServiceServicer_to_server(
            LearnerServicer(self.loaded, self.metrics, lambda v: self.model_servicer.metrics.version.set(v), Jobs(self.cfg)),
            host.server,
        )

    def load(self) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        set_torch_threads(self.cfg.torch_threads)
        learner = Learner(self.cfg, self.run_dir)
        self.metrics.policy_version.set(learner.version)
        self.model_servicer.attach(learner.handle)
        self.loaded.set(learner)


def create(cfg: LearnerConfig, run_dir: Path | None = None) -> LearnerApp:
    return LearnerApp(cfg, run_dir)
