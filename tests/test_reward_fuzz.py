"""Fuzzing (hypothesis) of the reward role's two APIs on a real role: gRPC `Score` and HTTP `POST /get_reward`
with random sizes, unicode, empty and huge strings, wrong types and raw bytes. Every request must be scored or
refused with INVALID_ARGUMENT / RESOURCE_EXHAUSTED (HTTP 400 / 413 / 429): never INTERNAL or HTTP 500, never a
crash (the role still serves afterwards, same pid)."""

from __future__ import annotations

import http.client
import json
import math
import urllib.parse

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from alignd.v1 import reward_pb2, reward_pb2_grpc

from conftest import start_role, stop_role, token_of

VOCAB = 529  # the tiny test tokenizer's vocabulary (tests/conftest.py models)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
HUGE = 300_000  # bytes: over limits.max_text_bytes (262144)

texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=400),  # any non-surrogate code point
    st.sampled_from(["", " ", "\x00", "\n" * 50, "é" * 10, "🙂" * 30, "a" * 3000, "x" * HUGE, "\u202e\u200b\ufeff"]),
)
ids = st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1) | st.integers(0, VOCAB - 1), max_size=30) | st.just(
    [5] * 700  # beyond the 512-token context
)
items = st.one_of(
    st.builds(lambda p, r: reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt=p, response=r)), texts, texts),
    st.builds(
        lambda p, r: reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=p, response_token_ids=r)),
        ids,
        ids,
    ),
    st.just(reward_pb2.ScoreItem()),
)

# Items that are valid but random (sizes, unicode, tokens): these must be scored.
good_items = st.one_of(
    st.builds(
        lambda p, r: reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt=p, response=r)),
        st.text(max_size=200),
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Z", "C"]), min_size=1, max_size=200),
    ),
    st.builds(
        lambda p, r: reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=p, response_token_ids=r)),
        st.lists(st.integers(0, VOCAB - 1), max_size=200),
        st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=200),
    ),
)


@pytest.fixture(scope="module")
def role(tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    cfg = {
        "model": {"path": str(tiny_models["reward"])},
        "torch_threads": 1,
        "limits": {"max_items": 16},
        "batching": {"max_queue": 4},
    }
    server = start_role("reward", cfg, work)
    info = json.loads((work / "reward.endpoint.json").read_text())
    yield server, info["http_url"]
    assert stop_role(server) == 0


@FUZZ
@given(batch=st.lists(items, max_size=20) | st.lists(good_items, min_size=1, max_size=16))
def test_fuzz_grpc_score(role, batch):
    server, _ = role
    stub = reward_pb2_grpc.RewardServiceStub(server.channel)
    try:
        resp = stub.Score(reward_pb2.ScoreRequest(items=batch), timeout=60)
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
            err.code(),
            err.details(),
        )
        assert err.details()
        event(f"grpc {err.code().name}")
        return
    event("grpc OK")
    assert len(resp.scores) == len(batch) and all(math.isfinite(s) for s in resp.scores)


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts)
json_any = st.recursive(
    json_leaf,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
queries = st.lists(texts, max_size=20)
bodies = st.one_of(
    st.builds(lambda q: {"query": q}, queries),
    st.builds(
        lambda q, p: {"query": q, "prompts": p, "labels": [None] * len(q)}, queries, st.lists(texts, max_size=20)
    ),
    # prompts that do begin their queries: the split succeeds, the pair goes to the model
    st.builds(
        lambda ps, rs: {"query": [p + r for p, r in zip(ps, rs)], "prompts": ps[: len(rs)]},
        st.lists(texts, min_size=1, max_size=8),
        st.lists(texts, min_size=1, max_size=8),
    ),
    st.dictionaries(st.sampled_from(["query", "prompts", "labels", "other"]), json_any, max_size=4),
    json_any,
)


def _post(url: str, data: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request(
        "POST",
        "/get_reward",
        body=data,
        headers={"Content-Type": content_type, "Authorization": f"Bearer {token_of('scorer')}"},
    )
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def _check_http(status: int, body: bytes, n: int | None) -> None:
    assert status in (200, 400, 413, 429), (status, body[:300])
    event(f"http {status}")
    out = json.loads(body)
    if status == 200:
        assert n is not None and len(out["rewards"]) == n and all(math.isfinite(x) for x in out["rewards"])
        assert out["scores"] == out["rewards"] and len(out["extra_logs"]["weight_version"]) == n
    else:
        assert out["error"] and out["code"] in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")


@FUZZ
@given(body=bodies)
def test_fuzz_http_get_reward_json(role, body):
    _, url = role
    data = json.dumps(body).encode()  # ensure_ascii: lone surrogates travel as \\ud800 escapes too
    status, out = _post(url, data)
    n = len(body["query"]) if isinstance(body, dict) and isinstance(body.get("query"), list) else None
    _check_http(status, out, n)


@FUZZ
@given(
    data=st.binary(max_size=300)
    | st.sampled_from([b"", b"{", b'{"query": ["\\ud800"]}', b'{"query": ["a"]}' * 3, b"[" * 5000 + b"]" * 5000])
)
def test_fuzz_http_get_reward_raw_bytes(role, data):
    _, url = role
    status, out = _post(url, data)
    _check_http(status, out, 1 if data == b'{"query": ["a"]}' else None)


def test_role_survived_the_fuzzing(role):
    server, url = role
    assert server.proc.poll() is None
    status, out = _post(url, b'{"query": ["still here"]}')
    assert status == 200 and len(json.loads(out)["rewards"]) == 1
    assert "rpc_failed" not in server.log() and "http_request_failed" not in server.log()
