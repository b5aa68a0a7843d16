"""The weights every role must serve during a run, and getting them there.

- `PolicyPushPlan` (a PPO run) and the pipeline's plan (services/coordinator/pipeline.py) say which weight
  version each role must serve now, and how to bring a replica that serves another one back to it.
- `WeightSync` pushes the learner's policy to the replicas (PushWeights; staged while they generate, with
  run.stage_weights), keeps the policy replicas' rotation (replicas.Rotation: who is out, who comes back), and
  calls a role again after re-syncing it when its answer came from weights the run did not expect
  (`call_at_run_version`: a replica that restarted serves the weights in its own configuration).
"""

from __future__ import annotations

import threading
from typing import Protocol

import grpc

from alignd.runtime.logging import get_logger
from alignd.services.coordinator.clients import RoleClients
from alignd.services.coordinator.errors import RunFailed
from alignd.services.coordinator.replicas import Rotation
from alignd.services.coordinator.runs import RunRecord
from alignd.services.coordinator.step_metrics import timed_phase
from alignd.v1 import learner_pb2, learner_pb2_grpc, model_pb2, model_pb2_grpc

_log = get_logger("alignd.coordinator.weight_sync")

RETURN_CHECK_BUDGET_S = 10.0  # checking and re-syncing a replica that returns to the rotation (not the phase budget)


class VersionPlan(Protocol):
    def expected_version(self, role: str) -> int | None:
        """The weight version `role`'s replicas must serve now; 0: the weights in their own configuration; None:
        the run does not manage that role's weights (they serve what they were given)."""

    def resync(self, role: str, replicas: list[int] | None, sync: WeightSync) -> None:
        """Brings `role`'s replicas (policy: those given, else every one in the rotation) to expected_version."""


