"""How the coordinator starts jobs outside the roles: local processes or Kubernetes Jobs, and their resources."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alignd.config.base import Strict

_QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


class JobResourcesConfig(Strict):
    """CPU, memory and GPUs of one job's pod (requests; memory and GPUs are also limits)."""

    cpu: str | None = Field(
        "2", pattern=_QUANTITY, description='CPU request (a Kubernetes quantity: "2", "500m"); null = none.'
    )
    memory: str | None = Field(
        "8Gi", pattern=_QUANTITY, description='Memory request and limit (a Kubernetes quantity: "8Gi"); null = none.'
    )
    gpu: int = Field(
        0,
        ge=0,
        description="nvidia.com/gpu limit. The training jobs run on CPU today (the learner's supervised trainer has no "
        "device option), so 0 by default; GPU nodes usually also need a toleration (see tolerations).",
    )

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _number_to_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


class KubernetesLauncherConfig(Strict):
    """How the coordinator runs a job as a Kubernetes batch/v1 Job (launcher.kind: kubernetes)."""

    namespace: str | None = Field(
        None,
        description="Namespace of the Jobs; default: the coordinator pod's own namespace (from its service-account "
        'token mount), else "default". The coordinator\'s Role (charts/alignd/templates/rbac.yaml) covers its own '
        "namespace only.",
    )
    kubeconfig: str | None = Field(
        None, description="A kubeconfig file to reach the API with; default: the in-cluster service account."
    )
    image: str | None = Field(
        None, description="Image of the job pods: one with the model dependencies (the alignd-gpu image). Required."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="imagePullPolicy of the job container."
    )
    image_pull_secrets: list[str] = Field([], description="Names of Secrets to pull the image with.")
    service_account: str | None = Field(
        None,
        description="serviceAccountName of the job pods (no API token is mounted either way); default: the "
        "namespace's default.",
    )
    pvc_claim: str | None = Field(
        None,
        description="PersistentVolumeClaim of the shared run volume (the chart's: <release>-alignd-data), mounted in "
        "the job "
        "pod at run_mount_path. Required: the job reads its request and writes its result there.",
    )
    run_mount_path: str = Field(
        "/var/lib/alignd",
        description="Where the job pod mounts pvc_claim: the coordinator's mount path, so every path of a request "
        "(under runs_dir) means the same file in the job.",
    )
    rm_resources: JobResourcesConfig = Field(
        JobResourcesConfig(), description="Resources of a reward-model training job."
    )
    ttl_seconds_after_finished: int = Field(
        600,
        ge=0,
        description="ttlSecondsAfterFinished: the cluster deletes a finished Job after this long if the coordinator "
        "could not.",
    )
    node_selector: dict[str, str] = Field({}, description="nodeSelector of the job pods.")
    tolerations: list[dict[str, Any]] = Field(
        [],
        description="Tolerations of the job pods (Kubernetes objects), e.g. "
        "[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}].",
    )
    labels: dict[str, str] = Field(
        {}, description="Extra labels of the Job and its pods (e.g. app.kubernetes.io/instance)."
    )
    env: dict[str, str] = Field({}, description="Extra environment variables of the job container.")


class LauncherConfig(Strict):
    """How the coordinator runs one-off jobs such as reward-model training (services/coordinator/launchers/)."""

    kind: Literal["local", "kubernetes"] = Field(
        "local",
        description='"local": `python -m alignd.cli job ...` as a child process of the coordinator; "kubernetes": a '
        "batch/v1 "
        "Job in the cluster (see kubernetes).",
    )
    kubernetes: KubernetesLauncherConfig = Field(KubernetesLauncherConfig(), description="The Kubernetes Job launcher.")

    @model_validator(mode="after")
    def _kubernetes_needs_image_and_volume(self) -> LauncherConfig:
        if self.kind == "kubernetes":
            missing = [k for k in ("image", "pvc_claim") if not getattr(self.kubernetes, k)]
            if missing:
                raise ValueError(f"{' and '.join('kubernetes.' + k for k in missing)} required when kind is kubernetes")
        return self
