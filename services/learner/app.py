"""The learner role: `alignd serve learner --config FILE`.

This version loads the policy it will train and serves ModelService.GetInfo
for it; TrainStep, SaveCheckpoint and PushWeights answer UNIMPLEMENTED until
the PPO engine lands (nothing answers success for work it did not do).
"""

from __future__ import annotations

from alignd.config import LearnerConfig
from alignd.models.app import ModelRoleApp
from alignd.models.handle import ModelHandle, load_causal_lm, load_tokenizer
from alignd.runtime.errors import Unimplemented
from alignd.runtime.server import ServiceHost
from alignd.v1 import learner_pb2_grpc


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    def TrainStep(self, request, context):
        raise Unimplemented("TrainStep is not implemented in this version of alignd")

    def SaveCheckpoint(self, request, context):
        raise Unimplemented("SaveCheckpoint is not implemented in this version of alignd")

    def PushWeights(self, request, context):
        raise Unimplemented("PushWeights is not implemented in this version of alignd")


class LearnerApp(ModelRoleApp):
    slug = "learner"
    role_service = "alignd.v1.LearnerService"
    accepts_updates = False  # the learner owns the weights it trains

    def __init__(self, cfg: LearnerConfig) -> None:
        super().__init__(cfg)
        self.cfg: LearnerConfig = cfg

    def register_role(self, host: ServiceHost) -> None:
        learner_pb2_grpc.add_LearnerServiceServicer_to_server(LearnerServicer(), host.server)

    def load_handle(self) -> ModelHandle:
        return ModelHandle(self.slug, self.cfg.model, load_causal_lm(self.cfg.model), load_tokenizer(self.cfg.model))

    def build(self, handle: ModelHandle) -> ModelHandle:
        return handle


def create(cfg: LearnerConfig) -> LearnerApp:
    return LearnerApp(cfg)
