"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    what: str, fn: Callable[[], T], timeout: float, poll: float = 0.2, *, alive: Callable[[], None] | None = None
) -> T:
    """fn()'s first truthy value, polled every `poll` seconds (a condition, not a sleep as synchronisation);
    TimeoutError naming `what` after `timeout` seconds. `alive`, called before each poll, raises when what is
    awaited can no longer happen (the process that would do it exited)."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server that must be told its port up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
