"""`LocalLauncher`: a job as a child process of the coordinator (`python -m alignd.cli ARGS`).

The child leads its own session, so a timeout or a cancel kills its whole
process group (SIGTERM, then SIGKILL after a grace period); it also dies with
the coordinator (`alignd.local_stack.child_env`). Its output goes to a log
file whose last lines are reported when it fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from alignd.local_stack import child_env
from alignd.runtime.logging import get_logger
from alignd.services.coordinator.launchers.base import JobResources, JobResult, JobSpec, job_name, last_lines

_log = get_logger("alignd.coordinator.launchers")


class LocalLauncher:
    """Runs `python -m alignd.cli ARGS` as a child process in its own session (its whole group is killed on timeout)."""

    def __init__(
        self,
        *,
        python: str = sys.executable,
        log_dir: str | os.PathLike | None = None,
        kill_grace_seconds: float = 5.0,
        poll_seconds: float = 0.2,
    ) -> None:
        self.python = python
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "alignd-jobs"
        self.kill_grace_seconds = kill_grace_seconds
        self.poll_seconds = poll_seconds
        self.rm_resources: JobResources | None = None

    def check_shared_path(self, path: str | os.PathLike) -> None:
        """Every local path is visible to a local job."""

    def _kill(self, proc: subprocess.Popen) -> None:
        for sig, wait in ((signal.SIGTERM, self.kill_grace_seconds), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)  # the child leads its own session: this reaches its children too
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def _wait(self, proc: subprocess.Popen, deadline: float, cancel: threading.Event | None) -> tuple[bool, bool]:
        """Waits for the child to exit; (timed_out, cancelled) when it is still running at the deadline or cancel."""
        while proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return True, False
            if cancel is not None and cancel.is_set():
                return False, True
            try:
                proc.wait(timeout=min(self.poll_seconds, left))
            except subprocess.TimeoutExpired:
                pass
        return False, False

    def run(self, job: JobSpec, timeout: float, *, cancel: threading.Event | None = None) -> JobResult:
        log_path = Path(job.log_path) if job.log_path else self.log_dir / f"{job_name(job.name)}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = child_env()  # the job goes when the coordinator goes, even killed
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(job.env)
        cmd = [self.python, "-m", "alignd.cli", *job.args]
        t0 = time.monotonic()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        _log.info("job_started", job=job.name, launcher="local", pid=proc.pid, log=str(log_path))
        timed_out = cancelled = False
        try:
            timed_out, cancelled = self._wait(proc, t0 + timeout, cancel)
        finally:
            if proc.poll() is None:
                self._kill(proc)
        try:
            tail = last_lines(log_path.read_text(errors="replace"))
        except OSError:
            tail = ""
        ok = proc.returncode == 0 and not (timed_out or cancelled)
        reason = (
            ""
            if ok
            else f"no result after {timeout:g} s; killed"
            if timed_out
            else "cancelled; killed"
            if cancelled
            else f"exit code {proc.returncode}"
        )
        result = JobResult(
            job.name,
            ok,
            exit_code=None if (timed_out or cancelled) else proc.returncode,
            timed_out=timed_out,
            cancelled=cancelled,
            reason=reason,
            log_tail="" if ok else tail,
            duration_seconds=time.monotonic() - t0,
        )
        _log.info(
            "job_finished",
            job=job.name,
            launcher="local",
            succeeded=ok,
            exit_code=proc.returncode,
            timed_out=timed_out,
            seconds=round(result.duration_seconds, 2),
        )
        return result
