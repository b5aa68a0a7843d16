"""Prometheus metrics shared by every service, and the /metrics endpoint.

Metric names follow `alignd_<slug>_<what>_<unit>`; the gRPC server metrics use
the names of go-grpc-prometheus (`grpc_server_handled_total`,
`grpc_server_handling_seconds`) so existing dashboards work. Every metric is
declared against an injectable `CollectorRegistry` so tests get a fresh one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

# Buckets for RPC latencies, in seconds: 1 ms .. 5 min.
LATENCY_BUCKETS_SECONDS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class GrpcServerMetrics:
    """Per-RPC counters and latency histogram, labelled by service, method, code."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "grpc_server_started_total",
            "RPCs started on the server.",
            ["grpc_type", "grpc_service", "grpc_method"],
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC on the server, in seconds.",
            ["grpc_type", "grpc_service", "grpc_method"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )


def serve_metrics(registry: CollectorRegistry, host: str, port: int, *, authorize=None, tls=None):
    """Starts the /metrics HTTP endpoint; returns (http_server, bound_port).

    authorize(header) -> bool: when given, a request whose `Authorization` header it refuses gets 401 and no
    metrics (server.auth.metrics_requires_token). tls (a config.TLSConfig): HTTPS with its certificate, and client
    certificates required when it names a client CA (server.metrics_tls)."""
    kwargs = {}
    if tls is not None and tls.enabled:
        kwargs = dict(
            certfile=tls.cert_file,
            keyfile=tls.key_file,
            client_cafile=tls.client_ca_file,
            client_auth_required=tls.client_ca_file is not None,
        )
    server, _thread = start_http_server(port, addr=host, registry=registry, **kwargs)
    if authorize is not None:
        app = server.get_app()

        def guarded(environ, start_response):
            if not authorize(environ.get("HTTP_AUTHORIZATION")):
                start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
                return [b"a token with the metrics scope is required\n"]
            return app(environ, start_response)

        server.set_app(guarded)
    return server, server.server_port


SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class BatchMetrics:
    """alignd_<slug>_* metrics of a role's dynamic batcher."""

    def __init__(self, slug: str, registry: CollectorRegistry) -> None:
        from prometheus_client import Gauge

        self.batch_size = Histogram(
            f"alignd_{slug}_batch_size_sequences",
            "Sequences per executed batch.",
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.batch_seconds = Histogram(
            f"alignd_{slug}_batch_seconds",
            "Time to execute one batch, in seconds.",
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            f"alignd_{slug}_queue_wait_seconds",
            "Time a request waited in the batching queue, in seconds.",
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            f"alignd_{slug}_queue_depth_requests", "Requests waiting in the batching queue.", registry=registry
        )
        self.dropped = Counter(
            f"alignd_{slug}_dropped_total",
            "Requests dropped from the batching queue without being computed, by reason (deadline: it passed "
            "while the request waited; cancelled: the caller gave up first).",
            ["reason"],
            registry=registry,
        )
        for reason in ("deadline", "cancelled"):
            self.dropped.labels(reason)
        self.sequences = Counter(f"alignd_{slug}_sequences_total", "Sequences processed.", registry=registry)
        self.tokens = Counter(
            f"alignd_{slug}_tokens_total",
            "Tokens processed, by kind (prompt, generated, scored).",
            ["kind"],
            registry=registry,
        )

    def on_batch(self, info) -> None:
        self.batch_size.observe(info.size)
        self.batch_seconds.observe(info.seconds)
        self.sequences.inc(info.size)
