"""Typed configuration of every alignd role and of the local stack.

Each role reads one YAML file (`alignd serve ROLE --config FILE`) validated
by the pydantic model below; `--set dotted.key=value` overrides any field
(the value is parsed as YAML: `--set policy.batching.max_batch_size=64`).
Unknown keys are rejected with their dotted name. Every field is documented
in docs/configuration.md and in the comments of configs/*.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ServerConfig(Strict):
    """gRPC and metrics endpoints of one role."""

    host: str = "127.0.0.1"  # interface for gRPC; "0.0.0.0" in containers
    port: int = Field(0, ge=0, le=65535)  # 0 = an ephemeral port
    metrics_host: str = "127.0.0.1"  # interface for the /metrics HTTP endpoint
    metrics_port: int = Field(0, ge=-1, le=65535)  # 0 = ephemeral, -1 = disabled
    max_workers: int = Field(16, ge=1)  # threads serving RPCs
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)  # per gRPC message
    grace_seconds: float = Field(10.0, ge=0)  # in-flight RPCs get this long on SIGTERM


class ModelConfig(Strict):
    """A Hugging Face model directory loaded with `from_pretrained`."""

    path: str  # directory holding config.json, weights and tokenizer files
    name: str | None = None  # reported by GetInfo; default: the directory name
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # fp32 on CPU (bf16 is ~100x slower there)
    device: str = "cpu"  # torch device, e.g. "cuda:0"
    max_context_tokens: int | None = Field(None, ge=2)  # default: the model's max_position_embeddings
    trust_remote_code: bool = False


class BatchingConfig(Strict):
    """Dynamic batching of concurrent requests."""

    max_batch_size: int = Field(32, ge=1)  # sequences per forward batch
    max_wait_ms: float = Field(5.0, ge=0)  # how long the first request waits for company
    max_queue: int = Field(256, ge=1)  # queued requests before RESOURCE_EXHAUSTED


class RoleConfig(Strict):
    server: ServerConfig = ServerConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    torch_threads: int = Field(0, ge=0)  # intra-op threads; 0 = torch's default


class PolicyConfig(RoleConfig):
    """policy: samples responses (alignd.v1.PolicyService + ModelService)."""

    model: ModelConfig
    batching: BatchingConfig = BatchingConfig()


class RewardConfig(RoleConfig):
    """reward: scores responses (alignd.v1.RewardService + ModelService)."""

    model: ModelConfig
    batching: BatchingConfig = BatchingConfig()
    # Accept a directory without a trained scalar head (the head is then
    # randomly initialised). Off by default: a random reward is a silent bug.
    allow_new_head: bool = False


class ReferenceConfig(RoleConfig):
    """reference: log-probs of the frozen SFT model (alignd.v1.ReferenceService + ModelService)."""

    model: ModelConfig
    batching: BatchingConfig = BatchingConfig()


class LearnerConfig(RoleConfig):
    """learner: PPO / SFT / RM training (alignd.v1.LearnerService + ModelService)."""

    model: ModelConfig  # the policy to train (initial weights)
    policy_addresses: list[str] = []  # policy replicas that receive new weights


class CoordinatorConfig(RoleConfig):
    """coordinator: runs the RLHF loop (alignd.v1.CoordinatorService). No torch."""

    policy_addresses: list[str] = []  # every policy replica (round robin)
    reward_addresses: list[str] = []
    reference_addresses: list[str] = []
    learner_address: str | None = None


ROLE_CONFIGS: dict[str, type[RoleConfig]] = {
    "policy": PolicyConfig,
    "reward": RewardConfig,
    "reference": ReferenceConfig,
    "learner": LearnerConfig,
    "coordinator": CoordinatorConfig,
}
ROLES = tuple(ROLE_CONFIGS)


class StackConfig(Strict):
    """`alignd up`: every role as a local child process on loopback.

    Addresses between roles are filled in by the launcher (ports are
    ephemeral unless a role's server.port is set).
    """

    startup_timeout_seconds: float = Field(600.0, gt=0)  # per role, load + warm-up
    stop_grace_seconds: float = Field(15.0, ge=0)  # SIGTERM, then SIGKILL after this
    policy: PolicyConfig
    reward: RewardConfig
    reference: ReferenceConfig
    learner: LearnerConfig
    coordinator: CoordinatorConfig = CoordinatorConfig()


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: empty key")
        out.append((key, yaml.safe_load(raw) if raw != "" else ""))
    return out


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def build_config(model: type[Strict], data: dict[str, Any] | None, overrides: list[str] | None = None):
    raw = dict(data or {})
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid {model.__name__}: {format_validation_error(err)}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config {p}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def load_config(model: type[Strict], path: str | Path | None, overrides: list[str] | None = None):
    """Reads YAML from `path` (optional), applies overrides, validates."""
    return build_config(model, load_yaml(path) if path else {}, overrides)


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
