"""The Python client SDK of the reward service (alignd.v1.RewardService).

    from alignd.reward_client import RewardClient

    with RewardClient("reward.example:50051", token_file="/run/secrets/reward-token", tls=True) as client:
        result = client.score([("What is 2+2?", " 4"), {"prompt": "Hi", "response": " Hello!"}])
        result.scores, result.weight_version

`RewardClient` is synchronous and thread-safe (one channel, any number of
threads); `AsyncRewardClient` is the same API on `grpc.aio`. Both:

* send the bearer token (`token=` or `token_file=`) as `authorization: Bearer
  <token>` metadata on every call;
* use TLS when `tls=True` or any certificate file is given (mutual TLS with
  `cert_file` + `key_file`);
* give every call a deadline (`timeout`, seconds, from the first attempt) and
  retry UNAVAILABLE only, up to `retries` attempts in all, with exponential
  backoff and full jitter, never past the deadline; the channel's own retries
  are off, so this is the only retry layer;
* raise `RewardClientError` (`.code`, a `grpc.StatusCode`; `.details`;
  `.attempts`) for every failed call, so callers need not catch grpc errors.

`score_many` splits a long list into requests of `batch_size` items, runs up
to `max_in_flight` of them at once over the one channel and returns the
scores in input order. Logging (structlog): `reward_client_token_without_tls`
(warning, once per client) when a token would travel in clear text to a host
other than loopback; `reward_client_retry` (debug) before each retry, only
when the application has configured structlog.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from alignd.runtime.addresses import is_loopback
from alignd.runtime.client import MAX_MESSAGE_BYTES, tls_credentials, wait_for_serving
from alignd.v1 import model_pb2, model_pb2_grpc, reward_pb2, reward_pb2_grpc

__all__ = ["AsyncRewardClient", "RewardClient", "RewardClientError", "ScoreManyResult", "ScoreResult"]

_log = structlog.get_logger(component="alignd.reward_client")

REWARD_SERVICE = "alignd.v1.RewardService"
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


class RewardClientError(Exception):
    """A call that failed: `code` (grpc.StatusCode), `details` (the server's message), `attempts` (calls made)."""

    def __init__(self, code: grpc.StatusCode, details: str, attempts: int = 1) -> None:
        super().__init__(code, details, attempts)
        self.code = code
        self.details = details
        self.attempts = attempts

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


@dataclass(frozen=True)
class ScoreResult:
    """One request's answer: a score per item, in order, and the reward-model version that produced them."""

    scores: list[float]
    weight_version: int


@dataclass(frozen=True)
class ScoreManyResult:
    """The answer of `score_many`: a score and a weight version per item, in input order.

    Each request of the batch reports its own version, so the versions differ
    when the reward model was reloaded while the batches ran.
    """

    scores: list[float]
    weight_versions: list[int]

    @property
    def weight_version(self) -> int | None:
        """The version of every item; None when items were scored by different versions (or there are none)."""
        versions = set(self.weight_versions)
        return versions.pop() if len(versions) == 1 else None


# -- configuration shared by both clients ------------------------------------------------------------------------


@dataclass(frozen=True)
class _RetryPolicy:
    attempts: int
    initial_backoff: float
    max_backoff: float

    def delay(self, failures: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max_backoff, initial_backoff * 2**(failures-1))]."""
        cap = min(self.max_backoff, self.initial_backoff * (2.0 ** min(failures - 1, 62)))
        return rng.uniform(0.0, cap)


def _read_file(arg: str, path: str | Path) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"{arg}: cannot read {path}: {exc.strerror or exc}") from None


def _check_token(token: str, arg: str) -> str:
    if not isinstance(token, str):
        raise TypeError(f"{arg}: must be a string, got {type(token).__name__}")
    token = token.strip()
    if not token:
        raise ValueError(f"{arg}: the token is empty")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"{arg}: the token must be printable ASCII without spaces")
    return token


def _positive(name: str, value: float | None, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


@dataclass(frozen=True)
class _Settings:
    """Everything both clients derive from the constructor's arguments (checked once, here)."""

    address: str
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, Any], ...]
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None
    policy: _RetryPolicy

    @classmethod
    def build(
        cls,
        address: str,
        *,
        token: str | None,
        token_file: str | Path | None,
        tls: bool,
        root_certificates_file: str | Path | None,
        cert_file: str | Path | None,
        key_file: str | Path | None,
        server_name_override: str | None,
        timeout: float | None,
        retries: int,
        initial_backoff: float,
        max_backoff: float,
        max_message_bytes: int,
    ) -> _Settings:
        if not isinstance(address, str) or not address.strip():
            raise ValueError(f"address: expected 'host:port', got {address!r}")
        address = address.strip()
        _positive("timeout", timeout, allow_none=True)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
            raise ValueError(f"retries: the number of attempts in all, at least 1; got {retries!r}")
        _positive("initial_backoff", initial_backoff, allow_zero=True)
        _positive("max_backoff", max_backoff, allow_zero=True)
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes: at least 1024, got {max_message_bytes!r}")

        if token is not None and token_file is not None:
            raise ValueError("token, token_file: give one of them, not both")
        if token_file is not None:
            try:
                text = _read_file("token_file", token_file).decode()
            except UnicodeDecodeError:
                raise ValueError(f"token_file: {token_file} is not UTF-8 text") from None
            token = _check_token(text, f"token_file ({token_file})")
        elif token is not None:
            token = _check_token(token, "token")
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()

        if (cert_file is None) != (key_file is None):
            missing = "key_file" if key_file is None else "cert_file"
            raise ValueError(f"{missing}: mutual TLS needs both cert_file and key_file, {missing} is missing")
        secure = bool(tls) or any(f is not None for f in (root_certificates_file, cert_file, key_file))
        if server_name_override is not None and not secure:
            raise ValueError("server_name_override: only meaningful with TLS (tls=True or a certificate file)")
        credentials = None
        if secure:
            credentials = tls_credentials(
                root_certificates_file=root_certificates_file, cert_file=cert_file, key_file=key_file, read=_read_file
            )
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_retries", 0),  # the client's own retries (below) are the only ones
        ]
        if server_name_override is not None:
            options.append(("grpc.ssl_target_name_override", server_name_override))
        if token is not None and not secure and not is_loopback(address):
            _log.warning("reward_client_token_without_tls", address=address)
        return cls(
            address,
            credentials,
            tuple(options),
            metadata,
            None if timeout is None else float(timeout),
            _RetryPolicy(retries, float(initial_backoff), float(max_backoff)),
        )

    def sync_channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address, options=list(self.options))
        return grpc.secure_channel(self.address, self.credentials, options=list(self.options))

    def aio_channel(self) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.address, options=list(self.options))
        return grpc.aio.secure_channel(self.address, self.credentials, options=list(self.options))


