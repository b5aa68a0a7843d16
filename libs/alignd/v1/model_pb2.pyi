from alignd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.ModelInfo
    def __init__(self, info: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ...) -> None: ...

class WeightsHeader(_message.Message):
    __slots__ = ("version", "num_tensors", "total_bytes", "partial", "stage_only", "replace_newer")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    STAGE_ONLY_FIELD_NUMBER: _ClassVar[int]
    REPLACE_NEWER_FIELD_NUMBER: _ClassVar[int]
    version: int
    num_tensors: int
    total_bytes: int
    partial: bool
    stage_only: bool
    replace_newer: bool
    def __init__(self, version: _Optional[int] = ..., num_tensors: _Optional[int] = ..., total_bytes: _Optional[int] = ..., partial: _Optional[bool] = ..., stage_only: _Optional[bool] = ..., replace_newer: _Optional[bool] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset_bytes", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _common_pb2.Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset_bytes: int
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_common_pb2.Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class WeightsTrailer(_message.Message):
    __slots__ = ("sha256", "crc32")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    sha256: bytes
    crc32: int
    def __init__(self, sha256: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class UpdateWeightsRequest(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: WeightsHeader
    chunk: TensorChunk
    trailer: WeightsTrailer
    def __init__(self, header: _Optional[_Union[WeightsHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., trailer: _Optional[_Union[WeightsTrailer, _Mapping]] = ...) -> None: ...

class UpdateWeightsResponse(_message.Message):
    __slots__ = ("version", "received_bytes", "num_tensors", "duration_seconds", "staged")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    version: int
    received_bytes: int
    num_tensors: int
    duration_seconds: float
    staged: bool
    def __init__(self, version: _Optional[int] = ..., received_bytes: _Optional[int] = ..., num_tensors: _Optional[int] = ..., duration_seconds: _Optional[float] = ..., staged: _Optional[bool] = ...) -> None: ...

class LoadWeightsRequest(_message.Message):
    __slots__ = ("path", "version", "stage_only", "replace_newer")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_ONLY_FIELD_NUMBER: _ClassVar[int]
    REPLACE_NEWER_FIELD_NUMBER: _ClassVar[int]
    path: str
    version: int
    stage_only: bool
    replace_newer: bool
    def __init__(self, path: _Optional[str] = ..., version: _Optional[int] = ..., stage_only: _Optional[bool] = ..., replace_newer: _Optional[bool] = ...) -> None: ...

class LoadWeightsResponse(_message.Message):
    __slots__ = ("version", "num_tensors", "duration_seconds", "staged")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    version: int
    num_tensors: int
    duration_seconds: float
    staged: bool
    def __init__(self, version: _Optional[int] = ..., num_tensors: _Optional[int] = ..., duration_seconds: _Optional[float] = ..., staged: _Optional[bool] = ...) -> None: ...

class CommitWeightsRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class CommitWeightsResponse(_message.Message):
    __slots__ = ("version", "num_tensors", "duration_seconds")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    num_tensors: int
    duration_seconds: float
    def __init__(self, version: _Optional[int] = ..., num_tensors: _Optional[int] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class JoinWeightGroupRequest(_message.Message):
    __slots__ = ("group", "store_address", "world_size", "rank_offset", "backend", "timeout_seconds")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_OFFSET_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    group: str
    store_address: str
    world_size: int
    rank_offset: int
    backend: str
    timeout_seconds: float
    def __init__(self, group: _Optional[str] = ..., store_address: _Optional[str] = ..., world_size: _Optional[int] = ..., rank_offset: _Optional[int] = ..., backend: _Optional[str] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class JoinWeightGroupResponse(_message.Message):
    __slots__ = ("ranks",)
    RANKS_FIELD_NUMBER: _ClassVar[int]
    ranks: int
    def __init__(self, ranks: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _common_pb2.Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_common_pb2.Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ReceiveWeightsRequest(_message.Message):
    __slots__ = ("group", "version", "tensors", "sha256", "stage_only", "replace_newer", "partial")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    STAGE_ONLY_FIELD_NUMBER: _ClassVar[int]
    REPLACE_NEWER_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    group: str
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    sha256: str
    stage_only: bool
    replace_newer: bool
    partial: bool
    def __init__(self, group: _Optional[str] = ..., version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., sha256: _Optional[str] = ..., stage_only: _Optional[bool] = ..., replace_newer: _Optional[bool] = ..., partial: _Optional[bool] = ...) -> None: ...

class ReceiveWeightsResponse(_message.Message):
    __slots__ = ("version", "num_tensors", "received_bytes", "duration_seconds", "staged")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    version: int
    num_tensors: int
    received_bytes: int
    duration_seconds: float
    staged: bool
    def __init__(self, version: _Optional[int] = ..., num_tensors: _Optional[int] = ..., received_bytes: _Optional[int] = ..., duration_seconds: _Optional[float] = ..., staged: _Optional[bool] = ...) -> None: ...

class LeaveWeightGroupRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: str
    def __init__(self, group: _Optional[str] = ...) -> None: ...

class LeaveWeightGroupResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
