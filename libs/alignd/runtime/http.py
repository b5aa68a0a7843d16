"""Serving an ASGI app over HTTP/1.1 with uvicorn (h11), hardened for callers that misbehave (docs/security.md).

uvicorn parses HTTP and runs the connections on one event loop thread (an idle or trickling connection costs a
few KB, not a thread). What it lacks, this module adds through a subclass of its h11 protocol:

* A total header timeout: from the accept, or from the end of the previous answer, to the end of the request's
  headers (`header_timeout`). uvicorn's keep-alive timer is armed only after an answer and cancelled by any byte
  received, so a client trickling a header byte a second (slowloris) would otherwise stay forever.
* A per-client-IP connection cap (`max_per_ip`), and a global cap (`max_connections`) that a slowloris cannot
  exhaust: at the cap a new connection evicts the connection that has waited longest for its request headers,
  and is refused 503 only when every connection is inside a request. So /health answers new callers (probes)
  while attackers hold connections.
* TCP_NODELAY on every connection (asyncio sets it only for sockets made with proto IPPROTO_TCP; with Nagle and
  delayed ACKs each keep-alive answer waited 40 ms: bench/README.md).
* The verified TLS client certificate in the ASGI scope (`scope["extensions"]["tls"]["client_cert_chain"]`).
* uvicorn's and asyncio's log records as structlog JSON events, never a bare traceback on stderr (a client that
  hangs up mid-request is an event, not an error).

What the subclass touches of uvicorn's own code: `H11Protocol.on_response_complete` (internal) and the
attributes `conn`, `client`, `transport`, `loop` and `app` of H11Protocol; uvicorn is pinned, and
tests/test_reward_http.py and tests/security cover each behaviour. Measured against the hand-written threaded
server it replaces: bench/reward_http_servers.py, bench/results/reward_http_servers.json.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from alignd.runtime.logging import get_logger

_log = get_logger("alignd.http")


@dataclass
class ConnectionPolicy:
    """Connection limits of one server, shared by its connections; used on the event loop's thread only."""

    header_timeout: float = 10.0
    max_connections: int = 1024
    max_per_ip: int = 64
    exempt: tuple = ()  # networks (ipaddress) not capped per IP: an ingress, the kubelet
    count: int = 0
    per_ip: dict[str, int] = field(default_factory=dict)
    # Connections waiting for request headers, oldest first (dicts keep insertion order).
    waiting: dict[Any, float] = field(default_factory=dict)
    stats: dict[str, int] = field(
        default_factory=lambda: {
            "accepted": 0,
            "refused_per_ip": 0,
            "refused_full": 0,
            "evicted": 0,
            "header_timeouts": 0,
        }
    )
    on_event: Any = None  # on_event(name): a refusal, eviction or timeout (metrics)

    def _event(self, name: str) -> None:
        self.stats[name] += 1
        if self.on_event is not None:
            try:
                self.on_event(name)
            except Exception:  # noqa: BLE001 - metrics must not break serving
                pass

    def _exempt(self, ip: str | None) -> bool:
        if ip is None or not self.exempt:
            return False
        try:
            addr = ipaddress.ip_address(ip.split("%")[0])
        except ValueError:
            return False
        addr = getattr(addr, "ipv4_mapped", None) or addr
        return any(addr in net for net in self.exempt)

    def admit(self, conn: GuardedH11Protocol, ip: str | None) -> str | None:
        """None when `conn` may stay (it is counted), else why it is refused."""
        if ip is not None and not self._exempt(ip) and self.per_ip.get(ip, 0) >= self.max_per_ip:
            self._event("refused_per_ip")
            return "too many connections from this address"
        if self.count >= self.max_connections:
            victim = next(iter(self.waiting), None)
            if victim is None:  # every connection is inside a request: refuse the newcomer
                self._event("refused_full")
                return "too many connections"
            self._event("evicted")
            victim.close_quietly()
        self.count += 1
        if ip is not None:
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        conn.counted_ip, conn.counted = ip, True
        self.stats["accepted"] += 1
        return None

    def release(self, conn: GuardedH11Protocol) -> None:
        """Idempotent: an eviction releases at once, connection_lost (later) again."""
        self.waiting.pop(conn, None)
        if conn.counted:
            conn.counted = False
            self.count -= 1
            ip = conn.counted_ip
            if ip is not None:
                left = self.per_ip.get(ip, 1) - 1
                if left > 0:
                    self.per_ip[ip] = left
                else:
                    self.per_ip.pop(ip, None)


