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
    ConfigError,
    Strict,
    CIDRList,
    expand_path,
)
from alignd.config.server import (  # noqa: F401
    AuthConfig,
    ServerLimitsConfig,
    TLSConfig,
    FaultInjectionConfig,
    ServerConfig,
    RoleClientConfig,
    PathsConfig,
    RoleConfig,
)
from alignd.config.training import (  # noqa: F401
    PPOConfig,
    OptimizerConfig,
    SupervisedJobConfig,
    SFTConfig,
    RMTrainConfig,
    EngineConfig,
)
from alignd.config.roles import (  # noqa: F401
    ModelConfig,
    BatchingConfig,
    PolicyBatchingConfig,
    ReferenceBatchingConfig,
    RewardBatchingConfig,
    RewardHTTPConfig,
    RewardLimitsConfig,
    PolicyConfig,
    RewardFunctionConfig,
    RewardConfig,
    ReferenceConfig,
    LearnerConfig,
)
from alignd.config.launch import (  # noqa: F401
    JobResourcesConfig,
    KubernetesLauncherConfig,
    LauncherConfig,
)
from alignd.config.coordinator import (  # noqa: F401
    RETRY_PHASES,
    HedgingConfig,
    JudgePluginConfig,
    CoordinatorConfig,
)
from alignd.config.runs import (  # noqa: F401
    SamplingConfig,
    PromptsConfig,
    PPORunConfig,
    JudgeConfig,
    LabelingConfig,
    RMRetrainConfig,
    EvaluationConfig,
    PipelineConfig,
)
from alignd.config.stack import (  # noqa: F401
    ROLE_CONFIGS,
    ROLES,
    RestartConfig,
    StackConfig,
    PipelineJobConfig,
    PPOJobConfig,
)
from alignd.config.loader import (  # noqa: F401
    parse_overrides,
    format_validation_error,
    build_config,
    load_yaml,
    load_config,
    dump_yaml,
)
from alignd.config.reference import (  # noqa: F401
    reference_markdown,
)

__all__ = [
    "AuthConfig",
    "BatchingConfig",
    "CIDRList",
    "ConfigError",
    "CoordinatorConfig",
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
