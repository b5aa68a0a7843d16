"""The reward role's HTTP server before alignd moved to uvicorn: a frozen copy, kept as the baseline of
bench/reward_http_servers.py (the measurement behind that move). Not used by alignd.

A thread per connection (socketserver.ThreadingHTTPServer), at most `max_connections` at once; the handler is
services/reward/http.py's RewardHTTPHandler of commit 7bf8b8d, verbatim but for these imports.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog

from alignd.runtime.auth import PRINCIPAL
from alignd.runtime.errors import AligndError, DeadlineExceeded, InvalidArgument, Unauthenticated
from alignd.runtime.logging import get_logger
from alignd.runtime.scopes import SCORE
from alignd.services.reward.api import RewardAPI, status_name
from alignd.services.reward.http import GRPC_TO_HTTP, TIMEOUT_HEADER, HttpError, parse_body, split_query

_log = get_logger("bench.stdlib_reward_http")


class RewardHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once; TLS handshakes run on the connection's
    thread, not the accept loop."""

    daemon_threads = True
    block_on_close = False  # server_close() must not wait for idle keep-alive connections (shutdown grace)
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address,
        api: RewardAPI,
        *,
        authenticator,
        tls,
        serving,
        max_body_bytes: int,
        max_connections: int,
        timeout_seconds: float,
        idle_timeout_seconds: float,
    ) -> None:
        self.api = api
        self.authenticator = authenticator  # alignd.runtime.auth.Authenticator or None
        self.tls = tls  # alignd.runtime.tls.HttpTLS or None
        self.serving = serving  # () -> bool
        self.max_body_bytes = max_body_bytes
        self.timeout_seconds = timeout_seconds
        self.idle_timeout_seconds = idle_timeout_seconds
        self._slots = threading.BoundedSemaphore(max_connections)
        host = address[0]
        try:
            if ipaddress.ip_address(host.strip("[]")).version == 6:
                self.address_family = socket.AF_INET6
        except ValueError:
            pass
        super().__init__(address, RewardHTTPHandler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            _log.warning("http_connection_refused", reason="max_connections")
            if self.tls is None:  # under TLS a plaintext answer would be noise: just close
                try:
                    request.sendall(
                        _plain_response(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections; retry later")
                    )
                except OSError:
                    pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            request.settimeout(self.idle_timeout_seconds)
            if self.tls is not None:
                try:
                    request = self.tls.context().wrap_socket(request, server_side=True)
                except (OSError, ValueError) as exc:  # handshake refused (no client certificate, bad TLS)
                    _log.info("http_tls_handshake_failed", error=type(exc).__name__)
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls is not None else 'http'}://{host}:{port}"


def _plain_response(status: HTTPStatus, message: str) -> bytes:
    body = json.dumps({"error": message, "code": "UNAVAILABLE"}).encode()
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class RewardHTTPHandler(BaseHTTPRequestHandler):
    server: RewardHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive: OpenRLHF's requests sessions reuse connections
    server_version = "alignd-reward"
    sys_version = ""

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature; requests are logged as events
        pass

    def _send_json(self, status: HTTPStatus, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload, allow_nan=False).encode()
        self.send_response(status.value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, err: HttpError) -> None:
        headers = {}
        if err.status == HTTPStatus.UNAUTHORIZED:
            headers["WWW-Authenticate"] = "Bearer"
        elif err.status == HTTPStatus.TOO_MANY_REQUESTS:
            headers["Retry-After"] = "1"
        if not self._body_read:
            # The body was not read: the stream cannot be reused. Say so, so the client does not reuse it.
            self.close_connection = True
            headers["Connection"] = "close"
        self._send_json(err.status, {"error": err.message, "code": err.code}, headers)

    # ---- framing: one check for every method, before anything reads or routes ------------------------------------

    _body_read = True  # False while a request's body (if any) is still on the stream
    _length = 0  # the request's Content-Length

    def _framing(self) -> bool:
        """Checks the body framing of any request; answers and closes (False) when it cannot be trusted.

        A body is framed by one Content-Length only: chunked (or any other) transfer encodings, several
        Content-Length headers and values that are not plain digits are refused, and the connection is closed,
        so that nothing left on the stream is ever read as the next request."""
        self._body_read, self._length = True, 0
        problem = None
        if any(v.strip().lower() not in ("", "identity") for v in self.headers.get_all("Transfer-Encoding") or ()):
            problem = (HTTPStatus.LENGTH_REQUIRED, "Transfer-Encoding: only bodies with a Content-Length are accepted")
        lengths = self.headers.get_all("Content-Length") or []
        if problem is None and len(lengths) > 1:
            problem = (HTTPStatus.BAD_REQUEST, "Content-Length: given more than once")
        if problem is None and lengths:
            if not re.fullmatch(r"[0-9]{1,18}", lengths[0].strip()):
                problem = (HTTPStatus.BAD_REQUEST, "Content-Length: not a number")
            else:
                self._length = int(lengths[0].strip())
                self._body_read = self._length == 0
        if problem is not None:
            self._body_read = False
            self._send_error(HttpError(problem[0], "INVALID_ARGUMENT", problem[1]))
            return False
        return True

    def _drain(self) -> None:
        """Reads and drops the body of a request that is answered without it (small bodies; else the
        connection closes after the answer)."""
        if not self._body_read and self._length <= 65536:
            if len(self.rfile.read(self._length)) == self._length:
                self._body_read = True

    def do_GET(self):
        if not self._framing():
            return
        self._drain()
        if self.path.split("?", 1)[0] == "/health":
            serving = self.server.serving()
            self._send_json(
                HTTPStatus.OK if serving else HTTPStatus.SERVICE_UNAVAILABLE,
                {"status": "SERVING" if serving else "NOT_SERVING"},
                None if self._body_read else {"Connection": "close"},
            )
            self.close_connection = self.close_connection or not self._body_read
            return
        self._route_error("GET")

    def _route_error(self, method: str) -> None:
        self._drain()
        if self.path.split("?", 1)[0] in ("/get_reward", "/health"):
            self._send_error(
                HttpError(
                    HTTPStatus.METHOD_NOT_ALLOWED, "UNIMPLEMENTED", f"{method} {self.path[:200]}: method not allowed"
                )
            )
        else:
            self._send_error(
                HttpError(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"no such path: {self.path[:200]}; POST /get_reward")
            )

    def do_PUT(self):
        if self._framing():
            self._route_error("PUT")

    def do_DELETE(self):
        if self._framing():
            self._route_error("DELETE")

    def do_POST(self):
        if not self._framing():
            return
        if self.path.split("?", 1)[0] != "/get_reward":
            self._route_error("POST")
            return
        started = time.perf_counter()
        api = self.server.api
        client = None
        log_tokens = structlog.contextvars.bind_contextvars(api="http", http_path="/get_reward")
        try:
            tls = self.server.tls
            if tls is not None and not tls.client_verified(self.connection):
                raise HttpError(HTTPStatus.FORBIDDEN, "UNAUTHENTICATED", "mutual TLS: a client certificate is required")
            principal = self._authenticate()  # before reading the body: a stranger's body is not read
            client = principal.name if principal is not None else None
            body = self._read_body()
            token = PRINCIPAL.set(principal)
            try:
                structlog.contextvars.bind_contextvars(client=client)
                payload = self._score(body)
            finally:
                PRINCIPAL.reset(token)
        except HttpError as err:
            api.observe("http", client, started, code=err.code)
            self._send_error(err)
        except AligndError as exc:
            code = status_name(exc)
            api.observe("http", client, started, code=code)
            if not isinstance(exc, Unauthenticated):
                _log.info("http_request_rejected", code=code, error=exc.message)
            self._send_error(HttpError(GRPC_TO_HTTP.get(code, HTTPStatus.INTERNAL_SERVER_ERROR), code, exc.message))
        except (TimeoutError, ConnectionError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - the boundary of the request
            api.observe("http", client, started, code="INTERNAL")
            _log.error("http_request_failed", exc_info=exc)
            self._send_error(
                HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "INTERNAL", f"internal error: {type(exc).__name__}")
            )
        else:
            api.observe("http", client, started, code="OK", items=len(payload["rewards"]))
            self._send_json(HTTPStatus.OK, payload)
        finally:
            structlog.contextvars.reset_contextvars(**log_tokens)
            structlog.contextvars.unbind_contextvars("client")

    def _read_body(self) -> bytes:
        if not self.headers.get_all("Content-Length"):
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "INVALID_ARGUMENT", "Content-Length is required")
        n = self._length
        if n > self.server.max_body_bytes:
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "INVALID_ARGUMENT",
                f"body of {n} bytes; at most {self.server.max_body_bytes} (server.max_message_bytes)",
            )
        ctype = self.headers.get("Content-Type", "application/json").split(";", 1)[0].strip().lower()
        body = self.rfile.read(n)
        if len(body) != n:
            raise ConnectionError("the body ended early")
        self._body_read = True
        if ctype not in ("application/json", ""):
            raise HttpError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "INVALID_ARGUMENT", f"Content-Type {ctype!r}: send application/json"
            )
        return body

    def _authenticate(self):
        """The caller (alignd.runtime.auth.Principal) with the score scope; None when authentication is off."""
        auth = self.server.authenticator
        if auth is None:
            return None
        try:
            ip = ipaddress.ip_address(self.client_address[0].split("%")[0])
            ip = getattr(ip, "ipv4_mapped", None) or ip  # an IPv4 client of a dual-stack socket
        except ValueError:
            ip = None
        principal = auth.authenticate(self.headers.get("Authorization"), ip, api="http")
        auth.authorize(principal, SCORE, "/get_reward", api="http")
        return principal

    def _timeout(self) -> float:
        timeout = self.server.timeout_seconds
        asked = self.headers.get(TIMEOUT_HEADER)
        if asked is not None:
            try:
                value = float(asked)
            except ValueError:
                raise InvalidArgument(TIMEOUT_HEADER, "not a number of seconds") from None
            if not value > 0:
                raise InvalidArgument(TIMEOUT_HEADER, "must be > 0 seconds")
            timeout = min(timeout, value)
        return timeout

    def _score(self, body: bytes) -> dict:
        api = self.server.api
        deadline = time.perf_counter() + self._timeout()
        queries, prompts = parse_body(body)
        api.check_count(len(queries), "query")
        state = api.loaded.get()
        handle = state.handle
        pad = handle.tokenizer.pad_token if isinstance(handle.tokenizer.pad_token, str) else None
        pairs = []
        for i, (query, prompt) in enumerate(zip(queries, prompts)):
            api.text_ids_size(query, f"query[{i}]")  # the limit applies to the query as sent, before any work
            if prompt is not None:
                api.text_ids_size(prompt, f"prompts[{i}]")
            p, r = split_query(query, prompt, pad, index=i)
            pairs.append(
                api.text_pair(
                    handle, p, r, field=f"query[{i}]", prompt_field=f"prompts[{i}]", response_field=f"query[{i}]"
                )
            )
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise DeadlineExceeded("the deadline passed while the request was read and checked")
        scores, version = api.score(state, pairs, remaining)
        return {"rewards": scores, "scores": scores, "extra_logs": {"weight_version": [version] * len(scores)}}
