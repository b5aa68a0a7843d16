"""The UpdateWeights stream codec in-process (no server), and ModelHandle.apply_weights."""

from __future__ import annotations

import copy
import hashlib
import itertools
import zlib

import pytest
import torch

from alignd.config import ModelConfig
from alignd.models.handle import ModelHandle, load_causal_lm, load_tokenizer
from alignd.models.tensors import tensor_bytes
from alignd.models.weights import encode_stream, receive_stream, unique_tensors
from alignd.runtime.errors import FailedPrecondition, InvalidArgument
from alignd.v1 import common_pb2, model_pb2

TIED = ("transformer.wte.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from alignd.models.tiny import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("weights") / "gpt2", seed=0, hidden=32, layers=1, heads=2, context=64, vocab_size=300
    )


@pytest.fixture(scope="module")
def model_cfg(tiny_dir) -> ModelConfig:
    return ModelConfig(path=str(tiny_dir))


@pytest.fixture(scope="module")
def tokenizer(model_cfg):
    return load_tokenizer(model_cfg)


@pytest.fixture
def model(model_cfg):
    return load_causal_lm(model_cfg)  # fresh per test: apply_weights mutates it


@pytest.fixture
def handle(model_cfg, model, tokenizer) -> ModelHandle:
    return ModelHandle("policy", model_cfg, model, tokenizer=tokenizer)


def raw(t: torch.Tensor) -> bytes:
    return bytes(tensor_bytes(t))


def snapshot(model) -> dict[str, bytes]:
    return {k: raw(v) for k, v in model.state_dict().items()}


def chunks_of(msgs):
    return [m.chunk for m in msgs if m.WhichOneof("part") == "chunk"]


def invalid(msgs, expected, field: str, *needles: str) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        receive_stream(iter(msgs), expected)
    err = info.value
    assert err.field == field, (err.field, err.message)
    for n in needles:
        assert n in err.message, (n, err.message)
    return err


# -- round trips ---------------------------------------------------------------


