"""Per-caller bounds of a role's gRPC server, on a real reward role with small limits (alignd.runtime.access):
calls in flight per client, idle client streams, health Watch streams, trusted networks, /metrics with a token,
and a role serving open on a non-loopback address."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alignd.v1 import model_pb2, model_pb2_grpc, reward_pb2, reward_pb2_grpc

from conftest import start_role, stop_role
from helpers import serve_once, wait_until

TOKENS = {
    "alice": {"token": "alice-token-0123456789abcdef", "scopes": ["score"]},
    "bob": {"token": "bob-token-0123456789abcdefgh", "scopes": ["score"]},
    "pusher": {"token": "pusher-token-0123456789abcde", "scopes": ["weights"]},
    "scraper": {"token": "scraper-token-0123456789abcd", "scopes": ["metrics"]},
}
ITEM = reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=[5, 6], response_token_ids=[7]))


def md(name: str) -> tuple:
    return (("authorization", f"Bearer {TOKENS[name]['token']}"),)


@pytest.fixture(scope="module")
def role(tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("limits")
    (work / "tokens.yaml").write_text(yaml.safe_dump(TOKENS))
    cfg = {
        "model": {"path": str(tiny_models["reward"])},
        "torch_threads": 1,
        "server": {
            "auth": {
                "tokens_file": str(work / "tokens.yaml"),
                "trusted_networks": ["127.0.0.0/8"],
                "metrics_requires_token": True,
            },
            "limits": {
                "max_concurrent_calls_per_client": 3,
                "stream_idle_timeout_seconds": 1.5,
                "max_health_watchers": 6,
                "max_health_watchers_per_peer": 4,
            },
        },
    }
    server = start_role("reward", cfg, work)
    yield server
    assert stop_role(server) == 0, server.log()[-3000:]


def blocked_stream(stop: threading.Event):
    """A request stream that sends nothing until `stop`: a call held open by a client that never sends."""
    while not stop.wait(0.05):
        pass
    return
    yield  # unreachable: a generator


def scores_started(role) -> float:
    """grpc_server_started_total of Score on the role (a call counts once a worker runs it)."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(role.metrics_url, headers={"Authorization": f"Bearer {TOKENS['scraper']['token']}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "grpc_server_started_total" and s.labels.get("grpc_method") == "Score"
    )


