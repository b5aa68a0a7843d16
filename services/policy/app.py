"""The policy role: `alignd serve policy --config FILE`."""

from __future__ import annotations

from dataclasses import dataclass

from alignd.config import PolicyConfig
from alignd.models.app import ModelRoleApp
from alignd.models.handle import ModelHandle, load_causal_lm, load_meta_causal_lm, load_tokenizer
from alignd.runtime.batching import DynamicBatcher, per_request
from alignd.runtime.server import ServiceHost
from alignd.services.policy.engine import PolicyEngine, Row, Sampling
from alignd.services.policy.servicer import PolicyServicer
from alignd.services.policy.vllm_engine import Generated, VllmEngine, VllmHandle
from alignd.v1 import policy_pb2_grpc


@dataclass
class PolicyState:
    handle: ModelHandle
    engine: PolicyEngine | None  # engine: transformers
    batcher: DynamicBatcher | None

    def generate(self, rows: list[Row], timeout: float | None, on_done) -> Generated:
        """Every row's sample and the weight version they ran with."""
        if isinstance(self.handle, VllmHandle):
            return self.handle.generate(rows, timeout, on_done)
        (results, version), pending, info = self.batcher.run(rows, len(rows), timeout, on_done=on_done)
        return Generated(results, version, pending.queue_seconds, info.seconds, info.size)


class PolicyApp(ModelRoleApp):
    slug = "policy"
    role_service = "alignd.v1.PolicyService"

    def __init__(self, cfg: PolicyConfig, run_dir=None) -> None:
        super().__init__(cfg, run_dir)
        self.cfg: PolicyConfig = cfg

    def register_role(self, host: ServiceHost) -> None:
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(
            PolicyServicer(self.loaded, self.batch_metrics), host.server
        )

    def load_handle(self) -> ModelHandle:
        tokenizer = load_tokenizer(self.cfg.model)
        if self.cfg.engine == "vllm":
            # The weights live in vLLM's workers; this process keeps their names and shapes to check updates.
            handle = VllmHandle(self.slug, self.cfg.model, load_meta_causal_lm(self.cfg.model), tokenizer=tokenizer)
            handle.engine = VllmEngine(self.cfg, max_context=handle.max_context)
            self.vllm = handle.engine
            return handle
        return ModelHandle(self.slug, self.cfg.model, load_causal_lm(self.cfg.model), tokenizer=tokenizer)

    def build(self, handle: ModelHandle) -> PolicyState:
        if isinstance(handle, VllmHandle):
            return PolicyState(handle, None, None)  # vLLM batches requests itself
        engine = PolicyEngine(handle, self.cfg.batching.max_batch_size)
        return PolicyState(handle, engine, self.make_batcher(per_request(engine.generate), self.cfg.batching))

    def warmup(self, state: PolicyState) -> None:
        s = Sampling(1.0, 1.0, 0, 2, frozenset(), False)
        state.generate([Row([state.handle.pad_token_id], s, 0)], None, None)

    def close(self) -> None:
        super().close()
        engine = getattr(self, "vllm", None)
        if engine is not None:
            engine.close()


def create(cfg: PolicyConfig, run_dir=None) -> PolicyApp:
    return PolicyApp(cfg, run_dir)
