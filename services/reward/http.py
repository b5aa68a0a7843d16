"""The reward role's HTTP API: the protocol of OpenRLHF's remote reward model.

OpenRLHF (`--remote_rm_url http://HOST:PORT/get_reward`) posts
`{"query": [...], "prompts": [...], "labels": [...]}` and reads `rewards`
from the answer `{"rewards": [...], "scores": [...], "extra_logs": {...}}`.
Each query is the prompt and the response decoded together (with special
tokens) by OpenRLHF's tokenizer; `prompts[i]` is the prompt text of
`query[i]`. alignd splits a query into prompt and response like this:

1. Copies of the reward model tokenizer's pad token at either end of the
   query are removed (OpenRLHF decodes left-padded batches with the pads).
2. With `prompts` given: `prompts[i]` (likewise without pad tokens at its
   start) must begin the query; the rest is the response. A query that does
   not start with its prompt is refused (400 naming `prompts[i]`), because
   scoring a wrong split would be silently wrong.
3. Without `prompts` (older OpenRLHF clients send only `query`): the whole
   query is the response, with an empty prompt.

The prompt and the response are then tokenized separately and scored like a
gRPC `Score` text item, through the same batcher: the same input gets the
same score over either API. `labels` is accepted (null, or one entry per
query) and ignored. `rewards` and `scores` are both the scores;
`extra_logs` holds `weight_version` per query (the reward model version that
scored it), a list as OpenRLHF logs them.

Errors are JSON `{"error": MESSAGE, "code": STATUS}` with the HTTP status of
the gRPC code: 400 (INVALID_ARGUMENT, naming the field, e.g. `query[3]`; also
malformed HTTP framing, answered by h11 and the connection closed), 401
(UNAUTHENTICATED, with `WWW-Authenticate: Bearer`), 403 (PERMISSION_DENIED:
a token without the score scope; or mutual TLS without a client
certificate), 404, 405, 408 (headers or body too slow), 411 (no body length),
413 (a body over `http.max_body_bytes`, refused from its Content-Length
before it is read, or counted while a chunked body is read), 415 (not JSON),
429 (RESOURCE_EXHAUSTED, with `Retry-After`), 503 (UNAVAILABLE: loading, or
too many connections), 504 (DEADLINE_EXCEEDED). An answer that leaves a body
unread says `Connection: close`.

Authentication is the gRPC API's: `Authorization: Bearer <token>` of a token
with the `score` scope, checked against `server.auth` (trusted networks give
the score scope without a token) before the body is read. TLS / mutual TLS
come from `server.tls`; under mutual TLS a client without a certificate
completes the handshake but gets 403 on `/get_reward` (`GET /health` still
answers, so that Kubernetes' HTTPS probes work). `GET /health` answers 200
when the role serves, else 503, and needs no token.

The server is uvicorn (h11) with the connection rules of alignd.runtime.http
(a total header timeout, per-IP and global connection caps that slowloris
clients cannot exhaust); the app is starlette. Parsing and scoring run on
worker threads (at most `http.max_concurrent_requests`), /health on the event
loop, so a flood of requests never starves the probes. The JSON nesting depth
is bounded before parsing (`http.max_json_depth`).
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from http import HTTPStatus

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from alignd.runtime.auth import PRINCIPAL
from alignd.runtime.errors import AligndError, DeadlineExceeded, InvalidArgument, Unauthenticated
from alignd.runtime.logging import get_logger
from alignd.runtime.scopes import SCORE
from alignd.services.reward.api import RewardAPI, status_name

_log = get_logger("alignd.reward.http")

GRPC_TO_HTTP = {
    "INVALID_ARGUMENT": HTTPStatus.BAD_REQUEST,
    "UNAUTHENTICATED": HTTPStatus.UNAUTHORIZED,
    "PERMISSION_DENIED": HTTPStatus.FORBIDDEN,
    "FAILED_PRECONDITION": HTTPStatus.BAD_REQUEST,
    "RESOURCE_EXHAUSTED": HTTPStatus.TOO_MANY_REQUESTS,
    "UNAVAILABLE": HTTPStatus.SERVICE_UNAVAILABLE,
    "DEADLINE_EXCEEDED": HTTPStatus.GATEWAY_TIMEOUT,
    "INTERNAL": HTTPStatus.INTERNAL_SERVER_ERROR,
}
TIMEOUT_HEADER = "X-Request-Timeout"  # seconds; lowers http.timeout_seconds for one request


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _strip_pads(text: str, pad: str, *, end: bool = True) -> str:
    """`text` without copies of `pad` at its start (and end): in linear time."""
    i, j, n = 0, len(text), len(pad)
    while text.startswith(pad, i, j):
        i += n
    while end and j - n >= i and text.endswith(pad, i, j):
        j -= n
    return text[i:j]


def split_query(query: str, prompt: str | None, pad: str | None, *, index: int) -> tuple[str, str]:
    """(prompt, response) of one OpenRLHF query (see the module docs)."""
    if pad:
        query = _strip_pads(query, pad)
    if prompt is None:
        return "", query
    if pad:
        prompt = _strip_pads(prompt, pad, end=False)
    if not query.startswith(prompt):
        raise InvalidArgument(f"prompts[{index}]", f"query[{index}] does not start with its prompt")
    return prompt, query[len(prompt) :]


def parse_body(body: bytes) -> tuple[list[str], list[str | None]]:
    """(queries, prompts or Nones) of a /get_reward body; InvalidArgument names the field."""
    try:
        data = json.loads(body)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer beyond Python's digit limit
        raise InvalidArgument("body", f"not JSON ({exc.__class__.__name__}: {str(exc)[:200]})") from None
    except RecursionError:
        raise InvalidArgument("body", "JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidArgument("body", f"must be a JSON object, got {type(data).__name__}")
    queries = data.get("query")
    if not isinstance(queries, list):
        raise InvalidArgument("query", "required: a list of strings (prompt + response, decoded together)")
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise InvalidArgument(f"query[{i}]", f"must be a string, got {type(q).__name__}")
    prompts = data.get("prompts")
    if prompts is None:
        prompts = [None] * len(queries)
    elif not isinstance(prompts, list) or len(prompts) != len(queries):
        raise InvalidArgument("prompts", f"must be null or a list of {len(queries)} strings, one per query")
    for i, p in enumerate(prompts):
        if p is not None and not isinstance(p, str):
            raise InvalidArgument(f"prompts[{i}]", f"must be a string, got {type(p).__name__}")
    labels = data.get("labels")
    if labels is not None and (not isinstance(labels, list) or len(labels) != len(queries)):
        raise InvalidArgument("labels", f"must be null or a list of {len(queries)} entries, one per query")
    return queries, prompts


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # every byte but the brackets: deleted by translate
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def check_json_depth(body: bytes, max_depth: int) -> None:
    """InvalidArgument when `body` nests arrays or objects deeper than `max_depth`, before json.loads builds them.
    Linear: strings are cut out by one regex pass; the bracket walk stops at the first level too deep."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return
    depth = 0
    for c in _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS):
        depth += _DEPTH_STEP[c]
        if depth > max_depth:
            raise InvalidArgument("body", f"JSON nested deeper than {max_depth} levels (http.max_json_depth)")