class _Attempts:
    """The retry schedule of one call: a deadline from the start, a timeout per attempt, a backoff per failure."""

    def __init__(self, settings: _Settings, timeout: float | None, rng: random.Random, method: str) -> None:
        if timeout is None:
            timeout = settings.timeout
        else:
            _positive("timeout", timeout)
        self.policy = settings.policy
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.rng = rng
        self.method = method
        self.made = 0

    def next_timeout(self) -> float | None:
        """The timeout of the next attempt: what is left of the deadline."""
        if self.deadline is None:
            self.made += 1
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise RewardClientError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline of {self.timeout:g}s passed before attempt {self.made + 1}",
                self.made,
            )
        self.made += 1
        return remaining

    def backoff(self, err: grpc.RpcError) -> float:
        """The pause before the next attempt after `err`; raises RewardClientError when the call is over."""
        code, details = err.code(), err.details() or ""
        if code not in RETRYABLE_CODES or self.made >= self.policy.attempts:
            raise RewardClientError(code, details, self.made) from err
        delay = self.policy.delay(self.made, self.rng)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            raise RewardClientError(code, details, self.made) from err  # a retry could not finish in time
        if structlog.is_configured():
            _log.debug(
                "reward_client_retry", method=self.method, attempt=self.made, code=code.name, backoff_s=round(delay, 4)
            )
        return delay


