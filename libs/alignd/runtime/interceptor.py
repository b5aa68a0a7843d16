"""One server interceptor for every alignd service.

It (1) carries a request id from the `x-request-id` metadata key (or makes
one) into structlog's context and back to the caller in trailing metadata,
(2) maps domain errors (`alignd.runtime.errors`) to their status codes and any
other exception to INTERNAL with a logged traceback, and (3) records
`grpc_server_started_total`, `grpc_server_handled_total` and
`grpc_server_handling_seconds`. (4) After each call it frees the OpenMP worker pool the handler's thread
may have made by running torch work (`alignd.runtime.omp`): pools left on gRPC threads throttle the batcher's.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import grpc
import structlog

from alignd.runtime.errors import AligndError
from alignd.runtime.logging import get_logger
from alignd.runtime.metrics import GrpcServerMetrics
from alignd.runtime.omp import release_thread_pool
from alignd.runtime.scopes import HEALTH_METHODS

REQUEST_ID_KEY = "x-request-id"
_log = get_logger("alignd.rpc")


def _split_method(full_method: str) -> tuple[str, str]:
    # "/alignd.v1.PolicyService/Generate" -> ("alignd.v1.PolicyService", "Generate")
    _, service, method = full_method.split("/", 2)
    return service, method


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    declared = getattr(behavior, "alignd_rpc_type", None)  # the access interceptor reads unary requests itself
    if declared:
        return declared
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


class _TrackedContext:
    """The handler's view of the ServicerContext; records a real abort() call."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context
        self.aborted = False

    def abort(self, code, details):
        self.aborted = True
        self._context.abort(code, details)

    def __getattr__(self, name):
        return getattr(self._context, name)


class _MethodMetrics:
    """The labelled metric children of one method, looked up once (a labels() call costs more than the update)."""

    def __init__(self, metrics: GrpcServerMetrics, rpc_type: str, service: str, *, method: str) -> None:
        self.started = metrics.started.labels(rpc_type, service, method)
        self.seconds = metrics.handling_seconds.labels(rpc_type, service, method)
        self._handled = metrics.handled
        self._key = (rpc_type, service, method)
        self._by_code: dict = {}

    def handled(self, code: grpc.StatusCode):
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._handled.labels(*self._key, code.name)
        return child


class ServerInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: GrpcServerMetrics) -> None:
        self._metrics = metrics
        self._methods: dict[tuple[str, str, str], _MethodMetrics] = {}

    def _method_metrics(self, rpc_type: str, service: str, method: str) -> _MethodMetrics:
        key = (rpc_type, service, method)
        found = self._methods.get(key)
        if found is None:
            found = self._methods[key] = _MethodMetrics(self._metrics, rpc_type, service, method=method)
        return found

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in HEALTH_METHODS:
            # Health checks keep their own handlers: Watch is non-blocking on the health thread (wrapping it would
            # make every watcher hold a worker thread), Check runs on the health threads too (ServiceHost).
            return handler
        service, method = _split_method(handler_call_details.method)
        rpc_type = _rpc_type(handler)
        metadata = dict(handler_call_details.invocation_metadata or ())
        incoming_id = metadata.get(REQUEST_ID_KEY)
        metrics = self._method_metrics(rpc_type, service, method)

        @contextlib.contextmanager
        def observed(context: grpc.ServicerContext, tracked: _TrackedContext):
            request_id = incoming_id or uuid.uuid4().hex
            tokens = structlog.contextvars.bind_contextvars(
                request_id=request_id, grpc_service=service, grpc_method=method
            )
            metrics.started.inc()
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
                yield
                code = context.code() or grpc.StatusCode.OK
            except AligndError as exc:
                code = exc.code
                _log.info("rpc_rejected", grpc_code=code.name, error=exc.message)
                context.abort(exc.code, exc.message)
            except Exception as exc:  # noqa: BLE001 - the boundary of the RPC
                if tracked.aborted:
                    # The handler called context.abort(); keep its status.
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                code = grpc.StatusCode.INTERNAL
                _log.error("rpc_failed", exc_info=exc, grpc_code=code.name)
                context.abort(code, f"internal error in {method}: {type(exc).__name__}; request_id={request_id}")
            finally:
                metrics.handled(code).inc()
                metrics.seconds.observe(time.perf_counter() - start)
                structlog.contextvars.reset_contextvars(**tokens)
                release_thread_pool()

        def wrap_unary_response(behavior):
            def run(request_or_iterator, context):
                tracked = _TrackedContext(context)
                with observed(context, tracked):
                    return behavior(request_or_iterator, tracked)

            return run

        def wrap_stream_response(behavior):
            def run(request_or_iterator, context):
                tracked = _TrackedContext(context)
                with observed(context, tracked):
                    yield from behavior(request_or_iterator, tracked)

            return run

        return rewrap(handler, wrap_unary_response, wrap_stream_response)


def rewrap(handler: grpc.RpcMethodHandler, wrap_unary_response, wrap_stream_response) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped: `wrap_unary_response` for RPCs that answer one message,
    `wrap_stream_response` for those that stream (each takes and returns a behaviour function)."""
    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

    def wrapped(wrap, behavior):
        out = wrap(behavior)
        # The thread pool a behaviour asked for (the access interceptor's refusals) stays its own.
        pool = getattr(behavior, "experimental_thread_pool", None)
        if pool is not None:
            out.experimental_thread_pool = pool
        return out

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrapped(wrap_unary_response, handler.unary_unary), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrapped(wrap_unary_response, handler.stream_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrapped(wrap_stream_response, handler.unary_stream), **kwargs)
    return grpc.stream_stream_rpc_method_handler(wrapped(wrap_stream_response, handler.stream_stream), **kwargs)
