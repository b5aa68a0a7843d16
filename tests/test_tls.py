"""TLS and mutual TLS (server.tls) of a real reward role, gRPC and HTTP, with certificates made in the test."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse

import grpc
import pytest
import trustme

from alignd.atomic import write_bytes_atomic
from alignd.v1 import reward_pb2, reward_pb2_grpc

from conftest import start_role, stop_role, token_of
from helpers import serve_once

ITEM = reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt="Hello", response=" world"))


def _write_server_cert(ca: trustme.CA, cert_path, key_path) -> None:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    write_bytes_atomic(cert_path, b"".join(b.bytes() for b in cert.cert_chain_pems))
    write_bytes_atomic(key_path, cert.private_key_pem.bytes())


def with_token(creds: grpc.ChannelCredentials) -> grpc.ChannelCredentials:
    """TLS credentials that also send the scorer's token of the test tokens file (every role requires one)."""
    return grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token_of("scorer")))


def _score(channel) -> float:
    return reward_pb2_grpc.RewardServiceStub(channel).Score(reward_pb2.ScoreRequest(items=[ITEM]), timeout=30).scores[0]


def _refused(channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        _score(channel)
    return err.value


def _https_post(url: str, ctx: ssl.SSLContext) -> tuple[int, dict]:
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=30)
    conn.request(
        "POST",
        "/get_reward",
        body=json.dumps({"query": ["Hello world"], "prompts": ["Hello"]}),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token_of('scorer')}"},
    )
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


@pytest.fixture(scope="module")
def tls_role(tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert, key = work / "tls.crt", work / "tls.key"
    _write_server_cert(ca, cert, key)
    cfg = {
        "model": {"path": str(tiny_models["reward"])},
        "torch_threads": 1,
        "server": {"tls": {"cert_file": str(cert), "key_file": str(key)}},
    }
    creds = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    server = start_role("reward", cfg, work, credentials=creds)
    info = json.loads((work / "reward.endpoint.json").read_text())
    yield server, ca, info, work
    assert stop_role(server) == 0


def test_tls_grpc_and_https(tls_role):
    server, ca, info, _work = tls_role
    with_tls = _score(server.channel)
    with grpc.insecure_channel(info["address"]) as plain:
        assert _refused(plain).code() == grpc.StatusCode.UNAVAILABLE  # plaintext against a TLS port
    with grpc.secure_channel(info["address"], grpc.ssl_channel_credentials(trustme.CA().cert_pem.bytes())) as other:
        assert _refused(other).code() == grpc.StatusCode.UNAVAILABLE  # a server the client's CA did not sign
    assert info["http_url"].startswith("https://")
    ctx = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    status, out = _https_post(info["http_url"], ctx)
    assert status == 200 and out["rewards"][0] == pytest.approx(with_tls, abs=1e-5)
    u = urllib.parse.urlparse(info["http_url"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)  # plain HTTP to the TLS port
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        conn.request("POST", "/get_reward", body=b'{"query": ["x"]}', headers={"Content-Length": "16"})
        conn.getresponse().read()
    conn.close()
    assert server.proc.poll() is None


def test_rewritten_certificates_serve_new_connections(tls_role):
    server, _ca, info, work = tls_role

    def grpc_ok(ca):
        with grpc.secure_channel(info["address"], with_token(grpc.ssl_channel_credentials(ca.cert_pem.bytes()))) as ch:
            assert isinstance(_score(ch), float)

    def https_ok(ca):
        assert _https_post(info["http_url"], ssl.create_default_context(cadata=ca.cert_pem.bytes().decode()))[0] == 200

    # New connections that trust only the new CA get through: the files were re-read, no restart. Both orders:
    # whichever API sees the new files first, the other one serves them too (kubelet HTTPS probes often come first).
    for first, second in ((grpc_ok, https_ok), (https_ok, grpc_ok)):
        new_ca = trustme.CA()
        _write_server_cert(new_ca, work / "tls.crt", work / "tls.key")
        first(new_ca)
        second(new_ca)
    assert server.log().count("tls_certificates_reloaded") == 2


@pytest.fixture(scope="module")
def mtls_role(tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("mtls")
    server_ca, client_ca = trustme.CA(), trustme.CA()
    cert, key = work / "tls.crt", work / "tls.key"
    _write_server_cert(server_ca, cert, key)
    write_bytes_atomic(work / "clients-ca.crt", client_ca.cert_pem.bytes())
    client = client_ca.issue_cert("trainer@example.com")
    client_pems = (client.private_key_pem.bytes(), b"".join(b.bytes() for b in client.cert_chain_pems))
    cfg = {
        "model": {"path": str(tiny_models["reward"])},
        "torch_threads": 1,
        "server": {
            "tls": {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(work / "clients-ca.crt")}
        },
    }
    creds = grpc.ssl_channel_credentials(server_ca.cert_pem.bytes(), *client_pems)
    server = start_role("reward", cfg, work, credentials=creds)
    info = json.loads((work / "reward.endpoint.json").read_text())
    yield server, server_ca, client, info, work
    assert stop_role(server) == 0


def test_mtls_requires_a_client_certificate(mtls_role):
    server, server_ca, client, info, work = mtls_role
    assert isinstance(_score(server.channel), float)  # the fixture's channel presents the client certificate
    no_cert = grpc.ssl_channel_credentials(server_ca.cert_pem.bytes())
    with grpc.secure_channel(info["address"], no_cert) as ch:
        assert _refused(ch).code() == grpc.StatusCode.UNAVAILABLE
    stranger = trustme.CA().issue_cert("intruder@example.com")  # a certificate the client CA did not sign
    creds = grpc.ssl_channel_credentials(
        server_ca.cert_pem.bytes(), stranger.private_key_pem.bytes(), stranger.cert_chain_pems[0].bytes()
    )
    with grpc.secure_channel(info["address"], creds) as ch:
        assert _refused(ch).code() == grpc.StatusCode.UNAVAILABLE
    # HTTPS: without a client certificate only GET /health (Kubernetes' HTTPS probes) is answered; scoring is
    # refused 403. A certificate the client CA did not sign fails the handshake. With the right one: served.
    ctx = ssl.create_default_context(cadata=server_ca.cert_pem.bytes().decode())
    status, out = _https_post(info["http_url"], ctx)
    assert status == 403 and "client certificate" in out["error"]
    u = urllib.parse.urlparse(info["http_url"])
    conn = http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=30)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    bad = ssl.create_default_context(cadata=server_ca.cert_pem.bytes().decode())
    stranger.configure_cert(bad)
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException, OSError)):
        _https_post(info["http_url"], bad)
    client.configure_cert(ctx)
    status, out = _https_post(info["http_url"], ctx)
    assert status == 200 and len(out["rewards"]) == 1
    assert server.proc.poll() is None