def raw_response(status: HTTPStatus, code: str, message: str) -> bytes:
    """A JSON error written straight to the transport (no request was parsed, so h11 cannot frame it)."""
    body = json.dumps({"error": message, "code": code}).encode()
    return (
        f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a ConnectionPolicy (`config.connection_policy`) and the ASGI TLS extension."""

    counted = False
    counted_ip: str | None = None
    _header_timer: asyncio.TimerHandle | None = None

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.policy: ConnectionPolicy = config.connection_policy

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._add_tls_extension(ssl_object)
        refused = self.policy.admit(self, self.client[0] if self.client else None)
        if refused is not None:
            if not transport.is_closing():
                transport.write(raw_response(HTTPStatus.SERVICE_UNAVAILABLE, "UNAVAILABLE", refused + "; retry later"))
                transport.close()
            return
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Headers complete: h11 parsed a Request and the answer is not sent yet.
        if self._header_timer is not None and self.conn.our_state is h11.SEND_RESPONSE:
            self._headers_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_done()
        self.policy.release(self)
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.our_state is h11.SEND_RESPONSE:  # a pipelined request was parsed already
            self._headers_done()
        else:
            self._await_headers()

    def _await_headers(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.policy.header_timeout, self._header_timed_out)
        self.policy.waiting.pop(self, None)
        self.policy.waiting[self] = self.loop.time()

    def _headers_done(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self.policy.waiting.pop(self, None)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        self.policy.waiting.pop(self, None)
        if self.transport.is_closing():
            return
        self.policy._event("header_timeouts")
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:
            self.transport.write(
                raw_response(
                    HTTPStatus.REQUEST_TIMEOUT,
                    "DEADLINE_EXCEEDED",
                    f"request headers not received within {self.policy.header_timeout:g} s",
                )
            )
        self.transport.close()

    def close_quietly(self) -> None:
        """Eviction: drops a connection that waits for request headers (nothing is in flight on it)."""
        self._headers_done()
        self.policy.release(self)
        if not self.transport.is_closing():
            self.transport.close()

    def _add_tls_extension(self, ssl_object) -> None:
        der = ssl_object.getpeercert(binary_form=True)  # only a certificate that verified (CERT_OPTIONAL)
        tls = {
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
            "client_cert_name": None,
            "client_cert_error": None,
            "server_cert": None,
            "tls_version": None,
            "cipher_suite": None,
        }
        inner = self.app  # config.loaded_app, read by H11Protocol.handle_events for each request

        async def app(scope, receive, send):
            scope["extensions"] = {**(scope.get("extensions") or {}), "tls": tls}
            await inner(scope, receive, send)

        self.app = app


class StructlogBridge(logging.Handler):
    """Forwards stdlib log records (uvicorn's, asyncio's) to structlog JSON; a hang-up loses its traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = get_logger(record.name)
            kw: dict[str, Any] = {"message": record.getMessage()[:500]}
            exc = record.exc_info[1] if record.exc_info else None
            if isinstance(exc, (ConnectionError, TimeoutError, ssl.SSLError)):
                kw["error"] = repr(exc)[:300]
            elif record.exc_info:
                kw["exc_info"] = record.exc_info
            level = record.levelname.lower()
            getattr(log, level if level in ("debug", "info", "warning", "error", "critical") else "info")(
                "http_server_log", **kw
            )
        except Exception:  # noqa: BLE001 - logging must not raise
            pass


def install_log_bridge() -> None:
    bridge = StructlogBridge()
    for name, level in (("uvicorn", logging.INFO), ("asyncio", logging.WARNING)):
        lg = logging.getLogger(name)
        lg.handlers[:] = [bridge]
        lg.propagate = False  # never the root logger / logging.lastResort (plain text on stderr)
        lg.setLevel(level)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (proto IPPROTO_TCP, so that asyncio sets TCP_NODELAY on its connections too)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    family = infos[0][0] if infos else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(infos[0][4] if infos else (host, port))
    sock.listen(1024)
    return sock


def reloading_ssl_context(http_tls) -> ssl.SSLContext:
    """An SSLContext serving the current certificates of `http_tls` (alignd.runtime.tls.HttpTLS): uvicorn hands one
    context to the event loop once, so each handshake switches its SSLObject to HttpTLS.context() in the SNI
    callback (called with or without SNI); rewritten certificate files serve new connections without a restart."""
    front = http_tls.context()

    def switch(ssl_object, _server_name, _ctx):
        current = http_tls.context()  # stats the files; rebuilds the context when they changed
        if ssl_object.context is not current:
            ssl_object.context = current
        return None

    front.sni_callback = switch
    return front


class HTTPServer:
    """uvicorn serving `app` on a socket bound here, on a thread with its own event loop."""

    def __init__(
        self,
        app,
        host: str,
        port: int,
        *,
        policy: ConnectionPolicy,
        ssl_context: ssl.SSLContext | None = None,
        keep_alive_seconds: float = 30.0,
        graceful_seconds: float = 5.0,
        name: str = "http",
    ) -> None:
        install_log_bridge()
        self.sock = bind(host, port)
        self.tls = ssl_context is not None
        config = uvicorn.Config(
            app,
            http=GuardedH11Protocol,
            loop="asyncio",
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,  # uvicorn's default dictConfig would take over logging
            access_log=False,
            proxy_headers=False,  # proxy_headers would trust X-Forwarded-For from loopback
            server_header=False,
            date_header=False,
            timeout_keep_alive=max(1, int(keep_alive_seconds)),
            timeout_graceful_shutdown=max(1, int(graceful_seconds)),
            h11_max_incomplete_event_size=16 * 1024,
            backlog=1024,
            ssl_context_factory=(lambda _cfg, _default: ssl_context) if ssl_context is not None else None,
        )
        config.connection_policy = policy  # read by GuardedH11Protocol
        self.policy = policy
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name=name, daemon=True)

    def start(self, timeout: float = 30.0) -> HTTPServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True  # polled by uvicorn's main loop every 0.1 s
        self.thread.join(timeout)
