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
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from google.protobuf import json_format

from alignd.atomic import write_json_atomic
from alignd.config import JobResourcesConfig, KubernetesLauncherConfig, LauncherConfig
from alignd.jobs import EXIT_INVALID, response_to_dict, rm_request, stored_response
from alignd.local_stack import child_env
from alignd.runtime.logging import get_logger
from alignd.v1 import learner_pb2

_log = get_logger("alignd.coordinator.launchers")

LOG_TAIL_LINES = 40
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
CONTAINER = "job"


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


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _interval(cancel: threading.Event | None, seconds: float) -> bool:
    """Sleeps; True when cancelled."""
    if cancel is None:
        time.sleep(seconds)
        return False
    return cancel.wait(seconds)


# -- local ------------------------------------------------------------------------------------------------------------
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
            deadline = t0 + timeout
            while proc.poll() is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    timed_out = True
                    break
                if cancel is not None and cancel.is_set():
                    cancelled = True
                    break
                try:
                    proc.wait(timeout=min(self.poll_seconds, left))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if proc.poll() is None:
                self._kill(proc)
        try:
            tail = _tail(log_path.read_text(errors="replace"))
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


# -- Kubernetes -------------------------------------------------------------------------------------------------------
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


def _label_value(value: str) -> str:
    return job_name(value)  # label values: at most 63 characters of the same alphabet (plus '.', '_', not needed here)


def build_job_manifest(
    spec: JobSpec, cfg: KubernetesLauncherConfig, *, timeout: float | None = None, namespace: str | None = None
) -> dict:
    """The batch/v1 Job that runs `alignd ARGS` for `spec` (pure: no API calls, no files read)."""
    name = job_name(spec.name)
    labels = {
        "app.kubernetes.io/name": "alignd",
        "app.kubernetes.io/component": "job",
        "app.kubernetes.io/part-of": "alignd",
        "app.kubernetes.io/managed-by": "alignd-coordinator",
        "alignd.io/job": _label_value(spec.name),
        **cfg.labels,
        **spec.labels,
    }
    env = {
        "HOME": "/tmp",
        "ALIGND_CACHE": "/var/cache/alignd",
        "HF_HOME": "/var/cache/alignd/huggingface",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        **cfg.env,
        **spec.env,
    }
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["alignd"],  # the images' entrypoint is `alignd serve`
        "args": list(spec.args),
        "env": [{"name": k, "value": str(v)} for k, v in env.items()],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "data", "mountPath": cfg.run_mount_path},
            {"name": "cache", "mountPath": "/var/cache/alignd"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    res = spec.resources
    if res is not None:
        requests: dict[str, str] = {}
        limits: dict[str, str] = {}
        if res.cpu:
            requests["cpu"] = str(res.cpu)
        if res.memory:
            requests["memory"] = limits["memory"] = str(res.memory)
        if res.gpu:
            limits["nvidia.com/gpu"] = str(res.gpu)
        resources = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
        if resources:
            container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the job never talks to the API
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": cfg.pvc_claim}},
            {"name": "cache", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if cfg.service_account:
        pod_spec["serviceAccountName"] = cfg.service_account
    if cfg.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in cfg.image_pull_secrets]
    if cfg.node_selector:
        pod_spec["nodeSelector"] = dict(cfg.node_selector)
    if cfg.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in cfg.tolerations]
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    ns = namespace or cfg.namespace
    if ns:
        metadata["namespace"] = ns
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,  # a failed job is reported, not retried behind the coordinator's back
        "ttlSecondsAfterFinished": cfg.ttl_seconds_after_finished,
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if timeout is not None:
        job_spec["activeDeadlineSeconds"] = max(1, math.ceil(timeout))
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def default_namespace() -> str:
    """The coordinator pod's namespace (its service-account mount), else "default"."""
    try:
        return Path(SERVICE_ACCOUNT_NAMESPACE).read_text().strip() or "default"
    except OSError:
        return "default"


# Pod states that cannot resolve themselves: fail the job now instead of at its deadline.
HOPELESS_WAITING = {"InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError"}


