"""Mutual TLS between roles, as the chart's `tls` wires it: each role serves with its own certificate and requires
a client certificate of the CA; the learner presents its certificate (and its token) when it pushes weights to the
policy, verifying the policy by the shared peer name; probes reach the plaintext health-only port."""

from __future__ import annotations

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alignd.atomic import write_bytes_atomic
from alignd.v1 import learner_pb2, learner_pb2_grpc, model_pb2, model_pb2_grpc

from conftest import start_role, stop_role, token_of, tokens_file

PEER_NAME = "rel-alignd-peers.ml.svc"  # what the chart puts in every certificate (alignd.tlsPeerName)


def issue(ca: trustme.CA, directory, name: str):
    """A kubernetes.io/tls-like directory for a role: tls.crt, tls.key, ca.crt (server and client auth)."""
    cert = ca.issue_cert(PEER_NAME, f"{name}.ml.svc", "127.0.0.1")
    directory.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(directory / "tls.crt", b"".join(b.bytes() for b in cert.cert_chain_pems))
    write_bytes_atomic(directory / "tls.key", cert.private_key_pem.bytes())
    write_bytes_atomic(directory / "ca.crt", ca.cert_pem.bytes())
    return directory


def server_tls(d) -> dict:
    return {"cert_file": str(d / "tls.crt"), "key_file": str(d / "tls.key"), "client_ca_file": str(d / "ca.crt")}


@pytest.fixture(scope="module")
def pair(tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("mtls")
    ca = trustme.CA()
    pol_dir, lrn_dir = issue(ca, work / "policy-tls", "policy"), issue(ca, work / "learner-tls", "learner")
    auth = {"tokens_file": str(tokens_file())}
    creds = grpc.ssl_channel_credentials(
        ca.cert_pem.bytes(), (pol_dir / "tls.key").read_bytes(), (pol_dir / "tls.crt").read_bytes()
    )
    policy = start_role(
        "policy",
        {
            "model": {"path": str(tiny_models["lm"])},
            "torch_threads": 1,
            "server": {"auth": auth, "tls": server_tls(pol_dir), "health_port": 0},
        },
        work / "policy",
        credentials=creds,
        options=[("grpc.ssl_target_name_override", PEER_NAME)],
    )
    learner_cfg = {
        "model": {"path": str(tiny_models["lm"])},
        "value_head_on_policy": True,
        "torch_threads": 1,
        "checkpoint_every_steps": 0,
        "weight_sync": "stream",
        "policy_addresses": [policy.address],
        "paths": {"roots": [str(tiny_models["lm"].parent)]},
        "server": {"auth": auth, "tls": server_tls(lrn_dir)},
        "client": {
            "tokens_file": str(tokens_file()),
            "token_name": "learner",
            "ca_file": str(lrn_dir / "ca.crt"),
            "cert_file": str(lrn_dir / "tls.crt"),
            "key_file": str(lrn_dir / "tls.key"),
            "server_name": PEER_NAME,
        },
    }
    learner_creds = grpc.ssl_channel_credentials(
        ca.cert_pem.bytes(), (lrn_dir / "tls.key").read_bytes(), (lrn_dir / "tls.crt").read_bytes()
    )
    learner = start_role(
        "learner",
        learner_cfg,
        work / "learner",
        credentials=learner_creds,
        options=[("grpc.ssl_target_name_override", PEER_NAME)],
    )
    yield policy, learner, ca, work
    assert stop_role(learner) == 0
    assert stop_role(policy) == 0


def test_the_learner_pushes_to_the_policy_over_mutual_tls(pair, tiny_models):
    policy, learner, _ca, _work = pair
    op = (("authorization", f"Bearer {token_of()}"),)  # these channels carry TLS only: the operator's token per call
    stub = learner_pb2_grpc.LearnerServiceStub(learner.channel)
    stub.ResetPolicy(
        learner_pb2.ResetPolicyRequest(policy_dir=str(tiny_models["lm_other"]), version=5), metadata=op, timeout=120
    )
    resp = stub.PushWeights(learner_pb2.PushWeightsRequest(), metadata=op, timeout=120)
    assert resp.version == 5 and resp.bytes_per_replica > 0  # streamed to the replica over mutual TLS
    info = (
        model_pb2_grpc.ModelServiceStub(policy.channel)
        .GetInfo(model_pb2.GetInfoRequest(), metadata=op, timeout=10)
        .info
    )
    assert info.weight_version == 5
    assert '"client": "learner"' in policy.log()  # with the learner's own token


def test_callers_without_a_certificate_of_the_ca_are_refused(pair):
    policy, _learner, ca, _work = pair
    token = (("authorization", f"Bearer {token_of()}"),)
    stranger = trustme.CA().issue_cert(PEER_NAME)
    for creds in (
        grpc.ssl_channel_credentials(ca.cert_pem.bytes()),  # no client certificate
        grpc.ssl_channel_credentials(
            ca.cert_pem.bytes(), stranger.private_key_pem.bytes(), stranger.cert_chain_pems[0].bytes()
        ),
    ):  # another CA's
        with grpc.secure_channel(policy.address, creds, options=[("grpc.ssl_target_name_override", PEER_NAME)]) as ch:
            with pytest.raises(grpc.RpcError) as err:
                model_pb2_grpc.ModelServiceStub(ch).GetInfo(model_pb2.GetInfoRequest(), metadata=token, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(policy.address) as ch:  # plaintext to the TLS port
        with pytest.raises(grpc.RpcError):
            model_pb2_grpc.ModelServiceStub(ch).GetInfo(model_pb2.GetInfoRequest(), metadata=token, timeout=10)


def test_probes_reach_the_plaintext_health_port_and_nothing_else(pair):
    import json

    policy, _learner, _ca, work = pair
    log = policy.log()
    started = [json.loads(line) for line in log.splitlines() if '"event": "server_started"' in line][-1]
    port = started["health_port"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:  # the role's API is not served there
            model_pb2_grpc.ModelServiceStub(ch).GetInfo(model_pb2.GetInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
