"""The weight stream of ModelService.UpdateWeights: encoding and receiving.

Stream: one header, chunks of about `chunk_bytes` per tensor in order, one
trailer with a checksum of all chunk data (CRC-32 by default, SHA-256 on
request; the receiver verifies whichever the trailer carries). Tensors that
share storage (tied embeddings) are sent once, under the first state-dict
name.

Also here: the shared-memory directory through which a learner publishes weights to replicas on its own host
(LearnerConfig.weight_sync: auto), and the loopback test that decides it.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import secrets
import shutil
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

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


def _plan(state: Mapping[str, torch.Tensor], chunk_bytes: int):
    """(header fields, [(name, dtype, shape, offset, piece memoryview)]) of a stream."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    tensors = unique_tensors(state)
    views = {name: tensor_bytes(t) for name, t in tensors.items()}
    total = sum(len(v) for v in views.values())

    def pieces():
        for name, t in tensors.items():
            view = views[name]
            dtype = TORCH_TO_PB[t.dtype]
            shape = list(t.shape)
            offset = 0
            while True:
                piece = view[offset : offset + chunk_bytes]
                yield name, dtype, shape, offset, piece
                offset += len(piece)
                if offset >= len(view):
                    break

    return len(tensors), total, pieces()


class _Checksum:
    def __init__(self, kind: str) -> None:
        if kind not in ("crc32", "sha256"):
            raise ValueError(f"checksum must be crc32 or sha256, got {kind!r}")
        self.sha = hashlib.sha256() if kind == "sha256" else None
        self.crc = 0

    def update(self, data) -> None:
        if self.sha is not None:
            self.sha.update(data)
        else:
            self.crc = zlib.crc32(data, self.crc)

    def trailer(self) -> model_pb2.UpdateWeightsRequest:
        t = (
            model_pb2.WeightsTrailer(sha256=self.sha.digest())
            if self.sha is not None
            else model_pb2.WeightsTrailer(crc32=self.crc)
        )
        return model_pb2.UpdateWeightsRequest(trailer=t)


def encode_stream(
    state: Mapping[str, torch.Tensor],
    version: int,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    partial: bool = False,
    checksum: str = "crc32",
    stage_only: bool = False,
    replace_newer: bool = False,
) -> Iterator[model_pb2.UpdateWeightsRequest]:
    """Yields the UpdateWeights messages for `state`; checksum: "crc32" or "sha256"."""
    ck = _Checksum(checksum)
    n, total, pieces = _plan(state, chunk_bytes)
    yield model_pb2.UpdateWeightsRequest(
        header=model_pb2.WeightsHeader(
            version=version,
            num_tensors=n,
            total_bytes=total,
            partial=partial,
            stage_only=stage_only,
            replace_newer=replace_newer,
        )
    )
    for name, dtype, shape, offset, piece in pieces:
        ck.update(piece)
        yield model_pb2.UpdateWeightsRequest(
            chunk=model_pb2.TensorChunk(name=name, dtype=dtype, shape=shape, offset_bytes=offset, data=bytes(piece))
        )
    yield ck.trailer()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# Wire tags (field number << 3 | wire type 2 = length-delimited).
_TAG_REQUEST_CHUNK = bytes([(2 << 3) | 2])  # UpdateWeightsRequest.chunk = 2
_TAG_CHUNK_DATA = bytes([(5 << 3) | 2])  # TensorChunk.data = 5