class KubernetesLauncher:
    """Runs a job as a batch/v1 Job. `api_client`: a kubernetes.client.ApiClient (tests inject one whose HTTP layer is
    fake); default: from cfg.kubeconfig, else the in-cluster service account."""

    def __init__(
        self,
        cfg: KubernetesLauncherConfig,
        *,
        api_client=None,
        poll_initial_seconds: float = 1.0,
        poll_max_seconds: float = 10.0,
        grace_seconds: float = 30.0,
    ) -> None:
        from kubernetes import client
        from kubernetes import config as kconfig

        if not cfg.image or not cfg.pvc_claim:
            raise LauncherError(
                "the kubernetes launcher needs launcher.kubernetes.image and launcher.kubernetes.pvc_claim"
            )
        self.cfg = cfg
        if api_client is None:
            try:
                if cfg.kubeconfig:
                    api_client = kconfig.new_client_from_config(config_file=cfg.kubeconfig)
                else:
                    kconfig.load_incluster_config()
                    api_client = client.ApiClient()
            except kconfig.ConfigException as err:
                raise LauncherError(f"cannot reach the Kubernetes API: {err}") from None
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace = cfg.namespace or default_namespace()
        self.rm_resources = cfg.rm_resources
        self.poll_initial = poll_initial_seconds
        self.poll_max = poll_max_seconds
        self.grace = grace_seconds  # the Job's own activeDeadlineSeconds usually ends it first

    def check_shared_path(self, path: str | os.PathLike) -> None:
        """A job pod sees the shared volume only: a path elsewhere would not exist there."""
        root = Path(self.cfg.run_mount_path).resolve()
        p = Path(path).resolve()
        if p != root and root not in p.parents:
            raise LauncherError(
                f"{path} is not on the shared run volume ({self.cfg.run_mount_path}); "
                "set the coordinator's runs_dir under launcher.kubernetes.run_mount_path"
            )

    # -- API calls (the only ones: see the module docstring) --
    def _api(self, what: str, call):
        from kubernetes.client.exceptions import ApiException

        try:
            return call()
        except ApiException as err:
            if err.status in (401, 403):
                raise LauncherError(
                    f"Kubernetes API refused to {what} in namespace {self.namespace}: {err.status} {err.reason}"
                ) from None
            if err.status in (400, 422):
                raise LauncherError(f"Kubernetes API rejected {what}: {err.status} {err.reason}: {err.body}") from None
            raise

    def _get_job(self, name: str):
        return self._api(f"get job {name}", lambda: self.batch.read_namespaced_job(name, self.namespace))

    def _create(self, manifest: dict, deadline: float, cancel) -> str:
        """Creates the Job; returns its uid. An existing Job of the same name (a coordinator restarted mid-job) is
        adopted while it runs or after it succeeded, and replaced when it failed. Transient API errors are retried
        until the deadline."""
        from kubernetes.client.exceptions import ApiException

        name = manifest["metadata"]["name"]
        interval = self.poll_initial
        while True:
            try:
                try:
                    job = self._api(
                        f"create job {name}", lambda: self.batch.create_namespaced_job(self.namespace, manifest)
                    )
                    return job.metadata.uid
                except ApiException as err:
                    if err.status != 409:
                        raise
                existing = self._get_job(name)
                if self._terminal(existing)[0] != "failed":
                    _log.info("job_adopted", job=name, uid=existing.metadata.uid)
                    return existing.metadata.uid
                _log.info("job_replacing_failed", job=name, uid=existing.metadata.uid)
                self._delete(name)  # then create again once it is gone (409 until then)
            except LauncherError:
                raise
            except ApiException as err:
                if err.status is not None and 400 <= err.status < 500 and err.status not in (404, 409, 429):
                    raise LauncherError(f"cannot create job {name}: {err.status} {err.reason}") from None
                _log.warning("job_create_retry", job=name, status=err.status, reason=err.reason)
            except Exception as err:  # noqa: BLE001 (API unreachable for a moment)
                _log.warning("job_create_retry", job=name, error=str(err))
            if time.monotonic() + interval > deadline:
                raise LauncherError(f"could not create job {name} before the deadline")
            if _interval(cancel, interval):
                raise LauncherError(f"cancelled while creating job {name}")
            interval = min(interval * 1.5, self.poll_max)

    def _delete(self, name: str) -> None:
        """Deletes the Job (its pods follow: propagation Background); logs, never raises."""
        from kubernetes.client.exceptions import ApiException

        for attempt in range(3):
            try:
                self._api(
                    f"delete job {name}",
                    lambda: self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Background"),
                )
                _log.info("job_deleted", job=name)
                return
            except ApiException as err:
                if err.status == 404:
                    return
                _log.warning("job_delete_failed", job=name, status=err.status, attempt=attempt + 1)
            except Exception as err:  # noqa: BLE001 (connection errors: try again; refusals: logged)
                _log.warning("job_delete_failed", job=name, error=str(err), attempt=attempt + 1)
                if isinstance(err, LauncherError):
                    break
            time.sleep(min(self.poll_initial * (attempt + 1), self.poll_max))
        _log.error("job_not_deleted", job=name, note="ttlSecondsAfterFinished removes it once it has finished")

    @staticmethod
    def _terminal(job) -> tuple[str | None, str]:
        """("succeeded" | "failed" | None, reason)."""
        status = job.status
        if status is None:
            return None, ""
        for c in status.conditions or []:
            if c.status == "True" and c.type == "Complete":
                return "succeeded", ""
            if c.status == "True" and c.type == "Failed":
                return "failed", " ".join(x for x in (c.reason, c.message) if x)
        if (status.succeeded or 0) >= 1:
            return "succeeded", ""
        if (status.failed or 0) >= 1:  # backoffLimit 0: one failed pod fails the Job
            return "failed", "pod failed"
        return None, ""

    def _pods(self, uid: str) -> list:
        pods = (
            self._api(
                "list pods",
                lambda: self.core.list_namespaced_pod(
                    self.namespace, label_selector=f"batch.kubernetes.io/controller-uid={uid}"
                ),
            ).items
            or []
        )
        return sorted(
            pods, key=lambda p: (p.metadata.creation_timestamp is not None, p.metadata.creation_timestamp or 0)
        )

    @staticmethod
    def _container_state(pod) -> tuple[int | None, str]:
        """(exit code, waiting reason) of the job container."""
        for cs in (pod.status.container_statuses or []) if pod.status else []:
            if cs.name != CONTAINER or cs.state is None:
                continue
            if cs.state.terminated is not None:
                return cs.state.terminated.exit_code, cs.state.terminated.reason or ""
            if cs.state.waiting is not None:
                return None, cs.state.waiting.reason or ""
        return None, ""

    def _log_tail(self, pod_name: str) -> str:
        try:
            text = self._api(
                "read pod log",
                lambda: self.core.read_namespaced_pod_log(
                    pod_name, self.namespace, container=CONTAINER, tail_lines=LOG_TAIL_LINES
                ),
            )
        except LauncherError:
            raise
        except Exception as err:  # noqa: BLE001 (no log yet, pod gone: report without it)
            return f"(no log: {err})"
        return text if isinstance(text, str) else str(text)

    def run(self, job: JobSpec, timeout: float, *, cancel: threading.Event | None = None) -> JobResult:
        from kubernetes.client.exceptions import ApiException

        manifest = build_job_manifest(job, self.cfg, timeout=timeout, namespace=self.namespace)
        name = manifest["metadata"]["name"]
        t0 = time.monotonic()
        deadline = t0 + timeout + self.grace
        outcome, reason, exit_code, uid = None, "", None, None
        timed_out = cancelled = False
        try:
            uid = self._create(manifest, deadline, cancel)
            _log.info(
                "job_started", job=job.name, launcher="kubernetes", k8s_job=name, namespace=self.namespace, uid=uid
            )
            interval = self.poll_initial
            while True:
                try:
                    k8s_job = self._get_job(name)
                    if k8s_job.metadata.uid != uid:
                        outcome, reason = "failed", "the Job was replaced by another one of the same name"
                        break
                    outcome, reason = self._terminal(k8s_job)
                    if outcome:
                        break
                    for pod in self._pods(uid):
                        _, waiting = self._container_state(pod)
                        if waiting in HOPELESS_WAITING:
                            outcome, reason = "failed", f"pod {pod.metadata.name}: {waiting}"
                    if outcome:
                        break
                except ApiException as err:
                    if err.status == 404:
                        outcome, reason = "failed", "the Job was deleted by someone else"
                        break
                    _log.warning("job_poll_failed", job=name, status=err.status, reason=err.reason)
                except LauncherError:
                    raise
                except Exception as err:  # noqa: BLE001 (API unreachable for a moment: keep polling to the deadline)
                    _log.warning("job_poll_failed", job=name, error=str(err))
                if time.monotonic() >= deadline:
                    timed_out, reason = True, f"no result after {timeout:g} s"
                    break
                if _interval(cancel, min(interval, max(0.0, deadline - time.monotonic()))):
                    cancelled, reason = True, "cancelled"
                    break
                interval = min(interval * 1.5, self.poll_max)
            if "DeadlineExceeded" in reason:
                timed_out = True
            tail = ""
            if outcome != "succeeded":
                try:
                    pods = self._pods(uid)
                    if pods:
                        exit_code, state = self._container_state(pods[-1])
                        if state and state not in reason:
                            reason = f"{reason}; container: {state}" if reason else f"container: {state}"
                        tail = _tail(self._log_tail(pods[-1].metadata.name))
                except LauncherError:
                    raise
                except Exception as err:  # noqa: BLE001
                    tail = f"(pods not readable: {err})"
            else:
                exit_code = 0
            ok = outcome == "succeeded"
            result = JobResult(
                job.name,
                ok,
                exit_code=exit_code,
                timed_out=timed_out,
                cancelled=cancelled,
                reason="" if ok else reason,
                log_tail=tail,
                duration_seconds=time.monotonic() - t0,
            )
            _log.info(
                "job_finished",
                job=job.name,
                launcher="kubernetes",
                k8s_job=name,
                succeeded=ok,
                exit_code=exit_code,
                timed_out=timed_out,
                reason=reason,
                seconds=round(result.duration_seconds, 2),
            )
            return result
        finally:
            self._delete(name)


