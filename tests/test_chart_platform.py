"""What a platform team needs from the chart (issue 20, item 7), rendered with the real Helm engine: a subchart's
`global`, per-role scheduling and pod extras, Kueue's queue label, the `helm test` hook (schema-valid, its probe
configuration what `alignd probe` reads, and that command passing against a real local stack), the reward alerts
and their runbooks, a per-release dashboard, and alignd_build_info.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import kubernetes_validate
import yaml

from alignd.config import ROLES

from test_chart import (
    CHART,
    FULLNAME,
    KUBE_VERSIONS,
    NAMESPACE,
    ROOT,
    chart,  # noqa: F401 - the module's Helm chart fixture
    find,
    one,
    render,
    workload,
)

PROBE = f"{FULLNAME}-probe"


def pod_spec(docs, role) -> dict:
    return workload(docs, role)["spec"]["template"]["spec"]


def validate(doc) -> None:
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_global_values_are_accepted(chart):  # noqa: F811
    docs = render(chart, {"global": {"imageRegistry": "registry.internal", "storageClass": "fast", "any": {"x": 1}}})
    assert workload(docs, "policy")


def test_per_role_scheduling_and_pod_extras(chart):  # noqa: F811
    extras = {
        "podLabels": {"volcano.sh/queue-name": "ml", "team": "rlhf"},
        "priorityClassName": "ml-high",
        "schedulerName": "volcano",
        "runtimeClassName": "nvidia",
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}
        ],
        "initContainers": [{"name": "fetch", "image": "busybox:1.36", "command": ["true"]}],
        "extraContainers": [{"name": "shipper", "image": "fluent/fluent-bit:3.1"}],
        "extraVolumes": [{"name": "models", "emptyDir": {}}],
        "extraVolumeMounts": [{"name": "models", "mountPath": "/models"}],
    }
    docs = render(chart, dict.fromkeys(ROLES, extras))
    for role in ROLES:
        w = workload(docs, role)
        spec = w["spec"]["template"]["spec"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert labels["volcano.sh/queue-name"] == "ml" and labels["app.kubernetes.io/component"] == role
        assert (spec["priorityClassName"], spec["schedulerName"], spec["runtimeClassName"]) == (
            "ml-high",
            "volcano",
            "nvidia",
        )
        assert spec["topologySpreadConstraints"] == extras["topologySpreadConstraints"]
        assert [c["name"] for c in spec["initContainers"]] == ["fetch"]
        assert [c["name"] for c in spec["containers"]] == [role, "shipper"]
        assert {"name": "models", "emptyDir": {}} in spec["volumes"]
        validate(w)
    # None of it by default.
    spec = pod_spec(render(chart, {}), "learner")
    assert not {"priorityClassName", "schedulerName", "runtimeClassName", "initContainers"} & set(spec)
    assert len(spec["containers"]) == 1


def test_kueue_queue_label(chart):  # noqa: F811
    docs = render(chart, {"kueue": {"queueName": "gpu-queue"}})
    for role in ROLES:
        w = workload(docs, role)
        queued = role != "coordinator"
        for labels in (w["metadata"]["labels"], w["spec"]["template"]["metadata"]["labels"]):
            assert (labels.get("kueue.x-k8s.io/queue-name") == "gpu-queue") is queued, role
        validate(w)
    docs = render(chart, {"kueue": {"queueName": "q", "roles": ["learner"]}})
    assert [r for r in ROLES if "kueue.x-k8s.io/queue-name" in workload(docs, r)["metadata"]["labels"]] == ["learner"]
    assert all("kueue.x-k8s.io/queue-name" not in workload(render(chart, {}), r)["metadata"]["labels"] for r in ROLES)


# -- helm test ----------------------------------------------------------------------------------------------------


def probe_parts(docs) -> tuple[dict, dict, dict]:
    pod, cm = one(docs, "Pod", PROBE), one(docs, "ConfigMap", PROBE)
    return pod, cm, yaml.safe_load(cm["data"]["probe.yaml"])


def test_helm_test_hook_is_a_valid_pod_running_alignd_probe(chart):  # noqa: F811
    from alignd.probe import ProbeConfig

    docs = render(chart, {})
    pod, cm, cfg = probe_parts(docs)
    for doc in (pod, cm):
        assert doc["metadata"]["annotations"]["helm.sh/hook"] == "test"
        validate(doc)
    (c,) = pod["spec"]["containers"]
    assert c["command"] == ["alignd", "probe", "--config", "/etc/alignd/probe/probe.yaml"]
    assert c["image"] == workload(docs, "coordinator")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert pod["spec"]["restartPolicy"] == "Never" and pod["spec"]["securityContext"]["runAsNonRoot"] is True
    parsed = ProbeConfig.model_validate(cfg)  # what `alignd probe` reads
    assert set(parsed.roles) == set(ROLES)
    assert parsed.roles["policy"] == f"{FULLNAME}-policy-headless.{NAMESPACE}.svc.cluster.local:50051"
    assert parsed.roles["reward"] == f"{FULLNAME}-reward.{NAMESPACE}.svc.cluster.local:50051"
    assert parsed.reward_http.url == f"http://{FULLNAME}-reward.{NAMESPACE}.svc.cluster.local:8000/get_reward"
    # The token it sends is the coordinator's, from the auth Secret.
    (auth,) = [v for v in pod["spec"]["volumes"] if v["name"] == "auth"]
    assert auth["secret"]["items"] == [{"key": "coordinator", "path": "token"}]
    assert parsed.reward_http.token_file == "/etc/alignd/auth/token"
    # Every role's NetworkPolicy admits it.
    labels = pod["metadata"]["labels"]
    for role in ("policy", "reward", "reference", "learner"):
        np = one(docs, "NetworkPolicy", f"{FULLNAME}-{role}")
        peers = [p for r in np["spec"]["ingress"] for p in r.get("from", []) if "podSelector" in p]
        assert any(all(labels.get(k) == v for k, v in p["podSelector"]["matchLabels"].items()) for p in peers), role
    assert not find(render(chart, {"helmTest": {"enabled": False}}), "Pod")


def test_helm_test_hook_with_tls_and_reward_tls(chart):  # noqa: F811
    docs = render(chart, {"tls": {"enabled": True, "certManager": {"enabled": False}}})
    pod, _, cfg = probe_parts(docs)
    assert cfg["client"]["ca_file"] == "/etc/alignd/tls/ca.crt" and cfg["client"]["cert_file"].endswith("tls.crt")
    assert any(
        v["name"] == "tls" and v["secret"]["secretName"] == f"{FULLNAME}-coordinator-tls"
        for v in pod["spec"]["volumes"]
    )
    validate(pod)
    docs = render(
        chart,
        {"rewardTLS": {"enabled": True, "secretName": "rw-tls", "mutual": True, "coordinatorClientSecret": "cl"}},
    )
    pod, _, cfg = probe_parts(docs)
    assert cfg["reward_http"]["url"].startswith("https://")
    assert cfg["reward_http"]["cert_file"] == "/etc/alignd/reward-tls-client/tls.crt"
    assert {v["name"] for v in pod["spec"]["volumes"]} >= {"reward-tls", "reward-tls-client"}
    validate(pod)


def test_alignd_probe_passes_against_the_local_stack_and_fails_on_a_dead_role(tmp_path):
    """The helm test's command against `alignd up` (every role and /get_reward, with the operator's token)."""
    from test_stack import stack_token, start_up

    run_dir = tmp_path / "run"
    proc, _ = start_up(run_dir, tmp_path / "cache", "--set", "reward.http.port=0")
    try:
        stack = json.loads((run_dir / "stack.json").read_text())
        token = tmp_path / "token"
        token.write_text(stack_token(stack) + "\n")
        cfg = {
            "roles": {role: stack["services"][role]["address"] for role in ROLES},
            "reward_http": {"url": stack["services"]["reward"]["http_url"] + "/get_reward", "token_file": str(token)},
            "timeout_seconds": 30,
        }

        def probe(c) -> subprocess.CompletedProcess:
            path = tmp_path / "probe.yaml"
            path.write_text(yaml.safe_dump(c))
            return subprocess.run(
                [sys.executable, "-m", "alignd.cli", "probe", "--config", str(path)],
                capture_output=True,
                text=True,
                timeout=120,
                env=dict(os.environ),
            )

        ok = probe(cfg)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        lines = ok.stdout.splitlines()
        assert len(lines) == len(ROLES) + 1 and all(line.startswith("ok") for line in lines), lines
        assert re.search(r"get_reward .*reward -?\d+\.\d{4}", ok.stdout)
        # A wrong token and a role that is not there fail, each on its own line.
        token.write_text("not-a-token\n")
        bad = probe({**cfg, "roles": {**cfg["roles"], "ghost": "127.0.0.1:1"}, "timeout_seconds": 3})
        assert bad.returncode == 1
        failed = [line for line in bad.stdout.splitlines() if line.startswith("FAIL")]
        assert len(failed) == 2 and "health ghost" in failed[0] and "HTTP 401" in failed[1], bad.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# -- alerts, runbooks, dashboard ---------------------------------------------------------------------------------


def test_every_alert_links_its_runbook_section(chart):  # noqa: F811
    rules = yaml.safe_load((CHART / "rules" / "alignd.rules.yaml").read_text())["groups"][0]["rules"]
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    sections = {h.lower() for h in re.findall(r"^## (\w+)$", runbooks, flags=re.M)}
    for r in rules:
        url = r["annotations"]["runbook_url"]
        assert url == f"https://github.com/alignd/alignd/blob/main/docs/runbooks.md#{r['alert'].lower()}"
        assert r["alert"].lower() in sections, r["alert"]
    docs = render(
        chart, {"metrics": {"prometheusRule": {"enabled": True, "runbookUrl": "https://wiki.internal/alignd"}}}
    )
    rendered = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    assert [r["annotations"]["runbook_url"] for r in rendered] == [
        f"https://wiki.internal/alignd#{r['alert'].lower()}" for r in rules
    ]


def test_reward_alert_counts_both_apis_server_side_failures_only():
    rules = yaml.safe_load((CHART / "rules" / "alignd.rules.yaml").read_text())["groups"][0]["rules"]
    (r,) = [r for r in rules if r["alert"] == "AligndRewardErrors"]
    assert "alignd_reward_requests_total" in r["expr"] and "by (namespace, job, api)" in r["expr"]
    failing = re.search(r'code=~"([^"]+)"', r["expr"]).group(1).split("|")
    assert "INTERNAL" in failing and not {"INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED"} & set(failing)


def test_dashboard_is_the_releases_own(chart):  # noqa: F811
    def dashboard(release_values, name="rel", namespace=NAMESPACE):
        out = chart.render(
            {"metrics": {"grafanaDashboard": {"enabled": True}}, **release_values}, name=name, namespace=namespace
        )
        docs = [
            d for path, text in out.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text) if d
        ]
        (cm,) = [
            d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"
        ]
        return json.loads(cm["data"]["alignd.json"])

    a, b, c = dashboard({}), dashboard({}, name="other"), dashboard({}, namespace="ml2")
    assert len({a["uid"], b["uid"], c["uid"]}) == 3 and all(len(d["uid"]) <= 40 for d in (a, b, c))
    assert dashboard({})["uid"] == a["uid"]  # stable across upgrades
    (release,) = [v for v in a["templating"]["list"] if v["name"] == "release"]
    assert release["current"]["value"] == FULLNAME and FULLNAME in a["title"]
    source = json.loads((CHART / "dashboards" / "alignd.json").read_text())
    assert a["panels"] == source["panels"]  # only uid, title and the variables' current values change

    def exprs(panels):
        for p in panels:
            yield from exprs(p.get("panels", []))
            yield from (t["expr"] for t in p.get("targets", []) if t.get("expr"))

    all_exprs = list(exprs(source["panels"]))
    assert all_exprs and all('service=~"$release-.*"' in e for e in all_exprs)
    # The variable's regex finds the release in the Services the ServiceMonitor scrapes.
    pattern = re.compile(release["regex"].strip("/"))
    for svc in (f"{FULLNAME}-policy-headless", f"{FULLNAME}-coordinator"):
        assert pattern.match(svc).group(1) == FULLNAME


def test_every_role_exports_build_info(tiny_models, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from alignd import __version__
    from alignd.build import commit

    from conftest import start_roles, stop_roles

    got = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    expected_commit = os.environ.get("ALIGND_COMMIT") or (got.stdout.strip() if got.returncode == 0 else "unknown")
    assert commit() == expected_commit
    cfg = {"model": {"path": str(tiny_models["lm"])}, "torch_threads": 1}
    [server] = start_roles([("reference", cfg, tmp_path / "reference")])
    try:
        families = {f.name: f for f in text_string_to_metric_families(server.metrics())}
        (sample,) = families["alignd_build_info"].samples
        assert sample.name == "alignd_build_info" and sample.value == 1
        assert sample.labels == {"version": __version__, "commit": expected_commit}
    finally:
        stop_roles([server])


def test_coordinator_service_can_be_exposed_for_alignd_runs(chart):  # noqa: F811
    """`alignd runs` from a workstation: the coordinator's Service as a LoadBalancer, with its source ranges and
    annotations, like the reward Service; ClusterIP by default."""
    name = f"{FULLNAME}-coordinator"
    assert one(render(chart, {}), "Service", name)["spec"]["type"] == "ClusterIP"
    exposed = {
        "type": "LoadBalancer",
        "annotations": {"networking.gke.io/load-balancer-type": "Internal"},
        "loadBalancerSourceRanges": ["10.20.0.0/16"],
    }
    docs = render(chart, {"coordinatorService": exposed})
    svc = one(docs, "Service", name)
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["loadBalancerSourceRanges"] == ["10.20.0.0/16"]
    assert svc["metadata"]["annotations"] == exposed["annotations"]
    validate(svc)
    assert one(docs, "Service", f"{FULLNAME}-reward")["spec"]["type"] == "ClusterIP"  # each Service its own type
