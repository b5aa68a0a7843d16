from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_PENDING: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_SUCCEEDED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]
    RUN_STATE_STOPPED: _ClassVar[RunState]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_PENDING: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_SUCCEEDED: RunState
RUN_STATE_FAILED: RunState
RUN_STATE_STOPPED: RunState

class Run(_message.Message):
    __slots__ = ("run_id", "state", "stage", "step", "total_steps", "policy_version", "latest_metrics", "error", "run_dir", "created_unix_seconds", "stage_fraction", "stage_detail")
    class LatestMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    LATEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    STAGE_DETAIL_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: RunState
    stage: str
    step: int
    total_steps: int
    policy_version: int
    latest_metrics: _containers.ScalarMap[str, float]
    error: str
    run_dir: str
    created_unix_seconds: float
    stage_fraction: float
    stage_detail: str
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., stage: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., policy_version: _Optional[int] = ..., latest_metrics: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ..., run_dir: _Optional[str] = ..., created_unix_seconds: _Optional[float] = ..., stage_fraction: _Optional[float] = ..., stage_detail: _Optional[str] = ...) -> None: ...

class GetCoordinatorInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetCoordinatorInfoResponse(_message.Message):
    __slots__ = ("alignd_version", "policy_addresses", "reward_addresses", "reference_addresses", "learner_address")
    ALIGND_VERSION_FIELD_NUMBER: _ClassVar[int]
    POLICY_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    REWARD_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    LEARNER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    alignd_version: str
    policy_addresses: _containers.RepeatedScalarFieldContainer[str]
    reward_addresses: _containers.RepeatedScalarFieldContainer[str]
    reference_addresses: _containers.RepeatedScalarFieldContainer[str]
    learner_address: str
    def __init__(self, alignd_version: _Optional[str] = ..., policy_addresses: _Optional[_Iterable[str]] = ..., reward_addresses: _Optional[_Iterable[str]] = ..., reference_addresses: _Optional[_Iterable[str]] = ..., learner_address: _Optional[str] = ...) -> None: ...

class StartRunRequest(_message.Message):
    __slots__ = ("run_id", "config_yaml", "run_dir")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_yaml: str
    run_dir: str
    def __init__(self, run_id: _Optional[str] = ..., config_yaml: _Optional[str] = ..., run_dir: _Optional[str] = ...) -> None: ...

class StartRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class StopRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class StopRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ...) -> None: ...

class GetRunFilesRequest(_message.Message):
    __slots__ = ("run_id", "paths")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    paths: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run_id: _Optional[str] = ..., paths: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRunFilesResponse(_message.Message):
    __slots__ = ("path", "offset", "data", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    data: bytes
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ComparisonTask(_message.Message):
    __slots__ = ("task_id", "prompt", "completions")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    prompt: str
    completions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_id: _Optional[str] = ..., prompt: _Optional[str] = ..., completions: _Optional[_Iterable[str]] = ...) -> None: ...

class LabelingProgress(_message.Message):
    __slots__ = ("round", "tasks", "labelled", "rankings")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    RANKINGS_FIELD_NUMBER: _ClassVar[int]
    round: int
    tasks: int
    labelled: int
    rankings: int
    def __init__(self, round: _Optional[int] = ..., tasks: _Optional[int] = ..., labelled: _Optional[int] = ..., rankings: _Optional[int] = ...) -> None: ...

class LeaseComparisonTasksRequest(_message.Message):
    __slots__ = ("run_id", "labeler", "max_tasks", "lease_seconds")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LABELER_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    labeler: str
    max_tasks: int
    lease_seconds: float
    def __init__(self, run_id: _Optional[str] = ..., labeler: _Optional[str] = ..., max_tasks: _Optional[int] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class LeaseComparisonTasksResponse(_message.Message):
    __slots__ = ("tasks", "progress")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[ComparisonTask]
    progress: LabelingProgress
    def __init__(self, tasks: _Optional[_Iterable[_Union[ComparisonTask, _Mapping]]] = ..., progress: _Optional[_Union[LabelingProgress, _Mapping]] = ...) -> None: ...

class SubmitRankingRequest(_message.Message):
    __slots__ = ("run_id", "task_id", "labeler", "ranking")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LABELER_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    task_id: str
    labeler: str
    ranking: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, run_id: _Optional[str] = ..., task_id: _Optional[str] = ..., labeler: _Optional[str] = ..., ranking: _Optional[_Iterable[int]] = ...) -> None: ...

class SubmitRankingResponse(_message.Message):
    __slots__ = ("progress",)
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    progress: LabelingProgress
    def __init__(self, progress: _Optional[_Union[LabelingProgress, _Mapping]] = ...) -> None: ...

class ReleaseComparisonTaskRequest(_message.Message):
    __slots__ = ("run_id", "task_id", "labeler")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LABELER_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    task_id: str
    labeler: str
    def __init__(self, run_id: _Optional[str] = ..., task_id: _Optional[str] = ..., labeler: _Optional[str] = ...) -> None: ...

class ReleaseComparisonTaskResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