def _ip(host: str | None):
    try:
        ip = ipaddress.ip_address((host or "").split("%")[0])
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip  # an IPv4 client of a dual-stack socket


def _body_pending(request: Request) -> bool:
    h = request.headers
    return "transfer-encoding" in h or h.get("content-length", "0") not in ("0", "")


class RewardHTTPApp:
    """POST /get_reward and GET /health over the reward role's RewardAPI (the core the gRPC servicer shares).

    authenticator: alignd.runtime.auth.Authenticator or None (auth off); serving() -> bool: the role's health;
    cfg: config.RewardHTTPConfig; mutual_tls: a client certificate is required for /get_reward."""

    def __init__(self, api, cfg, *, authenticator, serving, mutual_tls: bool = False) -> None:
        self.api, self.cfg, self.authenticator, self.serving, self.mutual_tls = (
            api,
            cfg,
            authenticator,
            serving,
            mutual_tls,
        )
        self._limiter: anyio.CapacityLimiter | None = None  # made on the serving loop
        self.app = Starlette(
            routes=[
                Route("/get_reward", self.get_reward, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)

    @staticmethod
    def _json(status: int, payload: dict, headers: dict | None = None) -> Response:
        return Response(
            json.dumps(payload, allow_nan=False), status_code=status, headers=headers, media_type="application/json"
        )

    def _error(self, err: HttpError, body_pending: bool) -> Response:
        headers = {}
        if err.status == HTTPStatus.UNAUTHORIZED:
            headers["WWW-Authenticate"] = "Bearer"
        elif err.status == HTTPStatus.TOO_MANY_REQUESTS:
            headers["Retry-After"] = "1"
        if body_pending:  # the stream cannot be reused: say so (uvicorn closes after such an answer)
            headers["Connection"] = "close"
        return self._json(err.status.value, {"error": err.message, "code": err.code}, headers)

    async def _drain(self, request: Request) -> bool:
        """Reads and drops a small body left on a request answered without it; True when none is left."""
        length = request.headers.get("content-length")
        if "transfer-encoding" in request.headers or length is None or not length.isdigit() or int(length) > 65536:
            return not _body_pending(request)
        try:
            await request.body()
        except ClientDisconnect:
            return False
        return True

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            err = HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                "UNIMPLEMENTED",
                f"{request.method} {request.url.path[:200]}: method not allowed",
            )
        else:
            err = HttpError(
                HTTPStatus.NOT_FOUND, "NOT_FOUND", f"no such path: {request.url.path[:200]}; POST /get_reward"
            )
        return self._error(err, not await self._drain(request))

    async def health(self, request: Request) -> Response:
        """On the event loop: no worker thread, no token; answers while every scoring thread is busy."""
        drained = await self._drain(request)
        serving = self.serving()
        return self._json(
            200 if serving else 503,
            {"status": "SERVING" if serving else "NOT_SERVING"},
            None if drained else {"Connection": "close"},
        )

    async def get_reward(self, request: Request) -> Response:
        started = time.perf_counter()
        api = self.api
        client = None
        pending = _body_pending(request)
        try:
            if self.mutual_tls and not request.scope.get("extensions", {}).get("tls", {}).get("client_cert_chain"):
                raise HttpError(HTTPStatus.FORBIDDEN, "UNAUTHENTICATED", "mutual TLS: a client certificate is required")
            principal = self._authenticate(request)  # before the body: a stranger's body is not read
            client = principal.name if principal is not None else None
            ctype = request.headers.get("content-type", "application/json").split(";", 1)[0].strip().lower()
            if ctype not in ("application/json", ""):
                raise HttpError(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    "INVALID_ARGUMENT",
                    f"Content-Type {ctype!r}: send application/json",
                )
            body = await self._read_body(request)
            pending = False
            timeout = self._timeout(request)
            if self._limiter is None:
                self._limiter = anyio.CapacityLimiter(self.cfg.max_concurrent_requests)
            payload = await anyio.to_thread.run_sync(self._score, body, timeout, principal, limiter=self._limiter)
        except HttpError as err:
            api.observe("http", client, started, code=err.code)
            return self._error(err, pending)
        except AligndError as exc:
            code = status_name(exc)
            api.observe("http", client, started, code=code)
            if not isinstance(exc, Unauthenticated):
                _log.info("http_request_rejected", code=code, error=exc.message)
            return self._error(
                HttpError(GRPC_TO_HTTP.get(code, HTTPStatus.INTERNAL_SERVER_ERROR), code, exc.message), pending
            )
        except ClientDisconnect:  # the client hung up mid-body: nothing to answer
            api.observe("http", client, started, code="CANCELLED")
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - the boundary of the request
            api.observe("http", client, started, code="INTERNAL")
            _log.error("http_request_failed", exc_info=exc)
            return self._error(
                HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "INTERNAL", f"internal error: {type(exc).__name__}"),
                pending,
            )
        api.observe("http", client, started, code="OK", items=len(payload["rewards"]))
        return self._json(200, payload)

    def _authenticate(self, request: Request):
        """The caller (alignd.runtime.auth.Principal) with the score scope; None when authentication is off."""
        auth = self.authenticator
        if auth is None:
            return None
        principal = auth.authenticate(
            request.headers.get("authorization"), _ip(request.client.host if request.client else None), api="http"
        )
        auth.authorize(principal, SCORE, "/get_reward", api="http")
        return principal

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_body_bytes
        length = request.headers.get("content-length")
        if length is None and "transfer-encoding" not in request.headers:
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "INVALID_ARGUMENT", "Content-Length is required")
        if length is not None and int(length) > limit:  # h11 checked that it is one decimal number
            raise HttpError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "INVALID_ARGUMENT",
                f"body of {length} bytes; at most {limit} (http.max_body_bytes)",
            )
        chunks, n = [], 0
        try:
            with anyio.fail_after(self.cfg.body_timeout_seconds):
                async for chunk in request.stream():
                    n += len(chunk)
                    if n > limit:  # a chunked body: counted while it is read
                        raise HttpError(
                            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            "INVALID_ARGUMENT",
                            f"body over {limit} bytes (http.max_body_bytes)",
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise HttpError(
                HTTPStatus.REQUEST_TIMEOUT,
                "DEADLINE_EXCEEDED",
                f"body not received within {self.cfg.body_timeout_seconds:g} s",
            ) from None
        return b"".join(chunks)

    def _timeout(self, request: Request) -> float:
        timeout = self.cfg.timeout_seconds
        asked = request.headers.get(TIMEOUT_HEADER)
        if asked is not None:
            try:
                value = float(asked)
            except ValueError:
                raise InvalidArgument(TIMEOUT_HEADER, "not a number of seconds") from None
            if not value > 0:
                raise InvalidArgument(TIMEOUT_HEADER, "must be > 0 seconds")
            timeout = min(timeout, value)
        return timeout

    def _score(self, body: bytes, timeout: float, principal) -> dict:
        """On a worker thread: parse, check and score (the batcher's wait blocks)."""
        token = PRINCIPAL.set(principal)
        try:
            api = self.api
            deadline = time.perf_counter() + timeout
            check_json_depth(body, self.cfg.max_json_depth)
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
        finally:
            PRINCIPAL.reset(token)


def start_http(cfg, server_cfg, api: RewardAPI, *, host_obj, registry=None):
    """Binds and serves the HTTP API (cfg: RewardHTTPConfig) on its own thread; returns the running HTTPServer."""
    from alignd.config import ConfigError
    from alignd.runtime.http import ConnectionPolicy, HTTPServer, reloading_ssl_context

    ssl_context = None
    mutual = False
    if host_obj.cert_files is not None:
        from alignd.runtime.tls import HttpTLS

        ssl_context = reloading_ssl_context(HttpTLS(host_obj.cert_files))
        mutual = host_obj.cert_files.mutual
    app = RewardHTTPApp(
        api, cfg, authenticator=host_obj.authenticator, serving=lambda: host_obj.serving, mutual_tls=mutual
    )
    policy = ConnectionPolicy(
        header_timeout=cfg.header_timeout_seconds,
        max_connections=cfg.max_connections,
        max_per_ip=cfg.max_connections_per_client,
        exempt=tuple(ipaddress.ip_network(n, strict=False) for n in cfg.connection_cap_exempt_networks),
    )
    if registry is not None:
        from prometheus_client import Counter

        refused = Counter(
            "alignd_reward_http_connections_refused_total",
            "HTTP connections refused or closed by the connection rules, by reason (refused_per_ip, "
            "refused_full, evicted: a connection waiting for headers made room; header_timeouts).",
            ["reason"],
            registry=registry,
        )
        for reason in ("refused_per_ip", "refused_full", "evicted", "header_timeouts"):
            refused.labels(reason)
        policy.on_event = lambda reason: refused.labels(reason).inc()
    host = cfg.host or server_cfg.host
    try:
        server = HTTPServer(
            app,
            host,
            cfg.port,
            policy=policy,
            ssl_context=ssl_context,
            keep_alive_seconds=cfg.idle_timeout_seconds,
            graceful_seconds=server_cfg.grace_seconds,
            name="reward-http",
        )
    except OSError as exc:
        raise ConfigError(f"http.port: cannot bind {host}:{cfg.port} ({exc.strerror or exc})") from None
    server.start()
    _log.info("http_server_started", url=server.url)
    return server
