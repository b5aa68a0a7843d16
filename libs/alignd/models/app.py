"""Base of the model-serving role apps (policy, reward, reference, learner)."""

from __future__ import annotations

import time

from alignd.config import BatchingConfig, RoleConfig
from alignd.models.handle import ModelHandle, set_torch_threads
from alignd.models.service import ModelServicer
from alignd.runtime.batching import DynamicBatcher
from alignd.runtime.logging import get_logger
from alignd.runtime.metrics import BatchMetrics
from alignd.runtime.role import Loaded, RoleApp
from alignd.runtime.server import ServiceHost
from alignd.v1 import model_pb2_grpc

_log = get_logger("alignd.models.app")

MODEL_SERVICE = "alignd.v1.ModelService"


class ModelRoleApp(RoleApp):
    """Registers ModelService + the role's service; loads, warms up, attaches.

    Subclasses set `slug`, `role_service`, and implement `load_handle`,
    `make_servicer` and `build` (engine + batcher from the loaded handle).
    """

    role_service: str = ""
    accepts_updates: bool = True

    def __init__(self, cfg: RoleConfig, run_dir=None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.loaded = Loaded()
        self.batcher: DynamicBatcher | None = None
        # Where paths in requests may lead: paths.roots and the run directory; also the weights the learner
        # publishes in shared memory (LoadWeights under weight_sync auto).
        from alignd.models.weights import SHM_PREFIX, SHM_ROOT
        from alignd.runtime.paths import role_roots

        self.roots = role_roots(cfg, run_dir, prefixes=[SHM_ROOT / SHM_PREFIX])

    @property
    def service_names(self) -> list[str]:  # type: ignore[override]
        return [self.role_service, MODEL_SERVICE]

    def register(self, host: ServiceHost) -> None:
        self.host = host
        self.model_servicer = ModelServicer(self.slug, host, accepts_updates=self.accepts_updates, roots=self.roots)
        model_pb2_grpc.add_ModelServiceServicer_to_server(self.model_servicer, host.server)
        self.batch_metrics = BatchMetrics(self.slug, host.registry)
        self.register_role(host)

    def register_role(self, host: ServiceHost) -> None:
        raise NotImplementedError

    def load_handle(self) -> ModelHandle:
        raise NotImplementedError

    def build(self, handle: ModelHandle):
        """Returns the state the servicer reads (engine, batcher, ...)."""
        raise NotImplementedError

    def warmup(self, state) -> None:
        """One small request through the engine, so the first user call is not slow."""

    def make_batcher(self, process, batching: BatchingConfig) -> DynamicBatcher:
        self.batcher = DynamicBatcher(
            process,
            max_batch_size=batching.max_batch_size,
            max_wait_s=batching.max_wait_ms / 1000.0,
            max_queue=batching.max_queue,
            name=self.slug,
            on_batch=self.batch_metrics.on_batch,
            on_queue_depth=self.batch_metrics.queue_depth.set,
            max_batch_tokens=getattr(batching, "max_batch_tokens", None),
            on_drop=lambda reason: self.batch_metrics.dropped.labels(reason).inc(),
        )
        return self.batcher

    def load(self) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # tqdm bars would break the JSON log stream
        set_torch_threads(self.cfg.torch_threads)
        t0 = time.perf_counter()
        handle = self.load_handle()
        _log.info(
            "model_loaded",
            path=handle.cfg.path,
            architecture=type(handle.model).__name__,
            num_parameters=handle.num_parameters,
            seconds=round(time.perf_counter() - t0, 3),
        )
        state = self.build(handle)
        t1 = time.perf_counter()
        self.warmup(state)
        _log.info("model_warmed_up", seconds=round(time.perf_counter() - t1, 3))
        self.handle = handle
        self.model_servicer.attach(handle)
        self.loaded.set(state)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
