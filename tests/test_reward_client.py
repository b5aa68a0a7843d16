"""The reward client SDK (alignd.reward_client) and `alignd reward score`, over real gRPC: real reward roles for the
scores and the token, an in-test gRPC server for retries, deadlines and concurrency."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import structlog
import yaml

from alignd.local_stack import child_env
from alignd.reward_client import (
    AsyncRewardClient,
    RewardClient,
    RewardClientError,
    ScoreManyResult,
    ScoreResult,
    _RetryPolicy,
)
from alignd.v1 import model_pb2, model_pb2_grpc, reward_pb2, reward_pb2_grpc

from conftest import secure_channel, start_role, stop_role, token_of

ALICE = "alice-token-0123456789"
SCORER = token_of("scorer")  # the score scope only, as an external scoring client has

PAIRS = [
    ("What is the capital of France?", " Paris is the capital of France."),
    ("Write a short story", " The robot learns to paint."),
    ("Hi", " Thank you!"),
    ("", " A response without a prompt."),
    ("Name a colour", " Blue."),
    ("Count to three", " one two three"),
    ("Is water wet?", " Yes, mostly."),
    ("Say something kind", " You are doing great."),
    ("2+2=", " 4"),
    ("Translate 'chat'", " cat"),
]
TOKEN_PAIRS = [([5, 6, 7], [8, 9]), ([], [10]), ([11], [12, 13, 14])]


def raw_score(channel, items, metadata=()):
    return reward_pb2_grpc.RewardServiceStub(channel).Score(
        reward_pb2.ScoreRequest(items=items), metadata=metadata, timeout=60
    )


def text_items(pairs):
    return [reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt=p, response=r)) for p, r in pairs]


def token_items(pairs):
    return [
        reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=p, response_token_ids=r)) for p, r in pairs
    ]


@pytest.fixture(scope="module")
def secured(tiny_models, tmp_path_factory):
    """A reward role that wants a bearer token (server.auth.tokens_file)."""
    work = tmp_path_factory.mktemp("reward-secured")
    tokens = work / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"alice": ALICE}))
    cfg = {
        "model": {"path": str(tiny_models["reward"])},
        "torch_threads": 1,
        "server": {"auth": {"tokens_file": str(tokens)}},
    }
    server = start_role("reward", cfg, work)
    yield server
    assert stop_role(server) == 0, server.log()[-3000:]


# -- an in-test reward server whose answers the test controls ----------------------------------------------------


class FakeReward(reward_pb2_grpc.RewardServiceServicer):
    """Fails the first `fail_first` calls with `code`, optionally blocks on `block` or meets the others at `barrier`,
    then answers: score = float(prompt) per text item, weight_version = the call's number (1-based)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self, *, fail_first: int = 0, code=grpc.StatusCode.UNAVAILABLE, block=None, barrier=None) -> None:
        self.fail_first, self.code, self.block, self.barrier = fail_first, code, block, barrier
        self.calls: list[tuple[float, dict]] = []  # (monotonic time, metadata)
        self.in_flight = 0
        self.max_in_flight = 0

    def Score(self, request, context):
        with self.lock:
            n = len(self.calls)
            self.calls.append((time.monotonic(), dict(context.invocation_metadata())))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.block is not None:
                self.block.wait(timeout=60)
            if self.barrier is not None:
                self.barrier.wait(timeout=30)
            if n < self.fail_first:
                context.abort(self.code, f"attempt {n + 1} refused")
            return reward_pb2.ScoreResponse(scores=[float(i.text.prompt) for i in request.items], weight_version=n + 1)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture(scope="module")
def fake_server():
    servicer = FakeReward()
    server = grpc.server(ThreadPoolExecutor(max_workers=16))
    reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


@pytest.fixture
def fake(fake_server):
    address, servicer = fake_server
    servicer.reset()
    return address, servicer


def numbered(n: int) -> list[tuple[str, str]]:
    return [(str(i), " r") for i in range(n)]


