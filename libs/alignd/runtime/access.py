"""Who may call what, and how much of the server one caller may hold (docs/security.md).

`AccessInterceptor` sits between the shared request interceptor (status
codes, metrics) and every servicer, and does, per call:

1. Authentication and authorisation from the call's metadata alone, before
   any request message is read: a call without a valid token is refused
   UNAUTHENTICATED, one whose token lacks the method's scope
   (alignd.runtime.scopes) PERMISSION_DENIED. Refusals run on a small pool
   of their own, so a flood of strangers neither reads a byte of body nor
   takes a worker thread. Only a call without a token, when trusted
   networks are configured, waits for its peer address (known once the
   handler runs), and is still decided before its message is read.
2. A per-client bound on calls in flight (`server.limits.
   max_concurrent_calls_per_client`, keyed by the token's name; by peer IP
   for trusted networks and open servers): one caller can hold only so
   many worker threads; beyond it, RESOURCE_EXHAUSTED at once.
3. The request message read here, not by gRPC: its size checked against
   the method's limit (`server.limits.max_request_bytes`; small for control
   RPCs, larger for Score / TrainStep / weight chunks) before it is parsed,
   parse errors answered INVALID_ARGUMENT, and a client stream (UpdateWeights)
   that sends nothing for `server.limits.stream_idle_timeout_seconds` ended
   with DEADLINE_EXCEEDED, so an idle stream cannot hold the replica's one
   update slot.

The health checks are public and pass through untouched (they run on their
own threads: alignd.runtime.server).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog

from alignd.runtime import scopes as S
from alignd.runtime.auth import AUTH_KEY, PRINCIPAL, Authenticator, Principal, peer_ip
from alignd.runtime.errors import AligndError, DeadlineExceeded, InvalidArgument, ResourceExhausted
from alignd.runtime.logging import get_logger

_log = get_logger("alignd.access")

KiB, MiB = 1024, 1024 * 1024
# Largest request message per method (short name), in bytes; other methods: DEFAULT_REQUEST_BYTES. The
# transport's server.max_message_bytes caps them all.
REQUEST_BYTES: dict[str, int] = {
    "Score": 16 * MiB,
    "Generate": 4 * MiB,
    "LogProbs": 16 * MiB,
    "TrainStep": 64 * MiB,
    "UpdateWeights": 16 * MiB,  # per message of the stream (chunks are ~1 MiB)
}
DEFAULT_REQUEST_BYTES = 1 * MiB


class Cancelled(AligndError):
    """The caller went away while its request was read."""

    code = grpc.StatusCode.CANCELLED


class ClientSlots:
    """Calls in flight per client key, at most `limit` each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._n: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        with self._lock:
            n = self._n.get(key, 0)
            if n >= self.limit:
                return False
            self._n[key] = n + 1
            return True

    def release(self, key: str) -> None:
        with self._lock:
            n = self._n.get(key, 0) - 1
            if n > 0:
                self._n[key] = n
            else:
                self._n.pop(key, None)

    def in_flight(self, key: str) -> int:
        with self._lock:
            return self._n.get(key, 0)


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def request_limit(method: str, overrides: dict[str, int], transport_max: int) -> int:
    short = _short(method)
    return min(overrides.get(short, REQUEST_BYTES.get(short, DEFAULT_REQUEST_BYTES)), transport_max)


def _parse(raw: bytes, deserialize, method: str, *, limit: int):
    if len(raw) > limit:
        raise ResourceExhausted(
            f"request: {len(raw)} bytes exceed the {limit}-byte limit of {_short(method)} "
            f"(server.limits.max_request_bytes)"
        )
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends: the caller's bytes
        raise InvalidArgument("request", f"not a valid request message of {_short(method)}") from None


def _read_one(request_iterator, deserialize, method: str, *, limit: int):
    """The one message of a unary-request call (the stream it arrives on is not read further)."""
    try:
        raw = next(request_iterator)
    except StopIteration:
        raise InvalidArgument("request", f"{_short(method)} needs exactly one request message, got none") from None
    except grpc.RpcError:
        raise Cancelled("the call ended before its request arrived") from None
    return _parse(raw, deserialize, method, limit=limit)


class _IdleLimitedStream:
    """The messages of a client stream, parsed and size-checked, with at most `idle` seconds between two.

    A reader thread pulls from gRPC's (blocking, untimed) request iterator into a one-slot queue; the handler
    waits on the queue with the timeout. When the handler stops (finished, failed or timed out), the reader
    stops at its next message, or when gRPC ends the call."""

    def __init__(self, request_iterator, deserialize, method: str, *, limit: int, idle: float) -> None:
        self._deserialize, self._method, self._limit, self._idle = deserialize, method, limit, idle
        self._q: queue.Queue = queue.Queue(maxsize=1)
        self._done = threading.Event()
        threading.Thread(target=self._pump, args=(request_iterator,), name="stream-reader", daemon=True).start()

    def _put(self, item) -> bool:
        while not self._done.is_set():
            try:
                self._q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _pump(self, request_iterator) -> None:
        try:
            for raw in request_iterator:
                if not self._put(("message", raw)):
                    return
            self._put(("end", None))
        except grpc.RpcError:
            self._put(("cancelled", None))
        except Exception as exc:  # noqa: BLE001 - handed to the handler's thread
            self._put(("error", exc))

    def close(self) -> None:
        self._done.set()

    def __iter__(self):
        return self

    def __next__(self):
        if self._done.is_set():
            raise StopIteration
        try:
            kind, value = self._q.get(timeout=self._idle)
        except queue.Empty:
            self._done.set()
            raise DeadlineExceeded(
                f"{_short(self._method)}: no message for {self._idle:g} s (server.limits.stream_idle_timeout_seconds); "
                "stream ended"
            ) from None
        if kind == "message":
            return _parse(value, self._deserialize, self._method, limit=self._limit)
        self._done.set()
        if kind == "end":
            raise StopIteration
        if kind == "cancelled":
            raise Cancelled("the caller cancelled the stream")
        raise value