def test_calls_in_flight_are_bounded_per_client(role):
    stop = threading.Event()
    held = []
    try:
        with grpc.insecure_channel(role.address) as ch:
            score = ch.stream_unary(
                "/alignd.v1.RewardService/Score",
                request_serializer=lambda x: x,
                response_deserializer=reward_pb2.ScoreResponse.FromString,
            )
            before = scores_started(role)
            for _ in range(3):  # alice's three calls in flight: never send their message
                held.append(score.future(blocked_stream(stop), metadata=md("alice")))
            wait_until("alice's three calls running", lambda: scores_started(role) >= before + 3, timeout=30)
            stub = reward_pb2_grpc.RewardServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:  # a fourth: refused at once
                stub.Score(reward_pb2.ScoreRequest(items=[ITEM]), metadata=md("alice"), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent_calls_per_client" in err.value.details()
            # Another client is served meanwhile.
            assert len(stub.Score(reward_pb2.ScoreRequest(items=[ITEM]), metadata=md("bob"), timeout=30).scores) == 1
            stop.set()  # alice's streams end without a message: INVALID_ARGUMENT, and her slots come back
            for f in held:
                assert f.exception(timeout=30).code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(stub.Score(reward_pb2.ScoreRequest(items=[ITEM]), metadata=md("alice"), timeout=30).scores) == 1
    finally:
        stop.set()
    req = urllib.request.Request(role.metrics_url, headers={"Authorization": f"Bearer {TOKENS['scraper']['token']}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    assert 'alignd_reward_calls_limited_total{reason="client_concurrency"} 1.0' in text


def test_an_idle_weight_stream_is_ended_and_frees_the_update_slot(role):
    """An UpdateWeights stream that sends a header and then nothing is ended after the idle timeout; the replica
    takes the next update (the single update slot was released)."""
    from alignd.models.weights import encode_stream

    stop = threading.Event()

    def header_then_silence():
        yield model_pb2.UpdateWeightsRequest(header=model_pb2.WeightsHeader(version=1, num_tensors=1, total_bytes=4))
        stop.wait(30)

    with grpc.insecure_channel(role.address) as ch:
        stub = model_pb2_grpc.ModelServiceStub(ch)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stub.UpdateWeights(header_then_silence(), metadata=md("pusher"), timeout=30)
        stop.set()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "no message for 1.5 s" in err.value.details()
        assert time.monotonic() - t0 < 10
        # The slot is free: a real (here: malformed on purpose) update reaches the receiver, not ABORTED.
        with pytest.raises(grpc.RpcError) as err:
            stub.UpdateWeights(encode_stream({}, 1), metadata=md("pusher"), timeout=30)
        assert err.value.code() != grpc.StatusCode.ABORTED, err.value.details()


def test_health_watch_streams_are_capped_and_check_always_answers(role):
    calls = []
    with grpc.insecure_channel(role.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        try:
            for _ in range(4):  # this peer's cap
                call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
                assert next(call).status == health_pb2.HealthCheckResponse.SERVING
                calls.append(call)
            refused = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            with pytest.raises(grpc.RpcError) as err:
                next(refused)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Check, what probes use, answers regardless.
            assert (
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            )
        finally:
            for call in calls:
                call.cancel()

        # Closed watchers free their places.
        def watch_ok():
            call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            try:
                return next(call).status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False
            finally:
                call.cancel()

        wait_until("a watcher's place to come back", watch_ok, timeout=10)


def test_trusted_networks_grant_score_and_nothing_else(role):
    with grpc.insecure_channel(role.address) as ch:  # loopback is trusted here; no token sent
        assert (
            len(reward_pb2_grpc.RewardServiceStub(ch).Score(reward_pb2.ScoreRequest(items=[ITEM]), timeout=30).scores)
            == 1
        )
        with pytest.raises(grpc.RpcError) as err:
            model_pb2_grpc.ModelServiceStub(ch).LoadWeights(
                model_pb2.LoadWeightsRequest(path="/x", version=5), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'weights' scope" in err.value.details() and "trusted-network" in err.value.details()


def test_metrics_require_a_token_with_the_metrics_scope(role):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(role.metrics_url, timeout=10)
    assert err.value.code == 401
    req = urllib.request.Request(role.metrics_url, headers={"Authorization": f"Bearer {TOKENS['alice']['token']}"})
    with pytest.raises(urllib.error.HTTPError) as err:  # a scoring token is not a scraper's
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401
    req = urllib.request.Request(role.metrics_url, headers={"Authorization": f"Bearer {TOKENS['scraper']['token']}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    assert "alignd_reward_auth_rejected_total" in text
    for entry in TOKENS.values():
        assert entry["token"] not in text


def test_a_role_open_on_a_non_loopback_address_says_so(tiny_models, tmp_path):
    """server.auth.enabled: false must be explicit, and on a non-loopback bind it is logged and exported."""
    cfg_path = tmp_path / "reward.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": {"path": str(tiny_models["reward"])}}))  # auth on, no tokens file
    out = serve_once("reward", cfg_path, tmp_path / "a")
    assert out.returncode == 2 and "server.auth.tokens_file: required" in out.stderr
    server = start_role(
        "reward",
        {
            "model": {"path": str(tiny_models["reward"])},
            "torch_threads": 1,
            "http": {"port": -1},
            "server": {"host": "0.0.0.0", "metrics_host": "127.0.0.1", "auth": {"enabled": False}},
        },
        tmp_path / "open",
    )
    try:
        assert '"event": "auth_disabled_exposed"' in server.log()
        assert "alignd_reward_auth_disabled_exposed 1.0" in server.metrics()
    finally:
        assert stop_role(server) == 0
