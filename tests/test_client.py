"""Client helpers: retries on UNAVAILABLE for idempotent calls only; health waits.

The servers here are real gRPC servers (ServiceHost) whose servicers are
fakes: the unit under test is the client's channel configuration.
"""

from __future__ import annotations

import threading

import grpc
import pytest

from alignd.config import ServerConfig
from alignd.runtime.client import wait_for_serving
from alignd.runtime.errors import Unavailable
from alignd.runtime.server import ServiceHost
from alignd.v1 import coordinator_pb2, coordinator_pb2_grpc, reward_pb2, reward_pb2_grpc

from conftest import secure_channel, tokens_file


class FlakyReward(reward_pb2_grpc.RewardServiceServicer):
    """Answers UNAVAILABLE `failures` times, then a score."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def Score(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            raise Unavailable("warming up")
        return reward_pb2.ScoreResponse(scores=[1.5])


class FlakyCoordinator(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self) -> None:
        self.starts = 0

    def StartRun(self, request, context):
        self.starts += 1
        raise Unavailable("try later")


@pytest.fixture
def host():
    h = ServiceHost(
        "test",
        ServerConfig(metrics_port=-1, auth={"tokens_file": str(tokens_file())}),
        ["alignd.v1.RewardService", "alignd.v1.CoordinatorService"],
    )
    yield h
    h.stop(grace=0)


def test_idempotent_call_is_retried_on_unavailable(host):
    reward = FlakyReward(failures=2)
    reward_pb2_grpc.add_RewardServiceServicer_to_server(reward, host.server)
    host.start()
    host.set_serving(True)
    with secure_channel(host.address) as ch:
        resp = reward_pb2_grpc.RewardServiceStub(ch).Score(reward_pb2.ScoreRequest(), timeout=30)
    assert list(resp.scores) == [1.5]
    assert reward.calls == 3


def test_retries_are_bounded(host):
    reward = FlakyReward(failures=100)
    reward_pb2_grpc.add_RewardServiceServicer_to_server(reward, host.server)
    host.start()
    with secure_channel(host.address) as ch, pytest.raises(grpc.RpcError) as err:
        reward_pb2_grpc.RewardServiceStub(ch).Score(reward_pb2.ScoreRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reward.calls == 4  # maxAttempts


def test_non_idempotent_call_is_not_retried(host):
    coord = FlakyCoordinator()
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(coord, host.server)
    host.start()
    with secure_channel(host.address) as ch, pytest.raises(grpc.RpcError) as err:
        coordinator_pb2_grpc.CoordinatorServiceStub(ch).StartRun(coordinator_pb2.StartRunRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert coord.starts == 1


def test_wait_for_serving_returns_when_health_turns_serving(host):
    host.start()
    done = threading.Event()
    errors = []

    def waiter():
        try:
            with secure_channel(host.address) as ch:
                wait_for_serving(ch, timeout=30)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        done.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not done.wait(timeout=0.3)  # NOT_SERVING: still waiting
    host.set_serving(True)
    assert done.wait(timeout=30)
    t.join()
    assert errors == []


def test_wait_for_serving_times_out(host):
    host.start()
    with secure_channel(host.address) as ch, pytest.raises(TimeoutError):
        wait_for_serving(ch, timeout=0.5)


def test_expand_addresses_spells_out_every_replica_behind_a_name():
    import socket

    from alignd.runtime.client import expand_addresses

    table = {
        "policy-headless": ["10.0.0.7", "10.0.0.5", "10.0.0.6", "10.0.0.5"],
        "reward": ["10.0.1.1"],
        "v6-headless": ["fd00::2", "fd00::1"],
    }
    calls = []

    def resolve(host, port, type=0):
        calls.append((host, port, type))
        if host not in table:
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, type, 6, "", (ip, port)) for ip in table[host]]

    got = expand_addresses(
        [
            "policy-headless:50051",
            "reward:50052",
            "127.0.0.1:1",
            "localhost:2",
            "not-yet:3",
            "v6-headless:4",
            "[::1]:5",
        ],
        resolve=resolve,
    )
    assert got == [
        "10.0.0.5:50051",
        "10.0.0.6:50051",
        "10.0.0.7:50051",  # one per distinct replica, sorted
        "reward:50052",  # a single address: the name is kept (gRPC re-resolves it on reconnect)
        "127.0.0.1:1",
        "localhost:2",  # literals and localhost are not looked up
        "not-yet:3",  # not resolvable yet: kept, the channel retries
        "[fd00::1]:4",
        "[fd00::2]:4",
        "[::1]:5",
    ]
    assert {c[0] for c in calls} == {"policy-headless", "reward", "not-yet", "v6-headless"}
    assert all(c[2] == socket.SOCK_STREAM for c in calls)


def test_token_source_reads_by_name_rotates_and_keeps_the_last_good_token(tmp_path):
    import yaml

    from alignd.atomic import write_bytes_atomic
    from alignd.runtime.client import TokenSource

    path = tmp_path / "tokens.yaml"
    write_bytes_atomic(path, yaml.safe_dump({"coordinator": "first-token-0123456789", "other": "x" * 20}).encode())
    source = TokenSource(str(path), "coordinator")
    assert source.token() == "first-token-0123456789"
    write_bytes_atomic(path, yaml.safe_dump({"coordinator": "second-token-0123456789"}).encode())
    assert source.token() == "second-token-0123456789"  # rotation: re-read on change
    write_bytes_atomic(path, b"coordinator: [unclosed")  # a bad rewrite: the last good token stays
    assert source.token() == "second-token-0123456789"
    write_bytes_atomic(path, yaml.safe_dump({"someone-else": "third-token-0123456789"}).encode())
    assert source.token() == "second-token-0123456789"
    plain = tmp_path / "token.txt"
    write_bytes_atomic(plain, b"  plain-token-0123456789\n")
    assert TokenSource(str(plain)).token() == "plain-token-0123456789"
    write_bytes_atomic(plain, b"")
    with pytest.raises(ValueError, match="empty token"):
        TokenSource(str(plain))  # unusable at start: an error, not a silent empty token


@pytest.mark.parametrize(
    "target, host, loopback",
    [
        ("127.0.0.1:50051", "127.0.0.1", True),
        ("127.3.4.5", "127.3.4.5", True),
        ("localhost:1", "localhost", True),
        ("api.localhost:1", "api.localhost", True),
        ("[::1]:50051", "::1", True),
        ("[::1]", "::1", True),
        ("::1", "::1", True),
        ("dns:///localhost:50051", "localhost", True),
        ("ipv4:127.0.0.1:1", "127.0.0.1", True),
        ("unix:/tmp/alignd.sock", None, True),
        ("0.0.0.0", "0.0.0.0", False),
        ("::", "::", False),
        ("10.0.0.7:50051", "10.0.0.7", False),
        ("reward.example.com:443", "reward.example.com", False),
        ("dns:///reward-headless.ml.svc:50051", "reward-headless.ml.svc", False),
    ],
)
def test_one_loopback_rule_for_targets_and_bind_addresses(target, host, loopback):
    """alignd.runtime.addresses: what the learner (shared-memory weights), the reward client (a token without TLS)
    and the server (auth off on an exposed address) each decided with a copy of their own."""
    from alignd.runtime.addresses import host_of, is_loopback

    if host is not None:
        assert host_of(target) == host
    assert is_loopback(target) is loopback
