"""The reference role: `alignd serve reference --config FILE`."""

from __future__ import annotations

from dataclasses import dataclass

from alignd.config import ReferenceConfig
from alignd.models.app import ModelRoleApp
from alignd.models.handle import ModelHandle, load_causal_lm, load_tokenizer
from alignd.runtime.batching import DynamicBatcher, per_request
from alignd.runtime.server import ServiceHost
from alignd.services.reference.engine import Item, ReferenceEngine
from alignd.services.reference.servicer import ReferenceServicer
from alignd.v1 import reference_pb2_grpc


@dataclass
class ReferenceState:
    handle: ModelHandle
    engine: ReferenceEngine
    batcher: DynamicBatcher


class ReferenceApp(ModelRoleApp):
    slug = "reference"
    role_service = "alignd.v1.ReferenceService"

    def __init__(self, cfg: ReferenceConfig, run_dir=None) -> None:
        super().__init__(cfg, run_dir)
        self.cfg: ReferenceConfig = cfg

    def register_role(self, host: ServiceHost) -> None:
        reference_pb2_grpc.add_ReferenceServiceServicer_to_server(
            ReferenceServicer(self.loaded, self.batch_metrics), host.server
        )

    def load_handle(self) -> ModelHandle:
        return ModelHandle(
            self.slug, self.cfg.model, load_causal_lm(self.cfg.model), tokenizer=load_tokenizer(self.cfg.model)
        )

    def build(self, handle: ModelHandle) -> ReferenceState:
        engine = ReferenceEngine(handle, self.cfg.batching.max_batch_size)
        return ReferenceState(handle, engine, self.make_batcher(per_request(engine.logprobs), self.cfg.batching))

    def warmup(self, state: ReferenceState) -> None:
        pad = state.handle.pad_token_id
        state.engine.logprobs([Item([pad], [pad], 1.0)])


def create(cfg: ReferenceConfig, run_dir=None) -> ReferenceApp:
    return ReferenceApp(cfg, run_dir)
