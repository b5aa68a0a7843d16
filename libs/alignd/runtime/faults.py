"""Fault injection for chaos drills: a server interceptor that delays chosen RPCs (server.fault_injection).

A drill of the coordinator's hedging sets `delay_seconds` on one policy
replica's `Generate`; the delay ends early when the caller cancels or its
deadline passes (as a slow model would be abandoned), so a hedged replica
does not keep serving work nobody waits for.
"""

from __future__ import annotations

import threading

import grpc
from prometheus_client import CollectorRegistry, Counter

from alignd.runtime.interceptor import rewrap
from alignd.runtime.logging import get_logger

_log = get_logger("alignd.runtime.faults")
HEALTH_PREFIX = "/grpc.health.v1.Health/"


class FaultInterceptor(grpc.ServerInterceptor):
    def __init__(self, cfg, registry: CollectorRegistry) -> None:
        self.delay = cfg.delay_seconds
        self.methods = set(cfg.methods)
        self.injected = Counter(
            "alignd_rpc_faults_injected_total",
            "RPCs delayed by server.fault_injection (chaos drills).",
            ["method"],
            registry=registry,
        )

    def _matches(self, method: str) -> bool:
        if method.startswith(HEALTH_PREFIX):
            return False
        return not self.methods or method.rsplit("/", 1)[-1] in self.methods

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self._matches(method):
            return handler
        name = method.rsplit("/", 1)[-1]

        def wait(context) -> None:
            done = threading.Event()
            if not context.add_callback(done.set):  # runs when the call ends: cancelled, deadline passed
                return
            self.injected.labels(name).inc()
            _log.warning("fault_injected", method=name, delay_seconds=self.delay)
            if done.wait(self.delay):  # the caller gave up: do not serve work nobody waits for
                context.abort(grpc.StatusCode.CANCELLED, f"{name}: cancelled during an injected delay")

        def unary(behavior):
            def run(request_or_iterator, context):
                wait(context)
                return behavior(request_or_iterator, context)

            return run

        def streaming(behavior):
            def run(request_or_iterator, context):
                wait(context)
                yield from behavior(request_or_iterator, context)

            return run

        return rewrap(handler, unary, streaming)
