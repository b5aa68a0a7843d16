"""Bearer-token authentication (alignd.runtime.auth) on the reward role, over real gRPC."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alignd.atomic import write_bytes_atomic
from alignd.runtime.auth import TokenError, parse_tokens, peer_ip
from alignd.v1 import model_pb2, model_pb2_grpc, reward_pb2, reward_pb2_grpc

from conftest import start_role, stop_role
from helpers import serve_once

ALICE, BOB, CAROL = "alice-token-0123456789", "bob-token-0123456789ab", "carol-token-0123456789"


def _write(path, tokens) -> None:
    write_bytes_atomic(path, yaml.safe_dump(tokens).encode())


def _score(channel, token: str | None):
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    item = reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=[5, 6], response_token_ids=[7]))
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    return stub.Score(reward_pb2.ScoreRequest(items=[item]), metadata=metadata, timeout=30)


def _refused(channel, token, *, header: str | None = None) -> str:
    with pytest.raises(grpc.RpcError) as err:
        if header is not None:
            stub = model_pb2_grpc.ModelServiceStub(channel)
            stub.GetInfo(model_pb2.GetInfoRequest(), metadata=(("authorization", header),), timeout=10)
        else:
            _score(channel, token)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
    return err.value.details()


@pytest.fixture(scope="module")
def secured(tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("auth")
    tokens = work / "tokens.yaml"
    _write(tokens, {"alice": ALICE, "bob": BOB})
    cfg = {
        "model": {"path": str(tiny_models["reward"])},
        "torch_threads": 1,
        "server": {"auth": {"tokens_file": str(tokens)}},
    }
    server = start_role("reward", cfg, work)  # readiness through the health check: public without a token
    yield server, tokens
    stop_role(server)


def test_missing_malformed_unknown_tokens_are_unauthenticated(secured):
    server, _ = secured
    assert "missing credentials" in _refused(server.channel, None)
    assert "unknown or revoked" in _refused(server.channel, "not-a-token-of-this-server")
    assert "malformed" in _refused(server.channel, None, header="Basic abc")
    assert len(_score(server.channel, ALICE).scores) == 1
    # Every RPC of the role is covered (ModelService too), health is not.
    _refused(server.channel, None, header=f"Token {ALICE}")
    health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for reason, n in (("missing", 1), ("malformed", 2), ("unknown", 1)):
        assert f'alignd_reward_auth_rejected_total{{reason="{reason}"}} {float(n)}' in metrics
    assert 'grpc_code="UNAUTHENTICATED"' in metrics
    # Refusals are logged, the tokens never.
    log = server.log()
    assert log.count('"grpc_code": "UNAUTHENTICATED"') >= 4
    assert ALICE not in log and "not-a-token-of-this-server" not in log


def test_rotation_and_revocation_without_restart(secured):
    server, tokens = secured
    pid = server.proc.pid
    assert len(_score(server.channel, BOB).scores) == 1
    _write(tokens, {"alice": ALICE, "carol": CAROL})  # bob revoked, carol added
    assert "unknown or revoked" in _refused(server.channel, BOB)
    assert len(_score(server.channel, CAROL).scores) == 1
    # A rewrite that does not parse keeps the last good tokens.
    write_bytes_atomic(tokens, b"alice: [unclosed\n")
    assert len(_score(server.channel, CAROL).scores) == 1
    _refused(server.channel, BOB)
    assert "auth_tokens_invalid" in server.log()
    _write(tokens, {"alice": ALICE, "bob": BOB})
    assert len(_score(server.channel, BOB).scores) == 1
    assert server.proc.pid == pid and server.proc.poll() is None


def test_trusted_networks_skip_the_token_by_configuration_only(tiny_models, tmp_path):
    tokens = tmp_path / "tokens.yaml"
    _write(tokens, {"alice": ALICE})
    cfg = {
        "model": {"path": str(tiny_models["reward"])},
        "torch_threads": 1,
        "server": {"auth": {"tokens_file": str(tokens), "trusted_networks": ["127.0.0.0/8"]}},
    }
    server = start_role("reward", cfg, tmp_path / "role")
    try:
        assert len(_score(server.channel, None).scores) == 1  # loopback is trusted here
        _refused(server.channel, "a-wrong-token-0123456789")  # a token that is sent is checked anyway
    finally:
        stop_role(server)


def test_an_unusable_tokens_file_refuses_to_start(tiny_models, tmp_path):
    cfg_path = tmp_path / "reward.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tiny_models["reward"])},
                "server": {"auth": {"tokens_file": str(tmp_path / "missing.yaml")}},
            }
        )
    )
    out = serve_once("reward", cfg_path, tmp_path)
    assert out.returncode == 2 and "server.auth.tokens_file" in out.stderr and "missing.yaml" in out.stderr


def test_tokens_file_format_and_peer_parsing():
    import hashlib

    parsed = parse_tokens(
        f"alice: {ALICE}\nbob: {{token: {BOB}, scopes: [weights, train]}}\n"
        f"carol: {{sha256: {hashlib.sha256(CAROL.encode()).hexdigest()}, scopes: [admin]}}\n",
        "f",
    )
    assert {n: sorted(e.scopes) for n, e in parsed.items()} == {
        "alice": ["score"],
        "bob": ["train", "weights"],
        "carol": ["admin"],
    }
    assert parsed["carol"].digest == hashlib.sha256(CAROL.encode()).digest()
    assert parse_tokens("", "f") == {}
    for text, problem in (
        (f"- {ALICE}", "mapping"),
        ("alice: short", "16 characters"),
        (f"alice: {ALICE}\nbob: {ALICE}", "same token"),
        ("a: [", "not YAML"),
        (f"alice: {{token: {ALICE}, scopes: [root]}}", "unknown scope 'root'"),
        (f"alice: {{token: {ALICE}}}", "scopes must be"),
        (f"alice: {{token: {ALICE}, sha256: ab, scopes: [score]}}", "exactly one of"),
        ("alice: {sha256: abcd, scopes: [score]}", "64 hex digits"),
        (f"alice: {{token: {ALICE}, scopes: [score], role: x}}", "unknown key"),
    ):
        with pytest.raises(TokenError, match=problem):
            parse_tokens(text, "f")
    assert str(peer_ip("ipv4:10.1.2.3:5555")) == "10.1.2.3"
    assert str(peer_ip("ipv6:[::1]:5555")) == "::1"
    assert peer_ip("unix:/tmp/sock") is None
    with pytest.raises(ValueError, match="CIDR"):
        from alignd.config import AuthConfig

        AuthConfig(trusted_networks=["not-a-net"])
