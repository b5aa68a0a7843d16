"""Conversion between torch tensors and alignd.v1 `Tensor`/`Dtype`."""

from __future__ import annotations

import torch

from alignd.v1 import common_pb2

TORCH_TO_PB = {
    torch.float32: common_pb2.DTYPE_FLOAT32,
    torch.float16: common_pb2.DTYPE_FLOAT16,
    torch.bfloat16: common_pb2.DTYPE_BFLOAT16,
    torch.int64: common_pb2.DTYPE_INT64,
    torch.int32: common_pb2.DTYPE_INT32,
    torch.int16: common_pb2.DTYPE_INT16,
    torch.uint8: common_pb2.DTYPE_UINT8,
    torch.int8: common_pb2.DTYPE_INT8,
    torch.float64: common_pb2.DTYPE_FLOAT64,
    torch.bool: common_pb2.DTYPE_BOOL,
}
PB_TO_TORCH = {v: k for k, v in TORCH_TO_PB.items()}


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Row-major bytes of `t` (CPU, contiguous) without an extra copy where possible."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def from_bytes(data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if len(data) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data) if isinstance(data, bytes) else data, dtype=dtype).reshape(shape)


def to_pb(t: torch.Tensor) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=TORCH_TO_PB[t.dtype], shape=list(t.shape), data=bytes(tensor_bytes(t)))


def from_pb(msg: common_pb2.Tensor, field: str = "tensor") -> torch.Tensor:
    from alignd.runtime.errors import InvalidArgument

    if msg.dtype not in PB_TO_TORCH:
        raise InvalidArgument(f"{field}.dtype", f"unsupported dtype {msg.dtype}")
    dtype = PB_TO_TORCH[msg.dtype]
    shape = list(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", f"negative dimension in {shape}")
    numel = 1
    for d in shape:
        numel *= d
    want = numel * itemsize(dtype)
    if len(msg.data) != want:
        raise InvalidArgument(f"{field}.data", f"{len(msg.data)} bytes for shape {shape} of {dtype}: expected {want}")
    return from_bytes(msg.data, dtype, shape)
