"""The reward role: `alignd serve reward --config FILE`."""

from __future__ import annotations

from dataclasses import dataclass

from alignd.config import RewardConfig
from alignd.models.app import ModelRoleApp
from alignd.models.handle import ModelHandle, load_scalar_head_model, load_tokenizer
from alignd.runtime.batching import DynamicBatcher, per_request
from alignd.runtime.server import ServiceHost
from alignd.services.reward.api import RewardAPI, RewardAPIMetrics
from alignd.services.reward.engine import FunctionRewardEngine, RewardEngine
from alignd.services.reward.servicer import RewardServicer
from alignd.v1 import reward_pb2_grpc


@dataclass
class RewardState:
    handle: ModelHandle
    engine: RewardEngine | FunctionRewardEngine
    batcher: DynamicBatcher


class RewardApp(ModelRoleApp):
    slug = "reward"
    role_service = "alignd.v1.RewardService"

    def __init__(self, cfg: RewardConfig, run_dir=None) -> None:
        super().__init__(cfg, run_dir)
        self.cfg: RewardConfig = cfg

    http_server = None

    def register_role(self, host: ServiceHost) -> None:
        metrics = RewardAPIMetrics(host.registry)
        self.api = RewardAPI(self.loaded, self.cfg.limits, metrics, batch_metrics=self.batch_metrics)
        if host.authenticator is not None:
            # gRPC refusals happen in the interceptor, before the servicer: count them with the API's.
            host.authenticator.listeners.append(
                lambda api, reason: api == "grpc" and metrics.rejected.labels("grpc", "unauthenticated").inc()
            )
        reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(self.api), host.server)

    def start_extra(self, host: ServiceHost) -> dict:
        """The HTTP API (OpenRLHF's /get_reward), bound next to the gRPC port; its URL goes into the endpoint file."""
        if self.cfg.http.port < 0:
            return {}
        from alignd.services.reward.http import start_http

        self.http_server = start_http(self.cfg.http, self.cfg.server, self.api, host_obj=host, registry=host.registry)
        return {"http_url": self.http_server.url}

    def load_handle(self) -> ModelHandle:
        if self.cfg.function is not None:
            # Only the tokenizer, vocabulary and context matter: load the backbone.
            from transformers import AutoModel

            from alignd.models.handle import DTYPES, check_model_dir

            model = AutoModel.from_pretrained(
                str(check_model_dir(self.cfg.model.path)), dtype=DTYPES[self.cfg.model.dtype]
            ).eval()
            return ModelHandle(self.slug, self.cfg.model, model, tokenizer=load_tokenizer(self.cfg.model))
        model = load_scalar_head_model(self.cfg.model, allow_new_head=self.cfg.allow_new_head)
        handle = ModelHandle(self.slug, self.cfg.model, model, tokenizer=load_tokenizer(self.cfg.model))
        # LoadWeights of a reward model of another architecture (rm.layers: a smaller RM) loads it whole;
        # it must carry a trained head.
        handle.reloader = lambda path: load_scalar_head_model(
            self.cfg.model.model_copy(update={"path": path}), allow_new_head=False
        )
        return handle

    def build(self, handle: ModelHandle) -> RewardState:
        if self.cfg.function is not None:
            from alignd.rewards import resolve

            engine = FunctionRewardEngine(handle, resolve(self.cfg.function.name), self.cfg.function.args)
        else:
            engine = RewardEngine(handle, self.cfg.batching.max_batch_size, self.cfg.batching.max_batch_tokens)
        return RewardState(handle, engine, self.make_batcher(per_request(engine.score), self.cfg.batching))

    def close(self) -> None:
        if self.http_server is not None:
            self.http_server.stop()
        super().close()

    def warmup(self, state: RewardState) -> None:
        state.engine.score([([], [state.handle.pad_token_id])])


def create(cfg: RewardConfig, run_dir=None) -> RewardApp:
    return RewardApp(cfg, run_dir)
