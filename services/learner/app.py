"""The learner role: `alignd serve learner --config FILE`.

One process, or N under torchrun (`torchrun ... -m alignd.cli serve learner
...`, what the Helm chart runs when the world size is > 1): rank 0 is this
app as with one process (gRPC, health, metrics, endpoint file); every other
rank serves no API and follows rank 0's commands (`follow`, ranks.py; a
pod's first process serves health for the pod's probes).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import structlog

from alignd.atomic import write_json_atomic
from alignd.config import LearnerConfig
from alignd.models.app import ModelRoleApp
from alignd.models.handle import set_torch_threads
from alignd.runtime.logging import get_logger
from alignd.runtime.server import ServiceHost
from alignd.services.learner import ranks
from alignd.services.learner.learner import Learner
from alignd.services.learner.servicer import LearnerMetrics, LearnerServicer
from alignd.v1 import learner_pb2_grpc

_log = get_logger("alignd.learner.app")


class LearnerApp(ModelRoleApp):
    slug = "learner"
    role_service = "alignd.v1.LearnerService"
    accepts_updates = False  # the learner owns the weights it trains

    def __init__(self, cfg: LearnerConfig, run_dir: Path | None = None) -> None:
        super().__init__(cfg, run_dir)
        self.cfg: LearnerConfig = cfg
        if cfg.checkpoint_dir:  # its own checkpoints are the learner's to read (ResetPolicy of a saved policy)
            from alignd.runtime.paths import role_roots

            self.roots = role_roots(cfg, run_dir, extra=[cfg.checkpoint_dir])
        self.launch = ranks.Launch.from_env()
        ranks.check_config(cfg, self.launch)  # ConfigError before anything binds or loads
        self.learner: Learner | None = None
        if self.launch.world_size > 1:
            structlog.contextvars.bind_contextvars(rank=self.launch.rank)
            ranks.die_with_launcher()

    @property
    def follows_rank0(self) -> bool:
        """True on ranks > 0 under torchrun: `alignd serve` calls `follow` instead of serving."""
        return self.launch.follower

    def register_role(self, host: ServiceHost) -> None:
        self.metrics = LearnerMetrics(host.registry)
        from alignd.services.learner.jobs import Jobs

        learner_pb2_grpc.add_LearnerServiceServicer_to_server(
            LearnerServicer(
                self.loaded,
                self.metrics,
                lambda v: self.model_servicer.metrics.version.set(v),
                jobs=Jobs(self.cfg),
                roots=self.roots,
            ),
            host.server,
        )

    def _build(self) -> Learner:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        set_torch_threads(self.cfg.torch_threads)
        return Learner(self.cfg, self.run_dir)

    def load(self) -> None:
        learner = self._build()
        self.learner = learner
        self.metrics.policy_version.set(learner.version)
        self.model_servicer.attach(learner.handle)
        learner.ranks.start_heartbeat()
        self.loaded.set(learner)

    def close(self) -> None:
        """Rank 0, after the server drained: the other ranks stop too."""
        if self.learner is not None:
            self.learner.ranks.shutdown()

    def follow(self, endpoint_file: Path | None = None) -> int:
        """A rank > 0: no API; builds the same learner, then runs rank 0's commands until Shutdown.

        The first process of a pod other than rank 0's (LOCAL_RANK 0) serves gRPC health (and /metrics) on the
        role's ports, so that the pod's probes see it: NOT_SERVING while it loads, SERVING once it follows. The
        learner API itself is rank 0's alone (the chart's client Service selects pod 0)."""
        ranks.ignore_stop_signals(self.launch.rank)
        host = None
        if self.launch.local_rank == 0:
            host = ServiceHost(self.slug, self.cfg.server, [])
            host.start()
            if endpoint_file is not None:
                write_json_atomic(
                    endpoint_file,
                    {
                        "role": self.slug,
                        "address": host.address,
                        "rank": self.launch.rank,
                        "metrics_url": host.metrics_url,
                        "pid": os.getpid(),
                    },
                )
        t0 = time.perf_counter()
        try:
            try:
                learner = self._build()
            except Exception as exc:  # noqa: BLE001 - reported, then the process exits 1 (torchrun fails the job)
                _log.error("load_failed", rank=self.launch.rank, exc_info=exc)
                return 1
            _log.info(
                "role_ready", slug=self.slug, rank=self.launch.rank, load_seconds=round(time.perf_counter() - t0, 3)
            )
            if host is not None:
                host.set_serving(True)
            return ranks.follow(learner)
        finally:
            if host is not None:
                host.stop(0)


def create(cfg: LearnerConfig, run_dir: Path | None = None) -> LearnerApp:
    return LearnerApp(cfg, run_dir)
