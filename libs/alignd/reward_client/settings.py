"""What both reward clients derive from their constructor's arguments, checked once (address, TLS credentials,
channel options, the token's metadata, the deadline, the retry policy), and the retry schedule of one call.

The SDK's usage and behaviour are in the package docstring (`alignd.reward_client`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import grpc
import structlog

from alignd.reward_client.results import RewardClientError
from alignd.runtime.addresses import is_loopback
from alignd.runtime.client import tls_credentials
from alignd.runtime.retry import Backoff

_log = structlog.get_logger(component="alignd.reward_client")

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class _RetryPolicy:
    """`attempts` in all for a call that fails with a retryable code; the pauses between them: Backoff."""

    attempts: int
    initial_backoff: float
    max_backoff: float

    @cached_property
    def backoff(self) -> Backoff:
        return Backoff(self.initial_backoff, self.max_backoff)

    def delay(self, failures: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max_backoff, initial_backoff * 2**(failures-1))]."""
        return self.backoff.delay(failures, rng)


def _read_file(arg: str, path: str | Path) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"{arg}: cannot read {path}: {exc.strerror or exc}") from None


def _check_token(token: str, arg: str) -> str:
    if not isinstance(token, str):
        raise TypeError(f"{arg}: must be a string, got {type(token).__name__}")
    token = token.strip()
    if not token:
        raise ValueError(f"{arg}: the token is empty")
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"{arg}: the token must be printable ASCII without spaces")
    return token


def _positive(name: str, value: float | None, *, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name}: must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


@dataclass(frozen=True)
class _Settings:
    """Everything both clients derive from the constructor's arguments (checked once, here)."""

    address: str
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, Any], ...]
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None
    policy: _RetryPolicy

    @classmethod
    def build(
        cls,
        address: str,
        *,
        token: str | None,
        token_file: str | Path | None,
        tls: bool,
        root_certificates_file: str | Path | None,
        cert_file: str | Path | None,
        key_file: str | Path | None,
        server_name_override: str | None,
        timeout: float | None,
        retries: int,
        initial_backoff: float,
        max_backoff: float,
        max_message_bytes: int,
    ) -> _Settings:
        if not isinstance(address, str) or not address.strip():
            raise ValueError(f"address: expected 'host:port', got {address!r}")
        address = address.strip()
        _positive("timeout", timeout, allow_none=True)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
            raise ValueError(f"retries: the number of attempts in all, at least 1; got {retries!r}")
        _positive("initial_backoff", initial_backoff, allow_zero=True)
        _positive("max_backoff", max_backoff, allow_zero=True)
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes: at least 1024, got {max_message_bytes!r}")

        if token is not None and token_file is not None:
            raise ValueError("token, token_file: give one of them, not both")
        if token_file is not None:
            try:
                text = _read_file("token_file", token_file).decode()
            except UnicodeDecodeError:
                raise ValueError(f"token_file: {token_file} is not UTF-8 text") from None
            token = _check_token(text, f"token_file ({token_file})")
        elif token is not None:
            token = _check_token(token, "token")
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()

        if (cert_file is None) != (key_file is None):
            missing = "key_file" if key_file is None else "cert_file"
            raise ValueError(f"{missing}: mutual TLS needs both cert_file and key_file, {missing} is missing")
        secure = bool(tls) or any(f is not None for f in (root_certificates_file, cert_file, key_file))
        if server_name_override is not None and not secure:
            raise ValueError("server_name_override: only meaningful with TLS (tls=True or a certificate file)")
        credentials = None
        if secure:
            credentials = tls_credentials(
                root_certificates_file=root_certificates_file, cert_file=cert_file, key_file=key_file, read=_read_file
            )
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_retries", 0),  # the client's own retries (below) are the only ones
        ]
        if server_name_override is not None:
            options.append(("grpc.ssl_target_name_override", server_name_override))
        if token is not None and not secure and not is_loopback(address):
            _log.warning("reward_client_token_without_tls", address=address)
        return cls(
            address,
            credentials,
            tuple(options),
            metadata,
            None if timeout is None else float(timeout),
            _RetryPolicy(retries, float(initial_backoff), float(max_backoff)),
        )

    def sync_channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address, options=list(self.options))
        return grpc.secure_channel(self.address, self.credentials, options=list(self.options))

    def aio_channel(self) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.address, options=list(self.options))
        return grpc.aio.secure_channel(self.address, self.credentials, options=list(self.options))


class _Attempts:
    """The retry schedule of one call: a deadline from the start, a timeout per attempt, a backoff per failure."""

    def __init__(self, settings: _Settings, timeout: float | None, rng: random.Random, *, method: str) -> None:
        if timeout is None:
            timeout = settings.timeout
        else:
            _positive("timeout", timeout)
        self.policy = settings.policy
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.rng = rng
        self.method = method
        self.made = 0

    def next_timeout(self) -> float | None:
        """The timeout of the next attempt: what is left of the deadline."""
        if self.deadline is None:
            self.made += 1
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise RewardClientError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline of {self.timeout:g}s passed before attempt {self.made + 1}",
                self.made,
            )
        self.made += 1
        return remaining

    def backoff(self, err: grpc.RpcError) -> float:
        """The pause before the next attempt after `err`; raises RewardClientError when the call is over."""
        code, details = err.code(), err.details() or ""
        if code not in RETRYABLE_CODES or self.made >= self.policy.attempts:
            raise RewardClientError(code, details, self.made) from err
        delay = self.policy.delay(self.made, self.rng)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            raise RewardClientError(code, details, self.made) from err  # a retry could not finish in time
        if structlog.is_configured():
            _log.debug(
                "reward_client_retry", method=self.method, attempt=self.made, code=code.name, backoff_s=round(delay, 4)
            )
        return delay
