"""The coordinator role: `alignd serve coordinator --config FILE`. Imports no torch.

This version reports the roles it drives (GetCoordinatorInfo); the run RPCs
answer UNIMPLEMENTED until the PPO loop lands.
"""

from __future__ import annotations

from alignd import __version__
from alignd.config import CoordinatorConfig
from alignd.runtime.errors import Unimplemented
from alignd.runtime.role import RoleApp
from alignd.runtime.server import ServiceHost
from alignd.v1 import coordinator_pb2, coordinator_pb2_grpc


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.cfg = cfg

    def GetCoordinatorInfo(self, request, context):
        return coordinator_pb2.GetCoordinatorInfoResponse(
            alignd_version=__version__,
            policy_addresses=self.cfg.policy_addresses,
            reward_addresses=self.cfg.reward_addresses,
            reference_addresses=self.cfg.reference_addresses,
            learner_address=self.cfg.learner_address or "",
        )

    def StartRun(self, request, context):
        raise Unimplemented("StartRun is not implemented in this version of alignd")

    def GetRun(self, request, context):
        raise Unimplemented("GetRun is not implemented in this version of alignd")

    def StopRun(self, request, context):
        raise Unimplemented("StopRun is not implemented in this version of alignd")

    def ListRuns(self, request, context):
        raise Unimplemented("ListRuns is not implemented in this version of alignd")


class CoordinatorApp(RoleApp):
    slug = "coordinator"
    service_names = ["alignd.v1.CoordinatorService"]

    def __init__(self, cfg: CoordinatorConfig) -> None:
        self.cfg = cfg

    def register(self, host: ServiceHost) -> None:
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(CoordinatorServicer(self.cfg), host.server)


def create(cfg: CoordinatorConfig) -> CoordinatorApp:
    return CoordinatorApp(cfg)