# -- requests ------------------------------------------------------------------------------------------------------


def _pair(pair: Any, keys: tuple[str, str], what: str, where: str) -> tuple[Any, Any]:
    """The two halves of `pair`: a mapping with `keys`, or a 2-sequence."""
    if isinstance(pair, Mapping):
        missing = [k for k in keys if k not in pair]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
        return pair[keys[0]], pair[keys[1]]
    if isinstance(pair, Sequence) and not isinstance(pair, (str, bytes)) and len(pair) == 2:
        return pair[0], pair[1]
    raise TypeError(f"{where}: expected a {what} pair or a mapping with {keys[0]!r} and {keys[1]!r}")


def _text_pair(pair: Any, where: str) -> tuple[str, str]:
    prompt, response = _pair(pair, ("prompt", "response"), "(prompt, response)", where)
    for name, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, str):
            raise TypeError(f"{where}: {name} must be a string, got {type(value).__name__}")
    return prompt, response


def _id_list(ids: Any, where: str) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"{where}: expected a list of token ids, got {type(ids).__name__}")
    out = list(ids)
    for i in out:
        if isinstance(i, bool) or not isinstance(i, int) or not -(2**31) <= i < 2**31:
            raise ValueError(f"{where}: token ids must be 32-bit integers, got {i!r}")
    return out


def _token_pair(pair: Any, where: str) -> tuple[list[int], list[int]]:
    prompt, response = _pair(pair, ("prompt_token_ids", "response_token_ids"), "(prompt ids, response ids)", where)
    return _id_list(prompt, f"{where} prompt"), _id_list(response, f"{where} response")


def _text_items(pairs: Iterable[Any]) -> list[reward_pb2.ScoreItem]:
    items = []
    for i, pair in enumerate(pairs):
        prompt, response = _text_pair(pair, f"pairs[{i}]")
        items.append(reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt=prompt, response=response)))
    return items


def _token_items(pairs: Iterable[Any]) -> list[reward_pb2.ScoreItem]:
    items = []
    for i, pair in enumerate(pairs):
        prompt, response = _token_pair(pair, f"pairs[{i}]")
        items.append(
            reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=prompt, response_token_ids=response))
        )
    return items