def test_gpt2_state_dict_round_trip_bit_exact_and_tied_weight_sent_once(model):
    state = model.state_dict()
    a, b = (state[n] for n in TIED)
    assert a.data_ptr() == b.data_ptr(), "tiny GPT-2 should tie wte and lm_head"
    unique = unique_tensors(state)
    assert TIED[0] in unique and TIED[1] not in unique
    assert len(unique) == len(state) - 1

    msgs = list(encode_stream(state, 5, chunk_bytes=4096))
    assert msgs[0].WhichOneof("part") == "header" and msgs[-1].WhichOneof("part") == "trailer"
    header = msgs[0].header
    names = [c.name for c in chunks_of(msgs)]
    assert list(dict.fromkeys(names)) == list(unique)  # state-dict order, each tensor once
    assert TIED[1] not in names
    assert header.num_tensors == len(unique)
    assert header.total_bytes == sum(t.numel() * t.element_size() for t in unique.values())
    assert header.version == 5 and header.partial is False
    assert msgs[-1].trailer.crc32 == zlib.crc32(b"".join(c.data for c in chunks_of(msgs)))  # the default
    assert not msgs[-1].trailer.sha256
    sha_msgs = list(encode_stream(state, 5, chunk_bytes=4096, checksum="sha256"))
    assert sha_msgs[-1].trailer.sha256 == hashlib.sha256(b"".join(c.data for c in chunks_of(sha_msgs))).digest()
    assert not sha_msgs[-1].trailer.HasField("crc32")
    assert receive_stream(iter(sha_msgs), state).received_bytes == header.total_bytes

    got = receive_stream(iter(msgs), state)
    assert got.version == 5 and got.partial is False
    assert got.received_bytes == header.total_bytes
    assert list(got.tensors) == list(unique)
    for name, t in got.tensors.items():
        assert t.dtype == state[name].dtype and t.shape == state[name].shape, name
        assert raw(t) == raw(state[name]), name


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1000, 1 << 20])
def test_chunk_sizes_smaller_and_larger_than_tensors(chunk_bytes):
    torch.manual_seed(0)
    state = {"w": torch.randn(10, 30), "b": torch.randn(30), "s": torch.tensor(2.5)}
    msgs = list(encode_stream(state, 1, chunk_bytes=chunk_bytes))
    for name, t in state.items():
        parts = [c for c in chunks_of(msgs) if c.name == name]
        nbytes = t.numel() * t.element_size()
        assert len(parts) == -(-nbytes // chunk_bytes), (name, len(parts))
        assert all(len(c.data) <= chunk_bytes for c in parts)
        assert [c.offset_bytes for c in parts] == list(itertools.accumulate([0] + [len(c.data) for c in parts[:-1]]))
        assert all(list(c.shape) == list(t.shape) and c.dtype == common_pb2.DTYPE_FLOAT32 for c in parts)
    got = receive_stream(iter(msgs), state)
    assert {k: raw(v) for k, v in got.tensors.items()} == {k: raw(v) for k, v in state.items()}


def test_dtypes_round_trip_bit_exact():
    torch.manual_seed(1)
    bf16 = torch.randn(5, 7).to(torch.bfloat16)
    bf16[0, 0] = float("inf")
    bf16[0, 1] = -0.0
    state = {
        "bf16": bf16,
        "fp16": torch.randn(3, 11).to(torch.float16),
        "int64": torch.tensor([0, 1, -1, 2**62, -(2**63), 2**63 - 1], dtype=torch.int64),
        "int32": torch.arange(-5, 5, dtype=torch.int32),
        "uint8": torch.arange(0, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "fp64": torch.randn(4, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3, dtype=torch.int64),
    }
    msgs = list(encode_stream(state, 2, chunk_bytes=5))  # odd size: chunks split elements
    got = receive_stream(iter(msgs), state)
    assert list(got.tensors) == list(state)
    for name, t in state.items():
        r = got.tensors[name]
        assert r.dtype == t.dtype and r.shape == t.shape, name
        assert raw(r) == raw(t), name


def test_non_contiguous_tensor_is_sent_row_major():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"t": base.t()}  # a transposed view
    expected = {"t": torch.empty(4, 3)}
    got = receive_stream(iter(encode_stream(state, 1, chunk_bytes=8)), expected)
    assert torch.equal(got.tensors["t"], base.t().contiguous())


def test_partial_flag_travels():
    state = {"a": torch.ones(2)}
    got = receive_stream(iter(encode_stream(state, 9, partial=True)), {"a": torch.zeros(2), "b": torch.zeros(3)})
    assert got.partial is True and got.version == 9 and list(got.tensors) == ["a"]


@pytest.mark.parametrize("chunk_bytes", [0, -4])
def test_non_positive_chunk_size_is_rejected(chunk_bytes):
    # chunk_bytes <= 0 must be refused; today encode_stream yields empty (or
    # overlapping) chunks forever. islice keeps the test finite.
    state = {"a": torch.ones(8)}
    with pytest.raises(ValueError):
        for _ in itertools.islice(encode_stream(state, 1, chunk_bytes=chunk_bytes), 1000):
            pass


# -- malformed streams -----------------------------------------------------------


@pytest.fixture
def small():
    """A valid stream of two tensors in 16-byte chunks, and the receiver's state."""
    torch.manual_seed(2)
    state = {"w": torch.randn(4, 3), "b": torch.randn(3)}  # 48 + 12 bytes
    msgs = list(encode_stream(state, 3, chunk_bytes=16))
    kinds = [m.WhichOneof("part") for m in msgs]
    assert kinds == ["header"] + ["chunk"] * 4 + ["trailer"]  # w: 16,16,16; b: 12
    assert receive_stream(iter(msgs), state).received_bytes == 60
    return msgs, state


def chunk_msg(name="w", dtype=common_pb2.DTYPE_FLOAT32, shape=(4, 3), offset=0, data=b"\0" * 4):
    return model_pb2.UpdateWeightsRequest(
        chunk=model_pb2.TensorChunk(name=name, dtype=dtype, shape=list(shape), offset_bytes=offset, data=data)
    )


def test_no_header(small):
    msgs, state = small
    invalid([], state, "header", "start with a header")
    invalid(msgs[1:], state, "header", "start with a header")


def test_second_header(small):
    msgs, state = small
    invalid(msgs[:2] + [msgs[0]] + msgs[2:], state, "header", "second header")


def test_chunk_after_trailer(small):
    msgs, state = small
    invalid(msgs + [msgs[1]], state, "trailer", "after the trailer")


def test_missing_trailer(small):
    msgs, state = small
    invalid(msgs[:-1], state, "trailer", "without a trailer")


def test_tensor_truncated_before_the_next_tensor(small):
    msgs, state = small
    invalid(msgs[:3] + msgs[4:], state, "chunk.data", "tensor w truncated", "32 of 48")


def test_last_tensor_truncated(small):
    msgs, state = small
    last = copy.deepcopy(msgs[4])
    last.chunk.data = last.chunk.data[:-4]
    invalid(msgs[:4] + [last, msgs[5]], state, "chunk.data", "tensor b truncated", "8 of 12")


def test_offset_gap(small):
    msgs, state = small
    invalid(msgs[:2] + msgs[3:], state, "chunk.offset_bytes", "offset 32, expected 16")


def test_first_chunk_with_nonzero_offset(small):
    msgs, state = small
    first = copy.deepcopy(msgs[1])
    first.chunk.offset_bytes = 4
    invalid([msgs[0], first] + msgs[2:], state, "chunk.offset_bytes", "offset 4, expected 0")


def test_data_beyond_shape_times_dtype(small):
    msgs, state = small
    big = copy.deepcopy(msgs[3])
    big.chunk.data += b"\0\0\0\0"
    invalid(msgs[:3] + [big] + msgs[4:], state, "chunk.data", "52 bytes exceed its size 48")
    # float32 data announced as float16: twice the bytes the shape allows.
    half = [msgs[0]] + [copy.deepcopy(m) for m in msgs[1:4]]
    for m in half[1:]:
        m.chunk.dtype = common_pb2.DTYPE_FLOAT16
    invalid(half, state, "chunk.data", "exceed its size 24")


def test_unknown_name(small):
    msgs, state = small
    invalid(msgs, {"w": state["w"]}, "chunk.name", "unknown tensor 'b'")


def test_tensor_sent_twice(small):
    msgs, state = small
    invalid(msgs[:5] + msgs[1:4] + msgs[5:], state, "chunk.name", "tensor w sent twice")


def test_shape_mismatch(small):
    msgs, state = small
    invalid(msgs, {"w": torch.zeros(3, 4), "b": state["b"]}, "chunk.shape", "[4, 3]", "[3, 4]")


def test_unsupported_dtype(small):
    msgs, state = small
    invalid([msgs[0], chunk_msg(dtype=common_pb2.DTYPE_UNSPECIFIED)], state, "chunk.dtype")


def test_message_without_part(small):
    msgs, state = small
    invalid([msgs[0], model_pb2.UpdateWeightsRequest()] + msgs[1:], state, "part")


def test_num_tensors_mismatch(small):
    msgs, state = small
    hdr = copy.deepcopy(msgs[0])
    hdr.header.num_tensors = 3
    invalid([hdr] + msgs[1:], state, "header.num_tensors", "announced 3", "carried 2")


def test_total_bytes_mismatch(small):
    msgs, state = small
    hdr = copy.deepcopy(msgs[0])
    hdr.header.total_bytes = 61
    invalid([hdr] + msgs[1:], state, "header.total_bytes", "announced 61", "carried 60")


def test_checksum_mismatch(small):
    msgs, state = small
    flipped = copy.deepcopy(msgs[2])
    data = bytearray(flipped.chunk.data)
    data[0] ^= 0x01
    flipped.chunk.data = bytes(data)
    invalid(msgs[:2] + [flipped] + msgs[3:], state, "trailer.crc32", "checksum mismatch")
    bad_crc = model_pb2.UpdateWeightsRequest(
        trailer=model_pb2.WeightsTrailer(crc32=(msgs[-1].trailer.crc32 + 1) % 2**32)
    )
    invalid(msgs[:-1] + [bad_crc], state, "trailer.crc32")
    bad_trailer = model_pb2.UpdateWeightsRequest(trailer=model_pb2.WeightsTrailer(sha256=b"\0" * 32))
    invalid(msgs[:-1] + [bad_trailer], state, "trailer.sha256")
    invalid(
        msgs[:-1] + [model_pb2.UpdateWeightsRequest(trailer=model_pb2.WeightsTrailer())],
        state,
        "trailer",
        "no checksum",
    )


# -- ModelHandle.apply_weights ---------------------------------------------------


def test_stream_then_apply_replaces_every_weight(handle, tiny_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    other = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    want = snapshot(other)
    got = receive_stream(encode_stream(other.state_dict(), 1, chunk_bytes=1000), handle.state_dict())
    n = handle.apply_weights(got.tensors, got.version, partial=got.partial)
    assert n == len(want) - 1  # the tied lm_head was not sent
    assert snapshot(handle.model) == want
    assert handle.version == 1 and handle.info().weight_version == 1


def test_full_update_missing_a_tensor_is_rejected_and_changes_nothing(handle):
    before = snapshot(handle.model)
    new = {k: v + 1 for k, v in unique_tensors(handle.state_dict()).items()}
    del new["transformer.ln_f.bias"]
    with pytest.raises(InvalidArgument) as info:
        handle.apply_weights(new, 1, partial=False)
    assert info.value.field == "weights"
    assert "transformer.ln_f.bias" in info.value.message and "misses 1" in info.value.message
    assert snapshot(handle.model) == before
    assert handle.version == 0


def test_full_update_needs_only_one_name_per_tied_group(handle):
    new = {k: torch.full_like(v, 0.5) for k, v in unique_tensors(handle.state_dict()).items()}
    assert TIED[1] not in new
    handle.apply_weights(new, 1, partial=False)
    assert all(torch.all(v == 0.5) for v in handle.model.state_dict().values())


def test_rejections_change_nothing(handle):
    before = snapshot(handle.model)
    state = handle.state_dict()
    good = torch.zeros_like(state["transformer.wpe.weight"])
    cases = [
        ({"transformer.wpe.weight": good, "nope.weight": torch.zeros(2)}, "unknown tensor 'nope.weight'"),
        (
            {"transformer.wpe.weight": good, "transformer.ln_f.bias": torch.zeros(3)},
            "transformer.ln_f.bias has shape [3]",
        ),
        (
            {"transformer.wpe.weight": good, "transformer.ln_f.bias": torch.zeros(32, dtype=torch.int64)},
            "dtype torch.int64",
        ),
    ]
    for tensors, needle in cases:
        with pytest.raises(InvalidArgument) as info:
            handle.apply_weights(tensors, 1, partial=True)
        assert needle in info.value.message, info.value.message
    with pytest.raises(FailedPrecondition):
        handle.apply_weights({"transformer.wpe.weight": good}, 0, partial=True)  # version not above 0
    assert snapshot(handle.model) == before
    assert handle.version == 0


def test_partial_update_changes_only_that_tensor(handle):
    before = snapshot(handle.model)
    name = "transformer.h.0.mlp.c_fc.bias"
    new = torch.arange(before[name].__len__() // 4, dtype=torch.float32)
    assert handle.apply_weights({name: new}, 7, partial=True) == 1
    after = snapshot(handle.model)
    assert after[name] == raw(new)
    assert {k for k in after if after[k] != before[k]} == {name}
    assert handle.version == 7


def test_partial_update_through_the_stream(handle):
    before = snapshot(handle.model)
    name = "transformer.wpe.weight"
    new = torch.randn_like(handle.state_dict()[name])
    got = receive_stream(encode_stream({name: new}, 2, partial=True, chunk_bytes=333), handle.state_dict())
    handle.apply_weights(got.tensors, got.version, partial=got.partial)
    after = snapshot(handle.model)
    assert {k for k in after if after[k] != before[k]} == {name}
    assert after[name] == raw(new)


@pytest.mark.parametrize("alias", TIED)
def test_tied_weight_updated_under_either_alias_updates_both(handle, alias):
    before = snapshot(handle.model)
    new = torch.randn_like(handle.state_dict()[alias])
    handle.apply_weights({alias: new}, 1, partial=True)
    state = handle.model.state_dict()
    for name in TIED:
        assert raw(state[name]) == raw(new), name
    assert (
        handle.model.get_input_embeddings().weight.data_ptr() == handle.model.get_output_embeddings().weight.data_ptr()
    )
    after = snapshot(handle.model)
    assert {k for k in after if after[k] != before[k]} == set(TIED)


def test_lower_precision_stream_is_cast_on_apply(handle):
    state = handle.state_dict()
    bf16 = {k: (v * 2).to(torch.bfloat16) for k, v in unique_tensors(state).items()}
    got = receive_stream(encode_stream(bf16, 4), state)
    assert all(t.dtype == torch.bfloat16 for t in got.tensors.values())
    handle.apply_weights(got.tensors, got.version, partial=False)
    after = handle.model.state_dict()
    for name, t in bf16.items():
        assert after[name].dtype == torch.float32
        assert torch.equal(after[name], t.to(torch.float32)), name


@pytest.mark.parametrize("checksum", ["crc32", "sha256"])
@pytest.mark.parametrize("chunk", [7, 4096, 1 << 20])
def test_wire_encoding_equals_protobuf_encoding(checksum, chunk):
    """encode_stream_wire appends the data field by hand: it must parse to the very same messages."""
    from alignd.models.weights import encode_stream_wire

    torch.manual_seed(0)
    state = {
        "a": torch.randn(300, 257),
        "b": torch.arange(10, dtype=torch.int64),
        "c": torch.randn(3).to(torch.bfloat16),
        "big": torch.randn(1 << 17),
    }
    wire = list(encode_stream_wire(state, 9, chunk_bytes=chunk, checksum=checksum))
    msgs = list(encode_stream(state, 9, chunk_bytes=chunk, checksum=checksum))
    assert len(wire) == len(msgs)
    for raw, msg in zip(wire, msgs):
        assert model_pb2.UpdateWeightsRequest.FromString(raw) == msg
    got = receive_stream((model_pb2.UpdateWeightsRequest.FromString(b) for b in wire), state)
    for k, v in state.items():
        assert torch.equal(got.tensors[k], v)


def test_shared_memory_dir_of_a_killed_process_is_reclaimed(tmp_path):
    """weight_sync auto's /dev/shm directory: held by a lock for its process's lifetime; once the process is killed
    (-9: no atexit), the next one to create a directory removes it, and never removes a live one."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from alignd.models.weights import shared_memory_dir

    code = (
        "import sys, time; from pathlib import Path; from alignd.models.weights import shared_memory_dir; "
        "print(shared_memory_dir(1, Path(sys.argv[1])), flush=True); time.sleep(120)"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        theirs = Path(child.stdout.readline().strip())
        assert theirs.parent == tmp_path and theirs.is_dir()
        mine = shared_memory_dir(1, tmp_path)
        assert mine is not None and mine.is_dir() and theirs.is_dir()  # the live one is left alone
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert theirs.is_dir()
    again = shared_memory_dir(1, tmp_path)
    assert not theirs.exists() and mine.is_dir() and again.is_dir()
    assert shared_memory_dir(10**18, tmp_path) is None  # no room: the caller streams