def make_launcher(cfg: LauncherConfig, **kw) -> JobLauncher:
    """The launcher the coordinator's configuration (CoordinatorConfig.launcher) asks for."""
    if cfg.kind == "kubernetes":
        return KubernetesLauncher(cfg.kubernetes, **kw)
    return LocalLauncher(**kw)


# -- the reward-model job ---------------------------------------------------------------------------------------------
def run_rm_job(
    launcher: JobLauncher,
    request: dict,
    timeout: float,
    *,
    cancel: threading.Event | None = None,
    work_dir: str | os.PathLike | None = None,
) -> dict:
    """Trains a reward model with `alignd job train-rm` through `launcher`; returns the TrainRewardModelResponse as a
    dict (proto field names; `rm_response` makes it the message). `request` has the fields of
    TrainRewardModelRequest. The request file (and, locally, the job's log) go to work_dir, default
    <parent of output_dir>/jobs. A result already published in output_dir for this job id is returned (replayed)
    without running anything. Raises JobFailed (`.invalid_request` when the job refused the request), ValueError for
    a request missing job_id or output_dir, LauncherError when the launcher cannot work."""
    req = rm_request(request)
    for key in ("job_id", "output_dir"):
        if not getattr(req, key):
            raise ValueError(f"{key}: must not be empty")
    output_dir = Path(req.output_dir)
    done = stored_response(output_dir, req.job_id, learner_pb2.TrainRewardModelResponse)
    if done is not None:
        done = response_to_dict(done)
        _log.info("job_replayed", job_id=req.job_id, output_dir=str(output_dir))
        return done
    work = Path(work_dir) if work_dir else output_dir.parent / "jobs"
    slug = job_name(f"rm-{req.job_id}")
    request_file = work / f"{slug}.request.json"
    check = getattr(launcher, "check_shared_path", None)
    if check is not None:
        check(request_file)
        check(output_dir)
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(request_file, json_format.MessageToDict(req, preserving_proto_field_name=True))
    spec = JobSpec(
        name=f"rm-{req.job_id}",
        args=["job", "train-rm", "--request", str(request_file)],
        resources=launcher.rm_resources,
        labels={"alignd.io/job-kind": "train-rm"},
        log_path=str(work / f"{slug}.log"),
    )
    result = launcher.run(spec, timeout, cancel=cancel)
    if not result.succeeded:
        raise JobFailed(result)
    resp = stored_response(output_dir, req.job_id, learner_pb2.TrainRewardModelResponse)
    if resp is None:
        raise JobFailed(
            JobResult(
                spec.name,
                False,
                exit_code=result.exit_code,
                reason=f"it succeeded but published no result in {output_dir}",
                duration_seconds=result.duration_seconds,
            )
        )
    resp.replayed = False  # the job just published it
    return response_to_dict(resp)