# -- scores -------------------------------------------------------------------------------------------------------


def test_sync_and_async_scores_equal_a_raw_stub_call(reward_server):
    raw_text = raw_score(reward_server.channel, text_items(PAIRS))
    raw_tokens = raw_score(reward_server.channel, token_items(TOKEN_PAIRS))
    with secure_channel(reward_server.address, "scorer") as as_scorer:  # a scorer sees no paths (docs/security.md)
        raw_info = model_pb2_grpc.ModelServiceStub(as_scorer).GetInfo(model_pb2.GetInfoRequest(), timeout=30)
    assert raw_info.info.model_path == ""

    with RewardClient(reward_server.address, token=SCORER) as client:
        client.wait_ready(timeout=30)
        text = client.score(PAIRS)
        as_dicts = client.score([{"prompt": p, "response": r, "id": i} for i, (p, r) in enumerate(PAIRS)])
        tokens = client.score_tokens(TOKEN_PAIRS)
        tokens_dicts = client.score_tokens([{"prompt_token_ids": p, "response_token_ids": r} for p, r in TOKEN_PAIRS])
        info = client.info()
    assert isinstance(text, ScoreResult)
    assert text == ScoreResult(list(raw_text.scores), raw_text.weight_version) == as_dicts
    assert tokens == ScoreResult(list(raw_tokens.scores), raw_tokens.weight_version) == tokens_dicts
    assert len(set(text.scores)) == len(PAIRS)  # real, distinct scores
    assert info == raw_info and info.info.role == "reward"

    async def run():
        async with AsyncRewardClient(reward_server.address, token=SCORER) as client:
            return await client.score(PAIRS), await client.score_tokens(TOKEN_PAIRS), await client.info()

    a_text, a_tokens, a_info = asyncio.run(run())
    assert a_text == text and a_tokens == tokens and a_info == raw_info


def test_score_many_keeps_order_and_equals_one_call(reward_server):
    with RewardClient(reward_server.address, token=SCORER) as client:
        whole = client.score(PAIRS)
        many = client.score_many(PAIRS, batch_size=3, max_in_flight=2)
        sequential = client.score_many(PAIRS, batch_size=4, max_in_flight=1)
        one_request = client.score_many(PAIRS)  # batch_size 64: one request, the same batch as `whole`
        assert client.score_many([], batch_size=3) == ScoreManyResult([], [])

    async def run():
        async with AsyncRewardClient(reward_server.address, token=SCORER) as client:
            return await client.score_many(PAIRS, batch_size=3, max_in_flight=2)

    a_many = asyncio.run(run())
    assert one_request == ScoreManyResult(whole.scores, [whole.weight_version] * len(PAIRS))
    for result in (many, sequential, a_many):
        assert isinstance(result, ScoreManyResult)
        assert result.weight_versions == [whole.weight_version] * len(PAIRS)
        assert result.weight_version == whole.weight_version
        # Other requests batch the items differently (padding), so the float32 forward may differ in the last bits.
        assert result.scores == pytest.approx(whole.scores, abs=1e-5)
    # Each item is its own score, not a neighbour's: the order is kept.
    assert [min(range(len(PAIRS)), key=lambda j: abs(whole.scores[j] - s)) for s in many.scores] == list(
        range(len(PAIRS))
    )


def test_score_many_runs_max_in_flight_requests_at_once_in_order(fake):
    address, servicer = fake
    pairs = numbered(30)
    # 8 requests (4 x 4 items, then 2); the barrier only opens for 4 calls at once: fewer in flight would time out.
    servicer.reset(barrier=threading.Barrier(4))
    with RewardClient(address) as client:
        result = client.score_many(pairs, batch_size=4, max_in_flight=4, timeout=20)
    assert servicer.max_in_flight == 4 and len(servicer.calls) == 8
    assert result.scores == [float(i) for i in range(30)]
    assert sorted(set(result.weight_versions)) == list(range(1, 9))  # a version per request, 4 items each
    assert all(result.weight_versions[i] == result.weight_versions[i - i % 4] for i in range(30))
    assert result.weight_version is None  # not one version

    servicer.reset(barrier=threading.Barrier(3))

    async def run():
        async with AsyncRewardClient(address) as client:
            return await client.score_many(pairs[:18], batch_size=3, max_in_flight=3, timeout=20)

    a_result = asyncio.run(run())
    assert servicer.max_in_flight == 3 and len(servicer.calls) == 6
    assert a_result.scores == [float(i) for i in range(18)]


