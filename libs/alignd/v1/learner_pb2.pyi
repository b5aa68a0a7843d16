from alignd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Experience(_message.Message):
    __slots__ = ("prompt_token_ids", "response_token_ids", "rollout_logprobs", "reference_logprobs", "score", "policy_version", "finish_reason")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_token_ids: _containers.RepeatedScalarFieldContainer[int]
    rollout_logprobs: _containers.RepeatedScalarFieldContainer[float]
    reference_logprobs: _containers.RepeatedScalarFieldContainer[float]
    score: float
    policy_version: int
    finish_reason: _common_pb2.FinishReason
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., response_token_ids: _Optional[_Iterable[int]] = ..., rollout_logprobs: _Optional[_Iterable[float]] = ..., reference_logprobs: _Optional[_Iterable[float]] = ..., score: _Optional[float] = ..., policy_version: _Optional[int] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ...) -> None: ...

class TrainStepRequest(_message.Message):
    __slots__ = ("step", "experiences", "rollout_logprobs_exact", "rollout_temperature")
    STEP_FIELD_NUMBER: _ClassVar[int]
    EXPERIENCES_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_LOGPROBS_EXACT_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    step: int
    experiences: _containers.RepeatedCompositeFieldContainer[Experience]
    rollout_logprobs_exact: bool
    rollout_temperature: float
    def __init__(self, step: _Optional[int] = ..., experiences: _Optional[_Iterable[_Union[Experience, _Mapping]]] = ..., rollout_logprobs_exact: _Optional[bool] = ..., rollout_temperature: _Optional[float] = ...) -> None: ...

class TrainStats(_message.Message):
    __slots__ = ("policy_loss", "value_loss", "approx_kl", "clip_fraction", "entropy", "mean_score", "kl_coef", "grad_norm", "tokens_per_second", "reference_kl", "ptx_loss", "ratio_mean", "value_clip_fraction", "learning_rate", "updates_applied", "updates_skipped", "stale_fraction", "behaviour_weight_mean", "behaviour_weight_max", "behaviour_truncated_fraction", "old_logprobs_from_rollout")
    POLICY_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALUE_LOSS_FIELD_NUMBER: _ClassVar[int]
    APPROX_KL_FIELD_NUMBER: _ClassVar[int]
    CLIP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    MEAN_SCORE_FIELD_NUMBER: _ClassVar[int]
    KL_COEF_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_KL_FIELD_NUMBER: _ClassVar[int]
    PTX_LOSS_FIELD_NUMBER: _ClassVar[int]
    RATIO_MEAN_FIELD_NUMBER: _ClassVar[int]
    VALUE_CLIP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    UPDATES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    STALE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_WEIGHT_MEAN_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_WEIGHT_MAX_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_TRUNCATED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    OLD_LOGPROBS_FROM_ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    policy_loss: float
    value_loss: float
    approx_kl: float
    clip_fraction: float
    entropy: float
    mean_score: float
    kl_coef: float
    grad_norm: float
    tokens_per_second: float
    reference_kl: float
    ptx_loss: float
    ratio_mean: float
    value_clip_fraction: float
    learning_rate: float
    updates_applied: int
    updates_skipped: int
    stale_fraction: float
    behaviour_weight_mean: float
    behaviour_weight_max: float
    behaviour_truncated_fraction: float
    old_logprobs_from_rollout: bool
    def __init__(self, policy_loss: _Optional[float] = ..., value_loss: _Optional[float] = ..., approx_kl: _Optional[float] = ..., clip_fraction: _Optional[float] = ..., entropy: _Optional[float] = ..., mean_score: _Optional[float] = ..., kl_coef: _Optional[float] = ..., grad_norm: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., reference_kl: _Optional[float] = ..., ptx_loss: _Optional[float] = ..., ratio_mean: _Optional[float] = ..., value_clip_fraction: _Optional[float] = ..., learning_rate: _Optional[float] = ..., updates_applied: _Optional[int] = ..., updates_skipped: _Optional[int] = ..., stale_fraction: _Optional[float] = ..., behaviour_weight_mean: _Optional[float] = ..., behaviour_weight_max: _Optional[float] = ..., behaviour_truncated_fraction: _Optional[float] = ..., old_logprobs_from_rollout: _Optional[bool] = ...) -> None: ...