def _chunks(items: list, batch_size: int, max_in_flight: int) -> list[list]:
    for name, value in (("batch_size", batch_size), ("max_in_flight", max_in_flight)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def _result(resp: reward_pb2.ScoreResponse) -> ScoreResult:
    return ScoreResult(list(resp.scores), int(resp.weight_version))


def _many(results: list[ScoreResult]) -> ScoreManyResult:
    scores: list[float] = []
    versions: list[int] = []
    for r in results:
        scores.extend(r.scores)
        versions.extend([r.weight_version] * len(r.scores))
    return ScoreManyResult(scores, versions)


_CONSTRUCTOR_DOC = """
    address: "host:port" of a reward replica (any gRPC target, e.g. "dns:///reward:50051").
    token / token_file: the bearer token, or a file holding just the token (read once, surrounding whitespace
        stripped); sent as `authorization: Bearer <token>`.
    tls: use TLS (the system's root certificates unless root_certificates_file is given). Implied by any of
        root_certificates_file, cert_file, key_file.
    root_certificates_file: PEM CA bundle that signed the server's certificate.
    cert_file, key_file: PEM client certificate chain and private key, for mutual TLS; both or neither.
    server_name_override: the name to check the server's certificate against (instead of the address's host).
    timeout: default deadline of a call in seconds, retries included (None: no deadline).
    retries: attempts in all for a call that fails with UNAVAILABLE (1: no retry).
    initial_backoff, max_backoff: the pause before retry k is uniform in [0, min(max_backoff, initial_backoff * 2**k)].
    max_message_bytes: the largest message sent or received.
"""


class _ClientBase:
    """The constructor both clients share (arguments: see _CONSTRUCTOR_DOC)."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        tls: bool = False,
        root_certificates_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        server_name_override: str | None = None,
        timeout: float | None = 30.0,
        retries: int = 4,
        initial_backoff: float = 0.1,
        max_backoff: float = 2.0,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._settings = _Settings.build(
            address,
            token=token,
            token_file=token_file,
            tls=tls,
            root_certificates_file=root_certificates_file,
            cert_file=cert_file,
            key_file=key_file,
            server_name_override=server_name_override,
            timeout=timeout,
            retries=retries,
            initial_backoff=initial_backoff,
            max_backoff=max_backoff,
            max_message_bytes=max_message_bytes,
        )
        self._rng = random.Random()
        self._closed = False
        self._open()

    def _open(self) -> None:
        raise NotImplementedError


# -- the synchronous client ---------------------------------------------------------------------------------------


class RewardClient(_ClientBase):
    __doc__ = "A synchronous, thread-safe client of alignd.v1.RewardService.\n" + _CONSTRUCTOR_DOC

    def _open(self) -> None:
        self._channel = self._settings.sync_channel()
        self._stub = {
            "reward": reward_pb2_grpc.RewardServiceStub(self._channel),
            "model": model_pb2_grpc.ModelServiceStub(self._channel),
        }
        self._rng_lock = threading.Lock()

    @property
    def address(self) -> str:
        return self._settings.address

    def _call(self, stub: str, method: str, request, timeout: float | None):
        if self._closed:
            raise RuntimeError("the RewardClient is closed")
        rpc = getattr(self._stub[stub], method)
        with self._rng_lock:
            rng = random.Random(self._rng.random())  # one per call: threads do not share its state
        attempts = _Attempts(self._settings, timeout, rng, method)
        while True:
            attempt_timeout = attempts.next_timeout()
            try:
                return rpc(request, timeout=attempt_timeout, metadata=self._settings.metadata)
            except grpc.RpcError as err:
                time.sleep(attempts.backoff(err))

    def _score_request(self, items: list, timeout: float | None) -> ScoreResult:
        return _result(self._call("reward", "Score", reward_pb2.ScoreRequest(items=items), timeout))

    def score(self, pairs: Iterable[Any], *, timeout: float | None = None) -> ScoreResult:
        """Scores (prompt, response) text pairs (tuples, or mappings with "prompt" and "response") in one request.

        The server checks the contents (an empty list or an empty response is INVALID_ARGUMENT); `timeout`
        overrides the client's deadline for this call.
        """
        return self._score_request(_text_items(pairs), timeout)

    def score_tokens(self, pairs: Iterable[Any], *, timeout: float | None = None) -> ScoreResult:
        """Scores (prompt ids, response ids) pairs of the reward model's tokenizer (or mappings with
        "prompt_token_ids" and "response_token_ids") in one request."""
        return self._score_request(_token_items(pairs), timeout)

    def score_many(
        self,
        pairs: Iterable[Any],
        *,
        batch_size: int = 64,
        max_in_flight: int = 4,
        timeout: float | None = None,
    ) -> ScoreManyResult:
        """Scores any number of text pairs: requests of `batch_size` items, up to `max_in_flight` at once (threads
        over the one channel), scores in input order. `timeout` is the deadline of each request (with its retries).
        The first failed request raises (requests not started yet are not sent); no pairs: no request."""
        return self._many(_text_items(pairs), batch_size, max_in_flight, timeout)

    def _many(self, items: list, batch_size: int, max_in_flight: int, timeout: float | None) -> ScoreManyResult:
        chunks = _chunks(items, batch_size, max_in_flight)
        if len(chunks) <= 1 or max_in_flight == 1:
            return _many([self._score_request(c, timeout) for c in chunks])
        pool = ThreadPoolExecutor(max_workers=min(max_in_flight, len(chunks)), thread_name_prefix="reward-client")
        try:
            futures = [pool.submit(self._score_request, c, timeout) for c in chunks]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                if f in done and f.exception() is not None:
                    raise f.exception()
            return _many([f.result() for f in futures])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def info(self, *, timeout: float | None = None) -> model_pb2.GetInfoResponse:
        """alignd.v1.ModelService.GetInfo of the replica: its model, tokenizer hash and weight version."""
        return self._call("model", "GetInfo", model_pb2.GetInfoRequest(), timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Blocks until the replica's health reports alignd.v1.RewardService SERVING; TimeoutError after `timeout`."""
        try:
            wait_for_serving(self._channel, REWARD_SERVICE, timeout=timeout)
        except grpc.RpcError as err:
            raise RewardClientError(err.code(), err.details() or "") from err

    def close(self) -> None:
        """Closes the channel (calls in flight are cancelled); idempotent."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the asyncio client ------------------------------------------------------------------------------------------


class AsyncRewardClient(_ClientBase):
    __doc__ = (
        "The asyncio client of alignd.v1.RewardService (grpc.aio); same arguments and behaviour as RewardClient.\n"
        "The channel is opened on the first call, in the running event loop.\n" + _CONSTRUCTOR_DOC
    )

    def _open(self) -> None:
        self._channel: grpc.aio.Channel | None = None  # opened on the first call, in the running loop

    @property
    def address(self) -> str:
        return self._settings.address

    def _stubs(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("the AsyncRewardClient is closed")
        if self._channel is None:
            self._channel = self._settings.aio_channel()
            self._stub = {
                "reward": reward_pb2_grpc.RewardServiceStub(self._channel),
                "model": model_pb2_grpc.ModelServiceStub(self._channel),
            }
        return self._stub

    async def _call(self, stub: str, method: str, request, timeout: float | None):
        rpc = getattr(self._stubs()[stub], method)
        attempts = _Attempts(self._settings, timeout, self._rng, method)
        while True:
            attempt_timeout = attempts.next_timeout()
            try:
                return await rpc(request, timeout=attempt_timeout, metadata=self._settings.metadata)
            except grpc.aio.AioRpcError as err:
                await asyncio.sleep(attempts.backoff(err))

    async def _score_request(self, items: list, timeout: float | None) -> ScoreResult:
        resp = await self._call("reward", "Score", reward_pb2.ScoreRequest(items=items), timeout)
        return _result(resp)

    async def score(self, pairs: Iterable[Any], *, timeout: float | None = None) -> ScoreResult:
        """See RewardClient.score."""
        return await self._score_request(_text_items(pairs), timeout)

    async def score_tokens(self, pairs: Iterable[Any], *, timeout: float | None = None) -> ScoreResult:
        """See RewardClient.score_tokens."""
        return await self._score_request(_token_items(pairs), timeout)

    async def score_many(
        self,
        pairs: Iterable[Any],
        *,
        batch_size: int = 64,
        max_in_flight: int = 4,
        timeout: float | None = None,
    ) -> ScoreManyResult:
        """See RewardClient.score_many: the requests run as tasks, at most `max_in_flight` at once; the first
        failure cancels the others and raises."""
        chunks = _chunks(_text_items(pairs), batch_size, max_in_flight)
        gate = asyncio.Semaphore(max_in_flight)

        async def one(chunk: list) -> ScoreResult:
            async with gate:
                return await self._score_request(chunk, timeout)

        tasks = [asyncio.ensure_future(one(c)) for c in chunks]
        try:
            return _many(list(await asyncio.gather(*tasks)))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def info(self, *, timeout: float | None = None) -> model_pb2.GetInfoResponse:
        """See RewardClient.info."""
        return await self._call("model", "GetInfo", model_pb2.GetInfoRequest(), timeout)

    async def close(self) -> None:
        """Closes the channel (calls in flight are cancelled); idempotent."""
        self._closed = True
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