def test_score_many_stops_at_the_first_failure(fake):
    address, servicer = fake
    servicer.reset(fail_first=1, code=grpc.StatusCode.INVALID_ARGUMENT)
    with RewardClient(address) as client, pytest.raises(RewardClientError) as err:
        client.score_many(numbered(12), batch_size=2, max_in_flight=1)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and len(servicer.calls) == 1


# -- the token ----------------------------------------------------------------------------------------------------


def test_the_token_is_sent_and_required(secured, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"  {ALICE}\n")
    expected = raw_score(secured.channel, text_items(PAIRS[:3]), (("authorization", f"Bearer {ALICE}"),))
    with RewardClient(secured.address, token=ALICE) as client:
        assert client.score(PAIRS[:3]).scores == list(expected.scores)
        assert client.info().info.role == "reward"
    with RewardClient(secured.address, token_file=token_file) as client:
        assert client.score(PAIRS[:3]).scores == list(expected.scores)
    for kwargs, needle in (
        ({}, "missing credentials"),
        ({"token": "not-a-token-of-this-server"}, "unknown or revoked"),
    ):
        with RewardClient(secured.address, **kwargs) as client, pytest.raises(RewardClientError) as err:
            client.score(PAIRS[:3])
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and needle in err.value.details
        assert err.value.attempts == 1

    async def run():
        async with AsyncRewardClient(secured.address, token_file=token_file) as client:
            ok = await client.score(PAIRS[:3])
        async with AsyncRewardClient(secured.address) as client:
            try:
                await client.score(PAIRS[:3])
            except RewardClientError as exc:
                return ok, exc
        raise AssertionError("no error without a token")

    ok, exc = asyncio.run(run())
    assert ok.scores == list(expected.scores) and exc.code == grpc.StatusCode.UNAUTHENTICATED


def test_the_token_travels_as_bearer_metadata(fake):
    address, servicer = fake
    with RewardClient(address, token=ALICE) as client:
        client.score(numbered(1))
    with RewardClient(address) as client:
        client.score(numbered(1))
    assert servicer.calls[0][1]["authorization"] == f"Bearer {ALICE}"
    assert "authorization" not in servicer.calls[1][1]


def test_a_token_in_clear_text_to_another_host_is_warned_about_once():
    with structlog.testing.capture_logs() as logs:
        client = RewardClient("reward.example.com:50051", token=ALICE)
        client.close()
        for address in ("127.0.0.1:1", "localhost:1", "[::1]:1", "unix:/tmp/reward.sock"):
            RewardClient(address, token=ALICE).close()
        RewardClient("reward.example.com:50051", token=ALICE, tls=True).close()  # TLS: no warning
        RewardClient("reward.example.com:50051").close()  # no token: nothing to leak
    warned = [e for e in logs if e["event"] == "reward_client_token_without_tls"]
    assert len(warned) == 1 and warned[0]["log_level"] == "warning"
    assert warned[0]["address"] == "reward.example.com:50051" and ALICE not in json.dumps(logs)


# -- retries and deadlines ----------------------------------------------------------------------------------------


