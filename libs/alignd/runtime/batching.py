"""Dynamic batching: requests that arrive close together run as one batch.

A single worker thread owns the model. Callers `submit()` a request with a
cost (number of sequences) and a token count; the worker takes the oldest
request, then keeps collecting until the batch holds `max_batch_size`
sequences, or the next request would take it past `max_batch_tokens` tokens,
or `max_wait_s` has passed since that first request arrived, and runs
`process(batch)` once. The queue is bounded: when `max_queue` requests wait,
`submit` raises ResourceExhausted instead of letting latency grow without
bound. A request carries its caller's deadline: one whose deadline passed
(or whose caller gave up) while it waited is dropped, never computed, and
its caller gets DeadlineExceeded.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from alignd.runtime.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from alignd.runtime.logging import get_logger

Req = TypeVar("Req")
Res = TypeVar("Res")

_log = get_logger("alignd.batching")


@dataclass
class Pending(Generic[Req]):
    request: Req
    cost: int  # sequences this request adds to a batch
    tokens: int = 0  # tokens this request adds to a batch
    deadline: float | None = None  # perf_counter time after which the result is useless
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.perf_counter)
    queue_seconds: float = 0.0


@dataclass
class BatchInfo:
    size: int  # sequences in the batch
    requests: int  # requests in the batch
    seconds: float  # time to process the batch


class DynamicBatcher(Generic[Req, Res]):
    """Collects concurrent requests into batches processed by one thread.

    `process(requests) -> results` receives the requests of one batch and
    returns one result per request. When it raises on a batch of several
    requests, each request runs again on its own: only a request that fails
    alone gets an error (one caller's bad input never fails its neighbours). `on_batch(info)` is called after each
    batch (for metrics), `on_drop(reason)` for each request dropped unrun
    ("deadline": its deadline passed in the queue; "cancelled": its caller
    gave up first).
    """

    def __init__(
        self,
        process: Callable[[Sequence[Req]], Sequence[Res]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        name: str,
        on_batch: Callable[[BatchInfo], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        max_batch_tokens: int | None = None,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._process = process
        self._max_batch = max_batch_size
        self._max_tokens = max_batch_tokens
        self._on_drop = on_drop
        self._max_wait = max_wait_s
        self._max_queue = max_queue
        self._on_batch = on_batch
        self._on_depth = on_queue_depth
        self._queue: collections.deque[Pending[Req]] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, request: Req, cost: int, tokens: int = 0, *, deadline: float | None = None) -> Pending[Req]:
        """Queues a request; wait on `.future` for its result. `deadline` is a time.perf_counter() value."""
        pending = Pending(request, max(1, cost), max(0, tokens), deadline)
        with self._cv:
            if self._closed:
                raise Unavailable("server is shutting down")
            if len(self._queue) >= self._max_queue:
                raise ResourceExhausted(f"request queue is full ({self._max_queue} waiting); retry later")
            self._queue.append(pending)
            depth = len(self._queue)
            self._cv.notify()
        if self._on_depth:
            self._on_depth(depth)
        return pending

    def run(
        self,
        request: Req,
        cost: int,
        timeout: float | None = None,
        *,
        tokens: int = 0,
        on_done=None,
    ) -> tuple[Res, Pending[Req], BatchInfo]:
        """Submits and waits; `timeout` is the caller's remaining deadline in seconds.

        gRPC reports a call without a deadline as a huge remaining time; that
        (anything beyond a day) means no timeout. `on_done` (a gRPC context's
        add_callback) is given a function that withdraws the request when the
        call ends first (a cancelled call, e.g. a hedge that lost): still
        queued, it is dropped unrun ("cancelled"); a batch already running
        finishes.
        """
        if timeout is not None and timeout > 86400:
            timeout = None
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded("the deadline passed before the request was queued")
        deadline = None if timeout is None else time.perf_counter() + timeout
        pending = self.submit(request, cost, tokens, deadline=deadline)
        if on_done is not None:
            on_done(pending.future.cancel)
        try:
            result, info = pending.future.result(timeout=timeout)
        except FutureTimeout:
            pending.future.cancel()
            raise DeadlineExceeded(f"no result within the deadline ({timeout:.3f}s)") from None
        except FutureCancelled:
            raise DeadlineExceeded("the caller cancelled the request while it was queued") from None
        return result, pending, info

    def close(self) -> None:
        """Stops taking requests; queued ones still run."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=60)

    def _take_batch(self) -> list[Pending[Req]] | None:
        with self._cv:
            while not self._queue:
                if self._closed:
                    return None
                self._cv.wait()
            first = self._queue.popleft()
            batch = [first]
            size, tokens = first.cost, first.tokens
            deadline = first.enqueued_at + self._max_wait
            while size < self._max_batch:
                if self._queue:
                    nxt = self._queue[0]
                    if size + nxt.cost > self._max_batch:
                        break
                    if self._max_tokens is not None and tokens + nxt.tokens > self._max_tokens:
                        break
                    batch.append(self._queue.popleft())
                    size += nxt.cost
                    tokens += nxt.tokens
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._closed:
                    break
                self._cv.wait(timeout=remaining)
            depth = len(self._queue)
        if self._on_depth:
            self._on_depth(depth)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            batch = self._drop_expired(batch)
            if not batch:
                continue
            now = time.perf_counter()
            for p in batch:
                p.queue_seconds = now - p.enqueued_at
            try:
                results, info = self._execute(batch)
            except Exception as exc:  # noqa: BLE001 - one request's failure must not fail its neighbours
                if len(batch) == 1:
                    batch[0].future.set_exception(exc)
                    continue
                _log.warning("batch_failed_isolating", requests=len(batch), error=type(exc).__name__)
                self._run_alone(batch)
                continue
            except BaseException as exc:  # noqa: BLE001 - forwarded to every caller
                for p in batch:
                    p.future.set_exception(exc)
                continue
            for p, r in zip(batch, results):
                p.future.set_result((r, info))

    def _execute(self, batch: list[Pending[Req]]) -> tuple[Sequence[Res], BatchInfo]:
        start = time.perf_counter()
        results = self._process([p.request for p in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"batch processor returned {len(results)} results for {len(batch)} requests")
        info = BatchInfo(size=sum(p.cost for p in batch), requests=len(batch), seconds=time.perf_counter() - start)
        if self._on_batch:
            try:
                self._on_batch(info)
            except Exception:  # noqa: BLE001
                _log.exception("batch_callback_failed")
        return results, info

    def _run_alone(self, batch: list[Pending[Req]]) -> None:
        """After a batch failed: each of its requests again on its own, so only the one that fails gets an error."""
        for p in batch:
            try:
                results, info = self._execute([p])
            except Exception as exc:  # noqa: BLE001 - this request's own failure
                p.future.set_exception(exc)
            else:
                p.future.set_result((results[0], info))

    def _drop_expired(self, batch: list[Pending[Req]]) -> list[Pending[Req]]:
        """The requests still worth computing, marked running; the others are answered without running."""
        now = time.perf_counter()
        keep = []
        for p in batch:
            if not p.future.set_running_or_notify_cancel():  # the caller gave up (its wait timed out)
                self._dropped("cancelled")
            elif p.deadline is not None and now >= p.deadline:
                p.future.set_exception(DeadlineExceeded("the deadline passed while the request waited in the queue"))
                self._dropped("deadline")
            else:
                keep.append(p)
        return keep

    def _dropped(self, reason: str) -> None:
        if self._on_drop:
            try:
                self._on_drop(reason)
            except Exception:  # noqa: BLE001
                _log.exception("batch_callback_failed")


def per_request(
    fn: Callable[[list[Any]], tuple[list[Any], Any]],
) -> Callable[[Sequence[Sequence[Any]]], list[tuple[list[Any], Any]]]:
    """Adapts `fn(flat_items) -> (results, version)` to the batcher's interface.

    Each request is a list of items; the batch's items are concatenated into
    one engine call and the results split back per request, each with the
    weight version that produced it.
    """

    def process(requests: Sequence[Sequence[Any]]) -> list[tuple[list[Any], Any]]:
        flat = [item for req in requests for item in req]
        results, version = fn(flat)
        out, k = [], 0
        for req in requests:
            out.append((results[k : k + len(req)], version))
            k += len(req)
        return out

    return process
