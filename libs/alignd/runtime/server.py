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
from prometheus_client import CollectorRegistry

from alignd.config import ServerConfig
from alignd.runtime.interceptor import ServerInterceptor
from alignd.runtime.logging import get_logger
from alignd.runtime.metrics import GrpcServerMetrics, serve_metrics

_log = get_logger("alignd.server")


def make_authenticator(role: str, cfg, registry: CollectorRegistry):
    """The bearer-token check of `server.auth` (ConfigError when the tokens file is unusable)."""
    from prometheus_client import Counter

    from alignd.config import ConfigError
    from alignd.runtime.auth import Authenticator, TokenError, TokenFile

    try:
        tokens = TokenFile(cfg.tokens_file)
    except TokenError as exc:
        raise ConfigError(str(exc)) from None
    rejected = Counter(
        f"alignd_{role}_auth_rejected_total", "Calls refused UNAUTHENTICATED, by reason (missing, malformed, unknown).",
        ["reason"], registry=registry,
    )
    for reason in ("missing", "malformed", "unknown"):
        rejected.labels(reason)
    return Authenticator(
        tokens, cfg.public_methods, cfg.trusted_networks, lambda api, reason: rejected.labels(reason).inc()
    )


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
        if cfg.auth.tokens_file:
            from alignd.runtime.auth import AuthInterceptor

            self.authenticator = make_authenticator(role, cfg.auth, self.registry)
            interceptors.append(AuthInterceptor(self.authenticator))
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
        self.health = health.HealthServicer(
            experimental_non_blocking=True,
            experimental_thread_pool=ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{role}-health"),
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
        return f"http://{self.cfg.metrics_host}:{self.metrics_port}/metrics"

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
                self.registry, self.cfg.metrics_host, self.cfg.metrics_port
            )
        _log.info(
            "server_started", address=self.address, metrics_url=self.metrics_url,
            tls="mutual" if self.cert_files is not None and self.cert_files.mutual else bool(self.cert_files),
        )

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