@pytest.mark.serial  # wall-clock bounds of a fraction of a second
def test_unavailable_is_retried_with_bounded_backoff(fake):
    address, servicer = fake
    servicer.reset(fail_first=2)
    start = time.monotonic()
    with RewardClient(address, retries=4, initial_backoff=0.05, max_backoff=0.08, timeout=10) as client:
        result = client.score(numbered(3))
    assert result == ScoreResult([0.0, 1.0, 2.0], 3)  # the third call answered
    times = [t for t, _ in servicer.calls]
    assert len(times) == 3
    # Full jitter: the pause before retry k is at most min(max_backoff, initial * 2**(k-1)) (+ scheduling slack).
    assert times[1] - times[0] < 0.05 + 0.3 and times[2] - times[1] < 0.08 + 0.3
    assert time.monotonic() - start < 10


def test_retries_stop_after_the_attempt_limit(fake):
    address, servicer = fake
    servicer.reset(fail_first=1000)
    with RewardClient(address, retries=3, initial_backoff=0.001, max_backoff=0.002) as client:
        with pytest.raises(RewardClientError) as err:
            client.score(numbered(1))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "refused" in err.value.details
    assert err.value.attempts == 3 and len(servicer.calls) == 3
    assert str(err.value).startswith("UNAVAILABLE: ")


@pytest.mark.serial  # wall-clock bounds of a fraction of a second
def test_backoff_never_passes_the_deadline(fake):
    address, servicer = fake
    servicer.reset(fail_first=1000)
    timeout = 0.8
    start = time.monotonic()
    with RewardClient(address, retries=1000, initial_backoff=0.05, max_backoff=0.2, timeout=timeout) as client:
        with pytest.raises(RewardClientError) as err:
            client.score(numbered(1))
    elapsed = time.monotonic() - start
    times = [t for t, _ in servicer.calls]
    assert err.value.code == grpc.StatusCode.UNAVAILABLE  # the last real error, not a made-up one
    assert 2 <= len(times) == err.value.attempts < 1000
    assert times[-1] - start < timeout  # every attempt started within the deadline
    assert elapsed < timeout + 0.3  # it gave up instead of sleeping past the deadline


def test_async_client_retries_too(fake):
    address, servicer = fake
    servicer.reset(fail_first=2)

    async def run():
        async with AsyncRewardClient(address, retries=3, initial_backoff=0.01, max_backoff=0.02) as client:
            ok = await client.score(numbered(2))
        servicer.reset(fail_first=1000)
        async with AsyncRewardClient(address, retries=2, initial_backoff=0.01, max_backoff=0.02) as client:
            try:
                await client.score(numbered(2))
            except RewardClientError as exc:
                return ok, exc
        raise AssertionError("no error")

    ok, exc = asyncio.run(run())
    assert ok == ScoreResult([0.0, 1.0], 3)
    assert exc.code == grpc.StatusCode.UNAVAILABLE and exc.attempts == 2 and len(servicer.calls) == 2


def test_other_codes_are_not_retried(fake, reward_server):
    address, servicer = fake
    servicer.reset(fail_first=1000, code=grpc.StatusCode.INVALID_ARGUMENT)
    with RewardClient(address, retries=5, initial_backoff=0.001) as client, pytest.raises(RewardClientError) as err:
        client.score(numbered(1))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.attempts == 1 and len(servicer.calls) == 1
    # The real service: an empty response is INVALID_ARGUMENT, raised after one attempt.
    with (
        RewardClient(reward_server.address, token=SCORER, retries=5) as client,
        pytest.raises(RewardClientError) as err,
    ):
        client.score([("a prompt", "")])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.attempts == 1
    assert "items[0].text.response" in err.value.details and "empty response" in err.value.details
    with RewardClient(reward_server.address, token=SCORER) as client, pytest.raises(RewardClientError) as err:
        client.score([])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.serial  # wall-clock bounds of a fraction of a second
def test_the_deadline_is_respected(fake):
    address, servicer = fake
    release = threading.Event()
    servicer.reset(block=release)
    try:
        with RewardClient(address, timeout=30) as client:
            start = time.monotonic()
            with pytest.raises(RewardClientError) as err:
                client.score(numbered(1), timeout=0.5)  # the call's own deadline beats the client's
            elapsed = time.monotonic() - start
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.attempts == 1
        assert 0.5 <= elapsed < 0.5 + 0.5 and len(servicer.calls) == 1

        async def run():
            async with AsyncRewardClient(address, timeout=0.4) as client:
                try:
                    await client.score(numbered(1))
                except RewardClientError as exc:
                    return exc
            raise AssertionError("no error")

        start = time.monotonic()
        exc = asyncio.run(run())
        assert exc.code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - start < 0.4 + 0.5
    finally:
        release.set()


