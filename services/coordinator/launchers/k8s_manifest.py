"""`build_job_manifest`: the batch/v1 Job that runs one job on Kubernetes (pure: no API calls, no files read).

The pod runs `alignd ARGS` in the configured image with the shared run
volume mounted at the same path as in the coordinator, a read-only root
file system, no API token, restartPolicy Never; the Job has backoffLimit 0
(a failure is reported, not retried behind the coordinator's back) and
activeDeadlineSeconds = the job's timeout.
"""

from __future__ import annotations

import math
from typing import Any

from alignd.config import KubernetesLauncherConfig
from alignd.services.coordinator.launchers.base import JobResources, JobSpec, job_name

CONTAINER = "job"


def _label_value(value: str) -> str:
    return job_name(value)  # label values: at most 63 characters of the same alphabet (plus '.', '_', not needed here)


def _labels(spec: JobSpec, cfg: KubernetesLauncherConfig) -> dict[str, str]:
    """The Job's and its pod's labels: alignd's, then the configuration's, then the job's."""
    return {
        "app.kubernetes.io/name": "alignd",
        "app.kubernetes.io/component": "job",
        "app.kubernetes.io/part-of": "alignd",
        "app.kubernetes.io/managed-by": "alignd-coordinator",
        "alignd.io/job": _label_value(spec.name),
        **cfg.labels,
        **spec.labels,
    }


def _env(spec: JobSpec, cfg: KubernetesLauncherConfig) -> dict[str, str]:
    """The container's environment: alignd's defaults, then the configuration's, then the job's."""
    return {
        "HOME": "/tmp",
        "ALIGND_CACHE": "/var/cache/alignd",
        "HF_HOME": "/var/cache/alignd/huggingface",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        **cfg.env,
        **spec.env,
    }


def _resources(res: JobResources | None) -> dict[str, dict[str, str]]:
    """The container's requests and limits ({} when there are none): memory is requested and limited alike."""
    if res is None:
        return {}
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu:
        requests["cpu"] = str(res.cpu)
    if res.memory:
        requests["memory"] = limits["memory"] = str(res.memory)
    if res.gpu:
        limits["nvidia.com/gpu"] = str(res.gpu)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _container(spec: JobSpec, cfg: KubernetesLauncherConfig) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": ["alignd"],  # the images' entrypoint is `alignd serve`
        "args": list(spec.args),
        "env": [{"name": k, "value": str(v)} for k, v in _env(spec, cfg).items()],
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
    resources = _resources(spec.resources)
    if resources:
        container["resources"] = resources
    return container


def _pod_spec(container: dict[str, Any], cfg: KubernetesLauncherConfig) -> dict[str, Any]:
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
    return pod_spec


def build_job_manifest(
    spec: JobSpec, cfg: KubernetesLauncherConfig, *, timeout: float | None = None, namespace: str | None = None
) -> dict:
    """The batch/v1 Job that runs `alignd ARGS` for `spec` (pure: no API calls, no files read)."""
    labels = _labels(spec, cfg)
    metadata: dict[str, Any] = {"name": job_name(spec.name), "labels": labels}
    ns = namespace or cfg.namespace
    if ns:
        metadata["namespace"] = ns
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,  # a failed job is reported, not retried behind the coordinator's back
        "ttlSecondsAfterFinished": cfg.ttl_seconds_after_finished,
        "template": {"metadata": {"labels": labels}, "spec": _pod_spec(_container(spec, cfg), cfg)},
    }
    if timeout is not None:
        job_spec["activeDeadlineSeconds"] = max(1, math.ceil(timeout))
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}