class AccessInterceptor(grpc.ServerInterceptor):
    """Authentication (when `authenticator` is set), scopes, per-client limits and request reading (module docs)."""

    def __init__(
        self, authenticator: Authenticator | None, limits, transport_max_bytes: int, *, on_limited=None
    ) -> None:
        self.auth = authenticator
        self.limits = limits  # config.ServerLimitsConfig
        self.transport_max = transport_max_bytes
        self.slots = ClientSlots(limits.max_concurrent_calls_per_client)
        self.on_limited = on_limited  # on_limited(): a call refused for its client's concurrency
        self._reject_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rpc-reject")

    # -- refusals ------------------------------------------------------------
    def _refusal(self, handler: grpc.RpcMethodHandler, exc: AligndError) -> grpc.RpcMethodHandler:
        """A handler of the call's shape that answers `exc` without reading the request, on the refusal pool."""

        if handler.response_streaming:

            def refuse_stream(request_iterator, context):
                raise exc
                yield  # unreachable: it makes this function a generator

            refuse_stream.experimental_thread_pool = self._reject_pool
            return grpc.stream_stream_rpc_method_handler(refuse_stream, None, handler.response_serializer)

        def refuse(request_iterator, context):
            raise exc

        refuse.experimental_thread_pool = self._reject_pool
        return grpc.stream_unary_rpc_method_handler(refuse, None, handler.response_serializer)

    def _limited(self, key: str) -> ResourceExhausted:
        if self.on_limited is not None:
            self.on_limited()
        return ResourceExhausted(
            f"too many calls in flight for this client ({self.slots.limit}, "
            "server.limits.max_concurrent_calls_per_client); retry with backoff"
        )

    # -- the interceptor -----------------------------------------------------
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        scope = S.scope_of(method)
        if scope == S.PUBLIC:
            return handler
        principal = None
        if self.auth is not None:
            header = dict(handler_call_details.invocation_metadata or ()).get(AUTH_KEY)
            if header is not None or not self.auth.trusted:
                try:
                    principal = self.auth.authenticate(header, None)
                    self.auth.authorize(principal, scope, _short(method))
                except AligndError as exc:
                    return self._refusal(handler, exc)
        key = None
        if principal is not None:
            key = f"token:{principal.name}"
            if not self.slots.acquire(key):
                return self._refusal(handler, self._limited(key))
        return self._guarded(handler, method, scope, principal=principal, key=key)

    def _guarded(self, handler, method: str, scope: str, *, principal: Principal | None, key: str | None):
        deserialize = handler.request_deserializer
        limit = request_limit(method, self.limits.max_request_bytes, self.transport_max)
        idle = self.limits.stream_idle_timeout_seconds
        auth, slots = self.auth, self.slots
        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        rpc_type = (
            ("bidi_stream" if handler.request_streaming else "server_stream")
            if handler.response_streaming
            else ("client_stream" if handler.request_streaming else "unary")
        )

        @contextlib.contextmanager
        def admitted(context):
            """The caller settled (a token-less caller by its peer address), its slot held, its name in the logs."""
            held = key
            try:
                who = principal
                if held is None:
                    ip = peer_ip(context.peer())
                    if auth is not None:  # no token, trusted networks configured: trusted, or refused here
                        who = auth.authenticate(None, ip)
                        auth.authorize(who, scope, _short(method))
                    candidate = f"peer:{ip}"
                    if not slots.acquire(candidate):
                        raise self._limited(candidate)
                    held = candidate
                log_tokens = structlog.contextvars.bind_contextvars(client=who.name) if who is not None else {}
                token = PRINCIPAL.set(who)
                try:
                    yield
                finally:
                    PRINCIPAL.reset(token)
                    structlog.contextvars.reset_contextvars(**log_tokens)
            finally:
                if held is not None:
                    slots.release(held)

        def request_of(request_iterator):
            if handler.request_streaming:
                return _IdleLimitedStream(request_iterator, deserialize, method, limit=limit, idle=idle)
            return _read_one(request_iterator, deserialize, method, limit=limit)

        if handler.response_streaming:

            def serve_stream(request_iterator, context):
                with admitted(context):
                    request = request_of(request_iterator)
                    try:
                        yield from inner(request, context)
                    finally:
                        if isinstance(request, _IdleLimitedStream):
                            request.close()

            serve_stream.alignd_rpc_type = rpc_type  # the method's own shape, for the request metrics
            return grpc.stream_stream_rpc_method_handler(serve_stream, None, handler.response_serializer)

        def serve(request_iterator, context):
            with admitted(context):
                request = request_of(request_iterator)
                try:
                    return inner(request, context)
                finally:
                    if isinstance(request, _IdleLimitedStream):
                        request.close()

        serve.alignd_rpc_type = rpc_type
        return grpc.stream_unary_rpc_method_handler(serve, None, handler.response_serializer)
