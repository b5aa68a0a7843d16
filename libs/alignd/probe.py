"""`alignd probe --config FILE`: is a deployment serving? What the chart's `helm test` pod runs.

Checks, in order, each printed as one line `ok|FAIL  CHECK  detail`:

- every listed role answers the gRPC health check SERVING (health is the one public RPC: no token needed);
- the reward role's HTTP API (OpenRLHF's protocol, POST /get_reward) scores a query, with the caller's token,
  and answers one finite number per query.

Exit 0 when all pass, 1 otherwise. The configuration (YAML; the chart renders it into the test's ConfigMap):

    roles: {policy: HOST:PORT, reward: HOST:PORT, ...}   # gRPC addresses
    client: {...}                  # RoleClientConfig: tokens_file, ca_file, cert_file, key_file, server_name
    reward_http:                   # optional
      url: http(s)://HOST:PORT/get_reward
      token_file: PATH             # a bearer token with the score scope
      ca_file / cert_file / key_file: PATH   # HTTPS (mutual with cert and key)
    timeout_seconds: 60            # per check
"""

from __future__ import annotations

import json
import math
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from pydantic import Field

from alignd.config import RoleClientConfig
from alignd.config.base import Strict

QUERY = "The quick brown fox jumps over the lazy dog."


class RewardHTTPProbe(Strict):
    url: str = Field(description="The reward role's /get_reward URL.")
    token_file: str | None = Field(None, description="File holding a bearer token with the score scope.")
    ca_file: str | None = Field(None, description="PEM CA of the server's certificate (HTTPS).")
    cert_file: str | None = Field(None, description="PEM client certificate (mutual TLS).")
    key_file: str | None = Field(None, description="PEM client key (mutual TLS).")


class ProbeConfig(Strict):
    roles: dict[str, str] = Field(description="Role name -> gRPC HOST:PORT.")
    client: RoleClientConfig = Field(RoleClientConfig(), description="How to reach the roles (TLS).")
    reward_http: RewardHTTPProbe | None = Field(None, description="The HTTP reward API to call, if any.")
    timeout_seconds: float = Field(60.0, gt=0, description="Deadline of each check.")


def check_health(address: str, client: RoleClientConfig, *, timeout: float) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from alignd.runtime.client import make_channel

    channel = make_channel(address, credentials=client)
    try:
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True
        )
    except grpc.RpcError as err:
        return False, f"{address}: {err.code().name} {err.details()}"
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def check_get_reward(cfg: RewardHTTPProbe, timeout: float) -> tuple[bool, str]:
    headers = {"Content-Type": "application/json"}
    if cfg.token_file:
        headers["Authorization"] = f"Bearer {Path(cfg.token_file).read_text().strip()}"
    context = None
    if cfg.url.startswith("https:"):
        context = ssl.create_default_context(cafile=cfg.ca_file)
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
    req = urllib.request.Request(cfg.url, data=json.dumps({"query": [QUERY]}).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return False, f"{cfg.url}: HTTP {err.code} {err.read()[:200].decode(errors='replace')}"
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as err:
        return False, f"{cfg.url}: {err}"
    rewards = body.get("rewards") if isinstance(body, dict) else None
    if not (isinstance(rewards, list) and len(rewards) == 1 and isinstance(rewards[0], (int, float))):
        return False, f"{cfg.url}: expected {{'rewards': [one number]}}, got {str(body)[:200]}"
    if not math.isfinite(rewards[0]):
        return False, f"{cfg.url}: non-finite reward {rewards[0]}"
    return True, f"{cfg.url}: reward {rewards[0]:.4f}"


def run(cfg: ProbeConfig, out=sys.stdout) -> int:
    """Runs every check, printing one line each; 0 when all pass."""
    results = [
        (f"health {name}", *check_health(addr, cfg.client, timeout=cfg.timeout_seconds))
        for name, addr in cfg.roles.items()
    ]
    if cfg.reward_http is not None:
        results.append(("get_reward", *check_get_reward(cfg.reward_http, cfg.timeout_seconds)))
    for check, ok, detail in results:
        print(f"{'ok' if ok else 'FAIL':4}  {check:18}  {detail}", file=out, flush=True)
    return 0 if all(ok for _, ok, _ in results) else 1
