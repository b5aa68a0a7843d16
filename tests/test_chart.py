"""The Helm chart (charts/alignd) and the images (deploy/), checked offline.

Helm's engine comes from `helm_python` (helm-python-sdk: the Helm SDK as a C
library), the Kubernetes schemas from `kubernetes_validate`. Four value sets
are rendered: the defaults, ci/ci-values.yaml, a learner of 2 pods x 8 GPUs
(with reward tokens), and metrics on (ServiceMonitor, PrometheusRule,
dashboard). ServiceMonitor and PrometheusRule are prometheus-operator CRDs
that kubernetes_validate has no schema for: they are checked structurally.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import re
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from alignd.config import ROLE_CONFIGS, ROLES, build_config

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "alignd"
RELEASE = "rel"
NAMESPACE = "ml"
FULLNAME = "rel-alignd"
KUBE_VERSIONS = ("1.30.0", "1.33.0")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

# What the coordinator may do with the Kubernetes API, and nothing more. The
# coordinator's Kubernetes Job launcher must use exactly these verbs/resources.
COORDINATOR_RBAC_RULES = [
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]

GPU_ROLES = ("policy", "reward", "reference", "learner")
HEADLESS_ROLES = ("policy", "reward", "reference", "learner")
CLIENT_SERVICE_ROLES = ("reward", "reference", "learner", "coordinator")


def load_ci_values() -> dict:
    return yaml.safe_load((CHART / "ci" / "ci-values.yaml").read_text())


CASES = {
    "default": {},
    "ci": load_ci_values(),
    "learner-2x8": {
        "learner": {"replicas": 2, "resources": {"limits": {"nvidia.com/gpu": 8}}},
        "auth": {
            "extraTokens": {
                "team-a": {"token": "token-a-0123456789", "scopes": ["score"]},
                "eval-bot": {"sha256": "ab" * 32, "scopes": ["score", "runs"]},
            },
            "trustedNetworks": ["10.244.0.0/16"],
        },
    },
    "metrics": {
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "prometheusRule": {"enabled": True},
            "grafanaDashboard": {"enabled": True},
        }
    },
}


@pytest.fixture(scope="module")
def chart():
    c = helm.Chart.load(str(CHART))
    yield c
    c.close()


def render(chart, values: dict) -> list[dict]:
    out = chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, list[dict]]:
    return {name: render(chart, values) for name, values in CASES.items()}


def find(docs, kind, name=None, component=None) -> list[dict]:
    out = []
    for d in docs:
        if d["kind"] != kind:
            continue
        if name is not None and d["metadata"]["name"] != name:
            continue
        if component is not None and d["metadata"].get("labels", {}).get("app.kubernetes.io/component") != component:
            continue
        out.append(d)
    return out


def one(docs, kind, name=None, component=None) -> dict:
    found = find(docs, kind, name, component)
    assert len(found) == 1, f"expected one {kind} {name or component}, found {len(found)}"
    return found[0]


def workload(docs, role) -> dict:
    return one(docs, "StatefulSet" if role == "learner" else "Deployment", f"{FULLNAME}-{role}")


def container(docs, role) -> dict:
    (c,) = workload(docs, role)["spec"]["template"]["spec"]["containers"]
    return c


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- schema, lint, Kubernetes schemas ------------------------------------------


def test_values_schema_is_generated_from_role_configs():
    spec = importlib.util.spec_from_file_location("gen_values_schema", ROOT / "charts" / "gen_values_schema.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (CHART / "values.schema.json").read_text() == gen.render(), (
        "values.schema.json is stale: run .venv/bin/python charts/gen_values_schema.py"
    )
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert set(ROLES) <= set(schema["required"])
    for role in ROLES:
        block = schema["properties"][role]
        assert block["additionalProperties"] is False
        assert set(block["required"]) == set(block["properties"])
        assert block["properties"]["config"]["$ref"] == f"#/$defs/{ROLE_CONFIGS[role].__name__}"
    # Every role block has the same keys.
    keys = {role: tuple(sorted(schema["properties"][role]["properties"])) for role in ROLES}
    assert len(set(keys.values())) == 1, keys


@pytest.mark.parametrize("case", list(CASES))
def test_strict_lint_passes(case):
    for version in KUBE_VERSIONS:
        report = helm.lint(
            str(CHART), copy.deepcopy(CASES[case]), strict=True, namespace=NAMESPACE, kube_version=f"v{version}"
        )
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], (version, problems, report["errors"])


@pytest.mark.parametrize("case", list(CASES))
def test_manifests_pass_kubernetes_schemas(rendered, case):
    docs = rendered[case]
    assert docs
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # no bundled schema: see test_metrics_resources
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 20


def test_strict_validation_catches_an_unknown_field(rendered):
    doc = copy.deepcopy(workload(rendered["default"], "policy"))
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grcp"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize(
    "values, where",
    [
        ({"policy": {"replicas": "two"}}, "/policy/replicas"),
        ({"learner": {"resources": {"limits": {"nvidia.com/gpu": "eight"}}}}, "nvidia.com~1gpu"),
        ({"coordinator": {"replicas": 2}}, "/coordinator/replicas"),
        ({"reward": {"image": {"tag": "latest"}}}, "/reward/image/tag"),
        ({"reward": {"podDisruptionBudget": {"maxUnavailable": "half"}}}, "/reward/podDisruptionBudget"),
        ({"policy": {"gpus": 2}}, "/policy"),  # unknown key of a role block
        (
            {"policy": {"config": {"model": {"pathh": "/x"}}}},
            "/policy/config/model",
        ),  # unknown key of the role's config
        ({"learner": {"config": {"ppo": {"clip": -1.0}}}}, "/learner/config/ppo/clip"),  # the pydantic constraint
        ({"coordinator": {"config": {"rpc_timeout_seconds": "soon"}}}, "/coordinator/config/rpc_timeout_seconds"),
        ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "/metrics/serviceMonitor/enabled"),
    ],
)
def test_schema_rejects_wrong_values(chart, values, where):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(copy.deepcopy(values))
    assert where in str(err.value), str(err.value)


def test_schema_accepts_every_case_and_lint_reports_a_bad_value(chart):
    for values in CASES.values():
        chart.validate_schema(copy.deepcopy(values))
    report = helm.lint(str(CHART), {"policy": {"replicas": "two"}}, strict=True, namespace=NAMESPACE)
    text = json.dumps(report)
    assert report["errors"] or any(m["severity"] >= 3 for m in report["messages"])
    assert "replicas" in text


# -- role configurations --------------------------------------------------------


def role_configs(docs) -> dict[str, dict]:
    out = {}
    for cm in find(docs, "ConfigMap"):
        role = cm["metadata"]["labels"].get("app.kubernetes.io/component")
        if role in ROLES and cm["metadata"]["name"] == f"{FULLNAME}-{role}-config":
            out[role] = yaml.safe_load(cm["data"]["config.yaml"])
    return out


def resolve(docs, address: str) -> tuple[dict, dict]:
    """host:port of an in-cluster Service -> (Service, port entry); fails if it is not in the release."""
    host, port = address.rsplit(":", 1)
    name, ns, svc, domain = host.split(".", 3)
    assert (ns, svc, domain) == (NAMESPACE, "svc", "cluster.local"), address
    service = one(docs, "Service", name)
    (entry,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    assert entry["name"] == "grpc"
    return service, entry


@pytest.mark.parametrize("case", list(CASES))
def test_role_configmaps_validate_against_the_role_models(rendered, case):
    docs = rendered[case]
    configs = role_configs(docs)
    assert set(configs) == set(ROLES)
    for role, data in configs.items():
        cfg = build_config(ROLE_CONFIGS[role], data)  # raises ConfigError on any unknown key or bad value
        (port,) = [p for p in container(docs, role)["ports"] if p["name"] == "grpc"]
        (metrics,) = [p for p in container(docs, role)["ports"] if p["name"] == "metrics"]
        assert (cfg.server.host, cfg.server.port) == ("0.0.0.0", port["containerPort"])
        assert (cfg.server.metrics_host, cfg.server.metrics_port) == ("0.0.0.0", metrics["containerPort"])
        # The pod passes exactly this file.
        c = container(docs, role)
        args = c["args"]
        assert args[:3] == [role, "--config", "/etc/alignd/config.yaml"]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
        assert mount["mountPath"] == "/etc/alignd"
        annotations = workload(docs, role)["spec"]["template"]["metadata"]["annotations"]
        assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])


@pytest.mark.parametrize("case", list(CASES))
def test_addresses_between_roles_are_service_dns_names(rendered, case):
    docs = rendered[case]
    configs = role_configs(docs)
    coord = build_config(ROLE_CONFIGS["coordinator"], configs["coordinator"])
    learner = build_config(ROLE_CONFIGS["learner"], configs["learner"])
    expected = {
        "policy": coord.policy_addresses,
        "reward": coord.reward_addresses,
        "reference": coord.reference_addresses,
        "learner": [coord.learner_address],
    }
    for role, addresses in expected.items():
        assert len(addresses) == 1, (role, addresses)
        service, _ = resolve(docs, addresses[0])
        pod_labels = dict(workload(docs, role)["spec"]["template"]["metadata"]["labels"])
        if role == "learner":  # the label the StatefulSet controller gives pod 0
            pod_labels["statefulset.kubernetes.io/pod-name"] = f"{FULLNAME}-learner-0"
        assert matches(service["spec"]["selector"], pod_labels)
        if role in ("policy", "reward", "reference"):
            # Headless: one DNS record per replica, so the coordinator can spread calls over all of them.
            assert service["spec"]["clusterIP"] == "None"
    # The learner's Service reaches rank 0 only.
    assert (
        one(docs, "Service", f"{FULLNAME}-learner")["spec"]["selector"]["statefulset.kubernetes.io/pod-name"]
        == f"{FULLNAME}-learner-0"
    )
    assert learner.policy_addresses == coord.policy_addresses
    assert coord.runs_dir == "/var/lib/alignd/runs"
    assert learner.checkpoint_dir == "/var/lib/alignd/learner/checkpoints"
    # RM jobs on Kubernetes (launcher.kind: kubernetes) get the learner's image, the shared volume and this namespace.
    k8s = coord.launcher.kubernetes
    assert k8s.image == workload(docs, "learner")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert k8s.pvc_claim == one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert k8s.run_mount_path == "/var/lib/alignd" and k8s.namespace == NAMESPACE
    assert coord.launcher.kind == "local"  # the defaults above change nothing until a user picks kubernetes


def test_user_addresses_and_ports_win_where_they_should(chart):
    docs = render(
        chart,
        {
            "coordinator": {"config": {"reward_addresses": ["reward.other.svc.cluster.local:443"]}},
            "policy": {"ports": {"grpc": 7001, "metrics": 7002}, "config": {"server": {"port": 1, "max_workers": 9}}},
            "reference": {"enabled": False},
        },
    )
    configs = role_configs(docs)
    coord = build_config(ROLE_CONFIGS["coordinator"], configs["coordinator"])
    assert coord.reward_addresses == ["reward.other.svc.cluster.local:443"]
    assert coord.reference_addresses == []
    assert coord.policy_addresses == [f"{FULLNAME}-policy-headless.{NAMESPACE}.svc.cluster.local:7001"]
    policy = build_config(ROLE_CONFIGS["policy"], configs["policy"])
    assert (policy.server.port, policy.server.metrics_port, policy.server.max_workers) == (7001, 7002, 9)
    assert not find(docs, "Deployment", f"{FULLNAME}-reference")
    c = container(docs, "policy")
    assert c["readinessProbe"]["grpc"]["port"] == 7001


# -- workloads --------------------------------------------------------------------


def test_workload_kinds_and_replicas(rendered):
    docs = rendered["default"]
    for role in ("policy", "reward", "reference", "coordinator"):
        one(docs, "Deployment", f"{FULLNAME}-{role}")
    assert workload(docs, "policy")["spec"]["replicas"] == 2
    assert workload(docs, "coordinator")["spec"]["strategy"]["type"] == "Recreate"
    sts = workload(docs, "learner")
    assert sts["kind"] == "StatefulSet"
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    headless = one(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    # One pod x one GPU: no torchrun.
    c = container(docs, "learner")
    assert c["command"] == ["alignd", "serve"]
    for role in GPU_ROLES:
        assert container(docs, role)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in json.dumps(container(docs, "coordinator")["resources"])


def test_learner_two_pods_of_eight_gpus(rendered):
    docs = rendered["learner-2x8"]
    sts = workload(docs, "learner")
    assert sts["spec"]["replicas"] == 2
    assert sts["metadata"]["annotations"]["alignd.io/world-size"] == "16"
    c = container(docs, "learner")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    cmd = c["command"] + c["args"]
    assert cmd[0] == "torchrun"
    assert "--nproc-per-node=8" in cmd and "--nnodes=2" in cmd
    assert "--node-rank=$(NODE_RANK)" in cmd
    assert cmd[cmd.index("--module") + 1 :][:3] == ["alignd.cli", "serve", "learner"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    headless = f"{FULLNAME}-learner-headless"
    assert sts["spec"]["serviceName"] == headless
    assert env["MASTER_ADDR"]["value"] == f"{FULLNAME}-learner-0.{headless}.{NAMESPACE}.svc.cluster.local"
    assert env["MASTER_PORT"]["value"] == "29500"
    service = one(docs, "Service", headless)
    assert {"name": "rendezvous", "port": 29500, "targetPort": "rendezvous", "protocol": "TCP"} in service["spec"][
        "ports"
    ]
    # Env vars referenced as $(VAR) are defined before use (Kubernetes expands only earlier ones).
    names = [e["name"] for e in c["env"]]
    for arg in cmd:
        for ref in re.findall(r"\$\((\w+)\)", arg):
            assert ref in names
    for e in c["env"]:
        for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
            assert names.index(ref) < names.index(e["name"])
    # Rank 0 alone answers the learner Service; learner pods reach each other on every port.
    np = one(docs, "NetworkPolicy", f"{FULLNAME}-learner")
    peer_rules = [r for r in np["spec"]["ingress"] if "ports" not in r]
    assert len(peer_rules) == 1
    assert matches(
        peer_rules[0]["from"][0]["podSelector"]["matchLabels"], sts["spec"]["template"]["metadata"]["labels"]
    )


@pytest.mark.parametrize("case", list(CASES))
def test_probes_security_and_volumes(rendered, case):
    docs = rendered[case]
    claim = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    for role in ROLES:
        pod = workload(docs, role)["spec"]["template"]["spec"]
        c = container(docs, role)
        (grpc_port,) = [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["grpc"] == {"port": grpc_port}, (role, probe)
        if case == "default" and role in GPU_ROLES:
            startup = c["startupProbe"]
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # model loading
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["automountServiceAccountToken"] is (role == "coordinator")
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["data"] == "/var/lib/alignd"
        assert {"config", "cache", "tmp"} <= set(mounts)


KITCHEN_SINK = {
    "fullnameOverride": "rlhf",
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccount": {"create": False, "name": "rlhf-jobs"},
    "persistence": {"storageClass": "-", "annotations": {"backup": "daily"}},
    "auth": {"existingSecret": "alignd-tokens"},
    "rewardService": {
        "type": "LoadBalancer",
        "annotations": {"lb/internal": "true"},
        "loadBalancerSourceRanges": ["203.0.113.0/24"],
    },
    "networkPolicy": {
        "reward": {"allowOtherNamespaces": True, "ipBlocks": ["203.0.113.0/24"]},
        "coordinatorFrom": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}],
    },
    "metrics": {
        "grafanaDashboard": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "RLHF"}}
    },
    "learner": {
        "replicas": 4,
        "resources": {"limits": {"nvidia.com/gpu": 8}},
        "env": [{"name": "NCCL_SOCKET_IFNAME", "value": "eth0"}],
        "nodeSelector": {"gpu": "h100"},
        "affinity": {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "learner"}},
                    }
                ]
            }
        },
        "podDisruptionBudget": {"maxUnavailable": 0},
        "podAnnotations": {"team": "rlhf"},
    },
    "policy": {
        "replicas": 8,
        "podDisruptionBudget": {"maxUnavailable": "25%"},
        "extraVolumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}],
        "extraVolumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
        "config": {"model": {"path": "/models/sft"}},
    },
}


def test_non_default_options_render_valid_manifests(chart):
    docs = render(chart, KITCHEN_SINK)
    for doc in docs:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    reward_svc = one(docs, "Service", "rlhf-reward")
    assert reward_svc["spec"]["type"] == "LoadBalancer"
    assert reward_svc["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    assert not find(docs, "ServiceAccount")
    assert one(docs, "RoleBinding")["subjects"][0]["name"] == "rlhf-jobs"
    assert one(docs, "Deployment", "rlhf-coordinator")["spec"]["template"]["spec"]["serviceAccountName"] == "rlhf-jobs"
    assert one(docs, "ConfigMap", "rlhf-dashboard")["metadata"]["namespace"] == "monitoring"
    c = one(docs, "StatefulSet", "rlhf-learner")["spec"]["template"]["spec"]["containers"][0]
    assert "--nnodes=4" in c["command"] and "--nproc-per-node=8" in c["command"]
    assert {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"} in c["env"]
    assert one(docs, "PodDisruptionBudget", "rlhf-learner")["spec"]["maxUnavailable"] == 0
    assert one(docs, "PodDisruptionBudget", "rlhf-policy")["spec"]["maxUnavailable"] == "25%"
    policy = one(docs, "Deployment", "rlhf-policy")["spec"]["template"]["spec"]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in policy["containers"][0]["volumeMounts"]
    assert policy["imagePullSecrets"] == [{"name": "regcred"}]
    configs = {
        cm["metadata"]["labels"]["app.kubernetes.io/component"]: yaml.safe_load(cm["data"]["config.yaml"])
        for cm in find(docs, "ConfigMap")
        if cm["metadata"]["name"].endswith("-config")
    }
    assert build_config(ROLE_CONFIGS["policy"], configs["policy"]).model.path == "/models/sft"
    assert build_config(ROLE_CONFIGS["coordinator"], configs["coordinator"]).policy_addresses == [
        f"rlhf-policy-headless.{NAMESPACE}.svc.cluster.local:50051"
    ]
    peers = grpc_peers(one(docs, "NetworkPolicy", "rlhf-coordinator"))
    assert peers == [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]


def test_persistence_options(chart):
    docs = render(chart, {})
    pvc = one(docs, "PersistentVolumeClaim", f"{FULLNAME}-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "storageClassName" not in pvc["spec"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    docs = render(chart, {"persistence": {"storageClass": "fast-nfs"}})
    assert one(docs, "PersistentVolumeClaim")["spec"]["storageClassName"] == "fast-nfs"
    docs = render(chart, {"persistence": {"storageClass": "-"}})
    assert one(docs, "PersistentVolumeClaim")["spec"]["storageClassName"] == ""
    docs = render(chart, {"persistence": {"existingClaim": "shared-runs"}})
    assert not find(docs, "PersistentVolumeClaim")
    for role in ROLES:
        volumes = {v["name"]: v for v in workload(docs, role)["spec"]["template"]["spec"]["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "shared-runs"
    docs = render(chart, {"persistence": {"enabled": False}})
    assert not find(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in workload(docs, "learner")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}


def test_pod_disruption_budgets_only_where_a_role_runs_more_than_one_pod(chart, rendered):
    # Defaults: the policy runs 2 replicas, every other role 1 (a budget there would protect nothing).
    assert [p["metadata"]["name"] for p in find(rendered["default"], "PodDisruptionBudget")] == [f"{FULLNAME}-policy"]
    scaled = render(chart, {role: {"replicas": 2} for role in ROLES if role != "coordinator"})
    multi = [role for role in ROLES if role != "coordinator"]  # the coordinator is one per release (schema)
    assert sorted(p["metadata"]["name"] for p in find(scaled, "PodDisruptionBudget")) == sorted(
        f"{FULLNAME}-{role}" for role in multi
    )
    for role in multi:
        pdb = one(scaled, "PodDisruptionBudget", f"{FULLNAME}-{role}")
        assert pdb["spec"]["maxUnavailable"] == 1
        assert matches(
            pdb["spec"]["selector"]["matchLabels"], workload(scaled, role)["spec"]["template"]["metadata"]["labels"]
        )
        # A role's selector must not pick another role's pods.
        for other in ROLES:
            if other != role:
                other_labels = workload(scaled, other)["spec"]["template"]["metadata"]["labels"]
                assert not matches(pdb["spec"]["selector"]["matchLabels"], other_labels)
    off = render(chart, {"policy": {"podDisruptionBudget": {"enabled": False}}})
    assert not find(off, "PodDisruptionBudget")
    # One learner pod that must not be drained mid-training (docs/deploy.md): maxUnavailable 0 keeps its budget.
    blocking = render(chart, {"learner": {"podDisruptionBudget": {"maxUnavailable": 0}}})
    assert one(blocking, "PodDisruptionBudget", f"{FULLNAME}-learner")["spec"]["maxUnavailable"] == 0


def test_ci_values_are_cpu_only_with_tiny_models(rendered):
    docs = rendered["ci"]
    assert "nvidia.com/gpu" not in json.dumps(docs)
    configs = role_configs(docs)
    for role in ("policy", "reward", "reference", "learner"):
        cfg = build_config(ROLE_CONFIGS[role], configs[role])
        assert (
            cfg.model.path.startswith("builtin:tiny-gpt2")
            and cfg.model.device == "cpu"
            and cfg.model.dtype == "float32"
        )
        assert "tolerations" not in workload(docs, role)["spec"]["template"]["spec"]
    assert build_config(ROLE_CONFIGS["learner"], configs["learner"]).engine.kind == "torch"
    assert container(docs, "learner")["command"] == ["alignd", "serve"]
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_chart_packages(tmp_path):
    import tarfile

    archive = Path(helm.package(str(CHART), destination=str(tmp_path)))
    assert archive.name == "alignd-0.1.0.tgz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for needed in (
        "Chart.yaml",
        "values.yaml",
        "values.schema.json",
        "README.md",
        "dashboards/alignd.json",
        "rules/alignd.rules.yaml",
        "ci/ci-values.yaml",
        "templates/_helpers.tpl",
        "templates/learner-statefulset.yaml",
    ):
        assert f"alignd/{needed}" in names, needed


# -- credentials -----------------------------------------------------------------


def _tokens(secret: dict) -> dict:
    return yaml.safe_load(base64.b64decode(secret["data"]["tokens.yaml"]))


def test_auth_secret_and_every_role_requires_tokens(rendered, chart):
    """auth (on by default): one Secret with tokens.yaml (digests and scopes) and the chart's callers' tokens;
    every role checks calls against tokens.yaml; the coordinator and the learner mount and send their own token,
    and no pod sees another caller's token."""
    from alignd.runtime.auth import parse_tokens, token_digest
    from alignd.runtime.scopes import ROLE_CLIENT_SCOPES

    docs = rendered["default"]
    secret = one(docs, "Secret", f"{FULLNAME}-auth")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    plain = {k: base64.b64decode(v).decode() for k, v in secret["data"].items() if k != "tokens.yaml"}
    assert set(plain) == {"coordinator", "learner", "operator"} and all(len(t) >= 40 for t in plain.values())
    entries = parse_tokens(base64.b64decode(secret["data"]["tokens.yaml"]).decode(), "tokens.yaml")  # alignd parses it
    for caller, token in plain.items():
        assert entries[caller].digest == token_digest(token)  # a digest, never the token
        assert token not in base64.b64decode(secret["data"]["tokens.yaml"]).decode()
    for caller, scopes in ROLE_CLIENT_SCOPES.items():
        assert entries[caller].scopes == frozenset(scopes)  # the chart's scopes are the code's
    assert entries["operator"].scopes == frozenset({"admin"})
    for role in ROLES:
        cfg = build_config(ROLE_CONFIGS[role], role_configs(docs)[role])
        assert cfg.server.auth.enabled and cfg.server.auth.tokens_file == "/etc/alignd/auth/tokens.yaml", role
        assert cfg.server.auth.trusted_networks == []
        assert cfg.paths.roots == ["/var/lib/alignd", "/var/cache/alignd"]
        volumes = {v["name"]: v for v in workload(docs, role)["spec"]["template"]["spec"]["volumes"]}
        items = volumes["auth"]["secret"]["items"]
        expected = [{"key": "tokens.yaml", "path": "tokens.yaml"}]
        if role in ("coordinator", "learner"):
            expected.append({"key": role, "path": "token"})
            assert cfg.client.tokens_file == "/etc/alignd/auth/token" and cfg.client.token_name is None
        assert items == expected, role  # its own token and nothing else
        mounts = {m["name"]: m["mountPath"] for m in container(docs, role)["volumeMounts"]}
        assert mounts["auth"] == "/etc/alignd/auth"
    # Your own callers join tokens.yaml as given; trusted networks reach the reward role only.
    docs = rendered["learner-2x8"]
    extra = _tokens(one(docs, "Secret", f"{FULLNAME}-auth"))
    assert extra["team-a"] == {"token": "token-a-0123456789", "scopes": ["score"]}
    assert extra["eval-bot"] == {"sha256": "ab" * 32, "scopes": ["score", "runs"]}
    assert role_configs(docs)["reward"]["server"]["auth"]["trusted_networks"] == ["10.244.0.0/16"]
    assert all(
        "trusted_networks" not in cfg["server"]["auth"] for r, cfg in role_configs(docs).items() if r != "reward"
    )
    # An existing Secret is mounted, not created.
    docs = render(chart, {"auth": {"existingSecret": "alignd-tokens"}})
    assert not find(docs, "Secret")
    volumes = {v["name"]: v for v in workload(docs, "coordinator")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == "alignd-tokens"
    # The chart's callers' names are reserved.
    with pytest.raises(helm.HelmError, match="auth.extraTokens.operator"):
        render(chart, {"auth": {"extraTokens": {"operator": {"token": "x" * 20, "scopes": ["score"]}}}})


def test_auth_off_is_explicit_and_metrics_auth_wires_the_scraper(chart):
    docs = render(chart, {"auth": {"enabled": False}})
    assert not find(docs, "Secret")
    for role in ROLES:
        cfg = build_config(ROLE_CONFIGS[role], role_configs(docs)[role])
        assert cfg.server.auth.enabled is False, role
        assert "auth" not in json.dumps(workload(docs, role)["spec"]["template"]["spec"]["volumes"])
    docs = render(chart, {"metrics": {"auth": True, "serviceMonitor": {"enabled": True}}})
    secret = one(docs, "Secret", f"{FULLNAME}-auth")
    assert "prometheus" in secret["data"] and _tokens(secret)["prometheus"]["scopes"] == ["metrics"]
    for role in ROLES:
        assert build_config(ROLE_CONFIGS[role], role_configs(docs)[role]).server.auth.metrics_requires_token
    (endpoint,) = one(docs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["bearerTokenSecret"] == {"name": f"{FULLNAME}-auth", "key": "prometheus"}


def test_chart_scopes_are_the_codes():
    spec = importlib.util.spec_from_file_location("gen_values_schema", ROOT / "charts" / "gen_values_schema.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from alignd.runtime.scopes import SCOPES

    assert tuple(mod.SCOPES) == SCOPES


# -- RBAC, network policies -----------------------------------------------------------


def test_coordinator_rbac_is_limited_to_jobs_in_its_namespace(rendered):
    docs = rendered["default"]
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == COORDINATOR_RBAC_RULES
    binding = one(docs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    sa = one(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert workload(docs, "coordinator")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    for r in ("policy", "reward", "reference", "learner"):
        assert "serviceAccountName" not in workload(docs, r)["spec"]["template"]["spec"]


def grpc_peers(np: dict) -> list[dict]:
    rules = [r for r in np["spec"]["ingress"] if r.get("ports") == [{"port": "grpc", "protocol": "TCP"}]]
    assert len(rules) == 1
    return rules[0]["from"]


def test_network_policies(rendered, chart):
    docs = rendered["default"]
    labels = {r: workload(docs, r)["spec"]["template"]["metadata"]["labels"] for r in ROLES}

    def callers(role, peers):
        out = set()
        for p in peers:
            assert set(p) == {"podSelector"}, p  # no namespace or CIDR peers by default
            out |= {r for r in ROLES if matches(p["podSelector"]["matchLabels"], labels[r])}
        return out

    expected = {
        "policy": {"coordinator", "learner"},
        "reward": {"coordinator"},
        "reference": {"coordinator"},
        "learner": {"coordinator"},
    }
    for role, allowed in expected.items():
        np = one(docs, "NetworkPolicy", f"{FULLNAME}-{role}")
        assert matches(np["spec"]["podSelector"]["matchLabels"], labels[role])
        assert np["spec"]["policyTypes"] == ["Ingress"]
        assert callers(role, grpc_peers(np)) == allowed
        metrics_rules = [r for r in np["spec"]["ingress"] if r.get("ports") == [{"port": "metrics", "protocol": "TCP"}]]
        assert len(metrics_rules) == 1
    # The reward API opened to other namespaces and to load-balancer clients.
    docs = render(
        chart,
        {
            "networkPolicy": {
                "reward": {
                    "allowOtherNamespaces": True,
                    "namespaceSelector": {"matchLabels": {"team": "eval"}},
                    "ipBlocks": ["10.0.0.0/8"],
                }
            }
        },
    )
    peers = grpc_peers(one(docs, "NetworkPolicy", f"{FULLNAME}-reward"))
    assert {"namespaceSelector": {"matchLabels": {"team": "eval"}}} in peers
    assert {"ipBlock": {"cidr": "10.0.0.0/8"}} in peers
    assert all("namespaceSelector" not in p for p in grpc_peers(one(docs, "NetworkPolicy", f"{FULLNAME}-reference")))
    assert not find(render(chart, {"networkPolicy": {"enabled": False}}), "NetworkPolicy")


# -- metrics, alerts, dashboard ---------------------------------------------------------


def exported_metric_names() -> set[str]:
    """Metric names declared in libs/ and services/ (f"alignd_{slug}_..." expanded for every role)."""
    names = set()
    for path in [*(ROOT / "libs").rglob("*.py"), *(ROOT / "services").rglob("*.py")]:
        text = path.read_text()
        names |= set(re.findall(r"""["']((?:alignd|grpc_server)_[a-z0-9_]+)["']""", text))
        for tail in re.findall(r"""f["']alignd_\{slug\}_([a-z0-9_]+)["']""", text):
            names |= {f"alignd_{role}_{tail}" for role in ROLES}
    return names


def metrics_in(expr: str) -> set[str]:
    out = set()
    for name in re.findall(r"\b((?:alignd|grpc_server)_[a-z0-9_]+)", expr):
        out.add(re.sub(r"_(bucket|sum|count)$", "", name) if not name.endswith("_total") else name)
    return out


def test_metrics_resources(rendered):
    assert not any(find(rendered["default"], k) for k in CRD_KINDS)
    assert not [cm for cm in find(rendered["default"], "ConfigMap") if "grafana_dashboard" in cm["metadata"]["labels"]]
    docs = rendered["metrics"]
    known = exported_metric_names()
    assert "alignd_coordinator_reference_kl" in known and "alignd_policy_queue_depth_requests" in known

    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    scraped = [
        s for s in find(docs, "Service") if matches(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    # Exactly one scraped Service per role (no double scraping), each with the metrics port, selecting that role's pods.
    assert sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in scraped) == sorted(ROLES)
    for s in scraped:
        role = s["metadata"]["labels"]["app.kubernetes.io/component"]
        assert "metrics" in [p["name"] for p in s["spec"]["ports"]]
        assert matches(s["spec"]["selector"], workload(docs, role)["spec"]["template"]["metadata"]["labels"])
        assert "statefulset.kubernetes.io/pod-name" not in s["spec"]["selector"]  # every learner pod

    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert {"AligndRunStalled", "AligndKLBlowUp", "AligndNaNLoss", "AligndServiceDown"} <= set(alerts)
    for r in group["rules"]:
        assert set(r) == {"alert", "expr", "for", "labels", "annotations"}
        assert r["labels"]["severity"] in ("warning", "critical")
        assert re.fullmatch(r"[0-9]+[smh]", r["for"])
        assert r["expr"].count("(") == r["expr"].count(")") and r["expr"].count("{") == r["expr"].count("}")
        assert f'namespace="{NAMESPACE}"' in r["expr"]
        assert metrics_in(r["expr"]) - {"up"} <= known, r["alert"]
    # Every `service` the rules select is a Service the ServiceMonitor scrapes.
    scraped_names = {s["metadata"]["name"] for s in scraped}
    for r in group["rules"]:
        for sel in re.findall(r'service="([^"]+)"', r["expr"]):
            assert sel in scraped_names, sel
        for sel in re.findall(r'service=~"([^"]+)"', r["expr"]):
            assert {n for n in scraped_names if re.fullmatch(sel, n)} == scraped_names

    (cm,) = [cm for cm in find(docs, "ConfigMap") if cm["metadata"]["labels"].get("grafana_dashboard") == "1"]
    dashboard = json.loads(cm["data"]["alignd.json"])
    assert dashboard["uid"] and dashboard["title"]
    exprs = [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    assert len(exprs) >= 15
    used = set().union(*(metrics_in(e) for e in exprs))
    assert used <= known, used - known
    for needed in (
        "alignd_coordinator_rollout_tokens_total",
        "alignd_coordinator_mean_score",
        "alignd_coordinator_reference_kl",
        "alignd_coordinator_phase_seconds",
        "alignd_coordinator_policy_lag_versions",
        "alignd_learner_weight_push_seconds",
        "alignd_learner_weight_push_bytes_total",
        "alignd_policy_queue_depth_requests",
        "grpc_server_handled_total",
    ):
        assert needed in used, needed
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# -- values documentation ---------------------------------------------------------------


def value_paths(node, prefix="") -> list[str]:
    """Dotted paths of the leaves of values.yaml (a role's `config`, free-form maps and lists are leaves)."""
    out = []
    for key, val in node.items():
        path = f"{prefix}{key}"
        free_form = key in {
            "config",
            "resources",
            "podSecurityContext",
            "containerSecurityContext",
            "tokens",
            "annotations",
            "labels",
            "namespaceSelector",
            "nodeSelector",
            "affinity",
            "podAnnotations",
        }
        if isinstance(val, dict) and val and not free_form:
            out += value_paths(val, path + ".")
        else:
            out.append(path)
    return out


def test_chart_readme_documents_every_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\|\s*`([^`]+)`", readme, flags=re.M))
    paths = value_paths(values)
    for role in ROLES:  # role blocks are documented once, as <role>.<key>
        paths = [p.replace(f"{role}.", "<role>.", 1) if p.startswith(f"{role}.") else p for p in paths]
    missing = sorted(set(paths) - documented)
    assert not missing, missing


# -- images ---------------------------------------------------------------------------------


def dockerfile(name: str) -> tuple[list[tuple[str, str]], str]:
    text = (ROOT / "deploy" / name).read_text()
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions, joined


@pytest.mark.parametrize("name", ["Dockerfile.gpu", "Dockerfile.coordinator"])
def test_dockerfiles_are_pinned_and_non_root(name):
    instructions, text = dockerfile(name)
    args = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v.strip('"')
    stages = set()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    for rest in froms:
        parts = rest.split()
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], parts[0])
        if image in stages:
            continue
        assert ":" in image or "@sha256:" in image, image
        tag = image.split("@")[0].rsplit(":", 1)[1]
        assert tag != "latest" and re.search(r"\d", tag), image
        if len(parts) == 3 and parts[1].upper() == "AS":
            stages.add(parts[2])
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    last_from = max(i for i, (w, _) in enumerate(instructions) if w == "FROM")
    assert any(w == "USER" for w, _ in instructions[last_from:]), "the final stage sets USER"
    entry = [json.loads(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    assert entry[-1] == ["alignd", "serve"]
    assert "latest" not in re.findall(r"[:@](\w+)", " ".join(froms))


def pip_installs(text: str) -> list[str]:
    """The arguments of every `pip install` in the RUN instructions, in order."""
    return [m.strip() for m in re.findall(r"pip install ([^&\n]+)", text)]


def test_gpu_image_installs_cuda_torch_before_the_extras():
    instructions, text = dockerfile("Dockerfile.gpu")
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    assert re.fullmatch(r"nvidia/cuda:12\.8\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    installs = pip_installs(text)
    assert installs[0] == "--index-url https://download.pytorch.org/whl/cu128 torch==2.13.0"
    # Then every other package from the lock, hash-checked, and alignd itself without dependencies.
    assert installs[1:] == ["--require-hashes --no-deps -r gpu.txt", "--no-deps ."]
    assert "COPY deploy/locks/gpu.txt ./" in text and "pip check" in text
    assert "python3.11 -m venv" in text


def test_coordinator_image_has_no_torch():
    instructions, text = dockerfile("Dockerfile.coordinator")
    installs = pip_installs(text)
    assert installs == ["--require-hashes --no-deps -r coordinator.txt", "--no-deps ."]
    assert "COPY deploy/locks/coordinator.txt ./" in text and "pip check" in text
    assert "torch" not in (ROOT / "deploy" / "locks" / "coordinator.txt").read_text()
    # Plots, the preset's judges, tracking and the presets themselves are in it (checked at build time).
    assert "alignd.plots, matplotlib, vaderSentiment, textblob, mlflow" in text and "tiny_pipeline.yaml" in text
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", args["PYTHON_IMAGE"])


# -- reward HTTP API and TLS ------------------------------------------------------------


def test_reward_http_port_everywhere(rendered):
    docs = rendered["default"]
    cfg = role_configs(docs)["reward"]
    assert cfg["http"] == {"host": "0.0.0.0", "port": 8000}
    assert build_config(ROLE_CONFIGS["reward"], cfg).http.port == 8000
    (port,) = [p for p in container(docs, "reward")["ports"] if p["name"] == "http"]
    assert port["containerPort"] == 8000
    for name in (f"{FULLNAME}-reward", f"{FULLNAME}-reward-headless"):
        (svc_port,) = [p for p in one(docs, "Service", name)["spec"]["ports"] if p["name"] == "http"]
        assert (svc_port["port"], svc_port["targetPort"], svc_port["appProtocol"]) == (8000, "http", "http")
    np = one(docs, "NetworkPolicy", f"{FULLNAME}-reward")
    http_rules = [r for r in np["spec"]["ingress"] if r.get("ports") == [{"port": "http", "protocol": "TCP"}]]
    assert len(http_rules) == 1 and http_rules[0]["from"] == grpc_peers(np)  # the same callers as gRPC
    for role in ROLES:
        if role != "reward":
            assert "http" not in role_configs(docs)[role]
            assert all(p["name"] != "http" for p in container(docs, role)["ports"])


TLS_VALUES = {
    "rewardTLS": {
        "enabled": True,
        "secretName": "reward-tls",
        "mutual": True,
        "coordinatorClientSecret": "coordinator-client",
    },
}


def test_reward_tls_and_coordinator_credentials(chart):
    docs = render(chart, TLS_VALUES)
    for doc in docs:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    configs = role_configs(docs)
    reward = build_config(ROLE_CONFIGS["reward"], configs["reward"])
    assert reward.server.tls.cert_file == "/etc/alignd/reward-tls/tls.crt"
    assert reward.server.tls.key_file == "/etc/alignd/reward-tls/tls.key"
    assert reward.server.tls.client_ca_file == "/etc/alignd/reward-tls-client-ca/ca.crt"
    coord = build_config(ROLE_CONFIGS["coordinator"], configs["coordinator"]).reward_client
    assert (coord.tokens_file, coord.token_name) == ("/etc/alignd/auth/token", None)  # its own token
    assert coord.ca_file == "/etc/alignd/reward-tls/ca.crt"
    assert (coord.cert_file, coord.key_file) == (
        "/etc/alignd/reward-tls-client/tls.crt",
        "/etc/alignd/reward-tls-client/tls.key",
    )
    assert coord.server_name == f"{FULLNAME}-reward-headless.{NAMESPACE}.svc.cluster.local"

    def mounts_and_volumes(role):
        pod = workload(docs, role)["spec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        return mounts, {v["name"]: v for v in pod["volumes"]}

    mounts, volumes = mounts_and_volumes("reward")
    assert (
        mounts["reward-tls"] == "/etc/alignd/reward-tls"
        and volumes["reward-tls"]["secret"]["secretName"] == "reward-tls"
    )
    assert "items" not in volumes["reward-tls"]["secret"]  # tls.crt, tls.key, ca.crt
    assert volumes["reward-tls-client-ca"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    mounts, volumes = mounts_and_volumes("coordinator")
    assert volumes["reward-tls"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]  # never the server's key
    assert volumes["reward-tls-client"]["secret"]["secretName"] == "coordinator-client"
    assert mounts["auth"] == "/etc/alignd/auth"  # it sends its own token
    for role in ("policy", "reference", "learner"):
        assert "reward-tls" not in json.dumps(workload(docs, role))
    # kubelet's gRPC probes speak no TLS: the reward probes are HTTPS GET /health; the others stay gRPC.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container(docs, "reward")[probe]["httpGet"] == {"path": "/health", "port": 8000, "scheme": "HTTPS"}
        assert "grpc" in container(docs, "policy")[probe]
    (svc_port,) = [p for p in one(docs, "Service", f"{FULLNAME}-reward")["spec"]["ports"] if p["name"] == "http"]
    assert svc_port["appProtocol"] == "https"
    with pytest.raises(helm.HelmError, match="rewardTLS.secretName"):
        render(chart, {"rewardTLS": {"enabled": True}})
    with pytest.raises(helm.HelmError, match="coordinatorClientSecret"):
        render(chart, {"rewardTLS": {"enabled": True, "secretName": "s", "mutual": True}})
    # Without rewardTLS the coordinator has no reward-only credentials (its client token serves every role).
    assert "reward_client" not in role_configs(render(chart, {}))["coordinator"]


def test_mutual_tls_between_all_roles(chart):
    """tls + cert-manager: a Certificate per role (its Services and the peer name, server and client auth); every
    role serves with its certificate and requires the CA's clients; the coordinator and the learner present their
    own; probes go to the plaintext health port."""
    values = {
        "tls": {"enabled": True, "certManager": {"enabled": True, "issuerRef": {"name": "alignd-ca", "kind": "Issuer"}}}
    }
    docs = render(chart, values)
    for doc in docs:
        if doc["kind"] not in CRD_KINDS | {"Certificate"}:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
    peer = f"{FULLNAME}-peers.{NAMESPACE}.svc"
    configs = role_configs(docs)
    for role in ROLES:
        cert = one(docs, "Certificate", f"{FULLNAME}-{role}")
        assert cert["apiVersion"] == "cert-manager.io/v1"
        assert cert["spec"]["secretName"] == f"{FULLNAME}-{role}-tls"
        assert cert["spec"]["usages"] == ["server auth", "client auth"]
        assert cert["spec"]["issuerRef"] == {"name": "alignd-ca", "kind": "Issuer"}
        names = cert["spec"]["dnsNames"]
        assert peer in names and f"{FULLNAME}-{role}.{NAMESPACE}.svc.cluster.local" in names
        cfg = build_config(ROLE_CONFIGS[role], configs[role])
        assert (cfg.server.tls.cert_file, cfg.server.tls.key_file, cfg.server.tls.client_ca_file) == (
            "/etc/alignd/tls/tls.crt",
            "/etc/alignd/tls/tls.key",
            "/etc/alignd/tls/ca.crt",
        )
        assert cfg.server.health_port == 9095
        if role in ("coordinator", "learner"):
            assert (cfg.client.ca_file, cfg.client.cert_file, cfg.client.key_file, cfg.client.server_name) == (
                "/etc/alignd/tls/ca.crt",
                "/etc/alignd/tls/tls.crt",
                "/etc/alignd/tls/tls.key",
                peer,
            )
            assert cfg.client.tokens_file == "/etc/alignd/auth/token"  # TLS does not replace the token
        c = container(docs, role)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["grpc"] == {"port": 9095}, (role, probe)
        assert {"name": "health", "containerPort": 9095, "protocol": "TCP"} in c["ports"]
        volumes = {v["name"]: v for v in workload(docs, role)["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == f"{FULLNAME}-{role}-tls"
    # Secrets you manage instead; an issuer is required with cert-manager; not together with rewardTLS.
    docs = render(chart, {"tls": {"enabled": True, "secretNames": {"reward": "my-reward-cert"}}})
    assert not find(docs, "Certificate")
    volumes = {v["name"]: v for v in workload(docs, "reward")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "my-reward-cert"
    with pytest.raises(helm.HelmError, match="issuerRef"):
        render(chart, {"tls": {"enabled": True, "certManager": {"enabled": True}}})
    with pytest.raises(helm.HelmError, match="enable one"):
        render(chart, {"tls": {"enabled": True}, "rewardTLS": {"enabled": True, "secretName": "s"}})
    assert not find(render(chart, {}), "Certificate")