class PolicyPushPlan:
    """A PPO run's plan: the policy serves the learner's last pushed version; reward and reference are not managed."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record

    def expected_version(self, role: str) -> int | None:
        return self.record.policy_version if role == "policy" else None

    def resync(self, role: str, replicas: list[int] | None, sync: WeightSync) -> None:
        if role == "policy":
            sync.push(replicas, budget=RETURN_CHECK_BUDGET_S if replicas is not None else None)


def load_weights(roles: RoleClients, channels: list[grpc.Channel], path: str, *, version: int) -> None:
    """LoadWeights(path, version) on every replica that does not serve `version` already (a restart may have
    loaded it before)."""
    for ch in channels:
        stub = model_pb2_grpc.ModelServiceStub(ch)
        served = roles.info(ch).weight_version
        if served == version:
            continue
        # A replica ahead of the run serves weights the run never published: replaced, not skipped.
        req = model_pb2.LoadWeightsRequest(path=path, version=version, replace_newer=served > version)
        roles.call("LoadWeights", ch, lambda t, stub=stub, req=req: stub.LoadWeights(req, timeout=t))


class WeightSync:
    def __init__(self, record: RunRecord, roles: RoleClients, metrics, *, plan: VersionPlan) -> None:
        self.record = record
        self.roles = roles
        self.metrics = metrics
        self.plan = plan
        self.rotation = Rotation(len(roles.policy), roles.cfg.hedging.out_of_rotation_steps)
        metrics.replicas_in_rotation.set(len(roles.policy))
        # One weight update of a role at a time: the main thread's pushes (and staging) and the rollout thread's
        # re-syncs would otherwise race for a replica's single update slot; concurrent micro-batches may find the
        # same restarted reward or reference replica.
        self._push_lock = threading.Lock()
        self._resync_locks = {role: threading.Lock() for role in ("policy", "reward", "reference")}
        self.stage_ok = True  # run.stage_weights, until a learner or replica shows it cannot stage

    def expected_version(self, role: str) -> int | None:
        return self.plan.expected_version(role)

    def resync(self, role: str, replicas: list[int] | None = None) -> None:
        self.plan.resync(role, replicas, self)

    # -- pushing the learner's policy ----------------------------------------
    def push(
        self, replicas: list[int] | None = None, *, budget: float | None = None, stage_only: bool = False
    ) -> learner_pb2.PushWeightsResponse:
        """PushWeights to `replicas`, else to every replica but those out of the rotation for being unavailable
        (the learner's configured set when every replica is in the rotation). A push that fails because a replica
        is down takes the replicas that do not answer out of the rotation (if others remain), and is retried
        without them."""
        learner = learner_pb2_grpc.LearnerServiceStub(self.roles.learner)

        def push(timeout: float):
            req = learner_pb2.PushWeightsRequest(addresses=self._push_addresses(replicas), stage_only=stage_only)
            try:
                with self._push_lock:
                    return learner.PushWeights(req, timeout=timeout)
            except grpc.RpcError as err:
                # (staging runs while the rollout thread generates: it leaves the rotation to the push after it)
                if (
                    err.code() == grpc.StatusCode.UNAVAILABLE
                    and replicas is None
                    and self.rotation.n > 1
                    and not stage_only
                ):
                    self._take_out_unreachable()
                raise

        return self.roles.call("PushWeights", self.roles.learner, push, budget=budget)

    def _push_addresses(self, replicas: list[int] | None) -> list[str]:
        """The replicas a push goes to ([]: the learner's configured set)."""
        if replicas is not None:
            return [self.roles.policy_addresses[r] for r in replicas]
        if len(self.rotation.inside()) == self.rotation.n:
            return []
        # slow replicas still get the weights: a fail-over may need them
        return [
            self.roles.policy_addresses[r] for r in range(self.rotation.n) if self.rotation.reason[r] != "unavailable"
        ]

    def stage(self, step: int, timings: dict[str, float]) -> None:
        """PushWeights(stage_only): the replicas receive the new weights while they generate (phase stage_weights
        of the step's timings). Best effort: the push that follows sends them in full to any replica that does not
        hold them staged."""
        try:
            with timed_phase(self.metrics, "stage_weights", timings):  # (not recorded when it fails)
                staged = self.push(budget=RETURN_CHECK_BUDGET_S, stage_only=True).staged
        except (grpc.RpcError, RunFailed) as err:
            # FAILED_PRECONDITION: a replica predates staging (it applied the weights at once)
            staged = not (isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.FAILED_PRECONDITION)
            _log.warning("weight_staging_failed", run_id=self.record.run_id, step=step, error=_detail(err))
        if not staged:  # a learner that predates staging answers with a full push
            self.stage_ok = False
            _log.warning(
                "weight_staging_off",
                run_id=self.record.run_id,
                step=step,
                reason="the learner or a policy replica does not stage weights",
            )

    # -- replicas in the rotation ----------------------------------------------
    def replica_out(self, replica: int, reason: str) -> None:
        """Told each replica taken out of the rotation (replicas.fan_out's on_out)."""
        _log.warning(
            "replica_out_of_rotation",
            run_id=self.record.run_id,
            replica=self.roles.policy_addresses[replica],
            reason=reason,
            steps=self.rotation.out_steps,
        )
        self.metrics.replicas_out.labels(reason).inc()
        self.metrics.replicas_in_rotation.set(len(self.rotation.inside()))

    def return_replicas(self, step: int) -> None:
        """Replicas whose time out of the rotation is over come back once they answer and serve the current weights
        (a replica that does not answer is looked up again: a Kubernetes pod that was replaced has a new address)."""
        for r in self.rotation.due(step):
            try:
                try:
                    info = self._replica_info(r)
                except grpc.RpcError:
                    if not self.roles.refresh_policy(r):
                        raise
                    info = self._replica_info(r)
                if info.weight_version != self.expected_version("policy"):  # behind, or ahead: never published
                    self.resync("policy", [r])
            except (grpc.RpcError, RunFailed) as err:
                _log.warning(
                    "replica_still_out",
                    run_id=self.record.run_id,
                    replica=self.roles.policy_addresses[r],
                    error=_detail(err),
                )
                self.rotation.take_out(r, step, "unavailable")
                continue
            self.rotation.put_back(r)
            _log.info("replica_back_in_rotation", run_id=self.record.run_id, replica=self.roles.policy_addresses[r])
            self.metrics.replicas_in_rotation.set(len(self.rotation.inside()))

    def _replica_info(self, r: int) -> model_pb2.ModelInfo:
        stub = model_pb2_grpc.ModelServiceStub(self.roles.policy[r])
        return stub.GetInfo(model_pb2.GetInfoRequest(), timeout=RETURN_CHECK_BUDGET_S).info

    def _take_out_unreachable(self) -> None:
        """Replicas in the rotation that do not answer GetInfo leave it, unless none would be left."""
        inside = self.rotation.inside()
        down = []
        for r in inside:
            try:
                model_pb2_grpc.ModelServiceStub(self.roles.policy[r]).GetInfo(model_pb2.GetInfoRequest(), timeout=5)
            except grpc.RpcError:
                down.append(r)
        if down and len(down) < len(inside):
            for r in down:
                self.rotation.take_out(r, self.record.step + 1, "unavailable")
                self.replica_out(r, "unavailable")

    # -- answers from the weights the run expects --------------------------------
    def call_at_run_version(self, role: str, fn, version_of, *, want: int | None = None):
        """fn() -> a response; when version_of(response) is below what `role` must serve (`want`, else
        expected_version: a replica that restarted from the weights in its configuration), the replicas are
        re-synced and fn is called again."""
        for attempt in range(3):
            resp = fn()
            want, got = (self.expected_version(role) if want is None else want), version_of(resp)
            # The policy may be ahead of `want` (async rollouts take any version from it on); the reward and
            # reference replicas of a pipeline serve exactly the run's version: one ahead of it serves weights the
            # run never published, and is re-synced too.
            if want is None or got == want or (role == "policy" and got > want):
                return resp
            _log.warning(
                "role_resync",
                run_id=self.record.run_id,
                role=role,
                expected_version=want,
                found_version=got,
                attempt=attempt + 1,
            )
            self.metrics.resyncs.labels(role).inc()
            with self._resync_locks[role]:  # a second caller finds the replicas at the version, and skips them
                self.resync(role)
        raise RunFailed(f"{role} replicas still serve weight version {got} after 3 re-syncs; expected {want}")


def _detail(err: Exception) -> str:
    return str(err.details() if isinstance(err, grpc.RpcError) else err)
