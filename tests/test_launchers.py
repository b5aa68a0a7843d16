"""The coordinator's job launchers (services/coordinator/launchers/) and `alignd job train-rm`.

- build_job_manifest: strict Kubernetes schema validation (1.30, 1.33), CPU and GPU jobs.
- KubernetesLauncher against a fake API server: the real `kubernetes` client (BatchV1Api, CoreV1Api) over a fake
  HTTP layer that records every request as (verb, resource) the way the API server's RBAC sees it; each must be
  allowed by the coordinator's Role (COORDINATOR_RBAC_RULES of tests/test_chart.py), and the Job is deleted
  whatever the outcome.
- LocalLauncher running `alignd job train-rm` for real on a tiny model: the published model loads as a reward
  model, a repeated job id replays the stored result, an invalid request exits 2 naming the field, a timeout
  kills the child.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import kubernetes_validate
import pytest

from alignd.config import CoordinatorConfig, KubernetesLauncherConfig, LauncherConfig, build_config
from alignd.jobs import rm_response
from alignd.services.coordinator import launchers
from alignd.services.coordinator.launchers import (
    JobFailed,
    JobResources,
    JobSpec,
    KubernetesLauncher,
    LauncherError,
    LocalLauncher,
    build_job_manifest,
    job_name,
    make_launcher,
    run_rm_job,
)

from test_chart import COORDINATOR_RBAC_RULES  # the chart's Role, checked against rbac.yaml there

KUBE_VERSIONS = ("1.30.0", "1.33.0")
NS = "ml"


def k8s_cfg(**kw) -> KubernetesLauncherConfig:
    base = {"namespace": NS, "image": "registry.example.com/alignd/alignd-gpu:0.1.0", "pvc_claim": "rel-alignd-data"}
    return build_config(KubernetesLauncherConfig, {**base, **kw})


CPU_SPEC = JobSpec(
    name="pipeline-rm-0",
    args=["job", "train-rm", "--request", "/var/lib/alignd/runs/p/jobs/r.json"],
    resources=JobResources(cpu="2", memory="8Gi"),
)
GPU_SPEC = JobSpec(
    name="Run_42/RM round 3 with a rather long name that will not fit in sixty-three characters",
    args=["job", "train-rm", "--request", "/var/lib/alignd/runs/p/jobs/r.json"],
    env={"EXTRA": "1"},
    resources=JobResources(cpu="8", memory="64Gi", gpu=1),
    labels={"team": "rl"},
)


# -- the manifest -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [CPU_SPEC, GPU_SPEC], ids=["cpu", "gpu"])
def test_job_manifest_is_a_valid_kubernetes_job(spec):
    cfg = k8s_cfg(
        service_account="alignd-jobs",
        image_pull_secrets=["regcred"],
        node_selector={"pool": "gpu"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        labels={"app.kubernetes.io/instance": "rel"},
        env={"NCCL_DEBUG": "WARN"},
    )
    m = build_job_manifest(spec, cfg, timeout=3600.5, namespace=NS)
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(m, version, strict=True)
    assert m["metadata"]["namespace"] == NS
    name = m["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    assert name == job_name(spec.name)  # stable: a restarted coordinator finds the same Job
    js = m["spec"]
    assert js["backoffLimit"] == 0 and js["activeDeadlineSeconds"] == 3601 and js["ttlSecondsAfterFinished"] == 600
    pod = js["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "alignd-jobs" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    (c,) = pod["containers"]
    assert c["command"] == ["alignd"] and c["args"] == spec.args and c["image"] == cfg.image
    assert {"name": "data", "mountPath": "/var/lib/alignd"} in c["volumeMounts"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "rel-alignd-data"}} in pod["volumes"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["NCCL_DEBUG"] == "WARN" and env["HF_HUB_OFFLINE"] == "1" and env["HOME"] == "/tmp"
    for labels in (m["metadata"]["labels"], js["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/name"] == "alignd" and labels["app.kubernetes.io/instance"] == "rel"
        assert labels["app.kubernetes.io/managed-by"] == "alignd-coordinator"
        assert all(len(v) <= 63 for v in labels.values())
    res = c["resources"]
    assert res["requests"]["cpu"] == spec.resources.cpu and res["limits"]["memory"] == spec.resources.memory
    if spec.resources.gpu:
        assert res["limits"]["nvidia.com/gpu"] == "1" and env["EXTRA"] == "1" and labels["team"] == "rl"
    else:
        assert "nvidia.com/gpu" not in res["limits"]


def test_job_manifest_without_resources_or_timeout_is_valid():
    m = build_job_manifest(JobSpec(name="x", args=["job", "train-rm", "--request", "/r.json"]), k8s_cfg(namespace=None))
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(m, version, strict=True)
    assert "namespace" not in m["metadata"] and "activeDeadlineSeconds" not in m["spec"]
    assert "resources" not in m["spec"]["template"]["spec"]["containers"][0]


def test_launcher_config_chooses_the_launcher_and_checks_kubernetes_fields(monkeypatch, tmp_path):
    assert CoordinatorConfig().launcher.kind == "local"
    assert isinstance(make_launcher(CoordinatorConfig().launcher), LocalLauncher)
    with pytest.raises(Exception, match="kubernetes.image and kubernetes.pvc_claim required"):
        build_config(CoordinatorConfig, {"launcher": {"kind": "kubernetes"}})
    cfg = build_config(
        CoordinatorConfig,
        {},
        [
            "launcher.kind=kubernetes",
            "launcher.kubernetes.image=img:1",
            "launcher.kubernetes.pvc_claim=data",
            "launcher.kubernetes.rm_resources.cpu=4",
            "launcher.kubernetes.rm_resources.gpu=1",
        ],
    )
    assert cfg.launcher.kubernetes.rm_resources.cpu == "4"
    sa_namespace = tmp_path / "namespace"
    monkeypatch.setattr(launchers.k8s, "SERVICE_ACCOUNT_NAMESPACE", str(sa_namespace))
    launcher = make_launcher(cfg.launcher, api_client=FakeCluster().api_client())
    assert isinstance(launcher, KubernetesLauncher)
    assert launcher.rm_resources == JobResources(cpu="4", memory="8Gi", gpu=1)
    assert launcher.namespace == "default"  # not in a pod: no service-account namespace file
    sa_namespace.write_text("team-a\n")
    assert make_launcher(cfg.launcher, api_client=FakeCluster().api_client()).namespace == "team-a"


# -- a fake API server behind the real client --------------------------------------------------------------------------
class _Resp:
    def __init__(self, status: int, body, content_type: str = "application/json") -> None:
        self.status = status
        self.reason = {200: "OK", 201: "Created", 404: "Not Found", 409: "Conflict", 500: "Internal Server Error"}.get(
            status, ""
        )
        self.data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.headers = {"content-type": content_type}


def _status(code: int, reason: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code}


class FakeCluster:
    """Answers the HTTP requests of the kubernetes client like an API server with a Job controller would.

    `outcome`: "succeed" (after `polls` reads of the Job), "fail" (the pod exits with `exit_code`), or "hang" (never
    finishes). Every request is recorded as (verb, apiGroup, resource, namespace)."""

    def __init__(
        self, outcome: str = "succeed", polls: int = 2, exit_code: int = 1, log: str = "", transient_errors: int = 0
    ) -> None:
        self.outcome, self.polls, self.exit_code, self.log = outcome, polls, exit_code, log
        self.transient_errors = transient_errors
        self.calls: list[tuple[str, str, str, str]] = []
        self.jobs: dict[str, dict] = {}
        self.created: list[dict] = []
        self.deleted: list[tuple[str, dict]] = []
        self.reads = 0
        self.lock = threading.Lock()
        self._uid = 0

    def api_client(self):
        from kubernetes import client

        conf = client.Configuration()
        conf.host = "https://fake-apiserver"
        api = client.ApiClient(conf)
        api.rest_client = (
            self  # the client's HTTP layer: request(method, url, headers, body, post_params, _request_timeout)
        )
        return api

    def add_job(self, manifest: dict, *, failed: bool = False) -> dict:
        self._uid += 1
        job = copy.deepcopy(manifest)
        job["metadata"]["uid"] = f"uid-{self._uid}"
        job["metadata"]["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        job["status"] = {"active": 1}
        if failed:
            job["status"] = {
                "failed": 1,
                "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
            }
        self.jobs[job["metadata"]["name"]] = job
        return job

    def _pod(self, job: dict) -> dict:
        uid = job["metadata"]["uid"]
        st = job["status"]
        if st.get("succeeded"):
            state = {"terminated": {"exitCode": 0, "reason": "Completed"}}
        elif st.get("failed"):
            state = {"terminated": {"exitCode": self.exit_code, "reason": "Error"}}
        else:
            state = {"running": {}}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{job['metadata']['name']}-abcde",
                "namespace": NS,
                "labels": {"batch.kubernetes.io/controller-uid": uid},
                "creationTimestamp": job["metadata"]["creationTimestamp"],
            },
            "spec": job["spec"]["template"]["spec"],
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {"name": "job", "image": "i", "imageID": "", "ready": False, "restartCount": 0, "state": state}
                ],
            },
        }

    @staticmethod
    def rbac_view(method: str, url: str) -> tuple[str, str, str, str, list[str]]:
        """(verb, apiGroup, resource[/subresource], namespace, path parts after the resource) as RBAC sees a request."""
        u = urlparse(url)
        parts = u.path.strip("/").split("/")
        if parts[0] == "api":
            group, rest = "", parts[2:]
        else:
            group, rest = parts[1], parts[3:]
        assert rest[0] == "namespaces", url  # namespaced calls only: the Role is a namespaced Role
        ns, resource, tail = rest[1], rest[2], rest[3:]
        named = bool(tail)
        if len(tail) > 1:
            resource = f"{resource}/{tail[1]}"
        q = parse_qs(u.query)
        verb = {
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if named else "deletecollection",
            "GET": "get" if named else ("watch" if q.get("watch", [""])[0] in ("true", "1") else "list"),
        }[method]
        return verb, group, resource, ns, tail

    def request(self, method, url, headers=None, body=None, post_params=None, _request_timeout=None):
        from kubernetes.client import rest

        with self.lock:
            verb, group, resource, ns, tail = self.rbac_view(method, url)
            self.calls.append((verb, group, resource, ns))
            return rest.RESTResponse(self._answer(verb, resource, tail, url, body))

    def _answer(self, verb, resource, tail, url, body) -> _Resp:
        name = tail[0] if tail else None
        if resource == "jobs" and verb == "create":
            if body["metadata"]["name"] in self.jobs:
                return _Resp(409, _status(409, "AlreadyExists"))
            self.created.append(body)
            return _Resp(201, self.add_job(body))
        if resource == "jobs" and verb == "get":
            job = self.jobs.get(name)
            if job is None:
                return _Resp(404, _status(404, "NotFound"))
            if self.transient_errors:
                self.transient_errors -= 1
                return _Resp(500, _status(500, "InternalError"))
            self.reads += 1
            if self.reads >= self.polls and job["status"].get("active"):
                if self.outcome == "succeed":
                    job["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
                elif self.outcome == "fail":
                    job["status"] = {
                        "failed": 1,
                        "conditions": [
                            {
                                "type": "Failed",
                                "status": "True",
                                "reason": "BackoffLimitExceeded",
                                "message": "Job has reached the specified backoff limit",
                            }
                        ],
                    }
            return _Resp(200, job)
        if resource == "jobs" and verb == "delete":
            job = self.jobs.pop(name, None)
            if job is None:
                return _Resp(404, _status(404, "NotFound"))
            self.deleted.append((name, parse_qs(urlparse(url).query)))
            return _Resp(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        if resource == "pods" and verb == "list":
            sel = parse_qs(urlparse(url).query)["labelSelector"][0]
            pods = [
                self._pod(j)
                for j in self.jobs.values()
                if f"batch.kubernetes.io/controller-uid={j['metadata']['uid']}" == sel
            ]
            return _Resp(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods})
        if resource == "pods/log" and verb == "get":
            return _Resp(200, self.log.encode(), "text/plain")
        return _Resp(405, _status(405, "MethodNotAllowed"))


def allowed(verb: str, group: str, resource: str) -> bool:
    return any(
        group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in COORDINATOR_RBAC_RULES
    )


def assert_rbac_ok(cluster: FakeCluster) -> None:
    assert cluster.calls
    for verb, group, resource, ns in cluster.calls:
        assert ns == NS, (verb, resource, ns)
        assert allowed(verb, group, resource), (
            f"{verb} {group or 'core'}/{resource} is not granted by the coordinator's Role"
        )


def fast_launcher(cluster: FakeCluster, **kw) -> KubernetesLauncher:
    return KubernetesLauncher(
        k8s_cfg(), api_client=cluster.api_client(), poll_initial_seconds=0.01, poll_max_seconds=0.05, **kw
    )


def test_kubernetes_launcher_success_uses_only_granted_verbs_and_deletes_the_job():
    cluster = FakeCluster("succeed", polls=3, transient_errors=1)
    result = fast_launcher(cluster).run(CPU_SPEC, timeout=60)
    assert result.succeeded and result.exit_code == 0 and not result.timed_out, result
    assert_rbac_ok(cluster)
    (created,) = cluster.created
    assert created["spec"]["activeDeadlineSeconds"] == 60 and created["metadata"]["namespace"] == NS
    assert cluster.deleted == [(job_name(CPU_SPEC.name), {"propagationPolicy": ["Background"]})]
    assert not cluster.jobs
    verbs = {(v, r) for v, _, r, _ in cluster.calls}
    assert {("create", "jobs"), ("get", "jobs"), ("delete", "jobs")} <= verbs


def test_kubernetes_launcher_failure_reports_exit_code_and_log_tail_and_deletes_the_job():
    log = "\n".join(f"line {i}" for i in range(100)) + "\nalignd: job train-rm: comparisons_path: must not be empty\n"
    cluster = FakeCluster("fail", polls=2, exit_code=2, log=log)
    result = fast_launcher(cluster).run(GPU_SPEC, timeout=60)
    assert not result.succeeded and result.exit_code == 2 and not result.timed_out
    assert "BackoffLimitExceeded" in result.reason
    assert result.log_tail.endswith("comparisons_path: must not be empty") and "line 50" not in result.log_tail
    assert_rbac_ok(cluster)
    assert ("get", "", "pods/log", NS) in cluster.calls
    assert [n for n, _ in cluster.deleted] == [job_name(GPU_SPEC.name)] and not cluster.jobs
    assert JobFailed(result).invalid_request


def test_kubernetes_launcher_timeout_and_cancel_delete_the_job():
    cluster = FakeCluster("hang")
    t0 = time.monotonic()
    result = fast_launcher(cluster, grace_seconds=0.0).run(CPU_SPEC, timeout=0.3)
    assert result.timed_out and not result.succeeded and time.monotonic() - t0 < 5
    assert_rbac_ok(cluster)
    assert len(cluster.deleted) == 1 and not cluster.jobs

    cluster = FakeCluster("hang")
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    result = fast_launcher(cluster).run(CPU_SPEC, timeout=60, cancel=cancel)
    assert result.cancelled and not result.succeeded
    assert_rbac_ok(cluster)
    assert len(cluster.deleted) == 1 and not cluster.jobs


def test_kubernetes_launcher_adopts_a_running_job_and_replaces_a_failed_one():
    # A restarted coordinator: the Job of the same job id is still running -> watched to the end, not duplicated.
    cluster = FakeCluster("succeed", polls=2)
    manifest = build_job_manifest(CPU_SPEC, k8s_cfg(), timeout=60, namespace=NS)
    cluster.add_job(manifest)
    assert fast_launcher(cluster).run(CPU_SPEC, timeout=60).succeeded
    assert cluster.created == [] and len(cluster.deleted) == 1
    assert_rbac_ok(cluster)
    # ... or it failed before: deleted and created afresh.
    cluster = FakeCluster("succeed", polls=2)
    cluster.add_job(manifest, failed=True)
    assert fast_launcher(cluster).run(CPU_SPEC, timeout=60).succeeded
    assert len(cluster.created) == 1 and len(cluster.deleted) == 2 and not cluster.jobs
    assert_rbac_ok(cluster)


def test_kubernetes_launcher_refuses_paths_off_the_shared_volume(tmp_path):
    launcher = fast_launcher(FakeCluster())
    launcher.check_shared_path("/var/lib/alignd/runs/p/rm-0")
    with pytest.raises(LauncherError, match="shared run volume"):
        launcher.check_shared_path(tmp_path / "rm-0")
    with pytest.raises(LauncherError, match="shared run volume"):
        run_rm_job(
            launcher,
            {"job_id": "j", "init_model_dir": "m", "comparisons_path": "c", "output_dir": str(tmp_path / "o")},
            60,
        )


# -- the local launcher, for real --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    from alignd.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("launcher-models") / "lm", seed=0)


def _comparisons(path: Path) -> str:
    words = ["good", "nice", "fine", "poor", "bad", "awful"]
    rows = []
    for i in range(8):
        cs = [f"{words[(i + j) % 6]} {words[(i + 2 * j) % 6]} {j}" for j in range(3)]
        score = [
            sum(c.count(w) for w in ("good", "nice")) - sum(c.count(w) for w in ("bad", "awful")) + 0.01 * j
            for j, c in enumerate(cs)
        ]
        rows.append(
            {"prompt": f"Say something {i}:", "completions": cs, "ranking": sorted(range(3), key=lambda j: -score[j])}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class Counting:
    """A JobLauncher that counts the jobs it runs through another one."""

    def __init__(self, inner) -> None:
        self.inner, self.runs = inner, 0
        self.rm_resources = inner.rm_resources

    def run(self, job, timeout, *, cancel=None):
        self.runs += 1
        return self.inner.run(job, timeout, cancel=cancel)


def test_local_launcher_trains_a_reward_model_and_replays_it(tiny_lm, tmp_path):
    from alignd.config import ModelConfig
    from alignd.models.handle import load_scalar_head_model

    run_dir = tmp_path / "run"
    request = {
        "job_id": "run-rm-0",
        "init_model_dir": str(tiny_lm),
        "comparisons_path": _comparisons(tmp_path / "c.jsonl"),
        "config_yaml": "max_tokens: 32\nbatch_size: 4\nvalidation_fraction: 0.25\n",
        "output_dir": str(run_dir / "rm-0"),
    }
    launcher = Counting(make_launcher(LauncherConfig()))
    resp = run_rm_job(launcher, request, timeout=240)
    assert launcher.runs == 1 and not resp["replayed"]
    assert resp["model_dir"] == str((run_dir / "rm-0").resolve())
    assert resp["train_comparisons"] == 6 and resp["validation_comparisons"] == 2 and len(resp["history"]) == 1
    rm = load_scalar_head_model(ModelConfig(path=resp["model_dir"]), allow_new_head=False)  # a trained head was saved
    assert rm.config.alignd_score_bias == pytest.approx(resp["score_bias"])
    assert rm_response(resp).train_comparisons == 6  # the dict converts back to the learner RPC's message
    jobs_dir = run_dir / "jobs"
    req_file = jobs_dir / "rm-run-rm-0.request.json"
    assert json.loads(req_file.read_text())["job_id"] == "run-rm-0"
    assert '"event": "rm_finished"' in (jobs_dir / "rm-run-rm-0.log").read_text()

    # The same job id again: the published result, nothing launched.
    again = run_rm_job(launcher, request, timeout=240)
    assert launcher.runs == 1 and again["replayed"]
    assert {k: v for k, v in again.items() if k != "replayed"} == {k: v for k, v in resp.items() if k != "replayed"}

    # The job itself replays too (a second launch of the same request): no training, the stored response printed.
    log = tmp_path / "again.log"
    weights = (run_dir / "rm-0" / "model.safetensors").stat().st_mtime_ns
    result = LocalLauncher().run(
        JobSpec(name="again", args=["job", "train-rm", "--request", str(req_file)], log_path=str(log)), timeout=240
    )
    assert result.succeeded, result.describe()
    text = log.read_text()
    assert "rm_started" not in text
    printed = json.loads(next(line for line in text.splitlines() if line.startswith('{"model_dir"')))
    assert printed["replayed"] and printed["val_accuracy"] == resp["val_accuracy"]
    assert (run_dir / "rm-0" / "model.safetensors").stat().st_mtime_ns == weights


def test_local_launcher_invalid_request_exits_2_naming_the_field(tiny_lm, tmp_path):
    request = {
        "job_id": "bad",
        "init_model_dir": str(tiny_lm),
        "output_dir": str(tmp_path / "rm"),
    }  # no comparisons_path
    with pytest.raises(JobFailed) as info:
        run_rm_job(LocalLauncher(), request, timeout=240)
    assert info.value.invalid_request and info.value.result.exit_code == 2
    assert "comparisons_path: must not be empty" in str(info.value)
    assert not (tmp_path / "rm").exists()
    # Not JSON at all / an unknown field: exit 2 as well, before any model is loaded.
    for content, needle in (
        ("{not json", "Expecting property name"),
        ('{"job_id": "x", "comparisons": "c"}', "comparisons: unknown field"),
    ):
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        log = tmp_path / "bad.log"
        log.unlink(missing_ok=True)
        result = LocalLauncher().run(
            JobSpec(name="bad", args=["job", "train-rm", "--request", str(bad)], log_path=str(log)), timeout=120
        )
        assert result.exit_code == 2 and needle in result.log_tail, result.log_tail


def test_local_launcher_timeout_kills_the_child(tiny_lm, tmp_path, monkeypatch):
    import os

    request = tmp_path / "r.json"
    request.write_text(
        json.dumps(
            {
                "job_id": "slow",
                "init_model_dir": str(tiny_lm),
                "comparisons_path": _comparisons(tmp_path / "c.jsonl"),
                "config_yaml": "epochs: 1000\nmax_tokens: 32\n",
                "output_dir": str(tmp_path / "rm"),
            }
        )
    )
    spec = JobSpec(
        name="slow", args=["job", "train-rm", "--request", str(request)], log_path=str(tmp_path / "slow.log")
    )
    pids: list[int] = []
    real_popen = launchers.local.subprocess.Popen

    def spy(*a, **kw):
        p = real_popen(*a, **kw)
        pids.append(p.pid)
        return p

    monkeypatch.setattr(launchers.local.subprocess, "Popen", spy)
    t0 = time.monotonic()
    result = LocalLauncher(kill_grace_seconds=2.0).run(spec, timeout=1.5)
    monkeypatch.undo()
    assert result.timed_out and not result.succeeded and result.exit_code is None
    assert time.monotonic() - t0 < 1.5 + 2.0 + 3.0
    (pid,) = pids
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone (and reaped)
    assert not (tmp_path / "rm").exists()
