"""The local stack: every role as a child process on loopback (`alignd up`).

Children start in dependency order (policy, reward and reference together;
then the learner, which pushes weights to the policy; then the
coordinator, which drives them all). Each child binds ephemeral ports,
writes an endpoint file, and is ready when its gRPC health says SERVING.
Once every child is ready, `stack.json` is written (atomically) in the run
directory. If a child dies, the launcher names it, prints its log tail,
stops the others and exits non-zero. SIGTERM/SIGINT stop every child:
SIGTERM, the grace period, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alignd.atomic import write_json_atomic
from alignd.config import StackConfig, build_config, dump_yaml
from alignd.runtime.lifetime import PARENT_ENV as PARENT_ENV
from alignd.runtime.lifetime import child_env
from alignd.runtime.lifetime import die_with_parent as die_with_parent
from alignd.runtime.logging import get_logger

# PARENT_ENV, child_env and die_with_parent (alignd.runtime.lifetime) are importable from here too, as before.

_log = get_logger("alignd.local_stack")

WAVES: list[list[str]] = [["policy", "reward", "reference"], ["learner"], ["coordinator"]]
LOG_TAIL_LINES = 40


class ChildDied(RuntimeError):
    def __init__(self, role: str, returncode: int | None, log_tail: str, *, reason: str = "") -> None:
        super().__init__(f"{role} exited with code {returncode}" + (f" ({reason})" if reason else ""))
        self.role = role
        self.returncode = returncode
        self.log_tail = log_tail
        self.reason = reason


@dataclass
class Child:
    role: str
    proc: subprocess.Popen
    log_path: Path
    endpoint_file: Path
    address: str = ""
    metrics_url: str | None = None
    extra: dict = field(default_factory=dict)  # other endpoints of the role (the reward role's http_url)
    exited: threading.Event = field(default_factory=threading.Event)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def ports(self) -> dict[str, int]:
        """The ports it was serving on (a restart binds the same ones, so callers' addresses stay valid)."""
        from urllib.parse import urlparse

        out = {}
        if self.address:
            out["port"] = int(self.address.rsplit(":", 1)[1])
        if self.metrics_url:
            out["metrics_port"] = urlparse(self.metrics_url).port
        if self.extra.get("http_url"):
            out["http_port"] = urlparse(self.extra["http_url"]).port
        return out


def pin_ports(role_cfg, ports: dict[str, int]):
    """A copy of a role's configuration that binds `ports` (see Child.ports)."""
    cfg = role_cfg.model_copy(deep=True)
    if "port" in ports:
        cfg.server.port = ports["port"]
    if "metrics_port" in ports:
        cfg.server.metrics_port = ports["metrics_port"]
    if "http_port" in ports and hasattr(cfg, "http"):
        cfg.http.port = ports["http_port"]
    return cfg


def default_stack_config(overrides: list[str] | None = None) -> StackConfig:
    """The embedded default (configs/local.yaml): built-in tiny models, one torch thread per role."""
    lm, rm = "builtin:tiny-gpt2", "builtin:tiny-gpt2-reward"
    data = {
        "policy": {"model": {"path": lm}, "torch_threads": 1},
        "reward": {"model": {"path": rm}, "torch_threads": 1},
        "reference": {"model": {"path": lm}, "torch_threads": 1},
        # The value model starts from the reward model, as in InstructGPT.
        "learner": {"model": {"path": lm}, "value_model": {"path": rm}, "torch_threads": 1},
    }
    return build_config(StackConfig, data, overrides)


class LocalStack:
    """Starts, supervises and stops the local stack. Use as a context manager."""

    def __init__(self, cfg: StackConfig, run_dir: Path, *, python: str = sys.executable, data_dirs=()) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.data_dirs = [str(d) for d in data_dirs]  # directories of the job's data files: roots of every role
        self.python = python
        self.children: dict[str, Child] = {}
        self.any_exited = threading.Event()
        self._stopping = False
        self._stop_requested = threading.Event()  # interrupts a restart backoff
        # Supervision (cfg.restart): restart times within the window, totals, last exit codes; /metrics.
        self.recent_restarts: dict[str, list[float]] = {}
        self.restart_totals: dict[str, int] = {}
        self.last_exit: dict[str, int | None] = {}
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self._m_restarts = Counter(
            "alignd_launcher_restarts_total",
            "Role processes the local stack restarted after they exited.",
            ["role"],
            registry=self.registry,
        )
        self._m_up = Gauge(
            "alignd_launcher_role_up",
            "1 while a role's process serves, 0 while it is down or restarting.",
            ["role"],
            registry=self.registry,
        )
        self._metrics_http = None
        self.metrics_url: str | None = None
        self.tokens_file: Path | None = None  # RUN_DIR/auth/tokens.yaml, made at start (alignd.runtime.tokens)

    def _apply_roots(self) -> None:
        """Where paths in requests may lead on the local stack (paths.roots of every role that sets none): the run
        directory (marked as alignd's: runs write into it), the directory alignd was started from, $ALIGND_CACHE,
        and the job's data directories."""
        from alignd.models.tiny import default_cache_dir
        from alignd.runtime.paths import is_owned, mark_owned

        if not is_owned(self.run_dir):
            mark_owned(self.run_dir)
        defaults = [str(self.run_dir.resolve()), os.getcwd(), str(default_cache_dir()), *self.data_dirs]
        for role in ("policy", "reward", "reference", "learner", "coordinator"):
            paths = getattr(self.cfg, role).paths
            paths.roots = list(dict.fromkeys([*(paths.roots or defaults), *self.data_dirs]))

    def operator_credentials(self):
        """What `alignd` commands send to this stack's roles: the operator's token (alignd.runtime.tokens)."""
        from alignd.runtime.tokens import operator_credentials

        return operator_credentials(self.tokens_file)

    # -- start -------------------------------------------------------------
    def _spawn(self, role: str, ports: dict[str, int] | None = None) -> Child:
        role_cfg = getattr(self.cfg, role)
        if ports:
            role_cfg = pin_ports(role_cfg, ports)
        cfg_dir = self.run_dir / "config"
        logs = self.run_dir / "logs"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        cfg_path = cfg_dir / f"{role}.yaml"
        cfg_path.write_text(dump_yaml(role_cfg))
        endpoint = self.run_dir / "endpoints" / f"{role}.json"
        endpoint.unlink(missing_ok=True)
        log_path = logs / f"{role}.log"
        log = open(log_path, "ab")
        cmd = [
            self.python,
            "-m",
            "alignd.cli",
            "serve",
            role,
            "--config",
            str(cfg_path),
            "--run-dir",
            str(self.run_dir),
            "--endpoint-file",
            str(endpoint),
        ]
        env = child_env()
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        log.close()
        child = Child(role, proc, log_path, endpoint)
        threading.Thread(target=self._reap, args=(child,), name=f"reap-{role}", daemon=True).start()
        _log.info("child_started", child=role, pid=proc.pid, log=str(log_path))
        return child

    def _reap(self, child: Child) -> None:
        child.proc.wait()
        child.exited.set()
        self.any_exited.set()

    def _died(self, child: Child) -> ChildDied:
        return ChildDied(child.role, child.proc.returncode, child.log_tail())

    def _wait_ready(self, child: Child, deadline: float) -> None:
        # 1. The endpoint file appears once the child bound its ports.
        while not child.endpoint_file.exists():
            if child.exited.wait(timeout=0.05):
                raise self._died(child)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.role} did not bind its ports in time")
        info = json.loads(child.endpoint_file.read_text())
        child.address, child.metrics_url = info["address"], info["metrics_url"]
        child.extra = {k: v for k, v in info.items() if k == "http_url"}
        # 2. Health turns SERVING once the model is loaded and warmed up.
        with grpc.insecure_channel(child.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            polling = False
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{child.role} not SERVING within {self.cfg.startup_timeout_seconds:.0f}s")
                try:
                    if polling:  # the role refused another Watch stream (its cap): ask with Check instead
                        serving = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=min(remaining, 5.0))
                        if serving.status == health_pb2.HealthCheckResponse.SERVING:
                            _log.info("child_ready", child=child.role, address=child.address)
                            return
                        child.exited.wait(0.2)
                        continue
                    for resp in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=min(remaining, 5.0)):
                        if resp.status == health_pb2.HealthCheckResponse.SERVING:
                            _log.info("child_ready", child=child.role, address=child.address)
                            return
                except grpc.RpcError as err:
                    if child.exited.is_set():
                        raise self._died(child) from None
                    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        polling = True
                    elif err.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                        raise

    def _fill_addresses(self) -> None:
        addr = {r: c.address for r, c in self.children.items()}
        if "policy" in addr:
            self.cfg.learner.policy_addresses = [addr["policy"]]
            self.cfg.coordinator.policy_addresses = [addr["policy"]]
        if "reward" in addr:
            self.cfg.coordinator.reward_addresses = [addr["reward"]]
        if "reference" in addr:
            self.cfg.coordinator.reference_addresses = [addr["reference"]]
        if "learner" in addr:
            self.cfg.coordinator.learner_address = addr["learner"]

    def start(self) -> dict:
        """Starts every role; returns the stack.json content once all are SERVING."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.tokens_file is None:
            from alignd.runtime.tokens import apply_stack_auth, ensure_stack_tokens

            self.tokens_file = ensure_stack_tokens(self.run_dir)
            apply_stack_auth(self.cfg, self.tokens_file)
            self._apply_roots()
        if self._metrics_http is None:
            from alignd.runtime.metrics import serve_metrics

            self._metrics_http, port = serve_metrics(self.registry, "127.0.0.1", 0)
            self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        for wave in WAVES:
            self._fill_addresses()
            started = [self._spawn(role) for role in wave]
            for c in started:
                self.children[c.role] = c
            deadline = time.monotonic() + self.cfg.startup_timeout_seconds
            for c in started:
                self._wait_ready(c, deadline)
                self._m_up.labels(c.role).set(1)
                self.restart_totals.setdefault(c.role, 0)
                self._m_restarts.labels(c.role)
        info = self.describe()
        write_json_atomic(self.run_dir / "stack.json", info)
        _log.info("stack_ready", stack_json=str(self.run_dir / "stack.json"))
        return info

    def restart(self, role: str) -> Child:
        """Starts `role` again (after it exited) with the same configuration, on the same ports (the other roles'
        addresses stay valid); returns once it is SERVING, and rewrites stack.json."""
        old = self.children[role]
        if old.proc.poll() is None:
            raise RuntimeError(f"{role} (pid {old.proc.pid}) is still running")
        child = self._spawn(role, ports=old.ports())
        self.children[role] = child
        self.any_exited.clear()
        self._wait_ready(child, time.monotonic() + self.cfg.startup_timeout_seconds)
        write_json_atomic(self.run_dir / "stack.json", self.describe())
        _log.info("child_restarted", child=role, pid=child.proc.pid, address=child.address)
        return child

    def describe(self) -> dict:
        services = {}
        for r, c in self.children.items():
            svc = {
                "address": c.address,
                "metrics_url": c.metrics_url,
                **c.extra,
                "pid": c.proc.pid,
                "log": str(c.log_path),
                "restarts": self.restart_totals.get(r, 0),
            }
            if r in self.last_exit:
                svc["last_exit_code"] = self.last_exit[r]
            services[r] = svc
        from alignd.runtime.tokens import OPERATOR

        auth = {"tokens_file": str(self.tokens_file), "operator_token": OPERATOR} if self.tokens_file else None
        return {"services": services, "launcher": {"pid": os.getpid(), "metrics_url": self.metrics_url}, "auth": auth}

    # -- supervision -------------------------------------------------------
    def supervise(self, on_restart=None) -> ChildDied | None:
        """Handles the roles that exited (call it when any_exited is set): each is restarted on its own ports
        after a backoff, as cfg.restart says; returns the death that must stop the stack, or None."""
        policy = self.cfg.restart
        self.any_exited.clear()
        while True:
            dead = self.dead_child()
            if dead is None or self._stopping or self._stop_requested.is_set():
                return None
            role, code = dead.role, dead.proc.returncode
            self.last_exit[role] = code
            self._m_up.labels(role).set(0)
            now = time.monotonic()
            recent = [t for t in self.recent_restarts.get(role, []) if now - t < policy.reset_after_seconds]
            self.recent_restarts[role] = recent
            if policy.policy == "never" or (policy.policy == "on_failure" and code == 0):
                _log.error("child_died", child=role, exit_code=code, restart_policy=policy.policy)
                return self._died(dead)
            if len(recent) >= policy.max_restarts:
                _log.error(
                    "child_restart_limit",
                    child=role,
                    exit_code=code,
                    restarts=len(recent),
                    max_restarts=policy.max_restarts,
                )
                return ChildDied(
                    role,
                    code,
                    dead.log_tail(),
                    reason=(
                        f"{len(recent)} restarts within {policy.reset_after_seconds:g}s: restart.max_restarts reached"
                    ),
                )
            backoff = policy.backoff(len(recent))
            _log.warning("child_died", child=role, exit_code=code, restarts=len(recent), backoff_seconds=backoff)
            if self._stop_requested.wait(backoff):
                return None
            recent.append(time.monotonic())
            self.restart_totals[role] = self.restart_totals.get(role, 0) + 1
            self._m_restarts.labels(role).inc()
            try:
                self.restart(role)
            except ChildDied:
                continue  # the new process died while starting: the loop sees it as dead again
            except TimeoutError:
                child = self.children[role]
                _log.error("child_restart_timeout", child=role, pid=child.proc.pid)
                child.proc.kill()
                child.exited.wait()
                continue
            self._m_up.labels(role).set(1)
            write_json_atomic(self.run_dir / "stack.json", self.describe())
            if on_restart is not None:
                on_restart(role, code)

    def request_stop(self) -> None:
        """Ends a supervision backoff early (signal handlers may call it: it only sets an Event)."""
        self._stop_requested.set()
        self.any_exited.set()

    # -- run / stop --------------------------------------------------------
    def dead_child(self) -> Child | None:
        for c in self.children.values():
            if c.exited.is_set():
                return c
        return None

    def stop(self) -> None:
        """SIGTERM every child (coordinator first), wait the grace period, SIGKILL the rest."""
        if self._stopping:
            return
        self._stopping = True
        self._stop_requested.set()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        order = [r for wave in reversed(WAVES) for r in wave if r in self.children]
        for role in order:
            c = self.children[role]
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.stop_grace_seconds
        for role in order:
            c = self.children[role]
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _log.warning("child_killed", child=role, pid=c.proc.pid)
                c.proc.kill()
                c.proc.wait()
        _log.info("stack_stopped")

    def __enter__(self) -> LocalStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def report_restart(stack: LocalStack, role: str, code: int | None, *, prefix: str = "") -> None:
    """The line printed when the supervisor restarted a role (LocalStack.supervise's on_restart)."""
    print(
        f"{prefix}alignd: {role} exited with code {code}; restarted on {stack.children[role].address} "
        f"(restart {stack.restart_totals[role]})",
        flush=True,
    )


def report_death(err: ChildDied) -> None:
    why = f" ({err.reason})" if err.reason else ""
    print(f"alignd: role {err.role} exited with code {err.returncode}{why}; last log lines:", file=sys.stderr)
    print(err.log_tail, file=sys.stderr)


def run_stack(cfg: StackConfig, run_dir: Path, *, data_dirs=()) -> int:
    """`alignd up`: start, print where everything is, supervise until a signal or a death."""
    stop = threading.Event()
    started = threading.Event()
    stack = LocalStack(cfg, run_dir, data_dirs=data_dirs)

    def on_signal(signum, _frame):
        stop.set()
        stack.request_stop()  # wake the supervisor, end a restart backoff
        if not started.is_set():
            raise KeyboardInterrupt  # abandon start-up; the handler below stops the children

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        info = stack.start()
    except ChildDied as err:
        report_death(err)
        stack.stop()
        return 1
    except KeyboardInterrupt:
        stack.stop()
        return 130
    except BaseException:
        stack.stop()
        raise
    started.set()
    for role, svc in info["services"].items():
        http = f"  http {svc['http_url']}" if svc.get("http_url") else ""
        print(f"{role:12s} {svc['address']:22s} metrics {svc['metrics_url']}{http}", flush=True)
    if stack.tokens_file is not None:
        print(
            f"credentials  {stack.tokens_file} (operator: admin; scorer: score; ... see docs/security.md)", flush=True
        )
    print(f"alignd: stack ready: {run_dir / 'stack.json'}", flush=True)
    while not stop.is_set():
        stack.any_exited.wait()
        if stop.is_set():
            break
        # restarts what died (restart policy); a death it cannot fix stops the stack
        death = stack.supervise(lambda role, code: report_restart(stack, role, code))
        if death is not None and not stop.is_set():
            report_death(death)
            stack.stop()
            return 1
    stack.stop()
    return 0
