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
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge

from alignd.config import ServerConfig
from alignd.runtime.access import AccessInterceptor
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
        ["reason"], registry=registry,
    )
    for reason in REJECT_REASONS:
        rejected.labels(reason)
    return Authenticator(
        tokens, cfg.public_methods, cfg.trusted_networks, lambda api, reason: rejected.labels(reason).inc()
    )


def is_loopback_host(host: str) -> bool:
    """Whether a bind address is loopback only ("127.0.0.1", "::1", "localhost")."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_HEALTH_POOL: list[ThreadPoolExecutor] = []


def _health_pool() -> ThreadPoolExecutor:
    """The process's health-check threads (grpc reads the pool from the handler function, which every
    HealthServicer of the process shares)."""
    if not _HEALTH_POOL:
        _HEALTH_POOL.append(ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
    return _HEALTH_POOL[0]


class CappedHealthServicer(health.HealthServicer):
    """grpc.health.v1 with a bound on open Watch streams, in all and per peer IP (they need no token)."""

    def __init__(self, pool: ThreadPoolExecutor, max_watchers: int, max_per_peer: int, on_refused=None) -> None:
        super().__init__(experimental_non_blocking=True, experimental_thread_pool=pool)
        # Check too runs on the health threads: a probe is answered while every worker thread is busy.
        self.Check.__func__.experimental_thread_pool = pool
        self._watch_lock = threading.Lock()
        self._watchers: dict[str, int] = {}
        self._max, self._per_peer, self._on_refused = max_watchers, max_per_peer, on_refused

    def Watch(self, request, context, send_response_callback=None):
        from alignd.runtime.auth import peer_ip

        peer = str(peer_ip(context.peer()))
        with self._watch_lock:
            total = sum(self._watchers.values())
            mine = self._watchers.get(peer, 0)
            refused = total >= self._max or mine >= self._per_peer
            if not refused:
                self._watchers[peer] = mine + 1
        if refused:
            if self._on_refused is not None:
                self._on_refused()
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "too many open health Watch streams (server.limits.max_health_watchers); use Check")

        def release():
            with self._watch_lock:
                n = self._watchers.get(peer, 0) - 1
                if n > 0:
                    self._watchers[peer] = n
                else:
                    self._watchers.pop(peer, None)

        context.add_callback(release)
        return super().Watch(request, context, send_response_callback)


class ServiceHost:
    """A gRPC server with health, reflection, metrics and graceful stop."""

    def __init__(
        self,
        role: str,
        cfg: ServerConfig,
        service_names: Iterable[str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.role = role
        self.cfg = cfg
        self.registry = registry or CollectorRegistry()
        self.rpc_metrics = GrpcServerMetrics(self.registry)
        self.service_names = list(service_names)
        self._executor = ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix=f"{role}-rpc")
        interceptors = [ServerInterceptor(self.rpc_metrics)]
        # Shared with other APIs of the role (the reward role's HTTP API); None without server.auth / server.tls.
        self.cert_files = None
        if cfg.tls.enabled:
            from alignd.runtime.tls import CertFiles

            self.cert_files = CertFiles(cfg.tls)  # ConfigError when the files are unusable
        self.authenticator = None
        if cfg.auth.enabled:
            self.authenticator = make_authenticator(role, cfg.auth, self.registry)
        self._m_limited = Counter(
            f"alignd_{role}_calls_limited_total",
            "Calls refused RESOURCE_EXHAUSTED before they were served, by reason (client_concurrency: the caller had "
            "server.limits.max_concurrent_calls_per_client in flight; health_watchers: too many Watch streams).",
            ["reason"], registry=self.registry,
        )
        for reason in ("client_concurrency", "health_watchers"):
            self._m_limited.labels(reason)
        self.exposed_open = not cfg.auth.enabled and not is_loopback_host(cfg.host)
        Gauge(
            f"alignd_{role}_auth_disabled_exposed",
            "1 when the role serves every caller unchecked (server.auth.enabled false) on a non-loopback address.",
            registry=self.registry,
        ).set(1 if self.exposed_open else 0)
        interceptors.append(AccessInterceptor(
            self.authenticator, cfg.limits, cfg.max_message_bytes,
            on_limited=self._m_limited.labels("client_concurrency").inc,
        ))
        if cfg.fault_injection.delay_seconds > 0:
            from alignd.runtime.faults import FaultInterceptor

            interceptors.append(FaultInterceptor(cfg.fault_injection, self.registry))
        self.server = grpc.server(
            self._executor,
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = CappedHealthServicer(
            _health_pool(),
            cfg.limits.max_health_watchers, cfg.limits.max_health_watchers_per_peer,
            on_refused=self._m_limited.labels("health_watchers").inc,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._serving = False
        self._set_health(False)
        self._metrics_http = None
        self.metrics_port: int | None = None
        self.port: int | None = None
        self._stopped = threading.Event()

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
        if self.cfg.metrics_port >= 0:
            self._metrics_http, self.metrics_port = serve_metrics(
                self.registry, self.cfg.metrics_host, self.cfg.metrics_port,
                authorize=self._metrics_authorizer(), tls=self.cfg.tls if self.cfg.metrics_tls else None,
            )
        _log.info(
            "server_started", address=self.address, metrics_url=self.metrics_url,
            tls="mutual" if self.cert_files is not None and self.cert_files.mutual else bool(self.cert_files),
            auth=self.cfg.auth.enabled,
        )
        if self.exposed_open:
            _log.warning("auth_disabled_exposed", address=self.address,
                         hint="server.auth.enabled is false on a non-loopback address: every caller may call every RPC")

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
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        _log.info("server_stopped")
