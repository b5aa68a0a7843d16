"""How the benchmarks start alignd: its command line, a pipeline run of a preset, and a role served as a subprocess.

Imported by the bench scripts (`from _launch import ...`: bench/ is on sys.path when a script runs). Only the
standard library at import: reward_load.py's client processes import their script too and stay light.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

ROOT = Path(__file__).resolve().parents[1]


def alignd_argv(*args: str) -> list[str]:
    """The command line of `alignd ARGS...` run by this interpreter (`python -m alignd.cli`)."""
    return [sys.executable, "-m", "alignd.cli", *args]


def set_flags(overrides: Iterable[str]) -> list[str]:
    """`--set KEY=VALUE` for each override, as the alignd commands take them."""
    return [arg for override in overrides for arg in ("--set", override)]


def preset_argv(preset: str, run_dir: Path, overrides: Iterable[str]) -> list[str]:
    """`alignd run --preset PRESET` (the whole pipeline) into run_dir, with those --set overrides."""
    return alignd_argv("run", "--preset", preset, "--run-dir", str(run_dir), *set_flags(overrides))


def run_offline(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Runs a command to its end from the repository root with the Hugging Face Hub offline, its output captured:
    the finished process and its wall-clock seconds."""
    t0 = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return out, time.perf_counter() - t0


def log_tail(log_path: Path, n: int) -> str:
    """The last n lines of a role's log ("" when it cannot be read)."""
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def spawn_serve(role: str, cfg: dict, d: Path) -> tuple[subprocess.Popen, Path, Path]:
    """`alignd serve ROLE` as a child process in directory d, its configuration `cfg` written to d/ROLE.yaml and
    its output to d/ROLE.log: (the process, its endpoint file, written once it bound its ports, its log)."""
    import yaml

    d.mkdir(parents=True, exist_ok=True)
    cfg_path = d / f"{role}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    endpoint = d / "endpoint.json"
    log_path = d / f"{role}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            alignd_argv(
                "serve", role, "--config", str(cfg_path), "--run-dir", str(d), "--endpoint-file", str(endpoint)
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ),
        )
    return proc, endpoint, log_path


def await_serving(
    proc: subprocess.Popen, endpoint: Path, deadline: float, *, name: str, log_tail: Callable[[], str]
) -> tuple[dict, grpc.Channel]:
    """Waits for a role spawn_serve started: its endpoint file (ports bound), then health SERVING (model loaded and
    warmed up), by `deadline` (time.monotonic()). Returns the endpoint file's contents and a channel to the role
    calling as the operator of the work directory's tokens (_auth.tokens_file of d's parent). RuntimeError, with
    the log's tail, if the role exits first; TimeoutError after the deadline."""
    from alignd.runtime.client import make_channel, wait_for_serving

    from _auth import operator, tokens_file

    while not endpoint.exists():
        try:
            proc.wait(timeout=0.05)  # returns only if the child died
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_tail()}")
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not bind its ports in time:\n{log_tail()}")
    info = json.loads(endpoint.read_text())
    channel = make_channel(info["address"], credentials=operator(tokens_file(endpoint.parent.parent)))
    try:
        wait_for_serving(channel, timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        channel.close()
        raise
    return info, channel