class TrainStepResponse(_message.Message):
    __slots__ = ("step", "policy_version", "stats", "replayed", "skipped")
    STEP_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    step: int
    policy_version: int
    stats: TrainStats
    replayed: bool
    skipped: bool
    def __init__(self, step: _Optional[int] = ..., policy_version: _Optional[int] = ..., stats: _Optional[_Union[TrainStats, _Mapping]] = ..., replayed: _Optional[bool] = ..., skipped: _Optional[bool] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("tag",)
    TAG_FIELD_NUMBER: _ClassVar[int]
    tag: str
    def __init__(self, tag: _Optional[str] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("path", "step")
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    path: str
    step: int
    def __init__(self, path: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class PushWeightsRequest(_message.Message):
    __slots__ = ("addresses", "stage_only")
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    STAGE_ONLY_FIELD_NUMBER: _ClassVar[int]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    stage_only: bool
    def __init__(self, addresses: _Optional[_Iterable[str]] = ..., stage_only: _Optional[bool] = ...) -> None: ...

class PushWeightsResponse(_message.Message):
    __slots__ = ("version", "bytes_per_replica", "duration_seconds", "staged", "committed_replicas")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_REPLICA_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    version: int
    bytes_per_replica: int
    duration_seconds: float
    staged: bool
    committed_replicas: int
    def __init__(self, version: _Optional[int] = ..., bytes_per_replica: _Optional[int] = ..., duration_seconds: _Optional[float] = ..., staged: _Optional[bool] = ..., committed_replicas: _Optional[int] = ...) -> None: ...

class TrainSFTRequest(_message.Message):
    __slots__ = ("job_id", "init_model_dir", "demonstrations_path", "validation_path", "config_yaml", "output_dir")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    INIT_MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    DEMONSTRATIONS_PATH_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_PATH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    init_model_dir: str
    demonstrations_path: str
    validation_path: str
    config_yaml: str
    output_dir: str
    def __init__(self, job_id: _Optional[str] = ..., init_model_dir: _Optional[str] = ..., demonstrations_path: _Optional[str] = ..., validation_path: _Optional[str] = ..., config_yaml: _Optional[str] = ..., output_dir: _Optional[str] = ...) -> None: ...

class EpochStats(_message.Message):
    __slots__ = ("epoch", "step", "train_loss", "val_loss", "val_accuracy")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    step: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    def __init__(self, epoch: _Optional[int] = ..., step: _Optional[int] = ..., train_loss: _Optional[float] = ..., val_loss: _Optional[float] = ..., val_accuracy: _Optional[float] = ...) -> None: ...

class TrainSFTResponse(_message.Message):
    __slots__ = ("model_dir", "best_epoch", "best_val_loss", "history", "train_examples", "validation_examples", "replayed", "duration_seconds")
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    BEST_EPOCH_FIELD_NUMBER: _ClassVar[int]
    BEST_VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_dir: str
    best_epoch: int
    best_val_loss: float
    history: _containers.RepeatedCompositeFieldContainer[EpochStats]
    train_examples: int
    validation_examples: int
    replayed: bool
    duration_seconds: float
    def __init__(self, model_dir: _Optional[str] = ..., best_epoch: _Optional[int] = ..., best_val_loss: _Optional[float] = ..., history: _Optional[_Iterable[_Union[EpochStats, _Mapping]]] = ..., train_examples: _Optional[int] = ..., validation_examples: _Optional[int] = ..., replayed: _Optional[bool] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class TrainRewardModelRequest(_message.Message):
    __slots__ = ("job_id", "init_model_dir", "comparisons_path", "validation_path", "demonstrations_path", "config_yaml", "output_dir")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    INIT_MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    COMPARISONS_PATH_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_PATH_FIELD_NUMBER: _ClassVar[int]
    DEMONSTRATIONS_PATH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    init_model_dir: str
    comparisons_path: str
    validation_path: str
    demonstrations_path: str
    config_yaml: str
    output_dir: str
    def __init__(self, job_id: _Optional[str] = ..., init_model_dir: _Optional[str] = ..., comparisons_path: _Optional[str] = ..., validation_path: _Optional[str] = ..., demonstrations_path: _Optional[str] = ..., config_yaml: _Optional[str] = ..., output_dir: _Optional[str] = ...) -> None: ...

class TrainRewardModelResponse(_message.Message):
    __slots__ = ("model_dir", "val_accuracy_before", "val_accuracy", "train_accuracy", "score_bias", "history", "train_comparisons", "validation_comparisons", "replayed", "duration_seconds")
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_BEFORE_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SCORE_BIAS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    TRAIN_COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_dir: str
    val_accuracy_before: float
    val_accuracy: float
    train_accuracy: float
    score_bias: float
    history: _containers.RepeatedCompositeFieldContainer[EpochStats]
    train_comparisons: int
    validation_comparisons: int
    replayed: bool
    duration_seconds: float
    def __init__(self, model_dir: _Optional[str] = ..., val_accuracy_before: _Optional[float] = ..., val_accuracy: _Optional[float] = ..., train_accuracy: _Optional[float] = ..., score_bias: _Optional[float] = ..., history: _Optional[_Iterable[_Union[EpochStats, _Mapping]]] = ..., train_comparisons: _Optional[int] = ..., validation_comparisons: _Optional[int] = ..., replayed: _Optional[bool] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class ResetPolicyRequest(_message.Message):
    __slots__ = ("policy_dir", "value_model_dir", "version")
    POLICY_DIR_FIELD_NUMBER: _ClassVar[int]
    VALUE_MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    policy_dir: str
    value_model_dir: str
    version: int
    def __init__(self, policy_dir: _Optional[str] = ..., value_model_dir: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ResetPolicyResponse(_message.Message):
    __slots__ = ("version", "replayed")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    version: int
    replayed: bool
    def __init__(self, version: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class EvaluateTextLossRequest(_message.Message):
    __slots__ = ("text_path", "max_tokens", "max_blocks")
    TEXT_PATH_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    text_path: str
    max_tokens: int
    max_blocks: int
    def __init__(self, text_path: _Optional[str] = ..., max_tokens: _Optional[int] = ..., max_blocks: _Optional[int] = ...) -> None: ...

class EvaluateTextLossResponse(_message.Message):
    __slots__ = ("loss", "tokens", "policy_version")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    loss: float
    tokens: int
    policy_version: int
    def __init__(self, loss: _Optional[float] = ..., tokens: _Optional[int] = ..., policy_version: _Optional[int] = ...) -> None: ...

class GetJobProgressRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobProgressResponse(_message.Message):
    __slots__ = ("job_id", "phase", "epoch", "epochs", "step", "total_steps")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    phase: str
    epoch: int
    epochs: int
    step: int
    total_steps: int
    def __init__(self, job_id: _Optional[str] = ..., phase: _Optional[str] = ..., epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ...) -> None: ...
