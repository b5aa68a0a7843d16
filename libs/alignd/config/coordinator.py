"""The coordinator role: its clients of the other roles, retry budgets, hedging, the job launcher, judges."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from alignd.config.base import Strict
from alignd.config.launch import LauncherConfig
from alignd.config.server import RoleClientConfig, RoleConfig

RETRY_PHASES = ("generate", "score", "reference", "train", "sync_weights", "evaluate", "sft", "rm")


class HedgingConfig(Strict):
    """What the coordinator does about a slow or failed policy replica (with two replicas or more)."""

    enabled: bool = Field(True, description="Hedge slow shards (a failed replica's shard is always sent elsewhere).")
    delay_factor: float = Field(
        2.0,
        ge=1.0,
        description="A rollout shard still running this many times longer than the step's fastest finished shard is "
        "sent again to a replica that is done; the first answer is used, the other call cancelled.",
    )
    min_delay_seconds: float = Field(1.0, ge=0, description="Never hedge a shard younger than this, in seconds.")
    out_of_rotation_steps: int = Field(
        5,
        ge=1,
        description="A replica that was slow (its shard hedged and the hedge won) or unavailable gets no shard of "
        "its own for this many steps; then it is checked, re-synced to the current weights, and used again.",
    )


class JudgePluginConfig(Strict):
    """A judge of your own, registered under a name in the coordinator's configuration (never named by a request)."""

    function: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description='"package.module:function" of a function (prompt, completion, **args) -> float, importable by '
        "the coordinator.",
    )
    args: dict[str, Any] = Field({}, description="Keyword arguments bound to it (a run's judge args are added).")


class CoordinatorTrackingConfig(Strict):
    """Where the tracking backends a run names send its data (the operator's choice, not the run request's)."""

    mlflow_tracking_uri: str | None = Field(
        None,
        description="MLflow tracking server (http(s)://...) or store; null = a file store in the run directory "
        "(RUN_DIR/mlruns: `mlflow ui --backend-store-uri RUN_DIR/mlruns`).",
    )
    wandb_mode: Literal["auto", "online", "offline"] = Field(
        "auto",
        description="W&B: auto = online when WANDB_API_KEY is set in the coordinator's environment, else offline "
        "(RUN_DIR/wandb; `wandb sync` uploads it later).",
    )
    wandb_entity: str | None = Field(None, description="W&B entity (team); null = the key's default.")


class CoordinatorConfig(RoleConfig):
    """coordinator: runs the RLHF loop (alignd.v1.CoordinatorService). Imports no torch."""

    policy_addresses: list[str] = Field(
        [], description="host:port of every policy replica (requests are spread over all)."
    )
    reward_addresses: list[str] = Field([], description="host:port of every reward replica.")
    client: RoleClientConfig = Field(
        default_factory=RoleClientConfig,
        description="Credentials the coordinator presents to every role it calls (a token with the scopes "
        "generate, score, logprobs, train and weights; TLS). The local stack fills it in.",
    )
    reward_client: RoleClientConfig = Field(
        default_factory=RoleClientConfig,
        description="Other credentials for the reward replicas only (e.g. a reward service run by another team); "
        "default: client.",
    )
    reference_addresses: list[str] = Field([], description="host:port of every reference replica.")
    learner_address: str | None = Field(None, description="host:port of the learner.")
    runs_dir: str | None = Field(None, description="Where run state lives (RUNS_DIR/<run_id>/); default: RUN_DIR/runs.")
    rpc_timeout_seconds: float = Field(600.0, gt=0, description="Deadline of each call to another role, in seconds.")
    recovery_timeout_seconds: float = Field(
        900.0, gt=0, description="How long a role may be unavailable (restarting) before the run fails, in seconds."
    )
    retry_budget_seconds: dict[Literal[RETRY_PHASES], Annotated[float, Field(gt=0)]] = Field(
        {},
        description="Per phase, how long a call may keep retrying an unavailable role (with jittered backoff) before "
        "the run fails, in seconds; phases: " + ", ".join(RETRY_PHASES) + ". A phase not listed uses "
        "recovery_timeout_seconds.",
    )
    hedging: HedgingConfig = Field(
        default_factory=HedgingConfig, description="Slow and failed policy replicas: hedging and rotation."
    )
    launcher: LauncherConfig = Field(
        LauncherConfig(), description="How jobs that run outside the roles (reward-model training) are started."
    )
    tracking: CoordinatorTrackingConfig = Field(
        default_factory=CoordinatorTrackingConfig,
        description="Where runs' MLflow and W&B tracking goes (a run chooses the backends: run.tracking).",
    )
    judges: dict[str, JudgePluginConfig] = Field(
        {},
        description="Judges a run may name besides the built-in ones of alignd.judges (char_fraction, "
        'distinct_char_fraction, vader, textblob, afinn): {name: {function: "package.module:function", args}}. A run '
        "request names a judge; it never names code.",
    )

    @field_validator("judges")
    @classmethod
    def _judge_names(cls, v: dict) -> dict:
        from alignd.judges import BUILTIN

        clash = sorted(set(v) & set(BUILTIN))
        if clash:
            raise ValueError(f"{', '.join(clash)}: already built-in judges; register yours under other names")
        return v

    def credentials_for(self, role: str) -> RoleClientConfig:
        """What the coordinator presents to `role`: reward_client for the reward replicas when set, else client."""
        if role == "reward" and self.reward_client != RoleClientConfig():
            return self.reward_client
        return self.client