def encode_stream_wire(
    state: Mapping[str, torch.Tensor],
    version: int,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    partial: bool = False,
    checksum: str = "crc32",
    stage_only: bool = False,
    replace_newer: bool = False,
) -> Iterator[bytes]:
    """The same stream as `encode_stream`, as serialized messages, built with one copy of the data.

    Building a protobuf message per 1 MiB chunk copies the data twice (into a
    bytes object, then into the message) before gRPC serialises it a third
    time. Here each chunk's small fields are serialised by protobuf and the
    data field is appended in protobuf's wire format (tag, varint length,
    bytes): field order is free in the format, so the result parses to the
    same message (tests/test_weights.py checks byte-level equivalence).
    """
    ck = _Checksum(checksum)
    n, total, pieces = _plan(state, chunk_bytes)
    yield model_pb2.UpdateWeightsRequest(
        header=model_pb2.WeightsHeader(
            version=version,
            num_tensors=n,
            total_bytes=total,
            partial=partial,
            stage_only=stage_only,
            replace_newer=replace_newer,
        )
    ).SerializeToString()
    for name, dtype, shape, offset, piece in pieces:
        ck.update(piece)
        meta = model_pb2.TensorChunk(name=name, dtype=dtype, shape=shape, offset_bytes=offset).SerializeToString()
        data_len = _varint(len(piece))
        inner_len = len(meta) + 1 + len(data_len) + len(piece)
        yield b"".join((_TAG_REQUEST_CHUNK, _varint(inner_len), meta, _TAG_CHUNK_DATA, data_len, piece))
    yield ck.trailer().SerializeToString()


@dataclass
class ReceivedWeights:
    version: int
    partial: bool
    tensors: dict[str, torch.Tensor]
    received_bytes: int
    stage_only: bool = False
    replace_newer: bool = False


class _Buffer:
    def __init__(self, name: str, dtype: torch.dtype, shape: list[int]) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape
        numel = 1
        for d in shape:
            numel *= d
        self.nbytes = numel * itemsize(dtype)
        # Uninitialised (no zero-fill pass): every byte is written by a chunk
        # before the tensor is accepted (filled == nbytes is checked).
        self.storage = torch.empty(self.nbytes, dtype=torch.uint8)
        self.data = memoryview(self.storage.numpy())
        self.filled = 0

    def write(self, chunk: model_pb2.TensorChunk) -> None:
        """Appends one chunk of this tensor: it must start where the data so far ends and fit in the tensor."""
        if chunk.offset_bytes != self.filled:
            raise InvalidArgument(
                "chunk.offset_bytes", f"tensor {chunk.name}: offset {chunk.offset_bytes}, expected {self.filled}"
            )
        end = self.filled + len(chunk.data)
        if end > self.nbytes:
            raise InvalidArgument(
                "chunk.data", f"tensor {chunk.name}: {end} bytes exceed its size {self.nbytes} (shape x dtype)"
            )
        self.data[self.filled : end] = chunk.data
        self.filled = end

    def check_complete(self) -> None:
        """Raises InvalidArgument when the stream moved on (or ended) before every byte of the tensor came."""
        if self.filled != self.nbytes:
            raise InvalidArgument("chunk.data", f"tensor {self.name} truncated: {self.filled} of {self.nbytes} bytes")


def _open_tensor(
    chunk: model_pb2.TensorChunk, expected: Mapping[str, torch.Tensor], buffers: dict[str, _Buffer]
) -> _Buffer:
    """The buffer for the tensor that `chunk` starts (added to `buffers`), once the tensor is checked: new in the
    stream, a key of the receiver's state dict with the same shape, a supported dtype."""
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
    buffers[chunk.name] = _Buffer(chunk.name, PB_TO_TORCH[chunk.dtype], want_shape)
    return buffers[chunk.name]


def _check_totals(header: model_pb2.WeightsHeader, buffers: dict[str, _Buffer], received: int) -> None:
    """The stream carried as many tensors and bytes as its header announced."""
    if len(buffers) != header.num_tensors:
        raise InvalidArgument(
            "header.num_tensors", f"header announced {header.num_tensors} tensors, stream carried {len(buffers)}"
        )
    if received != header.total_bytes:
        raise InvalidArgument(
            "header.total_bytes", f"header announced {header.total_bytes} bytes, stream carried {received}"
        )


