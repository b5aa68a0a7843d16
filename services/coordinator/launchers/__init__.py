"""How the coordinator runs one-off jobs (reward-model training) outside the roles.

A job is an `alignd` command line (`alignd job train-rm --request FILE`); a
launcher runs it to completion and cleans up after it:

- `LocalLauncher`: `python -m alignd.cli ARGS` as a child process (it dies
  with the coordinator; its output goes to a log file; killed on timeout).
- `KubernetesLauncher`: a batch/v1 Job built by `build_job_manifest` (the
  shared run volume mounted at the same path as in the coordinator, no API
  token, backoffLimit 0, activeDeadlineSeconds = the timeout), created in the
  configured namespace, polled until it succeeds or fails, its pod's log tail
  read on failure, and deleted (propagation Background) whatever happened.
  It uses only what the coordinator's Role grants
  (charts/alignd/templates/rbac.yaml): jobs create/get/delete, pods list,
  pods/log get.

`make_launcher(cfg.launcher)` picks one from the coordinator's configuration;
`run_rm_job` is the reward-model job through either: the request goes into a
file next to the output directory, and the result is read back from the
output directory, where the job publishes it (services/learner/jobs.py). The
job is idempotent by job id: a published result is returned without running
anything.

Imports no torch; the `kubernetes` client is imported by KubernetesLauncher
only.

Modules: `base` (JobSpec, JobResult, the JobLauncher protocol, the errors,
job_name), `local` (LocalLauncher), `k8s_manifest` (build_job_manifest),
`k8s` (KubernetesLauncher), `rm_job` (run_rm_job); `make_launcher` is here.
"""

from __future__ import annotations

from alignd.config import LauncherConfig
from alignd.services.coordinator.launchers.base import (
    LOG_TAIL_LINES,
    MAX_NAME,
    JobFailed,
    JobLauncher,
    JobResources,
    JobResult,
    JobSpec,
    LauncherError,
    job_name,
)
from alignd.services.coordinator.launchers.k8s import (
    HOPELESS_WAITING,
    SERVICE_ACCOUNT_NAMESPACE,
    KubernetesLauncher,
    default_namespace,
)
from alignd.services.coordinator.launchers.k8s_manifest import CONTAINER, build_job_manifest
from alignd.services.coordinator.launchers.local import LocalLauncher
from alignd.services.coordinator.launchers.rm_job import run_rm_job

__all__ = [
    "CONTAINER",
    "HOPELESS_WAITING",
    "LOG_TAIL_LINES",
    "MAX_NAME",
    "SERVICE_ACCOUNT_NAMESPACE",
    "JobFailed",
    "JobLauncher",
    "JobResources",
    "JobResult",
    "JobSpec",
    "KubernetesLauncher",
    "LauncherError",
    "LocalLauncher",
    "build_job_manifest",
    "default_namespace",
    "job_name",
    "make_launcher",
    "run_rm_job",
]


def make_launcher(cfg: LauncherConfig, **kw) -> JobLauncher:
    """The launcher the coordinator's configuration (CoordinatorConfig.launcher) asks for."""
    if cfg.kind == "kubernetes":
        return KubernetesLauncher(cfg.kubernetes, **kw)
    return LocalLauncher(**kw)
