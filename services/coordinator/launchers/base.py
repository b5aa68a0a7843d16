"""What every job launcher shares: the job (`JobSpec`), its outcome (`JobResult`), the `JobLauncher` protocol,
the errors, and `job_name` (a job id as a stable DNS-1123 name: the Kubernetes Job's, the local log file's)."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from alignd.config import JobResourcesConfig
from alignd.jobs import EXIT_INVALID

LOG_TAIL_LINES = 40

JobResources = JobResourcesConfig  # a pod's CPU, memory and GPUs: the configuration's model, not a copy of it


@dataclass(frozen=True)
class JobSpec:
    """One job: `alignd ARGS` with extra environment and (on Kubernetes) pod resources."""

    name: str  # unique per job and stable across retries (the job id); sanitised into a Kubernetes name
    args: list[str]  # the alignd command line after `alignd`, e.g. ["job", "train-rm", "--request", path]
    env: dict[str, str] = field(default_factory=dict)
    resources: JobResources | None = None  # None: no requests or limits
    labels: dict[str, str] = field(default_factory=dict)
    log_path: str | None = None  # LocalLauncher: where the output goes (default: its log_dir/<name>.log)


@dataclass
class JobResult:
    name: str
    succeeded: bool
    exit_code: int | None = None
    timed_out: bool = False
    cancelled: bool = False
    reason: str = ""  # why it failed, in a few words
    log_tail: str = ""
    duration_seconds: float = 0.0

    def describe(self) -> str:
        if self.succeeded:
            return f"job {self.name} succeeded"
        what = (
            "timed out"
            if self.timed_out
            else "was cancelled"
            if self.cancelled
            else f"failed (exit code {self.exit_code})"
            if self.exit_code is not None
            else "failed"
        )
        text = f"job {self.name} {what}" + (f": {self.reason}" if self.reason else "")
        return text + (f"; last log lines:\n{self.log_tail}" if self.log_tail else "")


class JobLauncher(Protocol):
    rm_resources: JobResources | None  # the reward-model job's pod resources (None: no requests or limits)

    def run(self, job: JobSpec, timeout: float, *, cancel: threading.Event | None = None) -> JobResult:
        """Starts the job, waits until it ends (or `timeout` seconds, or `cancel` is set), cleans up."""
        ...


class LauncherError(RuntimeError):
    """The launcher itself cannot work (no API access, permission denied)."""


class JobFailed(RuntimeError):
    def __init__(self, result: JobResult) -> None:
        super().__init__(result.describe())
        self.result = result

    @property
    def invalid_request(self) -> bool:
        """The job refused its request (exit code 2): retrying the same request cannot help."""
        return self.result.exit_code == EXIT_INVALID


def last_lines(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a job's log."""
    return "\n".join(text.splitlines()[-lines:])


def sleep_unless_cancelled(cancel: threading.Event | None, seconds: float) -> bool:
    """Sleeps `seconds` (less when `cancel` is set meanwhile); True when cancelled."""
    if cancel is None:
        time.sleep(seconds)
        return False
    return cancel.wait(seconds)


_NAME_OK = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 63


def job_name(name: str) -> str:
    """A DNS-1123 label for `name`, stable (the same job id gives the same Job, so a restarted coordinator finds it).
    Names that had to be changed or cut get a hash of the original."""
    if _NAME_OK.match(name) and len(name) <= MAX_NAME:
        return name
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    slug = slug[: MAX_NAME - len(digest) - 1].strip("-")
    return f"{slug}-{digest}" if slug else f"job-{digest}"
