"""The coordinator's clients of the other roles: a channel per replica with the coordinator's credentials, and
calls that survive a role restarting (wait for its health, back off, call again, within the phase's retry budget).

Which layer retries what (docs/architecture.md, "Retries"): the gRPC channel retries idempotent calls on
UNAVAILABLE a few times within one deadline (runtime.client.service_config); RoleClients.call retries any call
of the run for as long as its phase's budget (coordinator.retry_budget_seconds) while the role restarts; the
reward client SDK (alignd.reward_client) retries Score for callers outside alignd; both pause by
alignd.runtime.retry.Backoff.
"""

from __future__ import annotations

import time

import grpc

from alignd.config import CoordinatorConfig
from alignd.runtime.client import expand_addresses, make_channel, wait_for_serving
from alignd.runtime.errors import FailedPrecondition
from alignd.runtime.logging import get_logger
from alignd.runtime.retry import Backoff
from alignd.services.coordinator.errors import RunFailed
from alignd.v1 import model_pb2, model_pb2_grpc

_log = get_logger("alignd.coordinator.clients")


# The phase whose retry budget (coordinator.retry_budget_seconds) a call spends.
PHASE_OF = {
    "Generate": "generate",
    "Score": "score",
    "LogProbs": "reference",
    "TrainStep": "train",
    "PushWeights": "sync_weights",
    "LoadWeights": "sync_weights",
    "TrainSFT": "sft",
    "TrainRewardModel": "rm",
    "EvaluateTextLoss": "evaluate",
}


class RoleClients:
    """Channels to every role, and calls that survive a role restarting."""

    def __init__(self, cfg: CoordinatorConfig) -> None:
        missing = [
            name
            for name, v in (
                ("policy_addresses", cfg.policy_addresses),
                ("reward_addresses", cfg.reward_addresses),
                ("reference_addresses", cfg.reference_addresses),
                ("learner_address", cfg.learner_address),
            )
            if not v
        ]
        if missing:
            raise FailedPrecondition(f"coordinator is not configured with {', '.join(missing)}")
        self.cfg = cfg
        # A headless Service name becomes one channel per replica (resolved when the run starts).
        self.policy_addresses = expand_addresses(cfg.policy_addresses)
        self.policy = [self.channel("policy", a) for a in self.policy_addresses]
        self.reward = [self.channel("reward", a) for a in expand_addresses(cfg.reward_addresses)]
        self.reference = [self.channel("reference", a) for a in expand_addresses(cfg.reference_addresses)]
        self.learner = self.channel("learner", cfg.learner_address)
        self._rr = 0
        self._backoff = Backoff(0.2, 2.0)  # the pause before calling a role that is serving again

    def channel(self, role: str, address: str) -> grpc.Channel:
        """A channel to one replica of `role`, carrying the coordinator's credentials for it."""
        return make_channel(address, credentials=self.cfg.credentials_for(role))

    def next_rr(self) -> int:
        self._rr += 1
        return self._rr

    def budget(self, what: str) -> float:
        """Seconds a call of `what` may keep retrying an unavailable role."""
        return self.cfg.retry_budget_seconds.get(PHASE_OF.get(what, ""), self.cfg.recovery_timeout_seconds)

    def call(self, what: str, channel: grpc.Channel, fn, *, budget: float | None = None):
        """fn(timeout) with recovery: on UNAVAILABLE, wait for the role's health, back off (jittered), call again;
        for at most the phase's retry budget."""
        budget = self.budget(what) if budget is None else budget
        deadline = time.monotonic() + budget
        attempt = 0
        while True:
            try:
                return fn(self.cfg.rpc_timeout_seconds)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RunFailed(f"{what}: role unavailable for {budget:.0f}s (its retry budget)") from err
                _log.warning("role_unavailable", call=what, error=err.details(), attempt=attempt + 1)
                try:
                    wait_for_serving(channel, timeout=remaining)
                except TimeoutError as exc:
                    raise RunFailed(f"{what}: role did not come back within its retry budget: {exc}") from err
                # The role may serve while what it depends on does not (the learner while a policy replica
                # restarts, for PushWeights): back off before calling again.
                attempt += 1
                pause = self._backoff.delay(attempt)
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))

    def call_any(self, what: str, channels: list[grpc.Channel], fn):
        """fn(channel, timeout) on one replica, round robin; one that is UNAVAILABLE is skipped for the next,
        and when every replica is, the first is waited for (RoleClients.call)."""
        start = self.next_rr()
        order = [channels[(start + i) % len(channels)] for i in range(len(channels))]
        for ch in order[:-1]:
            try:
                return fn(ch, self.cfg.rpc_timeout_seconds)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                _log.warning("replica_skipped", call=what, error=err.details())
        last = order[-1]
        return self.call(what, last, lambda t: fn(last, t))

    def refresh_policy(self, r: int) -> bool:
        """Resolves the policy addresses again; when replica r's address changed (a replaced pod behind a headless
        Service) and the count is the same, r gets a channel to its new address. True when it changed."""
        fresh = expand_addresses(self.cfg.policy_addresses)
        if len(fresh) != len(self.policy_addresses) or fresh[r] == self.policy_addresses[r]:
            return False
        _log.info("replica_address_changed", old=self.policy_addresses[r], new=fresh[r])
        self.policy[r].close()
        self.policy_addresses[r] = fresh[r]
        self.policy[r] = self.channel("policy", fresh[r])
        return True

    def info(self, channel) -> model_pb2.ModelInfo:
        stub = model_pb2_grpc.ModelServiceStub(channel)
        return self.call("GetInfo", channel, lambda t: stub.GetInfo(model_pb2.GetInfoRequest(), timeout=t)).info

    def close(self) -> None:
        for ch in [*self.policy, *self.reward, *self.reference, self.learner]:
            ch.close()
