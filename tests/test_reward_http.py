"""The reward role's HTTP API (OpenRLHF's POST /get_reward), limits, the context policy and per-client metrics,
on a real reward role over real HTTP and gRPC."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse

import pytest
import yaml

from alignd.atomic import write_bytes_atomic
from alignd.v1 import reward_pb2, reward_pb2_grpc

from conftest import start_role, stop_role

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"


def post(url: str, body, *, token: str | None = None, headers: dict | None = None, raw: bool = False):
    """(status, parsed JSON or text, headers) of one POST /get_reward on a fresh connection."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    data = body if raw else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    conn.request("POST", "/get_reward", body=data, headers=h)
    resp = conn.getresponse()
    text = resp.read()
    conn.close()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return resp.status, parsed, resp.headers  # case-insensitive (h11 sends lower-case names)


def grpc_scores(channel, pairs, token: str | None = None):
    stub = reward_pb2_grpc.RewardServiceStub(channel)
    items = [reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt=p, response=r)) for p, r in pairs]
    md = (("authorization", f"Bearer {token}"),) if token else ()
    return stub.Score(reward_pb2.ScoreRequest(items=items), timeout=60, metadata=md)


@pytest.fixture(scope="module")
def rm(tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("reward_http")
    tokens = work / "tokens.yaml"
    write_bytes_atomic(tokens, yaml.safe_dump({"alice": ALICE, "bob": BOB}).encode())
    cfg = {
        "model": {"path": str(tiny_models["reward"])},
        "torch_threads": 1,
        "server": {"auth": {"tokens_file": str(tokens)}},
        "limits": {"max_items": 8, "max_text_bytes": 2000},
    }
    server = start_role("reward", cfg, work)
    info = json.loads((work / "reward.endpoint.json").read_text())
    yield server, info["http_url"]
    assert stop_role(server) == 0


TOKENIZER_OF = "reward"  # the conftest `tok` fixture loads the reward model's tokenizer


PAIRS = [("The cat sat", " on the mat."), ("", "hello world"), ("Q: 2+2?\nA:", " 4"), ("héllo ✓ ", "naïve café ☕")]


def test_get_reward_matches_grpc_score(rm, tok):
    server, url = rm
    expected = grpc_scores(server.channel, PAIRS, ALICE)
    status, out, _ = post(
        url,
        {"query": [p + r for p, r in PAIRS], "prompts": [p for p, _ in PAIRS], "labels": [None] * len(PAIRS)},
        token=ALICE,
    )
    assert status == 200, out
    assert out["rewards"] == pytest.approx(list(expected.scores), abs=1e-5)
    assert out["scores"] == out["rewards"]
    assert out["extra_logs"]["weight_version"] == [expected.weight_version] * len(PAIRS)
    # OpenRLHF decodes left-padded batches with the pad tokens: they are removed before the split.
    pad = tok.pad_token
    padded = [pad * 3 + p + r + pad for p, r in PAIRS]
    status, out2, _ = post(url, {"query": padded, "prompts": [pad * 3 + p for p, _ in PAIRS]}, token=ALICE)
    assert status == 200 and out2["rewards"] == pytest.approx(out["rewards"], abs=1e-5)
    # Without prompts (older clients): the whole query is the response, with an empty prompt.
    whole = grpc_scores(server.channel, [("", p + r) for p, r in PAIRS], ALICE)
    status, out3, _ = post(url, {"query": [p + r for p, r in PAIRS]}, token=BOB)
    assert status == 200 and out3["rewards"] == pytest.approx(list(whole.scores), abs=1e-5)


@pytest.mark.parametrize(
    "body, field",
    [
        (b"{not json", "body"),
        (b"[1, 2]", "body"),
        (b'{"prompts": []}', "query"),
        (b'{"query": "a string"}', "query"),
        (b'{"query": ["ok", 3]}', "query[1]"),
        (b'{"query": []}', "query"),
        (b'{"query": ["ab", "cd"], "prompts": ["a"]}', "prompts"),
        (b'{"query": ["ab"], "prompts": [7]}', "prompts[0]"),
        (b'{"query": ["ab", "xyz"], "prompts": ["a", "b"]}', "prompts[1]"),
        (b'{"query": ["ab"], "prompts": ["ab"]}', "query[0]"),
        (b'{"query": ["ab"], "labels": "x"}', "labels"),
        (b'{"query": ["a", "b", "c", "d", "e", "f", "g", "h", "i"]}', "query"),
        (json.dumps({"query": ["x" * 2001]}).encode(), "query[0]"),
        (b'{"query": ["\\ud800 lone surrogate"]}', "query[0]"),
        (b"\xff\xfe", "body"),
    ],
)
def test_malformed_requests_are_400_naming_the_field(rm, body, field):
    _server, url = rm
    status, out, _ = post(url, body, token=ALICE, raw=True)
    assert status == 400, out
    assert out["code"] == "INVALID_ARGUMENT"
    assert out["error"].startswith(field + ":") or out["error"].startswith(field + " "), out


def test_http_errors_and_health(rm):
    server, url = rm
    u = urllib.parse.urlparse(url)
    status, out, headers = post(url, {"query": ["a"]})
    assert status == 401 and out["code"] == "UNAUTHENTICATED" and headers.get("WWW-Authenticate") == "Bearer"
    assert post(url, {"query": ["a"]}, token="wrong-token-0123456789")[0] == 401
    assert post(url, b"{}", token=ALICE, raw=True, headers={"Content-Type": "text/plain"})[0] == 415
    assert post(url, {"query": ["a"]}, token=ALICE, headers={"X-Request-Timeout": "soon"})[0] == 400

    def raw_request(method: str, path: str, headers: dict, body: bytes = b"") -> int:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(body or None)
        status = conn.getresponse().status
        conn.close()
        return status

    auth = {"Authorization": f"Bearer {ALICE}"}
    assert raw_request("POST", "/get_reward", auth) == 411  # no Content-Length
    assert raw_request("POST", "/get_reward", {**auth, "Content-Length": str(10**9)}) == 413
    assert raw_request("POST", "/elsewhere", {**auth, "Content-Length": "0"}) == 404
    assert raw_request("GET", "/get_reward", auth) == 405
    assert raw_request("GET", "/health", {}) == 200  # no token needed: probes
    assert server.proc.poll() is None


def test_keep_alive_connection_serves_several_requests(rm):
    _server, url = rm
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    for i in range(3):
        conn.request(
            "POST",
            "/get_reward",
            body=json.dumps({"query": [f"hi {i}"]}),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {ALICE}"},
        )
        resp = conn.getresponse()
        assert resp.status == 200 and len(json.loads(resp.read())["rewards"]) == 1
    # A refused request on the same connection (400) leaves it usable too.
    conn.request("POST", "/get_reward", body=b'{"query": 1}', headers={"Authorization": f"Bearer {ALICE}"})
    resp = conn.getresponse()
    assert resp.status == 400 and resp.read()
    conn.request("POST", "/get_reward", body=b'{"query": ["again"]}', headers={"Authorization": f"Bearer {ALICE}"})
    assert conn.getresponse().status == 200
    conn.close()


def test_grpc_limits(rm):
    import grpc

    server, _url = rm
    stub = reward_pb2_grpc.RewardServiceStub(server.channel)
    md = (("authorization", f"Bearer {ALICE}"),)
    nine = [reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt="p", response="r"))] * 9
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(reward_pb2.ScoreRequest(items=nine), timeout=30, metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limits.max_items" in err.value.details()
    big = reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt="p" * 2001, response="r"))
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(reward_pb2.ScoreRequest(items=[big]), timeout=30, metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(
        "items[0].text.prompt:"
    )


def _samples(metrics_url: str) -> dict:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_per_api_and_client(rm):
    server, url = rm
    before = _samples(server.metrics_url)
    grpc_scores(server.channel, [("a", "b")], BOB)
    assert post(url, {"query": ["ab", "cd"]}, token=BOB)[0] == 200
    assert post(url, {"query": ["ab"]})[0] == 401
    assert post(url, b"nope", token=BOB, raw=True)[0] == 400
    after = _samples(server.metrics_url)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("alignd_reward_requests_total", api="grpc", client="bob", code="OK") == 1
    assert delta("alignd_reward_requests_total", api="http", client="bob", code="OK") == 1
    assert delta("alignd_reward_items_total", api="http", client="bob") == 2
    assert delta("alignd_reward_request_seconds_count", api="http", client="bob") == 2  # the OK and the 400
    assert delta("alignd_reward_rejected_total", api="http", reason="unauthenticated") == 1
    assert delta("alignd_reward_rejected_total", api="http", reason="invalid_argument") == 1
    assert delta("alignd_reward_auth_rejected_total", reason="missing") == 1
    text = " ".join(f"{k}" for k in after)
    assert ALICE not in text and BOB not in text  # names, never tokens


@pytest.fixture(scope="module")
def truncating(tiny_models, tmp_path_factory):
    cfg = {
        "model": {"path": str(tiny_models["reward"]), "max_context_tokens": 16},
        "torch_threads": 1,
        "limits": {"too_long": "truncate_left"},
        "http": {"port": -1},
    }
    work = tmp_path_factory.mktemp("reward_trunc")
    server = start_role("reward", cfg, work)
    yield server, work
    assert stop_role(server) == 0


def test_truncate_left_keeps_the_last_context_tokens(truncating):
    server, work = truncating
    assert "http_url" not in json.loads((work / "reward.endpoint.json").read_text())  # http.port: -1
    stub = reward_pb2_grpc.RewardServiceStub(server.channel)

    def score(p, r):
        item = reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=p, response_token_ids=r))
        return stub.Score(reward_pb2.ScoreRequest(items=[item]), timeout=30).scores[0]

    prompt, response = list(range(10, 30)), list(range(40, 46))  # 26 tokens > 16
    assert score(prompt, response) == pytest.approx(score(prompt[10:], response), abs=1e-6)
    long_response = list(range(40, 60))  # the response alone exceeds the context: its last 16 tokens
    assert score(prompt, long_response) == pytest.approx(score([], long_response[4:]), abs=1e-6)
    assert score(prompt, response) != pytest.approx(score(prompt[11:], response), abs=1e-6)  # one token less differs


