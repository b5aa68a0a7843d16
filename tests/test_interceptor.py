"""The shared server interceptor and ServiceHost, in-process.

A bytes-in/bytes-out probe service is registered on a real ServiceHost (port
0) with `grpc.method_handlers_generic_handler`; its handlers raise alignd
errors, crash, or abort, and the tests check status codes, the
grpc_server_handled_total counter, request ids and health.
"""

from __future__ import annotations

import re
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alignd.config import ServerConfig
from alignd.runtime.client import make_channel
from alignd.runtime.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from alignd.runtime.interceptor import REQUEST_ID_KEY
from alignd.runtime.server import ServiceHost

from conftest import secure_channel, tokens_file

SERVICE = "alignd.test.Probe"
SECRET = "secret-detail-8f3a"  # must never reach the client
TIMEOUT = 10.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _ok(request, context):
    return b"ok:" + request


def _invalid(request, context):
    raise InvalidArgument("items[0].prompt", "empty prompt")


def _exhausted(request, context):
    raise ResourceExhausted("request queue is full; retry later")


def _precondition(request, context):
    raise FailedPrecondition("version 1 is not above the served version 2")


def _crash(request, context):
    raise RuntimeError(SECRET)


def _abort(request, context):
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler said no")


def _set_code(request, context):
    context.set_code(grpc.StatusCode.NOT_FOUND)
    context.set_details("no such run")
    return b""


def _set_code_then_crash(request, context):
    # A handler that prepared an error status, then crashed before returning.
    context.set_code(grpc.StatusCode.NOT_FOUND)
    raise RuntimeError(SECRET)


def _stream(request, context):
    yield b"one"
    yield b"two"
    if request == b"fail":
        raise InvalidArgument("request", "fails after two messages")
    if request == b"crash":
        raise RuntimeError(SECRET)


def _collect(request_iterator, context):
    parts = list(request_iterator)
    if not parts:
        raise InvalidArgument("stream", "empty")
    return b"+".join(parts)


HANDLERS = {
    "Ok": grpc.unary_unary_rpc_method_handler(_ok),
    "InvalidArgument": grpc.unary_unary_rpc_method_handler(_invalid),
    "ResourceExhausted": grpc.unary_unary_rpc_method_handler(_exhausted),
    "FailedPrecondition": grpc.unary_unary_rpc_method_handler(_precondition),
    "Crash": grpc.unary_unary_rpc_method_handler(_crash),
    "Abort": grpc.unary_unary_rpc_method_handler(_abort),
    "SetCode": grpc.unary_unary_rpc_method_handler(_set_code),
    "SetCodeThenCrash": grpc.unary_unary_rpc_method_handler(_set_code_then_crash),
    "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    "Collect": grpc.stream_unary_rpc_method_handler(_collect),
}


class Probe:
    def __init__(self, host: ServiceHost, channel: grpc.Channel) -> None:
        self.host = host
        self.channel = channel

    def unary(self, method: str, request: bytes = b"x", metadata=None):
        """(response, call) on success; raises grpc.RpcError (also a Call) on error."""
        return self.channel.unary_unary(f"/{SERVICE}/{method}").with_call(request, timeout=TIMEOUT, metadata=metadata)

    def error(self, method: str, **kw) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            self.unary(method, **kw)
        return info.value

    def handled(self, method: str, code: str, rpc_type: str = "unary") -> float:
        value = self.host.registry.get_sample_value(
            "grpc_server_handled_total",
            {"grpc_type": rpc_type, "grpc_service": SERVICE, "grpc_method": method, "grpc_code": code},
        )
        return value or 0.0

    def health(self, service: str = "") -> int:
        return (
            health_pb2_grpc.HealthStub(self.channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            .status
        )


def make_host() -> ServiceHost:
    cfg = ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        max_workers=4,
        grace_seconds=0,
        auth={"tokens_file": str(tokens_file())},
    )
    host = ServiceHost("probe", cfg, [SERVICE])
    host.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, HANDLERS),))
    host.start()
    return host


@pytest.fixture
def probe():
    host = make_host()
    channel = secure_channel(host.address)  # the probe's methods are in no scope table: admin only
    yield Probe(host, channel)
    channel.close()
    host.stop(grace=0)


def trailing(call) -> dict[str, str]:
    return dict(call.trailing_metadata() or ())


# -- status codes and metrics ---------------------------------------------------


def test_ok(probe):
    resp, call = probe.unary("Ok", b"hi")
    assert resp == b"ok:hi" and call.code() == grpc.StatusCode.OK
    assert probe.handled("Ok", "OK") == 1
    started = probe.host.registry.get_sample_value(
        "grpc_server_started_total", {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "Ok"}
    )
    assert started == 1
    assert (
        probe.host.registry.get_sample_value(
            "grpc_server_handling_seconds_count", {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "Ok"}
        )
        == 1
    )


@pytest.mark.parametrize(
    "method, code, details",
    [
        ("InvalidArgument", grpc.StatusCode.INVALID_ARGUMENT, "items[0].prompt: empty prompt"),
        ("ResourceExhausted", grpc.StatusCode.RESOURCE_EXHAUSTED, "request queue is full; retry later"),
        ("FailedPrecondition", grpc.StatusCode.FAILED_PRECONDITION, "version 1 is not above the served version 2"),
        ("Abort", grpc.StatusCode.PERMISSION_DENIED, "handler said no"),
        ("SetCode", grpc.StatusCode.NOT_FOUND, "no such run"),
    ],
)
def test_domain_errors_map_to_their_status(probe, method, code, details):
    err = probe.error(method)
    assert err.code() == code, (err.code(), err.details())
    assert err.details() == details
    assert probe.handled(method, code.name) == 1
    assert probe.handled(method, "INTERNAL") == 0 and probe.handled(method, "OK") == 0


