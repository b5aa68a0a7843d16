"""Bearer-token authentication of a role's gRPC API (the reward service's, first of all).

Callers send `authorization: Bearer <token>` metadata. The tokens live in
one YAML file of named tokens, `{name: token, ...}` (in Kubernetes a mounted
Secret: the chart's `rewardAuth`), configured as `server.auth.tokens_file`.
The file is re-read when it changes (its mtime, size or inode; checked on
each call), so tokens are added, rotated and revoked by rewriting the file,
without a restart: a token removed from the file is refused from the next
call on. A rewrite that does not parse keeps the tokens of the last good
version (logged `auth_tokens_invalid`); a file that cannot be read at start
is a configuration error.

A call gets UNAUTHENTICATED (never reaching the servicer) for a missing
header, a malformed one, or a token that is not in the file. Exempt, by
configuration only: `public_methods` (by default the gRPC health checks,
which Kubernetes probes send without credentials) and callers from
`trusted_networks` (CIDRs, by default none: e.g. the pod network of the
coordinator inside the cluster). The token's name (never the token) goes into
the log context as `client`. Tokens are compared in constant time.
"""

from __future__ import annotations

import contextlib
import contextvars
import hmac
import ipaddress
import os
import threading
from pathlib import Path

import grpc
import structlog
import yaml

from alignd.runtime.errors import Unauthenticated
from alignd.runtime.interceptor import rewrap
from alignd.runtime.logging import get_logger

_log = get_logger("alignd.auth")

AUTH_KEY = "authorization"
HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")


class TokenError(ValueError):
    """The tokens file cannot be read or is not a mapping of names to tokens."""


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """{name: token} from the YAML text of a tokens file; TokenError names what is wrong."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TokenError(f"{source}: not YAML ({exc.__class__.__name__})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TokenError(f"{source}: must be a mapping of names to tokens, got {type(data).__name__}")
    seen: dict[str, str] = {}
    for name, token in data.items():
        if not isinstance(name, str) or not name:
            raise TokenError(f"{source}: token names must be non-empty strings, got {name!r}")
        if not isinstance(token, str) or len(token) < 16 or token != token.strip():
            raise TokenError(f"{source}: the token of {name!r} must be a string of at least 16 characters without surrounding spaces")
        if token in seen:
            raise TokenError(f"{source}: {name!r} and {seen[token]!r} have the same token")
        seen[token] = name
    return {name: token for token, name in seen.items()}


class TokenFile:
    """The named tokens of one file, reloaded when the file changes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(os.path.expandvars(os.path.expanduser(str(path))))
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._names: list[tuple[str, bytes]] = []  # (name, token)
        try:
            self._load(self._stat())
        except (OSError, TokenError) as exc:
            raise TokenError(f"server.auth.tokens_file: {exc}") from None

    def _stat(self) -> tuple:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, signature: tuple) -> None:
        tokens = parse_tokens(self.path.read_text(), str(self.path))
        self._names = [(name, token.encode()) for name, token in tokens.items()]
        self._signature = signature
        _log.info("auth_tokens_loaded", path=str(self.path), names=sorted(tokens))

    def refresh(self) -> None:
        """Re-reads the file if it changed; keeps the last good tokens if the new version is bad."""
        try:
            signature = self._stat()
        except OSError as exc:
            with self._lock:
                if self._signature is not None:
                    _log.error("auth_tokens_unreadable", path=str(self.path), error=str(exc))
                    self._signature = None  # log once; the last good tokens stay
            return
        if signature == self._signature:
            return
        with self._lock:
            if signature == self._signature:
                return
            try:
                self._load(signature)
            except (OSError, TokenError) as exc:
                self._signature = signature  # do not re-parse a bad version on every call
                _log.error("auth_tokens_invalid", path=str(self.path), error=str(exc))

    def name_of(self, token: str) -> str | None:
        """The name of `token`, or None; every known token is compared (constant time per token)."""
        self.refresh()
        given = token.encode()
        found = None
        for name, known in self._names:
            if hmac.compare_digest(given, known):
                found = name
        return found


def peer_ip(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a gRPC peer string ("ipv4:10.0.0.5:4321", "ipv6:[::1]:4321"); None for unix sockets etc."""
    try:
        if peer.startswith("ipv4:"):
            return ipaddress.ip_address(peer[5:].rsplit(":", 1)[0])
        if peer.startswith("ipv6:"):
            return ipaddress.ip_address(peer[5:].rsplit(":", 1)[0].strip("[]").split("%")[0])
    except ValueError:
        return None
    return None


# The authenticated caller's name during a call (the token's name; "trusted-network"; None without authentication),
# for per-client metrics. Set by AuthInterceptor around the handler, and by the HTTP API around its request.
CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("alignd_client", default=None)


class Authenticator:
    """The token check shared by the gRPC interceptor and the reward role's HTTP API."""

    def __init__(self, tokens: TokenFile, public_methods=HEALTH_METHODS, trusted_networks=(), on_reject=None) -> None:
        self.tokens = tokens
        self.public = frozenset(public_methods)
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in trusted_networks]
        # on_reject(api, reason) for each refusal; more listeners may be appended (the reward role's metrics).
        self.listeners = [on_reject] if on_reject else []

    def _reject(self, api: str, reason: str, message: str) -> Unauthenticated:
        for listener in self.listeners:
            listener(api, reason)
        return Unauthenticated(message)

    def authenticate(self, header: str | None, ip, api: str = "grpc") -> str:
        """The caller's name, from its `authorization` header value and its IP; Unauthenticated otherwise."""
        if header is None:
            if ip is not None and any(ip in net for net in self.trusted):
                return "trusted-network"
            raise self._reject(api, "missing", "missing credentials: send 'authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise self._reject(api, "malformed", "malformed authorization: expected 'Bearer <token>'")
        name = self.tokens.name_of(token.strip())
        if name is None:
            raise self._reject(api, "unknown", "unknown or revoked token")
        return name


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a valid bearer token (see the module docs); place it after the request interceptor,
    which turns the Unauthenticated error into the status and counts it."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in self.authenticator.public:
            return handler
        header = dict(handler_call_details.invocation_metadata or ()).get(AUTH_KEY)
        authenticate = self.authenticator.authenticate

        @contextlib.contextmanager
        def as_client(context):
            name = authenticate(header, peer_ip(context.peer()))
            log_tokens = structlog.contextvars.bind_contextvars(client=name)
            token = CLIENT.set(name)
            try:
                yield
            finally:
                CLIENT.reset(token)
                structlog.contextvars.reset_contextvars(**log_tokens)

        def unary(behavior):
            def run(request_or_iterator, context):
                with as_client(context):
                    return behavior(request_or_iterator, context)

            return run

        def streaming(behavior):
            def run(request_or_iterator, context):
                with as_client(context):
                    yield from behavior(request_or_iterator, context)

            return run

        return rewrap(handler, unary, streaming)
