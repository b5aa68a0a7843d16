"""`KubernetesLauncher`: a job as a batch/v1 Job (`k8s_manifest.build_job_manifest`), created, polled, deleted.

The Job is created in the configured namespace (one of the same name left by
a restarted coordinator is adopted while it runs or after it succeeded, and
replaced when it failed), polled until it succeeds or fails (a pod stuck in a
state that cannot resolve itself fails it at once), its pod's log tail read
on failure, and deleted (propagation Background) whatever happened. It uses
only what the coordinator's Role grants (charts/alignd/templates/rbac.yaml):
jobs create/get/delete, pods list, pods/log get. The `kubernetes` client is
imported by KubernetesLauncher only.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from alignd.config import KubernetesLauncherConfig
from alignd.runtime.logging import get_logger
from alignd.services.coordinator.launchers.base import (
    LOG_TAIL_LINES,
    JobResult,
    JobSpec,
    LauncherError,
    last_lines,
    sleep_unless_cancelled,
)
from alignd.services.coordinator.launchers.k8s_manifest import CONTAINER, build_job_manifest

_log = get_logger("alignd.coordinator.launchers")

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


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
            if sleep_unless_cancelled(cancel, interval):
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

    def _poll_once(self, name: str, uid: str) -> tuple[str | None, str]:
        """("succeeded" | "failed" | None, reason) of the Job now; a pod stuck in a hopeless state fails it."""
        k8s_job = self._get_job(name)
        if k8s_job.metadata.uid != uid:
            return "failed", "the Job was replaced by another one of the same name"
        outcome, reason = self._terminal(k8s_job)
        if outcome:
            return outcome, reason
        for pod in self._pods(uid):
            _, waiting = self._container_state(pod)
            if waiting in HOPELESS_WAITING:
                outcome, reason = "failed", f"pod {pod.metadata.name}: {waiting}"
        return outcome, reason

    def _wait(
        self, name: str, uid: str, *, timeout: float, deadline: float, cancel: threading.Event | None
    ) -> tuple[str | None, str, bool, bool]:
        """Polls the Job (backing off) until it ends, the deadline passes or `cancel` is set:
        (outcome, reason, timed_out, cancelled). Transient API errors are logged and polled through."""
        from kubernetes.client.exceptions import ApiException

        interval = self.poll_initial
        while True:
            try:
                outcome, reason = self._poll_once(name, uid)
                if outcome:
                    return outcome, reason, False, False
            except ApiException as err:
                if err.status == 404:
                    return "failed", "the Job was deleted by someone else", False, False
                _log.warning("job_poll_failed", job=name, status=err.status, reason=err.reason)
            except LauncherError:
                raise
            except Exception as err:  # noqa: BLE001 (API unreachable for a moment: keep polling to the deadline)
                _log.warning("job_poll_failed", job=name, error=str(err))
            if time.monotonic() >= deadline:
                return None, f"no result after {timeout:g} s", True, False
            if sleep_unless_cancelled(cancel, min(interval, max(0.0, deadline - time.monotonic()))):
                return None, "cancelled", False, True
            interval = min(interval * 1.5, self.poll_max)

    def _failure_details(self, uid: str, reason: str) -> tuple[int | None, str, str]:
        """(exit code, reason with the container's state, log tail) of a Job that did not succeed, from its last
        pod."""
        exit_code, tail = None, ""
        try:
            pods = self._pods(uid)
            if pods:
                exit_code, state = self._container_state(pods[-1])
                if state and state not in reason:
                    reason = f"{reason}; container: {state}" if reason else f"container: {state}"
                tail = last_lines(self._log_tail(pods[-1].metadata.name))
        except LauncherError:
            raise
        except Exception as err:  # noqa: BLE001
            tail = f"(pods not readable: {err})"
        return exit_code, reason, tail

    def run(self, job: JobSpec, timeout: float, *, cancel: threading.Event | None = None) -> JobResult:
        manifest = build_job_manifest(job, self.cfg, timeout=timeout, namespace=self.namespace)
        name = manifest["metadata"]["name"]
        t0 = time.monotonic()
        deadline = t0 + timeout + self.grace
        try:
            uid = self._create(manifest, deadline, cancel)
            _log.info(
                "job_started", job=job.name, launcher="kubernetes", k8s_job=name, namespace=self.namespace, uid=uid
            )
            outcome, reason, timed_out, cancelled = self._wait(
                name, uid, timeout=timeout, deadline=deadline, cancel=cancel
            )
            if "DeadlineExceeded" in reason:
                timed_out = True
            ok = outcome == "succeeded"
            exit_code, reason, tail = (0, reason, "") if ok else self._failure_details(uid, reason)
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