def _verify_checksum(trailer: model_pb2.WeightsTrailer, buffers: dict[str, _Buffer], crc: int) -> None:
    """The trailer carries a checksum and it matches the data: the running CRC-32 (`crc`), and SHA-256 over the
    assembled buffers (the same bytes in the same order) when the trailer carries one."""
    if not trailer.sha256 and not trailer.HasField("crc32"):
        raise InvalidArgument("trailer", "no checksum (set crc32 or sha256)")
    if trailer.HasField("crc32") and trailer.crc32 != crc:
        raise InvalidArgument("trailer.crc32", "checksum mismatch: the data received is not the data sent")
    if trailer.sha256:
        digest = hashlib.sha256()
        for b in buffers.values():
            digest.update(b.data)
        if trailer.sha256 != digest.digest():
            raise InvalidArgument("trailer.sha256", "checksum mismatch: the data received is not the data sent")


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
    if header.stage_only and header.replace_newer:
        raise InvalidArgument("header.replace_newer", "not with stage_only: a re-sync is applied at once")
    # The trailer says which checksum it carries only at the end: keep the
    # cheap CRC-32 running always, and SHA-256 over the assembled buffers
    # afterwards when the trailer asks for it (same bytes, same order).
    crc = 0
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
            if current is not None:
                current.check_complete()
            current = _open_tensor(chunk, expected, buffers)
        current.write(chunk)
        received += len(chunk.data)
        crc = zlib.crc32(chunk.data, crc)
    if trailer is None:
        raise InvalidArgument("trailer", "stream ended without a trailer (truncated)")
    if current is not None:
        current.check_complete()
    _check_totals(header, buffers, received)
    _verify_checksum(trailer, buffers, crc)
    tensors = {
        name: b.storage.view(b.dtype).reshape(b.shape) if b.nbytes else torch.empty(b.shape, dtype=b.dtype)
        for name, b in buffers.items()
    }
    return ReceivedWeights(
        version=header.version,
        partial=header.partial,
        tensors=tensors,
        received_bytes=received,
        stage_only=header.stage_only,
        replace_newer=header.replace_newer,
    )


UPDATE_WEIGHTS_METHOD = "/alignd.v1.ModelService/UpdateWeights"


def push_weights(channel, state: Mapping[str, torch.Tensor], version: int, *, timeout: float = 600.0, **kw):
    """Streams `state` to the ModelService behind `channel`; returns the UpdateWeightsResponse.

    Sends pre-serialized messages (`encode_stream_wire`) through a stream-unary
    call without a request serializer.
    """
    call = channel.stream_unary(
        UPDATE_WEIGHTS_METHOD, request_serializer=None, response_deserializer=model_pb2.UpdateWeightsResponse.FromString
    )
    return call(encode_stream_wire(state, version, **kw), timeout=timeout)


# -- shared memory for co-located replicas (LearnerConfig.weight_sync: auto) -------------------------------------
SHM_ROOT = Path("/dev/shm")
SHM_PREFIX = "alignd-weights-"


_held_locks: list = []  # the lock files of this process's directories, open (and flock-ed) until it exits


def _stale(path: Path) -> bool:
    """True when no live process holds the directory's lock (its owner died, whatever its pid was)."""
    lock = path / ".lock"
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:  # being created, or left half-made: stale once it is a minute old
        try:
            return time.time() - path.stat().st_mtime > 60
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # (releases the lock taken just to test it)
    return True


def shared_memory_dir(need_bytes: int, root: Path = SHM_ROOT) -> Path | None:
    """A new directory of this process under /dev/shm (removed at exit) when it is writable and has `need_bytes` free;
    None otherwise. A lock held for the process's lifetime marks it live: directories whose lock nobody holds (their
    learner died, kill -9) are removed first, whatever pid namespace they came from."""
    try:
        if not root.is_dir() or not os.access(root, os.W_OK):
            return None
        for old in root.glob(SHM_PREFIX + "*"):
            if _stale(old):
                shutil.rmtree(old, ignore_errors=True)
        st = os.statvfs(root)
        if st.f_bavail * st.f_frsize < need_bytes:
            return None
        path = root / f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        path.mkdir()
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held_locks.append(fd)
    except OSError:
        return None
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
