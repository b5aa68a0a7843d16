"""Child processes that must not outlive their launcher (standard library only).

A launcher (the local stack, the coordinator's local job launcher, the test suite) starts `alignd` processes
with `child_env()`; each calls `die_with_parent()` first thing, so it gets SIGTERM when the launcher dies, even
by SIGKILL.
"""

from __future__ import annotations

import os
import signal

PARENT_ENV = "ALIGND_PARENT_PID"


def child_env(base: dict | None = None) -> dict:
    """Environment for a child that must not outlive this process (see die_with_parent).

    Not a preexec_fn: running Python between fork and exec in a process whose
    gRPC threads are live aborts the child (seen: epoll_wait on a closed fd,
    SIGABRT); the child arms the guard itself at start-up instead.
    """
    env = dict(os.environ if base is None else base)
    env[PARENT_ENV] = str(os.getpid())
    return env


def die_with_parent() -> None:
    """Called first thing in `alignd` processes started by a launcher: SIGTERM when
    the launcher dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG); exits at
    once if the launcher is already gone."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux/glibc: the launcher's own stop() is the only guard
        return
    if os.getppid() != int(parent):  # the launcher died before the guard was armed
        os._exit(1)