@pytest.mark.parametrize(
    "tls, needle",
    [
        ({"cert_file": "CERT"}, "cert_file and key_file go together"),
        ({"cert_file": "CERT", "key_file": "MISSING"}, "server.tls: key_file"),
        ({"cert_file": "CERT", "key_file": "OTHER_KEY"}, "server.tls: certificate and key do not load together"),
        ({"cert_file": "CERT", "key_file": "KEY", "client_ca_file": "NOT_PEM"}, "server.tls: client_ca_file"),
    ],
)
def test_bad_tls_configuration_exits_2_naming_the_key(tiny_models, tmp_path, tls, needle):
    import yaml

    ca = trustme.CA()
    _write_server_cert(ca, tmp_path / "c.pem", tmp_path / "k.pem")
    _write_server_cert(ca, tmp_path / "c2.pem", tmp_path / "k2.pem")
    (tmp_path / "junk.txt").write_text("not a certificate\n")
    paths = {
        "CERT": tmp_path / "c.pem",
        "KEY": tmp_path / "k.pem",
        "OTHER_KEY": tmp_path / "k2.pem",
        "MISSING": tmp_path / "missing.pem",
        "NOT_PEM": tmp_path / "junk.txt",
    }
    cfg = {"model": {"path": str(tiny_models["reward"])}, "server": {"tls": {k: str(paths[v]) for k, v in tls.items()}}}
    (tmp_path / "reward.yaml").write_text(yaml.safe_dump(cfg))
    proc = serve_once("reward", tmp_path / "reward.yaml", tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr


def test_coordinator_channel_sends_token_over_mtls(tiny_models, tmp_path):
    """What the coordinator uses for the reward replicas (coordinator.reward_client): mutual TLS plus a token
    picked by name from the server's own tokens YAML, re-read when the file is rewritten."""
    import yaml

    from alignd.config import RoleClientConfig
    from alignd.runtime.client import make_channel

    server_ca, client_ca = trustme.CA(), trustme.CA()
    _write_server_cert(server_ca, tmp_path / "tls.crt", tmp_path / "tls.key")
    write_bytes_atomic(tmp_path / "clients-ca.crt", client_ca.cert_pem.bytes())
    write_bytes_atomic(tmp_path / "server-ca.crt", server_ca.cert_pem.bytes())
    client = client_ca.issue_cert("coordinator")
    write_bytes_atomic(tmp_path / "client.crt", client.cert_chain_pems[0].bytes())
    write_bytes_atomic(tmp_path / "client.key", client.private_key_pem.bytes())
    tokens = tmp_path / "tokens.yaml"
    write_bytes_atomic(tokens, yaml.safe_dump({"coordinator": "coordinator-token-0123456789"}).encode())
    cfg = {
        "model": {"path": str(tiny_models["reward"])},
        "torch_threads": 1,
        "http": {"port": -1},
        "server": {
            "tls": {
                "cert_file": str(tmp_path / "tls.crt"),
                "key_file": str(tmp_path / "tls.key"),
                "client_ca_file": str(tmp_path / "clients-ca.crt"),
            },
            "auth": {"tokens_file": str(tokens)},
        },
    }
    creds = grpc.ssl_channel_credentials(
        server_ca.cert_pem.bytes(), client.private_key_pem.bytes(), client.cert_chain_pems[0].bytes()
    )
    server = start_role("reward", cfg, tmp_path / "run", credentials=creds)
    try:
        client_cfg = RoleClientConfig(
            tokens_file=str(tokens),
            token_name="coordinator",
            ca_file=str(tmp_path / "server-ca.crt"),
            cert_file=str(tmp_path / "client.crt"),
            key_file=str(tmp_path / "client.key"),
        )
        with make_channel(server.address, credentials=client_cfg) as ch:
            assert isinstance(_score(ch), float)
            # Rotation: the server's file gets a new token; the client's source is the same file.
            write_bytes_atomic(tokens, yaml.safe_dump({"coordinator": "rotated-token-0123456789ab"}).encode())
            assert isinstance(_score(ch), float)
        no_token = client_cfg.model_copy(update={"tokens_file": None, "token_name": None})
        with make_channel(server.address, credentials=no_token) as ch:
            assert _refused(ch).code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert stop_role(server) == 0