def _raw(url: str, data: bytes) -> tuple[bytes, bool]:
    """Sends raw bytes on one connection; (everything the server sent until it closed or went quiet, closed?)."""
    u = urllib.parse.urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as sock:
        sock.sendall(data)
        out, closed = b"", False
        sock.settimeout(2.0)  # a bound on waiting for the server to send more, not a synchronisation
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                out += chunk
        except TimeoutError:
            pass
    return out, closed


def _statuses(raw: bytes) -> list[int]:
    import re

    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def test_framing_cannot_desync_a_keep_alive_connection(rm):
    _server, url = rm
    auth = f"Authorization: Bearer {ALICE}\r\n".encode()
    body = b'{"query": ["hi"]}'
    post = (
        b"POST /get_reward HTTP/1.1\r\nHost: x\r\n"
        + auth
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    # A body on GET /health is read and dropped: the next request on the connection is parsed as a request.
    smuggled = b"POST /get_reward HTTP/1.1\r\nContent-Length: 5\r\n\r\nxxxxx"
    get = b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled
    out, _ = _raw(url, get + post)
    assert _statuses(out) == [200, 200], out[:500]
    # A chunked body is framed by its chunks: "hello" is answered (not JSON: 400) and the next request on the
    # connection is parsed as a request.
    req = (
        b"POST /get_reward HTTP/1.1\r\nHost: x\r\n"
        + auth
        + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    out, closed = _raw(url, req + post)
    assert _statuses(out) == [400, 200] and not closed, out[:500]
    # Repeated or non-numeric Content-Length: refused, and the connection closes (nothing left on the stream is
    # read as the next request).
    for head in (
        b"Content-Length: 5\r\nContent-Length: 7\r\n",
        "Content-Length: \u00b2\r\n".encode("latin-1"),
        b"Content-Length: -1\r\n",
    ):
        req = b"POST /get_reward HTTP/1.1\r\nHost: x\r\n" + auth + head + b"\r\n5\r\nhello\r\n0\r\n\r\n"
        out, closed = _raw(url, req + post)
        assert _statuses(out) == [400] and closed, (head, out[:300])
        assert b"connection: close" in out.lower()


def test_huge_or_pad_heavy_inputs_are_refused_cheaply(rm, tok):
    _server, url = rm
    status, out, _ = post(url, b'{"query": [' + b"9" * 5000 + b"]}", token=ALICE, raw=True)
    assert status == 400 and out["error"].startswith("body:")  # an integer beyond Python's digit limit
    # The size limit applies to the query as sent, before the pads are stripped or anything is tokenized.
    status, out, _ = post(url, {"query": [tok.pad_token * 100_000 + "hi"]}, token=ALICE)
    assert status == 400 and out["error"].startswith("query[0]:") and "limits.max_text_bytes" in out["error"]
