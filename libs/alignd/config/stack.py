"""The local stack (`alignd up`: every role as a child process) and the job files of `alignd ppo` and
`alignd run` (a stack plus one run)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignd.config.base import Strict
from alignd.config.coordinator import CoordinatorConfig
from alignd.config.roles import LearnerConfig, PolicyConfig, ReferenceConfig, RewardConfig
from alignd.config.runs import PipelineConfig, PPORunConfig
from alignd.config.server import RoleConfig

ROLE_CONFIGS: dict[str, type[RoleConfig]] = {
    "policy": PolicyConfig,
    "reward": RewardConfig,
    "reference": ReferenceConfig,
    "learner": LearnerConfig,
    "coordinator": CoordinatorConfig,
}


ROLES = tuple(ROLE_CONFIGS)


class RestartConfig(Strict):
    """How the local stack restarts a role process that exits on its own (Kubernetes' restartPolicy, locally)."""

    policy: Literal["on_failure", "always", "never"] = Field(
        "on_failure",
        description="on_failure: restart a role that exits non-zero or is killed; always: also one that exits 0; "
        "never: a role that exits stops the whole stack (the launcher exits 1 naming it).",
    )
    max_restarts: int = Field(
        5,
        ge=0,
        description="Restarts of one role allowed within reset_after_seconds; one more stops the stack (exit 1).",
    )
    backoff_initial_seconds: float = Field(
        1.0, ge=0, description="Wait before the first restart of a role, in seconds."
    )
    backoff_max_seconds: float = Field(
        30.0, ge=0, description="The wait doubles with each restart within reset_after_seconds, up to this, in seconds."
    )
    reset_after_seconds: float = Field(
        600.0,
        gt=0,
        description="Restarts older than this no longer count toward max_restarts or the backoff, in seconds.",
    )

    def backoff(self, recent: int) -> float:
        """Seconds to wait before a restart, when `recent` restarts happened within reset_after_seconds."""
        return min(self.backoff_max_seconds, self.backoff_initial_seconds * (2.0 ** min(recent, 30)))


class StackConfig(Strict):
    """`alignd up`: every role as a local child process on loopback.

    Addresses between roles are filled in by the launcher (ports are
    ephemeral unless a role's server.port is set).
    """

    startup_timeout_seconds: float = Field(600.0, gt=0, description="Per role: model load + warm-up, in seconds.")
    stop_grace_seconds: float = Field(
        15.0, ge=0, description="On stop, children get SIGTERM, then SIGKILL after this many seconds."
    )
    restart: RestartConfig = Field(
        default_factory=RestartConfig,
        description="Restarting a role that dies: on the same ports, with backoff and a limit (stack.json: restarts).",
    )
    policy: PolicyConfig = Field(description="The policy role.")
    reward: RewardConfig = Field(description="The reward role.")
    reference: ReferenceConfig = Field(description="The reference role.")
    learner: LearnerConfig = Field(description="The learner role.")
    coordinator: CoordinatorConfig = Field(
        CoordinatorConfig(), description="The coordinator role; its addresses are filled in by the launcher."
    )


class PipelineJobConfig(Strict):
    """`alignd run --config FILE`: a local stack plus one pipeline run on it."""

    stack: StackConfig = Field(description="The local stack (see StackConfig).")
    pipeline: PipelineConfig = Field(description="The pipeline.")

    @model_validator(mode="after")
    def _learner_seed(self) -> PipelineJobConfig:
        if "seed" not in self.stack.learner.model_fields_set:
            self.stack.learner.seed = self.pipeline.seed
        return self


class PPOJobConfig(Strict):
    """`alignd ppo --config FILE`: a local stack plus one PPO run on it."""

    stack: StackConfig = Field(description="The local stack (see StackConfig).")
    run: PPORunConfig = Field(description="The PPO run.")

    @model_validator(mode="after")
    def _learner_seed(self) -> PPOJobConfig:
        if "seed" not in self.stack.learner.model_fields_set:
            self.stack.learner.seed = self.run.seed
        return self