def test_a_server_that_is_not_there_is_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with RewardClient(f"127.0.0.1:{port}", retries=2, initial_backoff=0.01, timeout=10) as client:
        with pytest.raises(RewardClientError) as err:
            client.score(numbered(1))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.attempts == 2


def test_backoff_schedule_is_capped_full_jitter():
    policy = _RetryPolicy(attempts=10, initial_backoff=0.1, max_backoff=0.5)
    rng = random.Random(0)
    for failures, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)):
        delays = [policy.delay(failures, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays) and max(delays) > cap * 0.9


# -- arguments ----------------------------------------------------------------------------------------------------


def test_arguments_are_checked(tmp_path):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("reward.example")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))

    for cls in (RewardClient, AsyncRewardClient):
        with pytest.raises(ValueError, match="key_file"):
            cls("h:1", cert_file=cert_file)
        with pytest.raises(ValueError, match="cert_file"):
            cls("h:1", key_file=key_file)
        with pytest.raises(ValueError, match="root_certificates_file: cannot read"):
            cls("h:1", root_certificates_file=tmp_path / "missing.pem")
        with pytest.raises(ValueError, match="token, token_file"):
            cls("h:1", token=ALICE, token_file=tmp_path / "t")
        (tmp_path / "empty").write_text("\n")
        with pytest.raises(ValueError, match="token_file.*empty"):
            cls("h:1", token_file=tmp_path / "empty")
        with pytest.raises(ValueError, match="token_file: cannot read"):
            cls("h:1", token_file=tmp_path / "missing")
        with pytest.raises(ValueError, match="without spaces"):
            cls("h:1", token="two words")
        with pytest.raises(ValueError, match="server_name_override"):
            cls("h:1", server_name_override="reward.example")
        with pytest.raises(ValueError, match="retries"):
            cls("h:1", retries=0)
        with pytest.raises(ValueError, match="timeout"):
            cls("h:1", timeout=0)
        # Valid TLS and mutual-TLS settings make a client (connecting is lazy).
        cls("h:1", tls=True)
        cls(
            "h:1",
            root_certificates_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            server_name_override="reward.example",
        )

    with RewardClient("127.0.0.1:1") as client:
        with pytest.raises(TypeError, match=r"pairs\[1\]"):
            client.score([("p", "r"), "not a pair"])
        with pytest.raises(ValueError, match=r"pairs\[0\]: missing 'response'"):
            client.score([{"prompt": "p"}])
        with pytest.raises(TypeError, match="response must be a string"):
            client.score([("p", 3)])
        with pytest.raises(ValueError, match="32-bit"):
            client.score_tokens([([1], [2**40])])
        with pytest.raises(ValueError, match="batch_size"):
            client.score_many([("p", "r")], batch_size=0)
    with pytest.raises(RuntimeError, match="closed"):
        client.score([("p", "r")])


# -- the command line ---------------------------------------------------------------------------------------------


def alignd_reward(*args, token: str | None = None, stdin: str | None = None):
    env = child_env()
    env.pop("ALIGND_REWARD_TOKEN", None)
    if token is not None:
        env["ALIGND_REWARD_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "alignd.cli", "reward", "score", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        input=stdin,
    )


