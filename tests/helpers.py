"""Helpers shared by the test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from alignd.runtime.lifetime import child_env

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


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


def alignd_argv(*args: str) -> list[str]:
    """The command line of `alignd ARGS...` run by this interpreter (`python -m alignd.cli`)."""
    return [sys.executable, "-m", "alignd.cli", *args]


def set_flags(overrides: Iterable[str]) -> list[str]:
    """`--set KEY=VALUE` for each override, as the alignd commands take them."""
    return [arg for override in overrides for arg in ("--set", override)]


def tiny_ppo_argv(run_dir: Path, *overrides: str) -> list[str]:
    """`alignd ppo` of the tiny job (configs/tiny.yaml) into run_dir, with those --set overrides."""
    config = str(ROOT / "configs" / "tiny.yaml")
    return alignd_argv("ppo", "--config", config, "--run-dir", str(run_dir), *set_flags(overrides))


def serve_once(role: str, config: Path, run_dir: Path) -> subprocess.CompletedProcess:
    """`alignd serve ROLE` with that configuration file, run to its end with its output captured (for a
    configuration the role must refuse: it exits 2 before serving)."""
    return subprocess.run(
        alignd_argv("serve", role, "--config", str(config), "--run-dir", str(run_dir)),
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
