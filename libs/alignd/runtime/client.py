"""Client helpers: channels with retries for idempotent calls, deadlines, health waits.

Retries are declared in the channel's service config and apply to
UNAVAILABLE only, and only to methods listed as idempotent below. Every call
should pass a `timeout` (the deadline); `DEFAULT_TIMEOUT_SECONDS` is the
fallback used by alignd's own clients.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alignd.runtime.watched import WatchedFiles

DEFAULT_TIMEOUT_SECONDS = 60.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Calls that may run twice without harm. Generate is idempotent from the
# caller's view (a retried sample is just another sample); TrainStep is keyed
# by its step id on the learner. UpdateWeights is a client stream and is
# never retried by the channel.
IDEMPOTENT_METHODS: dict[str, list[str]] = {
    "alignd.v1.PolicyService": ["Generate"],
    "alignd.v1.RewardService": ["Score"],
    "alignd.v1.ReferenceService": ["LogProbs"],
    "alignd.v1.ModelService": ["GetInfo"],
    "alignd.v1.LearnerService": ["TrainStep"],
    # SubmitRanking: resubmitting the same ranking returns the stored record.
    "alignd.v1.CoordinatorService": [
        "GetCoordinatorInfo",
        "GetRun",
        "ListRuns",
        "SubmitRanking",
        "ReleaseComparisonTask",
    ],
    "grpc.health.v1.Health": ["Check"],
}


def service_config(max_attempts: int = 4) -> str:
    names = [{"service": svc, "method": m} for svc, methods in IDEMPOTENT_METHODS.items() for m in methods]
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": names,
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


def _read(field: str, path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def tls_credentials(
    *, root_certificates_file=None, cert_file=None, key_file=None, read: Callable[[str, Any], bytes] = _read
) -> grpc.ChannelCredentials:
    """A client's TLS credentials from PEM files: the CA bundle that signed the server's certificate (None: the
    system's roots), and with cert_file and key_file a client certificate (mutual TLS). `read(field, path)`
    reads one file (the reward client's names the argument in its error)."""
    return grpc.ssl_channel_credentials(
        root_certificates=None
        if root_certificates_file is None
        else read("root_certificates_file", root_certificates_file),
        private_key=None if key_file is None else read("key_file", key_file),
        certificate_chain=None if cert_file is None else read("cert_file", cert_file),
    )


def make_channel(
    address: str, *, retries: bool = True, max_message_bytes: int = MAX_MESSAGE_BYTES, credentials=None
) -> grpc.Channel:
    """A channel to `address` (host:port) with alignd's defaults: plaintext, or with `credentials` (a
    config.RoleClientConfig) TLS / mutual TLS and a bearer token on every call."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1 if retries else 0),
    ]
    if retries:
        options.append(("grpc.service_config", service_config()))
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    if credentials.server_name:
        options.append(("grpc.ssl_target_name_override", credentials.server_name))
    if credentials.ca_file:
        ssl = tls_credentials(
            root_certificates_file=credentials.ca_file, cert_file=credentials.cert_file, key_file=credentials.key_file
        )
        channel = grpc.secure_channel(address, ssl, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if credentials.tokens_file:
        channel = grpc.intercept_channel(
            channel, BearerToken(TokenSource(credentials.tokens_file, credentials.token_name))
        )
    return channel


class TokenSource:
    """The token to send, from a file holding it alone or from a tokens YAML by name; re-read when the file changes
    (alignd.runtime.watched: a rewrite that cannot be read keeps the last good token and is logged once)."""

    def __init__(self, path: str, name: str | None = None) -> None:
        self.path, self.name = path, name
        self._file = WatchedFiles([path], self._read, on_error=self._failed)  # OSError / ValueError: unusable

    def _read(self) -> str:
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
        if self.name is None:
            token = text.strip()
        else:
            import yaml

            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError:
                raise ValueError(f"{self.path}: not YAML") from None
            token = data.get(self.name) if isinstance(data, dict) else None
            if isinstance(token, dict):  # {name: {token, scopes}}: the local stack's tokens file
                token = token.get("token")
            if not isinstance(token, str):
                raise ValueError(f"{self.path}: no token named {self.name!r}")
        if not token:
            raise ValueError(f"{self.path}: empty token")
        return token

    def _failed(self, exc: Exception) -> None:
        from alignd.runtime.logging import get_logger

        get_logger("alignd.client").error("client_token_unreadable", path=self.path, error=str(exc)[:200])

    def token(self) -> str:
        """The current token; after a rewrite that cannot be read, the last good one."""
        return self._file.get()


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a channel (plaintext or TLS)."""

    def __init__(self, source: TokenSource) -> None:
        self.source = source

    def _details(self, details):
        metadata = [*(details.metadata or ()), ("authorization", f"Bearer {self.source.token()}")]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata) -> None:
        self.method, self.timeout, self.credentials = base.method, base.timeout, base.credentials
        self.wait_for_ready, self.compression = (
            getattr(base, "wait_for_ready", None),
            getattr(base, "compression", None),
        )
        self.metadata = metadata


def wait_for_serving(channel: grpc.Channel, service: str = "", timeout: float = 300.0) -> None:
    """Blocks until the health service reports SERVING for `service`.

    Uses the streaming Watch RPC, so it returns as soon as the status changes
    (no polling). Raises TimeoutError after `timeout` seconds.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"service {service!r} not SERVING within {timeout:.0f}s")
        call = None
        try:
            call = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=remaining)
            for resp in call:
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"service {service!r} not SERVING within {timeout:.0f}s") from err
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # too many watchers on the server: poll Check instead
                _poll_check(stub, service, deadline, timeout=timeout)
                return
            if code != grpc.StatusCode.UNAVAILABLE:
                raise
            # Server not up yet: wait for the channel to connect (bounded).
            try:
                grpc.channel_ready_future(channel).result(timeout=min(1.0, max(remaining, 0.01)))
            except grpc.FutureTimeoutError:
                pass
        finally:
            if call is not None:
                call.cancel()  # the server holds a watcher until the stream ends (its Watch streams are capped)


def _poll_check(stub, service: str, deadline: float, *, timeout: float) -> None:
    """wait_for_serving by Check every 0.2 s (when the server refuses another Watch stream)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"service {service!r} not SERVING within {timeout:.0f}s")
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=min(remaining, 5.0))
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def expand_addresses(addresses: list[str], resolve=socket.getaddrinfo) -> list[str]:
    """host:port entries with every replica spelt out: a name that resolves to several IPs (a Kubernetes headless
    Service, one A record per ready pod) becomes one ip:port per address, sorted, so callers can spread work over
    the replicas and reach each one (weight pushes). IP literals, localhost and names that do not resolve (yet)
    are kept as given; duplicates are dropped."""
    out: list[str] = []
    for addr in addresses:
        host, sep, port = addr.rpartition(":")
        if not sep or not port.isdigit():
            out.append(addr)
            continue
        bare = host.strip("[]")
        try:
            ipaddress.ip_address(bare)
            out.append(addr)
            continue
        except ValueError:
            pass
        if bare == "localhost":
            out.append(addr)
            continue
        try:
            infos = resolve(bare, int(port), type=socket.SOCK_STREAM)
        except OSError:
            out.append(addr)
            continue
        ips = sorted({info[4][0] for info in infos})
        if len(ips) <= 1:
            out.append(addr)
        else:
            out.extend(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips)
    return list(dict.fromkeys(out))
