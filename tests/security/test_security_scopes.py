"""Every RPC of every role refuses callers without a valid credential of the right scope, and nothing changes.

The five roles run as real subprocesses with authentication on (the default) against one tokens file of the
local stack's callers (alignd.runtime.tokens). For every method of every alignd.v1 service, and the reflection
service, a call with no token, a malformed header, an unknown token and (where the method needs a scope) a valid
token without that scope is refused UNAUTHENTICATED / PERMISSION_DENIED. The requests are ones that would change
state if they were served (load other weights, start a run, train, write a checkpoint, push weights); afterwards
every role serves what it served before (versions, greedy outputs, scores), no run exists, and no file was
created, changed or deleted under the roles' directories.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rpc_catalog import SERVICES, all_methods, base_requests

from alignd.runtime import scopes as S
from alignd.runtime.auth import parse_tokens
from alignd.v1 import (
    common_pb2,
    coordinator_pb2,
    model_pb2,
    model_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

from conftest import secure_channel, start_tiny_stack, stop_roles, token_of, tokens_file

ROOT = Path(__file__).resolve().parents[2]
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
PROMPT = [5, 6, 7, 8]


def test_every_method_has_a_scope_and_unlisted_methods_need_admin():
    methods = all_methods()
    assert len(methods) == 27  # 7 ModelService + 3 model roles + 8 LearnerService + 9 CoordinatorService
    missing = [m for m in methods if m not in S.METHOD_SCOPES]
    assert not missing, f"methods without an entry in alignd.runtime.scopes.METHOD_SCOPES: {missing}"
    assert all(S.METHOD_SCOPES[m] != S.PUBLIC for m in methods)  # only health is public
    assert S.scope_of("/alignd.v1.PolicyService/SomethingNew") == S.ADMIN


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("scopes")
    by_role = start_tiny_stack(tiny_models, root)
    yield root, by_role
    stop_roles(list(by_role.values()))


def snapshot(root: Path, roles: dict) -> dict:
    """What a refused call must not change: weight versions, greedy outputs, scores, log-probs, runs, files."""
    out = {}
    for role in ("policy", "reward", "reference", "learner"):
        info = model_pb2_grpc.ModelServiceStub(roles[role].channel).GetInfo(model_pb2.GetInfoRequest(), timeout=30).info
        out[f"{role}.version"] = (info.weight_version, info.staged_weight_version)
    gen = policy_pb2_grpc.PolicyServiceStub(roles["policy"].channel).Generate(
        policy_pb2.GenerateRequest(
            prompts=[policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=PROMPT))],
            sampling=policy_pb2.SamplingParams(temperature=0.0, max_new_tokens=8),
        ),
        timeout=60,
    )
    out["policy.greedy"] = list(gen.samples[0].token_ids)
    score = reward_pb2_grpc.RewardServiceStub(roles["reward"].channel).Score(
        reward_pb2.ScoreRequest(
            items=[
                reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=PROMPT, response_token_ids=[9, 10]))
            ]
        ),
        timeout=60,
    )
    out["reward.score"] = list(score.scores)
    lp = reference_pb2_grpc.ReferenceServiceStub(roles["reference"].channel).LogProbs(
        reference_pb2.LogProbsRequest(
            items=[reference_pb2.LogProbsItem(prompt_token_ids=PROMPT, response_token_ids=[9, 10])]
        ),
        timeout=60,
    )
    out["reference.logprobs"] = list(lp.results[0].logprobs)
    from alignd.v1 import coordinator_pb2_grpc

    runs = coordinator_pb2_grpc.CoordinatorServiceStub(roles["coordinator"].channel).ListRuns(
        coordinator_pb2.ListRunsRequest(), timeout=30
    )
    out["coordinator.runs"] = [r.run_id for r in runs.runs]
    files = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.suffix == ".log":  # the roles' own logs grow with every refusal
                continue
            st = p.stat()
            files[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    out["files"] = files
    return out


def harmful_requests(root: Path, tiny_models) -> dict[str, object]:
    """A request per method that would change state (or read data) if it were served."""
    return base_requests(root, tiny_models, stream_state=True)


def call(channel, method: str, request, metadata):
    """Calls `method` with `request` (a message, or a callable giving a stream of them); returns the status code."""
    short = method.rsplit("/", 1)[-1]
    pool = descriptor_pool.Default()
    m = pool.FindMethodByName(method.strip("/").replace("/", "."))
    from google.protobuf import message_factory

    resp_cls = message_factory.GetMessageClass(m.output_type)
    try:
        if m.client_streaming:
            channel.stream_unary(
                method, request_serializer=lambda x: x.SerializeToString(), response_deserializer=resp_cls.FromString
            )(request(), metadata=metadata, timeout=30)
        elif m.server_streaming:
            list(
                channel.unary_stream(
                    method,
                    request_serializer=lambda x: x.SerializeToString(),
                    response_deserializer=resp_cls.FromString,
                )(request, metadata=metadata, timeout=30)
            )
        else:
            channel.unary_unary(
                method, request_serializer=lambda x: x.SerializeToString(), response_deserializer=resp_cls.FromString
            )(request, metadata=metadata, timeout=30)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, f"{short} served"


def lacking(scope: str) -> str:
    """A token of the tokens file without `scope` (nor admin)."""
    entries = parse_tokens(Path(tokens_file()).read_text(), "tokens")
    for name, e in entries.items():
        if scope not in e.scopes and S.ADMIN not in e.scopes:
            return name
    raise AssertionError(f"every token has {scope}")


def test_every_rpc_refuses_missing_malformed_unknown_and_unscoped_credentials(stack, tiny_models):
    root, roles = stack
    before = snapshot(root, roles)
    requests = harmful_requests(root, tiny_models)
    checked = 0
    for role, services in SERVICES.items():
        with grpc.insecure_channel(roles[role].address) as ch:
            for method in [m for m in all_methods() if m.split("/")[1] in services]:
                short = method.rsplit("/", 1)[-1]
                request = requests[short]
                bad = {
                    "no token": (),
                    "malformed": (("authorization", f"Basic {token_of()}"),),
                    "empty bearer": (("authorization", "Bearer "),),
                    "unknown token": (("authorization", "Bearer not-a-token-of-this-stack-0123456789"),),
                }
                for case, md in bad.items():
                    code, details = call(ch, method, request, md)
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (role, method, case, code, details)
                scope = S.METHOD_SCOPES[method]
                if scope != S.ANY:
                    name = lacking(scope)
                    code, details = call(ch, method, request, (("authorization", f"Bearer {token_of(name)}"),))
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (role, method, name, code, details)
                    assert f"'{scope}' scope" in details and repr(name) in details, details
                checked += 1
            # Reflection needs a credential too (any scope): it is how grpcurl finds every other method.
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                list(
                    stub.ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
                    )
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert checked == sum(len([m for m in all_methods() if m.split("/")[1] in s]) for s in SERVICES.values())
    after = snapshot(root, roles)
    assert after == before
    # The refusals are counted by reason on every role.
    for role in SERVICES:
        text = roles[role].metrics()
        assert f'alignd_{role}_auth_rejected_total{{reason="missing"}}' in text
        for reason in ("missing", "malformed", "unknown"):
            value = [
                line
                for line in text.splitlines()
                if line.startswith(f'alignd_{role}_auth_rejected_total{{reason="{reason}"}}')
            ]
            assert value and float(value[0].split()[-1]) >= 1, (role, reason)
        log = roles[role].log()
        assert token_of() not in log and token_of("coordinator") not in log  # no credential in the logs


def test_refusal_comes_before_the_body_is_read(stack):
    """A stranger's oversized message is refused UNAUTHENTICATED, not for its size: the body was never parsed."""
    _, roles = stack
    big = reward_pb2.ScoreRequest(
        items=[reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt="x" * (20 << 20), response="y"))]
    )
    with grpc.insecure_channel(roles["reward"].address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            reward_pb2_grpc.RewardServiceStub(ch).Score(big, timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # With a token: the size limit of Score (16 MiB) answers, before any parsing.
    with secure_channel(roles["reward"].address, "scorer", max_message_bytes=64 << 20) as ch:
        with pytest.raises(grpc.RpcError) as err:
            reward_pb2_grpc.RewardServiceStub(ch).Score(big, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of Score" in err.value.details()


def test_get_info_shows_paths_to_admins_only(stack):
    _, roles = stack
    for role in ("policy", "reward", "reference", "learner"):
        with secure_channel(roles[role].address, "scorer") as ch:
            scorer = model_pb2_grpc.ModelServiceStub(ch).GetInfo(model_pb2.GetInfoRequest(), timeout=30).info
        admin = (
            model_pb2_grpc.ModelServiceStub(roles[role].channel).GetInfo(model_pb2.GetInfoRequest(), timeout=30).info
        )
        assert admin.model_path and Path(admin.model_path).is_dir()
        assert scorer.model_path == "" and scorer.model_name == admin.model_name


def test_docs_scope_table_is_the_code():
    """docs/security.md lists every method with the scope alignd.runtime.scopes enforces."""
    doc = (ROOT / "docs" / "security.md").read_text()
    for method in all_methods():
        scope = S.METHOD_SCOPES[method]
        shown = "any valid token" if scope == S.ANY else f"`{scope}`"
        row = [line for line in doc.splitlines() if line.startswith(f"| `{method}` |")]
        assert len(row) == 1 and row[0].split("|")[2].strip().startswith(shown), (method, row)
