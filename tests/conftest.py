"""Shared fixtures: tiny models saved with save_pretrained, and role servers
started as real subprocesses through the `alignd serve` entry point."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from alignd.local_stack import child_env  # children go when pytest goes, even killed
from alignd.runtime.client import make_channel, wait_for_serving

from helpers import alignd_argv

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STARTUP_TIMEOUT_S = 180.0

_TOKENS: list[Path] = []


def tokens_file() -> Path:
    """This test process's tokens file (the local stack's callers and scopes: alignd.runtime.tokens), made once."""
    if not _TOKENS:
        import atexit
        import shutil
        import tempfile

        from alignd.runtime.tokens import ensure_stack_tokens

        base = tempfile.mkdtemp(prefix="alignd-test-auth-")
        atexit.register(shutil.rmtree, base, ignore_errors=True)  # one per test process, gone with it
        _TOKENS.append(ensure_stack_tokens(base))
    return _TOKENS[0]


def credentials(name: str = "operator"):
    """config.RoleClientConfig sending the token `name` of tokens_file() (operator: admin)."""
    from alignd.config import RoleClientConfig

    return RoleClientConfig(tokens_file=str(tokens_file()), token_name=name)


def token_of(name: str = "operator") -> str:
    from alignd.runtime.auth import read_token_entry

    return read_token_entry(tokens_file(), name)


def bearer(name: str = "operator") -> tuple:
    """Call metadata carrying the token `name` of tokens_file()."""
    return (("authorization", f"Bearer {token_of(name)}"),)


def secure_channel(address: str, name: str = "operator", **kw) -> grpc.Channel:
    """make_channel to `address` sending the token `name` of tokens_file()."""
    return make_channel(address, credentials=credentials(name), **kw)


def with_test_auth(role: str, cfg: dict) -> tuple[dict, bool]:
    """`cfg` with server.auth pointing at tokens_file() (and the coordinator's / learner's own token as client),
    unless the test configured server.auth itself; and whether it did so."""
    cfg = dict(cfg)
    server = dict(cfg.get("server") or {})
    if "auth" in server:
        return cfg, False
    server["auth"] = {"tokens_file": str(tokens_file())}
    cfg["server"] = server
    if role in ("coordinator", "learner") and "client" not in cfg:
        cfg["client"] = {"tokens_file": str(tokens_file()), "token_name": role}
    return cfg, True


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """gpt2 LM, a second gpt2 LM (other weights), llama LM, gpt2 reward model."""
    from alignd.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {
        "lm": build_tiny_model(root / "lm", seed=0),
        "lm_other": build_tiny_model(root / "lm_other", seed=123),
        "llama": build_tiny_model(root / "llama", arch="llama", seed=0),
        "reward": build_tiny_model(root / "reward", kind="reward", seed=1),
        "reward_other": build_tiny_model(root / "reward_other", kind="reward", seed=77),
    }


@pytest.fixture(scope="module")
def tok(tiny_models, request):
    """The tokenizer of a tiny model, loaded as users load it: tiny_models[TOKENIZER_OF] of the test module
    ("lm" unless the module sets it; the reward tests use "reward")."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_models[getattr(request.module, "TOKENIZER_OF", "lm")]))


@dataclass
class RoleServer:
    role: str
    address: str
    metrics_url: str
    proc: subprocess.Popen
    log_path: Path
    channel: grpc.Channel

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        """The role's /metrics text."""
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            return resp.read().decode()


def start_role(
    role: str, cfg: dict, workdir: Path, credentials: grpc.ChannelCredentials | None = None, options: list | None = None
) -> RoleServer:
    """Runs `python -m alignd.cli serve ROLE` and waits until it is SERVING (over TLS with `credentials`; channel
    `options` such as grpc.ssl_target_name_override)."""
    return _await_role(_spawn_role(role, cfg, workdir), credentials, options)


def start_roles(specs: list[tuple[str, dict, Path]]) -> list[RoleServer]:
    """Several roles (role, cfg, workdir) started at once, then each waited for: their start-ups overlap."""
    spawned = [_spawn_role(*spec) for spec in specs]
    servers: list[RoleServer] = []
    try:
        for sp in spawned:
            servers.append(_await_role(sp))
    except BaseException:
        for sp in spawned[len(servers) + 1 :]:
            sp[1].kill()
            sp[1].wait()
        for srv in servers:
            stop_role(srv)
        raise
    return servers


def _spawn_role(role: str, cfg: dict, workdir: Path):
    cfg, injected = with_test_auth(role, cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / f"{role}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    endpoint = workdir / f"{role}.endpoint.json"
    log_path = workdir / f"{role}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            alignd_argv(
                "serve", role, "--config", str(cfg_path), "--run-dir", str(workdir), "--endpoint-file", str(endpoint)
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(),
        )
    return role, proc, endpoint, log_path, injected


