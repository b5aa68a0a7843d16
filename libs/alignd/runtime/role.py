"""What `alignd serve ROLE` runs: a role app inside a ServiceHost.

A role app registers its servicers, then loads (and warms up) its model
while the server already answers health checks with NOT_SERVING, so a
Kubernetes startup probe or the local launcher can watch it come up.
SIGTERM or SIGINT: health goes NOT_SERVING, in-flight RPCs get the grace
period, the process exits 0.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from alignd.atomic import write_json_atomic
from alignd.runtime.logging import get_logger
from alignd.runtime.server import ServiceHost

_log = get_logger("alignd.role")


class Loaded:
    """Holds what a role builds at load time; servicers registered before the
    model is loaded read it through `get()`, which answers UNAVAILABLE until
    then."""

    def __init__(self) -> None:
        self._value = None

    def set(self, value) -> None:
        self._value = value

    def get(self):
        value = self._value
        if value is None:
            from alignd.runtime.errors import Unavailable

            raise Unavailable("the model is still loading")
        return value


class RoleApp:
    """Base of the five role apps (services/<slug>/app.py)."""

    slug: str = ""
    service_names: list[str] = []

    def register(self, host: ServiceHost) -> None:
        raise NotImplementedError

    def start_extra(self, host: ServiceHost) -> dict:
        """Starts what the role serves besides gRPC (after the gRPC port is bound); returns its endpoint-file
        entries (the reward role's http_url)."""
        return {}

    def load(self) -> None:
        """Loads and warms up the model; health turns SERVING afterwards."""

    def close(self) -> None:
        """Releases resources after the server stopped."""


def run_role(app: RoleApp, host: ServiceHost, endpoint_file: Path | None = None) -> int:
    """Serves `app` until SIGTERM/SIGINT; returns the process exit code."""
    stop = threading.Event()  # set by the loader when loading fails
    signals: list[int] = []

    def on_signal(signum, _frame):
        # Runs between two bytecodes of the main thread, which may hold a lock (the log's, an Event's):
        # take none here (a lock taken in a handler deadlocked a shutdown); the main thread logs it.
        signals.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    app.register(host)
    host.start()
    try:
        extra = app.start_extra(host)
    except BaseException:
        host.stop(0)
        raise
    if endpoint_file is not None:
        write_json_atomic(
            endpoint_file,
            {"role": app.slug, "address": host.address, "metrics_url": host.metrics_url, "pid": os.getpid(), **extra},
        )

    failure: list[BaseException] = []

    def load():
        t0 = time.perf_counter()
        try:
            app.load()
        except BaseException as exc:  # noqa: BLE001 - reported, then the process exits 1
            failure.append(exc)
            _log.error("load_failed", exc_info=exc)
            stop.set()
            return
        host.set_serving(True)
        _log.info("role_ready", slug=app.slug, load_seconds=round(time.perf_counter() - t0, 3))

    loader = threading.Thread(target=load, name="loader", daemon=True)
    loader.start()
    while not signals and not stop.wait(0.1):
        pass
    if signals:
        _log.info("signal_received", signal=signal.Signals(signals[0]).name)
    host.stop()
    try:
        app.close()
    except Exception as exc:  # noqa: BLE001
        _log.error("close_failed", exc_info=exc)
    return 1 if failure else 0
