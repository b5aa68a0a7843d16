"""The two reward clients: RewardClient (synchronous, thread-safe) and AsyncRewardClient (grpc.aio), on the
constructor they share.

The SDK's usage and behaviour are in the package docstring (`alignd.reward_client`).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import grpc

from alignd.reward_client.requests import _chunks, _many, _result, _text_items, _token_items
from alignd.reward_client.results import RewardClientError, ScoreManyResult, ScoreResult
from alignd.reward_client.settings import _Attempts, _Settings
from alignd.runtime.client import MAX_MESSAGE_BYTES, wait_for_serving
from alignd.v1 import model_pb2, model_pb2_grpc, reward_pb2, reward_pb2_grpc

REWARD_SERVICE = "alignd.v1.RewardService"


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

    def _call(self, stub: str, method: str, request, *, timeout: float | None):
        if self._closed:
            raise RuntimeError("the RewardClient is closed")
        rpc = getattr(self._stub[stub], method)
        with self._rng_lock:
            rng = random.Random(self._rng.random())  # one per call: threads do not share its state
        attempts = _Attempts(self._settings, timeout, rng, method=method)
        while True:
            attempt_timeout = attempts.next_timeout()
            try:
                return rpc(request, timeout=attempt_timeout, metadata=self._settings.metadata)
            except grpc.RpcError as err:
                time.sleep(attempts.backoff(err))

    def _score_request(self, items: list, timeout: float | None) -> ScoreResult:
        return _result(self._call("reward", "Score", reward_pb2.ScoreRequest(items=items), timeout=timeout))

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
        return self._many(_text_items(pairs), batch_size=batch_size, max_in_flight=max_in_flight, timeout=timeout)

    def _many(self, items: list, *, batch_size: int, max_in_flight: int, timeout: float | None) -> ScoreManyResult:
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
        return self._call("model", "GetInfo", model_pb2.GetInfoRequest(), timeout=timeout)

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

    async def _call(self, stub: str, method: str, request, *, timeout: float | None):
        rpc = getattr(self._stubs()[stub], method)
        attempts = _Attempts(self._settings, timeout, self._rng, method=method)
        while True:
            attempt_timeout = attempts.next_timeout()
            try:
                return await rpc(request, timeout=attempt_timeout, metadata=self._settings.metadata)
            except grpc.aio.AioRpcError as err:
                await asyncio.sleep(attempts.backoff(err))

    async def _score_request(self, items: list, timeout: float | None) -> ScoreResult:
        resp = await self._call("reward", "Score", reward_pb2.ScoreRequest(items=items), timeout=timeout)
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
        return await self._call("model", "GetInfo", model_pb2.GetInfoRequest(), timeout=timeout)

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