def test_cli_scores_a_pair_and_a_file(secured, tmp_path):
    with RewardClient(secured.address, token=ALICE) as client:
        expected = client.score(PAIRS)
        single = client.score([PAIRS[0]])
    version = expected.weight_version

    out = alignd_reward("--address", secured.address, "--prompt", PAIRS[0][0], "--response", PAIRS[0][1], token=ALICE)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == [
        {"score": single.scores[0], "weight_version": version}
    ]

    src = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"prompt": p, "response": r, **({"id": f"q{i}"} if i % 2 == 0 else {})})
        for i, (p, r) in enumerate(PAIRS)
    ]
    src.write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")  # a blank line is skipped
    token_file = tmp_path / "token"
    token_file.write_text(ALICE + "\n")
    dst = tmp_path / "out.jsonl"
    # One request of all the pairs: the same batch as `expected`, so the same floats.
    out = alignd_reward(
        "--address", secured.address, "--file", str(src), "--out", str(dst), "--token-file", str(token_file)
    )
    assert out.returncode == 0 and out.stdout == "", out.stderr
    got = [json.loads(line) for line in dst.read_text().splitlines()]
    assert got == [
        {**({"id": f"q{i}"} if i % 2 == 0 else {}), "score": s, "weight_version": version}
        for i, s in enumerate(expected.scores)
    ]

    # --stack (the stack.json of `alignd up`), stdin, small batches: the same scores within float32 noise.
    stack = tmp_path / "stack.json"
    stack.write_text(json.dumps({"services": {"reward": {"address": secured.address, "metrics_url": "", "pid": 0}}}))
    out = alignd_reward("--stack", str(stack), "--file", "-", "--batch-size", "3", token=ALICE, stdin=src.read_text())
    assert out.returncode == 0, out.stderr
    got = [json.loads(line) for line in out.stdout.splitlines()]
    assert [g["score"] for g in got] == pytest.approx(expected.scores, abs=1e-5)
    assert [g.get("id") for g in got] == [f"q{i}" if i % 2 == 0 else None for i in range(len(PAIRS))]


def test_cli_errors(secured, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "a", "response": " b"}\n{"prompt": "", "response": " c"}\n{"prompt": "a"}\n')
    dst = tmp_path / "out.jsonl"
    out = alignd_reward("--address", secured.address, "--file", str(src), "--out", str(dst), token=ALICE)
    assert out.returncode == 2 and f'{src}:3: missing "response"' in out.stderr, out.stderr
    assert not dst.exists()
    for bad, needle in (
        ("{oops", "not JSON"),
        ('{"prompt": 1, "response": "x"}', '"prompt" must be a string'),
        ('{"prompt": "p", "response": ""}', '"response" must not be empty'),
    ):
        src.write_text('{"prompt": "a", "response": " b"}\n' + bad + "\n")
        out = alignd_reward("--address", secured.address, "--file", str(src), token=ALICE)
        assert out.returncode == 2 and f"{src}:2: {needle}" in out.stderr, (bad, out.stderr)
        assert out.stdout == ""

    # The service refuses: exit 1, the status code and its details on stderr.
    out = alignd_reward("--address", secured.address, "--prompt", "p", "--response", " r")
    assert out.returncode == 1 and "UNAUTHENTICATED: missing credentials" in out.stderr, out.stderr
    assert out.stdout == ""
    # Usage errors: exit 2.
    out = alignd_reward("--address", secured.address, "--prompt", "p", token=ALICE)
    assert out.returncode == 2 and "--response" in out.stderr
    out = alignd_reward("--address", secured.address, "--response", "r", "--cert-file", str(src), token=ALICE)
    assert out.returncode == 2 and "key_file" in out.stderr
    out = alignd_reward("--stack", str(tmp_path / "nope.json"), "--response", "r")
    assert out.returncode == 2 and "nope.json" in out.stderr


# -- TLS and mutual TLS (server.tls) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server certificate for reward.test (not for 127.0.0.1) and a client certificate; another CA."""
    import trustme

    root = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    files = {}

    def save(name, blob):
        files[name] = root / f"{name}.pem"
        blob.write_to_path(str(files[name]))

    server, client, stranger = (
        ca.issue_cert("reward.test"),
        ca.issue_cert("client.alignd.test"),
        other.issue_cert("client.alignd.test"),
    )
    save("ca", ca.cert_pem)
    save("other_ca", other.cert_pem)
    save("server_key", server.private_key_pem)
    save("client_key", client.private_key_pem)
    save("stranger_key", stranger.private_key_pem)
    for name, cert in (("server_cert", server), ("client_cert", client), ("stranger_cert", stranger)):
        files[name] = root / f"{name}.pem"
        files[name].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return files