def _await_role(spawned, credentials: grpc.ChannelCredentials | None = None, options: list | None = None) -> RoleServer:
    import json
    import time

    role, proc, endpoint, log_path, injected = spawned
    try:
        # The child writes the endpoint file right after binding; wait for the
        # process to either write it or die (bounded by the startup timeout).
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not endpoint.exists():
            try:
                proc.wait(timeout=0.05)
                raise RuntimeError(f"{role} exited with {proc.returncode}:\n{log_path.read_text()}")
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{role} did not bind in time:\n{log_path.read_text()}")
        info = json.loads(endpoint.read_text())
        if credentials is None:
            channel = secure_channel(info["address"]) if injected else make_channel(info["address"])
        else:
            if injected:  # TLS, and the operator's token on every call
                credentials = grpc.composite_channel_credentials(
                    credentials, grpc.access_token_call_credentials(token_of())
                )
            channel = grpc.secure_channel(info["address"], credentials, options=options)
        wait_for_serving(channel, timeout=STARTUP_TIMEOUT_S)
    except BaseException:
        proc.kill()
        proc.wait()
        print(log_path.read_text(errors="replace"), file=sys.stderr)
        raise
    return RoleServer(role, info["address"], info["metrics_url"], proc, log_path, channel)


def start_tiny_stack(
    tiny_models: dict[str, Path],
    root: Path,
    *,
    every: dict | None = None,
    learner: dict | None = None,
    coordinator: dict | None = None,
) -> dict[str, RoleServer]:
    """The five roles on the tiny models, by role, each in its own directory under `root`: policy, reward and
    reference started together, then the learner (streaming weights to the policy) and the coordinator (pointed at
    the three, with a learner address nothing listens on: the tests call the learner directly). `every` is added to
    each role's configuration, `learner` and `coordinator` to those roles'. Stop them with stop_roles."""
    every = every or {}
    model = lambda key: {"path": str(tiny_models[key])}  # noqa: E731
    first = start_roles(
        [
            ("policy", {"model": model("lm"), "torch_threads": 1, **every}, root / "policy"),
            ("reward", {"model": model("reward"), "torch_threads": 1, **every}, root / "reward"),
            ("reference", {"model": model("lm"), "torch_threads": 1, **every}, root / "reference"),
        ]
    )
    by_role = {s.role: s for s in first}
    learner_cfg = {
        "model": model("lm"),
        "value_model": model("reward"),
        "torch_threads": 1,
        "policy_addresses": [by_role["policy"].address],
        "weight_sync": "stream",
        **every,
        **(learner or {}),
    }
    coordinator_cfg = {
        "policy_addresses": [by_role["policy"].address],
        "reward_addresses": [by_role["reward"].address],
        "reference_addresses": [by_role["reference"].address],
        "learner_address": "127.0.0.1:1",
        **every,
        **(coordinator or {}),
    }
    later = start_roles(
        [("learner", learner_cfg, root / "learner"), ("coordinator", coordinator_cfg, root / "coordinator")]
    )
    by_role.update({s.role: s for s in later})
    return by_role


def stop_role(server: RoleServer) -> int:
    server.channel.close()
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        raise


def stop_roles(servers: list[RoleServer]) -> None:
    """stop_role for several roles, their graceful stops overlapping."""
    for server in servers:
        server.channel.close()
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
    for server in servers:
        stop_role(server)


def dump_stack(run_dir: Path, lines: int = 40) -> None:
    """Prints a local stack's stack.json and the end of every role's log (for a failing test's report)."""
    stack = run_dir / "stack.json"
    print(f"--- {stack}:\n{stack.read_text() if stack.exists() else '(none)'}", file=sys.stderr)
    for log in sorted((run_dir / "logs").glob("*.log")) if (run_dir / "logs").exists() else []:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"--- {log} (last {lines} lines):\n" + "\n".join(tail), file=sys.stderr)


def stop_launcher(proc: subprocess.Popen) -> None:
    """Stops an `alignd up/run/ppo` process: SIGTERM first (it stops its children), SIGKILL only if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def role_fixture(role: str, model_key: str, **extra):
    @pytest.fixture(scope="module")
    def fixture(tiny_models, tmp_path_factory):
        # The tiny models' directory is a root: tests load their other weights from there (LoadWeights).
        cfg = {
            "model": {"path": str(tiny_models[model_key])},
            "torch_threads": 1,
            "paths": {"roots": [str(Path(tiny_models[model_key]).parent)]},
            **extra,
        }
        server = start_role(role, cfg, tmp_path_factory.mktemp(role))
        yield server
        rc = stop_role(server)
        assert rc == 0, f"{role} did not shut down cleanly (exit {rc}):\n{server.log()[-3000:]}"

    return fixture


policy_server = role_fixture("policy", "lm", batching={"max_batch_size": 32, "max_wait_ms": 20})
reward_server = role_fixture("reward", "reward")
reference_server = role_fixture("reference", "lm")


def assert_invalid(call, *needles: str) -> grpc.RpcError:
    """`call()` fails with INVALID_ARGUMENT and a message containing every needle."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    for n in needles:
        assert n in err.details(), (n, err.details())
    return err
