"""Bearer-token authentication and scope authorisation of a role's APIs (docs/security.md).

Callers send `authorization: Bearer <token>` metadata (gRPC) or header
(HTTP). A role checks it against one YAML file of named tokens,
`server.auth.tokens_file` (in Kubernetes a mounted Secret; on the local
stack the file `alignd up` generates), each entry one of:

    scorer: "the-token"                       # a bare token: scope `score` only
    coordinator:
      token: "the-token"                      # the token itself, or
      sha256: "hex digest of the token"       # only its SHA-256 (the role never holds it)
      scopes: [generate, score, logprobs, train, weights]

Scopes are those of alignd.runtime.scopes; `admin` grants every one. The file
is re-read when it changes (mtime, size or inode; checked on each call), so
tokens are added, rotated and revoked by rewriting it, without a restart. A
rewrite that does not parse keeps the tokens of the last good version
(logged `auth_tokens_invalid`); a file that cannot be read at start is a
configuration error.

A call without a valid token gets UNAUTHENTICATED (missing header, malformed
header, unknown token); a token without the method's scope gets
PERMISSION_DENIED naming the scope. Exempt, by configuration only: the
public methods (the gRPC health checks) and callers from `trusted_networks`
(CIDRs, none by default), which get the `score` scope and nothing else (the
OpenRLHF client sends no token). The token's name (never the token) goes
into the log context as `client`. Tokens are compared in constant time.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from alignd.runtime import scopes as S
from alignd.runtime.errors import PermissionDenied, Unauthenticated
from alignd.runtime.logging import get_logger
from alignd.runtime.watched import WatchedFiles

_log = get_logger("alignd.auth")

AUTH_KEY = "authorization"
HEALTH_METHODS = S.HEALTH_METHODS
TRUSTED_NETWORK = "trusted-network"
MIN_TOKEN_CHARS = 16
REJECT_REASONS = ("missing", "malformed", "unknown", "scope")


class TokenError(ValueError):
    """The tokens file cannot be read or is not a mapping of names to token entries."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's name and the scopes it carries."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in (S.ANY, S.PUBLIC) or S.ADMIN in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class TokenEntry:
    name: str
    digest: bytes  # SHA-256 of the token: what is compared (constant time)
    scopes: frozenset[str]


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _entry(name, value, source: str) -> TokenEntry:
    where = f"{source}: {name!r}"
    if isinstance(value, str):  # a bare token: a scoring client (the least privilege)
        value = {"token": value, "scopes": [S.SCORE]}
    if not isinstance(value, dict):
        raise TokenError(f"{where}: must be a token string or a mapping with token (or sha256) and scopes")
    unknown = set(value) - {"token", "sha256", "scopes"}
    if unknown:
        raise TokenError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    token, sha = value.get("token"), value.get("sha256")
    if (token is None) == (sha is None):
        raise TokenError(f"{where}: give exactly one of token and sha256")
    if token is not None:
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS or token != token.strip():
            raise TokenError(
                f"{where}: the token must be a string of at least {MIN_TOKEN_CHARS} characters "
                "without surrounding spaces"
            )
        digest = token_digest(token)
    else:
        try:
            digest = bytes.fromhex(sha) if isinstance(sha, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise TokenError(f"{where}: sha256 must be 64 hex digits (the SHA-256 of the token)")
    raw_scopes = value.get("scopes")
    if not isinstance(raw_scopes, list) or not raw_scopes or not all(isinstance(s, str) for s in raw_scopes):
        raise TokenError(f"{where}: scopes must be a non-empty list of scope names ({', '.join(S.SCOPES)})")
    try:
        scopes = S.check_scopes(raw_scopes, where)
    except ValueError as exc:
        raise TokenError(str(exc)) from None
    return TokenEntry(name, digest, scopes)


def parse_tokens(text: str, source: str) -> dict[str, TokenEntry]:
    """{name: TokenEntry} from the YAML text of a tokens file; TokenError names what is wrong."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TokenError(f"{source}: not YAML ({exc.__class__.__name__})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TokenError(f"{source}: must be a mapping of names to tokens, got {type(data).__name__}")
    out: dict[str, TokenEntry] = {}
    seen: dict[bytes, str] = {}
    for name, value in data.items():
        if not isinstance(name, str) or not name or name == TRUSTED_NETWORK:
            raise TokenError(
                f"{source}: token names must be non-empty strings other than {TRUSTED_NETWORK!r}, got {name!r}"
            )
        entry = _entry(name, value, source)
        if entry.digest in seen:
            raise TokenError(f"{source}: {name!r} and {seen[entry.digest]!r} have the same token")
        seen[entry.digest] = name
        out[name] = entry
    return out


def read_token_entry(path: str | os.PathLike, name: str) -> str:
    """The plain token named `name` in the tokens YAML at `path` (a client reading its own credential)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        raise ValueError(f"{path}: not YAML") from None
    value = data.get(name) if isinstance(data, dict) else None
    if isinstance(value, dict):
        value = value.get("token")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{path}: no token named {name!r}")
    return value


class TokenFile:
    """The named tokens of one file, reloaded when the file changes (alignd.runtime.watched)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(os.path.expandvars(os.path.expanduser(str(path))))
        try:
            self._file = WatchedFiles([self.path], self._load, on_error=self._failed)
        except (OSError, TokenError) as exc:
            raise TokenError(f"server.auth.tokens_file: {exc}") from None

    def _load(self) -> list[TokenEntry]:
        entries = parse_tokens(self.path.read_text(), str(self.path))
        _log.info("auth_tokens_loaded", path=str(self.path), names=sorted(entries))
        return list(entries.values())

    def _failed(self, exc: Exception) -> None:
        """A rewrite that cannot be read or parsed: logged once; the last good tokens stay."""
        event = "auth_tokens_unreadable" if isinstance(exc, OSError) else "auth_tokens_invalid"
        _log.error(event, path=str(self.path), error=str(exc))

    def refresh(self) -> None:
        """Re-reads the file if it changed; keeps the last good tokens if the new version is bad."""
        self._file.refresh()

    def principal_of(self, token: str) -> Principal | None:
        """Who `token` is, or None; every known token is compared (constant time per token)."""
        given = token_digest(token)
        found = None
        for entry in self._file.get():
            if hmac.compare_digest(given, entry.digest):
                found = Principal(entry.name, entry.scopes)
        return found

    def name_of(self, token: str) -> str | None:
        p = self.principal_of(token)
        return None if p is None else p.name


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


# The authenticated caller during a call (None without authentication), for per-client metrics and for answers
# that depend on the scope (GetInfo's paths). Set by the access interceptor around the handler, and by the HTTP
# API around its request.
PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("alignd_principal", default=None)


class _ClientName:
    """CLIENT.get(): the caller's name (the token's name; "trusted-network"; None without authentication)."""

    @staticmethod
    def get() -> str | None:
        p = PRINCIPAL.get()
        return None if p is None else p.name


CLIENT = _ClientName()


def caller_is_admin() -> bool:
    p = PRINCIPAL.get()
    return p is not None and p.allows(S.ADMIN)


class Authenticator:
    """The token and scope check shared by the gRPC interceptor and the reward role's HTTP API."""

    def __init__(
        self, tokens: TokenFile, public_methods=HEALTH_METHODS, trusted_networks=(), *, on_reject=None
    ) -> None:
        self.tokens = tokens
        self.public = frozenset(public_methods)
        self.trusted = [ipaddress.ip_network(n, strict=False) for n in trusted_networks]
        # on_reject(api, reason) for each refusal; more listeners may be appended (the reward role's metrics).
        self.listeners = [on_reject] if on_reject else []

    def _reject(self, api: str, reason: str) -> None:
        for listener in self.listeners:
            listener(api, reason)

    def is_trusted(self, ip) -> bool:
        return ip is not None and any(ip in net for net in self.trusted)

    def authenticate(self, header: str | None, ip, api: str = "grpc") -> Principal:
        """The caller, from its `authorization` header value and its IP (None: not known yet); Unauthenticated
        otherwise. Without a header, a caller from a trusted network is TRUSTED_NETWORK with the score scope."""
        if header is None:
            if self.is_trusted(ip):
                return Principal(TRUSTED_NETWORK, frozenset({S.SCORE}))
            self._reject(api, "missing")
            raise Unauthenticated("missing credentials: send 'authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self._reject(api, "malformed")
            raise Unauthenticated("malformed authorization: expected 'Bearer <token>'")
        principal = self.tokens.principal_of(token.strip())
        if principal is None:
            self._reject(api, "unknown")
            raise Unauthenticated("unknown or revoked token")
        return principal

    def authorize(self, principal: Principal, scope: str, what: str, *, api: str = "grpc") -> None:
        """PermissionDenied naming the scope when `principal` lacks it."""
        if not principal.allows(scope):
            self._reject(api, "scope")
            raise PermissionDenied(
                f"{what} needs the '{scope}' scope, which the credential of {principal.name!r} does not carry"
            )