@pytest.fixture(scope="module")
def mtls(tiny_models, tmp_path_factory, pki):
    """A reward role with mutual TLS and a bearer token (its certificate names reward.test)."""
    work = tmp_path_factory.mktemp("reward-mtls")
    tokens = work / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"alice": ALICE}))
    cfg = {
        "model": {"path": str(tiny_models["reward"])},
        "torch_threads": 1,
        "server": {
            "auth": {"tokens_file": str(tokens)},
            "tls": {
                "cert_file": str(pki["server_cert"]),
                "key_file": str(pki["server_key"]),
                "client_ca_file": str(pki["ca"]),
            },
        },
    }
    creds = grpc.ssl_channel_credentials(
        pki["ca"].read_bytes(), pki["client_key"].read_bytes(), pki["client_cert"].read_bytes()
    )
    server = start_role(
        "reward", cfg, work, credentials=creds, options=[("grpc.ssl_target_name_override", "reward.test")]
    )
    kwargs = dict(
        root_certificates_file=pki["ca"],
        cert_file=pki["client_cert"],
        key_file=pki["client_key"],
        server_name_override="reward.test",
        token=ALICE,
    )
    yield server, kwargs
    assert stop_role(server) == 0, server.log()[-3000:]


def test_mutual_tls(mtls, pki, reward_server):
    server, kwargs = mtls
    with RewardClient(reward_server.address, token=SCORER) as plain:
        expected = plain.score(PAIRS)  # the same model, served in plaintext
    with RewardClient(server.address, **kwargs) as client:
        assert client.score(PAIRS) == expected
        assert client.info().info.role == "reward"

    async def run():
        async with AsyncRewardClient(server.address, **kwargs) as client:
            return await client.score(PAIRS)

    assert asyncio.run(run()) == expected

    refused = {
        "no client certificate": dict(kwargs, cert_file=None, key_file=None),
        "a client certificate of another CA": dict(
            kwargs, cert_file=pki["stranger_cert"], key_file=pki["stranger_key"]
        ),
        "a server certificate of an unknown CA": dict(kwargs, root_certificates_file=pki["other_ca"]),
        "a certificate for another name": dict(kwargs, server_name_override="not-reward.test"),
    }
    for case, args in refused.items():
        with (
            RewardClient(server.address, **dict(args, retries=1, timeout=10)) as client,
            pytest.raises(RewardClientError) as err,
        ):
            client.score(PAIRS[:1])
        assert err.value.code == grpc.StatusCode.UNAVAILABLE, (case, err.value)
    with (
        RewardClient(server.address, **dict(kwargs, token=None, retries=1)) as client,
        pytest.raises(RewardClientError) as err,
    ):
        client.score(PAIRS[:1])  # TLS does not replace the token
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with RewardClient(server.address, retries=1, timeout=10) as client, pytest.raises(RewardClientError) as err:
        client.score(PAIRS[:1])  # plaintext to a TLS port
    assert err.value.code == grpc.StatusCode.UNAVAILABLE

    out = alignd_reward(
        "--address",
        server.address,
        "--ca-file",
        str(pki["ca"]),
        "--cert-file",
        str(pki["client_cert"]),
        "--key-file",
        str(pki["client_key"]),
        "--server-name",
        "reward.test",
        "--prompt",
        PAIRS[2][0],
        "--response",
        PAIRS[2][1],
        token=ALICE,
    )
    assert out.returncode == 0, out.stderr
    with RewardClient(server.address, **kwargs) as client:
        single = client.score([PAIRS[2]])
    assert json.loads(out.stdout) == {"score": single.scores[0], "weight_version": single.weight_version}
