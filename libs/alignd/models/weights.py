"""The weight stream of ModelService.UpdateWeights: encoding and receiving.

Stream: one header, chunks of about `chunk_bytes` per tensor in order, one
trailer with the SHA-256 of all chunk data. Tensors that share storage (tied
embeddings) are sent once, under the first state-dict name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch

from alignd.models.tensors import PB_TO_TORCH, TORCH_TO_PB, itemsize, tensor_bytes
from alignd.runtime.errors import InvalidArgument
from alignd.v1 import model_pb2

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: near the loopback streaming optimum (ENV.md)


def unique_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without aliases: one entry per distinct storage."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if t.numel() == 0:
            out[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def encode_stream(
    state: Mapping[str, torch.Tensor],
    version: int,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    partial: bool = False,
) -> Iterator[model_pb2.UpdateWeightsRequest]:
    """Yields the UpdateWeights messages for `state`."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    tensors = unique_tensors(state)
    views = {name: tensor_bytes(t) for name, t in tensors.items()}
    total = sum(len(v) for v in views.values())
    yield model_pb2.UpdateWeightsRequest(
        header=model_pb2.WeightsHeader(version=version, num_tensors=len(tensors), total_bytes=total, partial=partial)
    )
    digest = hashlib.sha256()
    for name, t in tensors.items():
        view = views[name]
        dtype = TORCH_TO_PB[t.dtype]
        shape = list(t.shape)
        offset = 0
        while True:
            piece = bytes(view[offset : offset + chunk_bytes])
            digest.update(piece)
            yield model_pb2.UpdateWeightsRequest(
                chunk=model_pb2.TensorChunk(name=name, dtype=dtype, shape=shape, offset_bytes=offset, data=piece)
            )
            offset += len(piece)
            if offset >= len(view):
                break
    yield model_pb2.UpdateWeightsRequest(trailer=model_pb2.WeightsTrailer(sha256=digest.digest()))


@dataclass
class ReceivedWeights:
    version: int
    partial: bool
    tensors: dict[str, torch.Tensor]
    received_bytes: int


class _Buffer:
    def __init__(self, name: str, dtype: torch.dtype, shape: list[int]) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape
        numel = 1
        for d in shape:
            numel *= d
        self.nbytes = numel * itemsize(dtype)
        self.data = bytearray(self.nbytes)
        self.filled = 0


def receive_stream(
    messages: Iterable[model_pb2.UpdateWeightsRequest],
    expected: Mapping[str, torch.Tensor],
) -> ReceivedWeights:
    """Reads a whole UpdateWeights stream and validates it against `expected`.

    `expected` is the receiver's state dict: every streamed tensor must name
    one of its keys with the same shape (the dtype may differ; it is cast on
    apply). Raises InvalidArgument naming the problem; nothing is applied.
    """
    it = iter(messages)
    first = next(it, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("header", "the stream must start with a header message")
    header = first.header
    digest = hashlib.sha256()
    buffers: dict[str, _Buffer] = {}
    current: _Buffer | None = None
    received = 0
    trailer = None
    for msg in it:
        part = msg.WhichOneof("part")
        if trailer is not None:
            raise InvalidArgument("trailer", "messages after the trailer")
        if part == "header":
            raise InvalidArgument("header", "a second header in the stream")
        if part == "trailer":
            trailer = msg.trailer
            continue
        if part != "chunk":
            raise InvalidArgument("part", "message without a part")
        chunk = msg.chunk
        if current is None or chunk.name != current.name:
            if current is not None and current.filled != current.nbytes:
                raise InvalidArgument(
                    "chunk.data", f"tensor {current.name} truncated: {current.filled} of {current.nbytes} bytes"
                )
            if chunk.name in buffers:
                raise InvalidArgument("chunk.name", f"tensor {chunk.name} sent twice")
            if chunk.name not in expected:
                raise InvalidArgument("chunk.name", f"unknown tensor {chunk.name!r}")
            if chunk.dtype not in PB_TO_TORCH:
                raise InvalidArgument("chunk.dtype", f"unsupported dtype {chunk.dtype} for {chunk.name}")
            want_shape = list(expected[chunk.name].shape)
            if list(chunk.shape) != want_shape:
                raise InvalidArgument(
                    "chunk.shape", f"tensor {chunk.name} has shape {list(chunk.shape)}, the model expects {want_shape}"
                )
            current = _Buffer(chunk.name, PB_TO_TORCH[chunk.dtype], want_shape)
            buffers[chunk.name] = current
        if chunk.offset_bytes != current.filled:
            raise InvalidArgument(
                "chunk.offset_bytes", f"tensor {chunk.name}: offset {chunk.offset_bytes}, expected {current.filled}"
            )
        end = current.filled + len(chunk.data)
        if end > current.nbytes:
            raise InvalidArgument(
                "chunk.data", f"tensor {chunk.name}: {end} bytes exceed its size {current.nbytes} (shape x dtype)"
            )
        current.data[current.filled : end] = chunk.data
        current.filled = end
        received += len(chunk.data)
        digest.update(chunk.data)
    if trailer is None:
        raise InvalidArgument("trailer", "stream ended without a trailer (truncated)")
    if current is not None and current.filled != current.nbytes:
        raise InvalidArgument("chunk.data", f"tensor {current.name} truncated: {current.filled} of {current.nbytes} bytes")
    if len(buffers) != header.num_tensors:
        raise InvalidArgument("header.num_tensors", f"header announced {header.num_tensors} tensors, stream carried {len(buffers)}")
    if received != header.total_bytes:
        raise InvalidArgument("header.total_bytes", f"header announced {header.total_bytes} bytes, stream carried {received}")
    if trailer.sha256 != digest.digest():
        raise InvalidArgument("trailer.sha256", "checksum mismatch: the data received is not the data sent")
    tensors = {
        name: torch.frombuffer(b.data, dtype=b.dtype).reshape(b.shape) if b.nbytes else torch.empty(b.shape, dtype=b.dtype)
        for name, b in buffers.items()
    }
    return ReceivedWeights(version=header.version, partial=header.partial, tensors=tensors, received_bytes=received)


def push_weights(channel, state: Mapping[str, torch.Tensor], version: int, *, timeout: float = 600.0, **kw):
    """Streams `state` to the ModelService behind `channel`; returns the UpdateWeightsResponse."""
    from alignd.v1 import model_pb2_grpc

    return model_pb2_grpc.ModelServiceStub(channel).UpdateWeights(encode_stream(state, version, **kw), timeout=timeout)
