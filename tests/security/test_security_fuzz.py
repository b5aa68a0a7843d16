"""A fuzz pass over every RPC's request message of every role: never INTERNAL, never OK with a non-finite number.

Hypothesis builds request messages from the alignd.v1 descriptors (every field type, boundary integers, NaN and
infinities, unknown enum values, nested and repeated fields, oneofs) and also sends raw bytes that are not a valid
message. The five roles run as real subprocesses; the caller holds the admin scope, so every request reaches its
handler. Each answer must be OK (with finite floats everywhere in the response) or a deliberate status.
"""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rpc_catalog import SERVICES, all_methods, base_requests

from conftest import bearer, start_tiny_stack, stop_roles

ROOT = Path(__file__).resolve().parents[2]
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
DELIBERATE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.PERMISSION_DENIED,
}
INTS = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}


def scalar(field) -> st.SearchStrategy:
    t = field.type
    if t in INTS:
        lo, hi = INTS[t]
        return st.one_of(
            st.integers(-3, 600).filter(lambda v: lo <= v <= hi), st.sampled_from([lo, hi, 0, 1]), st.integers(lo, hi)
        )
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return st.one_of(
            st.sampled_from([0.0, 1.0, -1.0, 1e-45, 1e38, float("nan"), float("inf"), -float("inf")]),
            st.floats(width=32 if t == F.TYPE_FLOAT else 64),
        )
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.sampled_from(["", "..", "/etc/passwd", "os:system", "a" * 5000]))
    if t == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == F.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 50))
    raise AssertionError(f"no strategy for {field.full_name}")


def message_strategy(desc, depth: int = 0) -> st.SearchStrategy:
    """Random messages of `desc` (dicts of field name -> value, built into the message by `build`)."""
    fields = {}
    for f in desc.fields:
        if f.type == F.TYPE_MESSAGE:
            if depth >= 3 or f.message_type.GetOptions().map_entry:
                if f.message_type.GetOptions().map_entry:
                    fields[f.name] = st.dictionaries(st.text(max_size=8), st.floats(), max_size=3)
                continue
            inner = message_strategy(f.message_type, depth + 1)
        else:
            inner = scalar(f)
        if f.is_repeated and not (f.type == F.TYPE_MESSAGE and f.message_type.GetOptions().map_entry):
            inner = st.lists(inner, max_size=6)
        fields[f.name] = inner
    names = list(fields)
    return st.fixed_dictionaries({}, optional={n: fields[n] for n in names})


def build(cls, values: dict):
    msg = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        if field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            getattr(msg, name).update(value)
        elif field.type == F.TYPE_MESSAGE:
            sub_cls = message_factory.GetMessageClass(field.message_type)
            if field.is_repeated:
                getattr(msg, name).extend(build(sub_cls, v) for v in value)
            else:
                getattr(msg, name).CopyFrom(build(sub_cls, value))
        elif field.is_repeated:
            try:
                getattr(msg, name).extend(value)
            except (ValueError, TypeError):
                pass  # an out-of-range float for a float32 field: leave it out
        else:
            try:
                setattr(msg, name, value)
            except (ValueError, TypeError):
                pass
    return msg


def finite_everywhere(msg) -> bool:
    if isinstance(msg, list):  # a server stream's messages
        return all(finite_everywhere(m) for m in msg)
    for field, value in msg.ListFields():
        values = value if field.is_repeated else [value]
        if field.type == F.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                if not all(math.isfinite(v) for v in value.values() if isinstance(v, float)):
                    return False
                continue
            if not all(finite_everywhere(v) for v in values):
                return False
        elif field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE) and not all(math.isfinite(v) for v in values):
            return False
    return True


@pytest.fixture(scope="module")
def roles(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    paths = {"roots": [str(tmp_path_factory.getbasetemp()), str(ROOT / "configs")]}  # the valid requests' files
    by_role = start_tiny_stack(
        tiny_models,
        root,
        every={"paths": paths},
        learner={"checkpoint_every_steps": 0},
        coordinator={"recovery_timeout_seconds": 1},
    )
    yield by_role
    stop_roles(list(by_role.values()))


def cases() -> list[tuple[str, str]]:
    return [(role, m) for role, services in SERVICES.items() for m in all_methods() if m.split("/")[1] in services]


def call(channel, method: str, payload):
    """(code, response or None) of `method` with `payload` (a message, or raw bytes)."""
    pool = descriptor_pool.Default()
    m = pool.FindMethodByName(method.strip("/").replace("/", "."))
    resp_cls = message_factory.GetMessageClass(m.output_type)
    ser = (lambda x: x) if isinstance(payload, bytes) else (lambda x: x.SerializeToString())
    try:
        if m.client_streaming:
            resp = channel.stream_unary(method, request_serializer=ser, response_deserializer=resp_cls.FromString)(
                iter([payload]), metadata=bearer(), timeout=30
            )
        elif m.server_streaming:
            resp = list(
                channel.unary_stream(method, request_serializer=ser, response_deserializer=resp_cls.FromString)(
                    payload, metadata=bearer(), timeout=30
                )
            )
        else:
            resp = channel.unary_unary(method, request_serializer=ser, response_deserializer=resp_cls.FromString)(
                payload, metadata=bearer(), timeout=30
            )
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, resp


@pytest.mark.parametrize("role, method", cases(), ids=lambda x: x.rsplit("/", 1)[-1] if "/" in x else x)
def test_fuzz_every_request_message(roles, role, method, tmp_path_factory, tiny_models):
    pool = descriptor_pool.Default()
    m = pool.FindMethodByName(method.strip("/").replace("/", "."))
    req_cls = message_factory.GetMessageClass(m.input_type)
    channel = roles[role].channel
    base = base_requests(tmp_path_factory.getbasetemp(), tiny_models).get(method.rsplit("/", 1)[-1])
    seen: dict[str, int] = {}

    def check(payload) -> None:
        code, out = call(channel, method, payload)
        seen[code.name] = seen.get(code.name, 0) + 1
        assert code == grpc.StatusCode.OK or code in DELIBERATE, (method, code, out, payload)
        if code == grpc.StatusCode.OK:
            assert finite_everywhere(out), (method, out)

    @FUZZ
    @given(values=message_strategy(m.input_type), mutate=st.booleans())
    def structured(values, mutate):
        """Random messages, and mutations of a valid request (random values merged over some of its fields)."""
        payload = build(req_cls, values)
        if mutate and base is not None:
            merged = req_cls()
            merged.CopyFrom(base)
            merged.MergeFrom(payload)
            payload = merged
        check(payload)

    @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(garbage=st.binary(min_size=1, max_size=64))
    def raw(garbage):
        """Bytes that are not a message of the request type (or are, by chance)."""
        check(garbage)

    structured()
    raw()
    print(method, seen)
    assert roles[role].proc.poll() is None
    assert "rpc_failed" not in roles[role].log(), roles[role].log()[-3000:]
