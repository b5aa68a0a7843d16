"""Typed configuration of every alignd role, run and local stack (pydantic; unknown keys are errors).

Each role reads one YAML file (`alignd serve ROLE --config FILE`) validated by its model; `--set dotted.key=value`
overrides any field (the value is parsed as YAML: `--set policy.batching.max_batch_size=64`). Every field is
documented in docs/configuration.md (generated from these models) and in the comments of configs/*.yaml.

One module per concern; import from here:

- base: Strict (the base model), ConfigError, shared field types;
- server: a role's server (endpoints, auth, limits, TLS), its client credentials, path roots;
- training: PPO, optimizer, SFT and RM jobs, engine (defaults from alignd.paper);
- roles: policy, reward, reference and learner;
- launch: the job launchers (local, Kubernetes);
- coordinator: the coordinator role;
- runs: a PPO run and the pipeline;
- stack: the local stack and the job files of `alignd ppo` / `alignd run`;
- loader: YAML files and --set overrides;
- reference: docs/configuration.md.
"""

from __future__ import annotations

from alignd.config.base import (  # noqa: F401
    CIDRList,
    ConfigError,
    Strict,
    expand_path,
)
from alignd.config.coordinator import (  # noqa: F401
    RETRY_PHASES,
    CoordinatorConfig,
    CoordinatorTrackingConfig,
    HedgingConfig,
    JudgePluginConfig,
)
from alignd.config.launch import (  # noqa: F401
    JobResourcesConfig,
    KubernetesLauncherConfig,
    LauncherConfig,
)
from alignd.config.loader import (  # noqa: F401
    build_config,
    dump_yaml,
    format_validation_error,
    load_config,
    load_yaml,
    parse_overrides,
)
from alignd.config.reference import (  # noqa: F401
    reference_markdown,
)
from alignd.config.roles import (  # noqa: F401
    BatchingConfig,
    LearnerConfig,
    ModelConfig,
    PolicyBatchingConfig,
    PolicyConfig,
    ReferenceBatchingConfig,
    ReferenceConfig,
    RewardBatchingConfig,
    RewardConfig,
    RewardFunctionConfig,
    RewardHTTPConfig,
    RewardLimitsConfig,
)
from alignd.config.runs import (  # noqa: F401
    EvaluationConfig,
    JudgeConfig,
    LabelingConfig,
    PipelineConfig,
    PPORunConfig,
    PromptsConfig,
    RMRetrainConfig,
    SamplingConfig,
    TrackingConfig,
)
from alignd.config.server import (  # noqa: F401
    AuthConfig,
    FaultInjectionConfig,
    PathsConfig,
    RoleClientConfig,
    RoleConfig,
    ServerConfig,
    ServerLimitsConfig,
    TLSConfig,
)
from alignd.config.stack import (  # noqa: F401
    ROLE_CONFIGS,
    ROLES,
    PipelineJobConfig,
    PPOJobConfig,
    RestartConfig,
    StackConfig,
)
from alignd.config.training import (  # noqa: F401
    EngineConfig,
    OptimizerConfig,
    PPOConfig,
    RMTrainConfig,
    SFTConfig,
    SupervisedJobConfig,
)

__all__ = [
    "AuthConfig",
    "BatchingConfig",
    "CIDRList",
    "ConfigError",
    "CoordinatorConfig",
    "CoordinatorTrackingConfig",
    "EngineConfig",
    "EvaluationConfig",
    "FaultInjectionConfig",
    "HedgingConfig",
    "JobResourcesConfig",
    "JudgeConfig",
    "JudgePluginConfig",
    "KubernetesLauncherConfig",
    "LabelingConfig",
    "LauncherConfig",
    "LearnerConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PPOConfig",
    "PPOJobConfig",
    "PPORunConfig",
    "PathsConfig",
    "PipelineConfig",
    "PipelineJobConfig",
    "PolicyBatchingConfig",
    "PolicyConfig",
    "PromptsConfig",
    "TrackingConfig",
    "RETRY_PHASES",
    "RMRetrainConfig",
    "RMTrainConfig",
    "ROLES",
    "ROLE_CONFIGS",
    "ReferenceBatchingConfig",
    "ReferenceConfig",
    "RestartConfig",
    "RewardBatchingConfig",
    "RewardConfig",
    "RewardFunctionConfig",
    "RewardHTTPConfig",
    "RewardLimitsConfig",
    "RoleClientConfig",
    "RoleConfig",
    "SFTConfig",
    "SamplingConfig",
    "ServerConfig",
    "ServerLimitsConfig",
    "StackConfig",
    "Strict",
    "SupervisedJobConfig",
    "TLSConfig",
    "build_config",
    "dump_yaml",
    "expand_path",
    "format_validation_error",
    "load_config",
    "load_yaml",
    "parse_overrides",
    "reference_markdown",
]
