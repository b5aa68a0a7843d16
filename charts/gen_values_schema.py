"""Writes charts/alignd/values.schema.json.

The chart's own values are typed here; each role's `config` block takes the
JSON schema of its pydantic model (alignd.config.ROLE_CONFIGS), so `helm
install/upgrade/lint/template` reject a config key the role would refuse at
start-up. tests/test_chart.py fails when the file is stale:

    .venv/bin/python charts/gen_values_schema.py          # rewrite
    .venv/bin/python charts/gen_values_schema.py --check  # exit 1 when stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CHART = Path(__file__).resolve().parent / "alignd"
SCHEMA_PATH = CHART / "values.schema.json"
ROLES = ("policy", "reward", "reference", "learner", "coordinator")
# The credential scopes (libs/alignd/runtime/scopes.py SCOPES; tests/test_chart.py checks they agree).
SCOPES = ("score", "generate", "logprobs", "label", "runs", "train", "weights", "metrics", "admin")

STRING = {"type": "string"}
BOOL = {"type": "boolean"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
# Kubernetes resource.Quantity: a number, or a string such as "500m", "64Gi", "1e3".
QUANTITY = {
    "anyOf": [
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"},
    ]
}
DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
# Free-form Kubernetes objects (validated by the API server): a mapping.
K8S_OBJECT = {"type": "object"}


def obj(properties: dict, *, required: list[str] | None = None, description: str | None = None) -> dict:
    out = {"type": "object", "additionalProperties": False, "properties": properties}
    out["required"] = list(properties) if required is None else required
    if description:
        out["description"] = description
    return out


def probe(description: str) -> dict:
    return obj(
        {
            "periodSeconds": {"type": "integer", "minimum": 1},
            "timeoutSeconds": {"type": "integer", "minimum": 1},
            "failureThreshold": {"type": "integer", "minimum": 1},
        },
        description=description,
    )


def role_block(role: str, config_def: str) -> dict:
    replicas = {"type": "integer", "minimum": 0, "description": "Pods of the role (0 stops it)."}
    if role == "coordinator":
        replicas = {
            "type": "integer",
            "minimum": 0,
            "maximum": 1,
            "description": "0 or 1: one coordinator per release.",
        }
    return obj(
        {
            "enabled": {**BOOL, "description": f"Deploy the {role} role."},
            "replicas": replicas,
            "image": obj(
                {
                    "repository": {"type": "string", "minLength": 1},
                    "tag": {
                        "type": "string",
                        "not": {"const": "latest"},
                        "description": '"" = the chart appVersion; never "latest".',
                    },
                    "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                }
            ),
            "ports": (
                obj(
                    {"grpc": PORT, "metrics": PORT, "http": PORT},
                    description="gRPC, /metrics and HTTP (/get_reward) ports (also set server.* and http.port of "
                    "config).",
                )
                if role == "reward"
                else obj(
                    {"grpc": PORT, "metrics": PORT},
                    description="gRPC and /metrics ports (also set server.* of config).",
                )
            ),
            "resources": obj(
                {
                    "requests": {"type": "object", "additionalProperties": QUANTITY},
                    "limits": {"type": "object", "additionalProperties": QUANTITY},
                },
                required=[],
                description="Container resources; GPU roles set limits.nvidia.com/gpu.",
            ),
            "shmSize": {
                "type": "string",
                "pattern": r"^$|^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$",
                "description": 'Memory-backed /dev/shm size; "" = none.',
            },
            "nodeSelector": STRING_MAP,
            "tolerations": {"type": "array", "items": K8S_OBJECT},
            "affinity": K8S_OBJECT,
            "podAnnotations": STRING_MAP,
            "podLabels": {**STRING_MAP, "description": "Extra labels on the role's pods."},
            "priorityClassName": {**STRING, "description": 'PriorityClass of the pods ("" = the cluster default).'},
            "schedulerName": {
                **STRING,
                "description": 'Scheduler of the pods ("" = default-scheduler; e.g. "volcano" to gang-schedule).',
            },
            "runtimeClassName": {**STRING, "description": 'RuntimeClass of the pods ("" = the node default).'},
            "topologySpreadConstraints": {"type": "array", "items": K8S_OBJECT},
            "initContainers": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            "extraContainers": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            "env": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            "extraVolumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            "extraVolumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
            "startupProbe": probe("gRPC startup probe: allows periodSeconds x failureThreshold for model loading."),
            "livenessProbe": probe("gRPC liveness probe."),
            "readinessProbe": probe("gRPC readiness probe (NOT_SERVING while loading or reloading weights)."),
            "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
            "podDisruptionBudget": obj(
                {
                    "enabled": BOOL,
                    "maxUnavailable": {
                        "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^[0-9]+%$"}]
                    },
                }
            ),
            "config": {
                "$ref": f"#/$defs/{config_def}",
                "description": f"The {role} role's configuration ({config_def} in libs/alignd/config/).",
            },
        },
        description=f"The {role} role.",
    )


def role_config_defs() -> tuple[dict[str, str], dict[str, dict]]:
    """JSON schemas of the role configs, their nested models hoisted into one $defs."""
    from alignd.config import ROLE_CONFIGS

    defs: dict[str, dict] = {}
    names: dict[str, str] = {}
    for role in ROLES:
        model = ROLE_CONFIGS[role]
        schema = model.model_json_schema(ref_template="#/$defs/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            if name in defs and defs[name] != sub:
                raise SystemExit(f"two different pydantic models named {name}")
            defs[name] = sub
        if model.__name__ in defs and defs[model.__name__] != schema:
            raise SystemExit(f"two different pydantic models named {model.__name__}")
        defs[model.__name__] = schema
        names[role] = model.__name__
    return names, dict(sorted(defs.items()))


def build_schema() -> dict:
    names, defs = role_config_defs()
    peers = {"type": "array", "items": K8S_OBJECT, "description": "NetworkPolicyPeer objects."}
    props = {
        "global": {
            "type": "object",
            "description": "Values an umbrella chart shares with its subcharts; this chart reads none of them.",
        },
        "nameOverride": STRING,
        "fullnameOverride": STRING,
        "imagePullSecrets": {"type": "array", "items": obj({"name": {"type": "string", "minLength": 1}})},
        "clusterDomain": {"type": "string", "minLength": 1},
        "podSecurityContext": K8S_OBJECT,
        "containerSecurityContext": K8S_OBJECT,
        "serviceAccount": obj({"create": BOOL, "name": STRING, "annotations": STRING_MAP}),
        "rbac": obj({"create": BOOL}),
        "persistence": obj(
            {
                "enabled": BOOL,
                "existingClaim": STRING,
                "storageClass": STRING,
                "accessModes": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
                },
                "size": QUANTITY,
                "keep": BOOL,
                "annotations": STRING_MAP,
                "mountPath": {"type": "string", "pattern": "^/"},
            }
        ),
        "cache": obj({"sizeLimit": QUANTITY}),
        "auth": obj(
            {
                "enabled": BOOL,
                "existingSecret": STRING,
                "extraTokens": {
                    "type": "object",
                    "description": "Your own callers: {name: {sha256 | token, scopes}} (alignd.runtime.auth).",
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["scopes"],
                        "properties": {
                            "token": {"type": "string", "minLength": 16},
                            "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
                            "scopes": {"type": "array", "minItems": 1, "items": {"enum": list(SCOPES)}},
                        },
                        "oneOf": [{"required": ["token"]}, {"required": ["sha256"]}],
                    },
                },
                "trustedNetworks": {"type": "array", "items": STRING},
                "mountPath": {"type": "string", "pattern": "^/"},
            }
        ),
        "tls": obj(
            {
                "enabled": BOOL,
                "mutual": BOOL,
                "certManager": obj(
                    {
                        "enabled": BOOL,
                        "issuerRef": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": STRING, "kind": STRING, "group": STRING},
                        },
                        "duration": DURATION,
                        "renewBefore": DURATION,
                    }
                ),
                "secretNames": {
                    "type": "object",
                    "propertyNames": {"enum": list(ROLES)},
                    "additionalProperties": {"type": "string"},
                },
                "healthPort": PORT,
                "mountPath": {"type": "string", "pattern": "^/"},
            }
        ),
        "rewardTLS": obj(
            {
                "enabled": BOOL,
                "secretName": STRING,
                "mountPath": {"type": "string", "pattern": "^/"},
                "mutual": BOOL,
                "clientCASecret": STRING,
                "coordinatorClientSecret": STRING,
                "serverName": STRING,
            }
        ),
        **{
            service: obj(
                {
                    "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    "annotations": STRING_MAP,
                    "loadBalancerSourceRanges": {"type": "array", "items": STRING},
                }
            )
            for service in ("rewardService", "coordinatorService")
        },
        "learnerLaunch": obj({"masterPort": PORT, "maxRestarts": {"type": "integer", "minimum": 0}}),
        "networkPolicy": obj(
            {
                "enabled": BOOL,
                "reward": obj(
                    {
                        "allowOtherNamespaces": BOOL,
                        "namespaceSelector": K8S_OBJECT,
                        "ipBlocks": {
                            "type": "array",
                            "items": {"type": "string", "pattern": r"^[0-9a-fA-F:.]+/[0-9]+$"},
                        },
                    }
                ),
                "coordinatorFrom": peers,
                "metricsFrom": peers,
            }
        ),
        "helmTest": obj({"enabled": BOOL, "timeoutSeconds": {"type": "number", "exclusiveMinimum": 0}}),
        "kueue": obj(
            {
                "queueName": {
                    **STRING,
                    "description": 'Kueue LocalQueue the roles\' workloads are admitted through ("" = none).',
                },
                "roles": {"type": "array", "items": {"enum": list(ROLES)}, "uniqueItems": True},
            }
        ),
        "metrics": obj(
            {
                "auth": BOOL,
                "serviceMonitor": obj(
                    {"enabled": BOOL, "interval": DURATION, "scrapeTimeout": DURATION, "labels": STRING_MAP}
                ),
                "prometheusRule": obj(
                    {
                        "enabled": BOOL,
                        "labels": STRING_MAP,
                        "stalledRunWindow": DURATION,
                        "klThreshold": {"type": "number", "exclusiveMinimum": 0},
                        "errorRatioThreshold": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                        "runbookUrl": {"type": "string", "minLength": 1},
                    }
                ),
                "grafanaDashboard": obj(
                    {"enabled": BOOL, "namespace": STRING, "labels": STRING_MAP, "annotations": STRING_MAP}
                ),
            }
        ),
    }
    for role in ROLES:
        props[role] = role_block(role, names[role])
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "alignd chart values",
        "description": "Generated by charts/gen_values_schema.py from the chart's value types and the role configs "
        "of libs/alignd/config/. Do not edit by hand.",
        **obj(props),
        "$defs": defs,
    }
    return schema


def render() -> str:
    return json.dumps(build_schema(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if values.schema.json is stale")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = SCHEMA_PATH.read_text() if SCHEMA_PATH.exists() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is stale: run python charts/gen_values_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(SCHEMA_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