def test_unexpected_exception_is_internal_without_leaking_its_text(probe):
    err = probe.error("Crash", metadata=[(REQUEST_ID_KEY, "req-crash-1")])
    assert err.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in err.details(), err.details()
    assert "Crash" in err.details() and "RuntimeError" in err.details()
    assert "request_id=req-crash-1" in err.details()  # the id to grep the server log for
    assert probe.handled("Crash", "INTERNAL") == 1


def test_handler_that_set_a_code_then_crashed_does_not_leak(probe):
    # The interceptor treats "a code was set" as "the handler aborted" and
    # re-raises the exception; gRPC then reports "Exception calling
    # application: <text>" to the client.
    err = probe.error("SetCodeThenCrash")
    assert SECRET not in err.details(), (err.code(), err.details())
    assert err.code() == grpc.StatusCode.INTERNAL, err.code()
    assert probe.handled("SetCodeThenCrash", "INTERNAL") == 1


def test_counter_counts_each_call_by_code(probe):
    for _ in range(3):
        probe.unary("Ok")
    for _ in range(2):
        probe.error("InvalidArgument")
        probe.error("Crash")
    probe.error("ResourceExhausted")
    probe.error("FailedPrecondition")
    probe.error("Abort")
    counts = {
        ("Ok", "OK"): 3,
        ("InvalidArgument", "INVALID_ARGUMENT"): 2,
        ("Crash", "INTERNAL"): 2,
        ("ResourceExhausted", "RESOURCE_EXHAUSTED"): 1,
        ("FailedPrecondition", "FAILED_PRECONDITION"): 1,
        ("Abort", "PERMISSION_DENIED"): 1,
    }
    for (method, code), n in counts.items():
        assert probe.handled(method, code) == n, (method, code)
    total = sum(
        s.value
        for metric in probe.host.registry.collect()
        if metric.name == "grpc_server_handled"
        for s in metric.samples
        if s.name == "grpc_server_handled_total" and s.labels["grpc_service"] == SERVICE
    )
    assert total == sum(counts.values())


def test_streaming_rpcs(probe):
    stream = probe.channel.unary_stream(f"/{SERVICE}/Stream")
    assert list(stream(b"ok", timeout=TIMEOUT)) == [b"one", b"two"]
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for m in stream(b"fail", timeout=TIMEOUT):
            got.append(m)
    assert got == [b"one", b"two"]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "request: fails after two messages"
    with pytest.raises(grpc.RpcError) as info:
        list(stream(b"crash", timeout=TIMEOUT))
    assert info.value.code() == grpc.StatusCode.INTERNAL and SECRET not in info.value.details()
    assert probe.handled("Stream", "OK", "server_stream") == 1
    assert probe.handled("Stream", "INVALID_ARGUMENT", "server_stream") == 1
    assert probe.handled("Stream", "INTERNAL", "server_stream") == 1

    collect = probe.channel.stream_unary(f"/{SERVICE}/Collect")
    assert collect(iter([b"a", b"b", b"c"]), timeout=TIMEOUT) == b"a+b+c"
    with pytest.raises(grpc.RpcError) as info:
        collect(iter([]), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert probe.handled("Collect", "OK", "client_stream") == 1
    assert probe.handled("Collect", "INVALID_ARGUMENT", "client_stream") == 1


def test_unknown_method_is_unimplemented(probe):
    err = probe.error("NoSuchMethod")
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED


# -- request ids ------------------------------------------------------------------


def test_request_id_is_echoed(probe):
    _, call = probe.unary("Ok", metadata=[(REQUEST_ID_KEY, "client-chosen-id")])
    assert trailing(call)[REQUEST_ID_KEY] == "client-chosen-id"
    err = probe.error("InvalidArgument", metadata=[(REQUEST_ID_KEY, "id-on-error")])
    assert trailing(err)[REQUEST_ID_KEY] == "id-on-error"
    err = probe.error("Crash", metadata=[(REQUEST_ID_KEY, "id-on-crash")])
    assert trailing(err)[REQUEST_ID_KEY] == "id-on-crash"


def test_request_id_is_generated_when_absent(probe):
    ids = []
    for _ in range(2):
        _, call = probe.unary("Ok")
        rid = trailing(call).get(REQUEST_ID_KEY)
        assert rid and re.fullmatch(r"[0-9a-f]{32}", rid), rid
        ids.append(rid)
    assert ids[0] != ids[1]
    err = probe.error("Crash")
    rid = trailing(err).get(REQUEST_ID_KEY)
    assert rid and f"request_id={rid}" in err.details()


# -- health -----------------------------------------------------------------------


def test_health_follows_set_serving(probe):
    for service in ("", SERVICE):
        assert probe.health(service) == NOT_SERVING, service
    probe.host.set_serving(True)
    assert probe.host.serving
    for service in ("", SERVICE):
        assert probe.health(service) == SERVING, service
    probe.host.set_serving(False)
    assert probe.health(SERVICE) == NOT_SERVING
    with pytest.raises(grpc.RpcError) as info:
        probe.health("alignd.test.Unknown")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_stop_turns_health_off():
    host = make_host()
    channel = make_channel(host.address)
    try:
        host.set_serving(True)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT
        )
        assert next(watch).status == SERVING
        # stop() waits up to `grace` for the open Watch stream; run it aside.
        stopper = threading.Thread(target=host.stop, kwargs={"grace": 5.0})
        stopper.start()
        assert next(watch).status == NOT_SERVING  # pushed to watchers before the server closes
        watch.cancel()
        stopper.join(TIMEOUT)
        assert not stopper.is_alive()
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        host.stop()  # idempotent
    finally:
        channel.close()
        host.stop(grace=0)
