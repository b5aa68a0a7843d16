"""Server bootstrap shared by every role.

`ServiceHost` owns the gRPC server (a thread pool: see docs/architecture.md
for the measurement against grpc.aio), the standard `grpc.health.v1` service,
server reflection, the shared interceptor and the /metrics endpoint. Health
is NOT_SERVING for every service until the role calls `set_serving(True)`
(after its model is loaded and warmed up) and again while weights are swapped
or the server shuts down.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from alignd import build
from alignd.config import ServerConfig
from alignd.runtime.access import AccessInterceptor
from alignd.runtime.addresses import is_loopback
from alignd.runtime.interceptor import ServerInterceptor
from alignd.runtime.logging import get_logger
from alignd.runtime.metrics import GrpcServerMetrics, serve_metrics

_log = get_logger("alignd.server")


def make_authenticator(role: str, cfg, registry: CollectorRegistry):
    """The token and scope check of `server.auth` (ConfigError when it is enabled without a usable tokens file)."""
    from prometheus_client import Counter

    from alignd.config import ConfigError
    from alignd.runtime.auth import REJECT_REASONS, Authenticator, TokenError, TokenFile

    if not cfg.tokens_file:
        raise ConfigError(
            "server.auth.tokens_file: required while server.auth.enabled is true (the default): a YAML file of named "
            "tokens and their scopes (docs/security.md); `alignd up` generates one. To serve every caller unchecked, "
            "set server.auth.enabled: false explicitly."
        )
    try:
        tokens = TokenFile(cfg.tokens_file)
    except TokenError as exc:
        raise ConfigError(str(exc)) from None
    rejected = Counter(
        f"alignd_{role}_auth_rejected_total",
        "Calls refused, by reason: missing, malformed or unknown token (UNAUTHENTICATED), scope (PERMISSION_DENIED).",
        ["reason"],
        registry=registry,
    )
    for reason in REJECT_REASONS:
        rejected.labels(reason)
    return Authenticator(
        tokens, cfg.public_methods, cfg.trusted_networks, on_reject=lambda api, reason: rejected.labels(reason).inc()
    )


class HealthInterceptor(grpc.ServerInterceptor):
    """The health checks on threads of their own, and a bound on open Watch streams (they need no token).

    Check runs on two threads of its own, so a probe is answered while every worker thread is busy. Each Watch
    holds one thread of a pool of `max_watchers` (grpc's blocking watcher: the servicer only queues each status
    for it, so changing the health never waits on a watcher's connection; the non-blocking variant sends from
    inside the health servicer's lock and can deadlock with a watcher that closes meanwhile). Beyond
    `max_watchers` open streams in all, or `max_per_peer` from one IP, Watch answers RESOURCE_EXHAUSTED at once.
    """

    WATCH, CHECK = "/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/Check"

    def __init__(self, max_watchers: int, max_per_peer: int, on_refused=None) -> None:
        self._check_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="health-check")
        self._watch_pool = ThreadPoolExecutor(max_workers=max_watchers, thread_name_prefix="health-watch")
        self._lock = threading.Lock()
        self._total = 0
        self._per_peer: dict[str, int] = {}
        self._max, self._max_per_peer, self._on_refused = max_watchers, max_per_peer, on_refused

    def _refuse(self, handler):
        if self._on_refused is not None:
            self._on_refused()

        def refuse(request_iterator, context):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many open health Watch streams (server.limits.max_health_watchers); use Check",
            )
            yield  # unreachable: a generator, like Watch

        refuse.experimental_thread_pool = self._check_pool
        return grpc.stream_stream_rpc_method_handler(refuse, None, handler.response_serializer)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in (self.WATCH, self.CHECK):
            return handler
        if method == self.CHECK:
            check = handler.unary_unary

            def checked(request, context):
                return check(request, context)

            checked.experimental_thread_pool = self._check_pool
            return grpc.unary_unary_rpc_method_handler(
                checked, handler.request_deserializer, handler.response_serializer
            )
        with self._lock:  # admitted before it queues for a thread: the pool never holds more than it can run
            if self._total >= self._max:
                refused = True
            else:
                refused = False
                self._total += 1
        if refused:
            return self._refuse(handler)
        watch, deserialize = handler.unary_stream, handler.request_deserializer

        def watching(request_iterator, context):
            from alignd.runtime.auth import peer_ip

            peer = str(peer_ip(context.peer()))
            try:
                with self._lock:
                    mine = self._per_peer.get(peer, 0)
                    if mine < self._max_per_peer:
                        self._per_peer[peer] = mine + 1
                if mine >= self._max_per_peer:
                    if self._on_refused is not None:
                        self._on_refused()
                    context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "too many open health Watch streams from this address; use Check",
                    )
                try:
                    raw = next(request_iterator, None)  # read here: this runs even for a call cancelled in the queue
                    if raw is not None:
                        yield from watch(deserialize(raw), context)
                except grpc.RpcError:
                    return  # the watcher went away
                finally:
                    with self._lock:
                        n = self._per_peer.get(peer, 1) - 1
                        if n > 0:
                            self._per_peer[peer] = n
                        else:
                            self._per_peer.pop(peer, None)
            finally:
                with self._lock:
                    self._total -= 1

        watching.experimental_thread_pool = self._watch_pool
        return grpc.stream_stream_rpc_method_handler(watching, None, handler.response_serializer)


def _cert_files(cfg: ServerConfig):
    """The server's TLS files (alignd.runtime.tls.CertFiles), None without server.tls; ConfigError when unusable."""
    if not cfg.tls.enabled:
        return None
    from alignd.runtime.tls import CertFiles

    return CertFiles(cfg.tls)


def _limited_calls_counter(role: str, registry: CollectorRegistry) -> Counter:
    """alignd_<role>_calls_limited_total by reason, each reason at 0 from the start."""
    limited = Counter(
        f"alignd_{role}_calls_limited_total",
        "Calls refused RESOURCE_EXHAUSTED before they were served, by reason (client_concurrency: the caller had "
        "server.limits.max_concurrent_calls_per_client in flight; health_watchers: too many Watch streams).",
        ["reason"],
        registry=registry,
    )
    for reason in ("client_concurrency", "health_watchers"):
        limited.labels(reason)
    return limited


class ServiceHost:
    """A gRPC server with health, reflection, metrics and graceful stop."""

    def __init__(
        self,
        role: str,
        cfg: ServerConfig,
        service_names: Iterable[str],
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.role = role
        self.cfg = cfg
        self.registry = registry or CollectorRegistry()
        self.rpc_metrics = GrpcServerMetrics(self.registry)
        self.service_names = list(service_names)
        self._executor = ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix=f"{role}-rpc")
        # Shared with other APIs of the role (the reward role's HTTP API); None without server.auth / server.tls.
        self.cert_files = _cert_files(cfg)  # ConfigError when the files are unusable
        self.authenticator = make_authenticator(role, cfg.auth, self.registry) if cfg.auth.enabled else None
        self._m_limited = _limited_calls_counter(role, self.registry)
        self.exposed_open = not cfg.auth.enabled and not is_loopback(cfg.host)
        Info(
            "alignd_build",
            "The alignd build this role runs: version and commit (alignd.build).",
            registry=self.registry,
        ).info(build.info())
        Gauge(
            f"alignd_{role}_auth_disabled_exposed",
            "1 when the role serves every caller unchecked (server.auth.enabled false) on a non-loopback address.",
            registry=self.registry,
        ).set(1 if self.exposed_open else 0)
        interceptors = self._call_interceptors()
        health_gate = HealthInterceptor(
            cfg.limits.max_health_watchers,
            cfg.limits.max_health_watchers_per_peer,
            on_refused=self._m_limited.labels("health_watchers").inc,
        )
        self.server = grpc.server(
            self._executor,
            interceptors=[health_gate, *interceptors],
            options=[
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self._add_health_service(health_gate)
        self._serving = False
        self._set_health(False)
        self._metrics_http = None
        self.metrics_port: int | None = None
        self.port: int | None = None
        self._stopped = threading.Event()

    def _call_interceptors(self) -> list[grpc.ServerInterceptor]:
        """Around every call, outermost first: metrics and logs, access (token, scope, limits), injected faults."""
        cfg = self.cfg
        interceptors: list[grpc.ServerInterceptor] = [ServerInterceptor(self.rpc_metrics)]
        interceptors.append(
            AccessInterceptor(
                self.authenticator,
                cfg.limits,
                cfg.max_message_bytes,
                on_limited=self._m_limited.labels("client_concurrency").inc,
            )
        )
        if cfg.fault_injection.delay_seconds > 0:
            from alignd.runtime.faults import FaultInterceptor

            interceptors.append(FaultInterceptor(cfg.fault_injection, self.registry))
        return interceptors

    def _add_health_service(self, health_gate: HealthInterceptor) -> None:
        """The grpc.health.v1 service on the server, and on its own plaintext server at server.health_port if set."""
        # Blocking watchers, each on a thread of the HealthInterceptor's Watch pool (see there why).
        self.health = health.HealthServicer(experimental_non_blocking=False)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # server.health_port: the same health service, plaintext, alone (probes cannot speak TLS).
        self._health_server = None
        self.health_port: int | None = None
        if self.cfg.health_port >= 0:
            self._health_server = grpc.server(
                ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.role}-probe"), interceptors=[health_gate]
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)

    def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            self.health.set(name, status)

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        if self.metrics_port is None:
            return None
        scheme = "https" if self.cfg.metrics_tls else "http"
        return f"{scheme}://{self.cfg.metrics_host}:{self.metrics_port}/metrics"

    def start(self) -> None:
        """Binds the ports and starts serving (health NOT_SERVING until set_serving)."""
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        bind = f"{self.cfg.host}:{self.cfg.port}"
        if self.cert_files is not None:
            self.port = self.server.add_secure_port(bind, self.cert_files.grpc_credentials())
        else:
            self.port = self.server.add_insecure_port(bind)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {self.cfg.host}:{self.cfg.port}")
        self.server.start()
        if self._health_server is not None:
            self.health_port = self._health_server.add_insecure_port(f"{self.cfg.host}:{self.cfg.health_port}")
            if self.health_port == 0:
                raise OSError(f"cannot bind the health port {self.cfg.host}:{self.cfg.health_port}")
            self._health_server.start()
        if self.cfg.metrics_port >= 0:
            self._metrics_http, self.metrics_port = serve_metrics(
                self.registry,
                self.cfg.metrics_host,
                self.cfg.metrics_port,
                authorize=self._metrics_authorizer(),
                tls=self.cfg.tls if self.cfg.metrics_tls else None,
            )
        _log.info(
            "server_started",
            address=self.address,
            metrics_url=self.metrics_url,
            tls="mutual" if self.cert_files is not None and self.cert_files.mutual else bool(self.cert_files),
            auth=self.cfg.auth.enabled,
            health_port=self.health_port,
        )
        if self.exposed_open:
            _log.warning(
                "auth_disabled_exposed",
                address=self.address,
                hint="server.auth.enabled is false on a non-loopback address: every caller may call every RPC",
            )

    def _metrics_authorizer(self):
        """authorize(header) for /metrics under server.auth.metrics_requires_token, else None."""
        if not (self.cfg.auth.metrics_requires_token and self.authenticator is not None):
            return None
        from alignd.runtime.errors import AligndError
        from alignd.runtime.scopes import METRICS

        auth = self.authenticator

        def authorize(header: str | None) -> bool:
            try:
                auth.authorize(auth.authenticate(header, None, api="metrics"), METRICS, "/metrics", api="metrics")
            except AligndError:
                return False
            return True

        return authorize

    def set_serving(self, serving: bool) -> None:
        self._serving = serving
        self._set_health(serving)
        _log.info("health_changed", serving=serving)

    @property
    def serving(self) -> bool:
        return self._serving

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, finish in-flight RPCs for `grace` s, close."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        grace = self.cfg.grace_seconds if grace is None else grace
        _log.info("server_stopping", grace_seconds=grace)
        self.server.stop(grace).wait()
        if self._health_server is not None:
            self._health_server.stop(0).wait()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        _log.info("server_stopped")
