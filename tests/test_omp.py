"""alignd.runtime.omp: a thread that ran torch work gives its OpenMP pool back, and every RPC's thread does.

libgomp keeps one pool of worker threads per thread that started a parallel region, as OS threads of the
process: the tests count them in /proc/self/task. Each case runs in its own interpreter (torch with 2 intra-op
threads, the setting of the roles on 2 cores), so the pools of other tests cannot blur the count; each has a
control that shows the count would fail without the release.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="counts threads in /proc")

COMMON = """
import json, os, threading, concurrent.futures as cf
import torch
torch.set_num_threads(2)
from alignd.runtime.omp import release_thread_pool

def threads():
    return len(os.listdir("/proc/self/task"))

def parallel_work():
    x = torch.ones(1 << 22)
    x.add_(1.0)  # over torch's grain size: a parallel region on 2 threads
    return float(x[0])
"""


def run_case(body: str, **env: str) -> dict:
    code = textwrap.dedent(COMMON) + textwrap.dedent(body)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_thread_gives_its_pool_back():
    got = run_case(
        """
        pool = cf.ThreadPoolExecutor(1)  # one long-lived thread, as a gRPC worker
        pool.submit(lambda: None).result()
        base = threads()
        pool.submit(parallel_work).result()
        with_pool = threads()
        released = pool.submit(release_thread_pool).result()
        after = threads()
        pool.submit(parallel_work).result()  # the next region makes a new pool
        again = threads()
        print(json.dumps(dict(base=base, with_pool=with_pool, released=released, after=after, again=again)))
        """
    )
    assert got["with_pool"] == got["base"] + 1, got  # the worker libgomp started for that thread
    assert got["released"] is True
    assert got["after"] == got["base"], got
    assert got["again"] == got["base"] + 1, got


def test_disabled_by_environment():
    got = run_case(
        """
        pool = cf.ThreadPoolExecutor(1)
        pool.submit(parallel_work).result()
        n = threads()
        released = pool.submit(release_thread_pool).result()
        print(json.dumps(dict(n=n, released=released, after=threads())))
        """,
        ALIGND_OMP_RELEASE="0",
    )
    assert got["released"] is False
    assert got["after"] == got["n"], got


def test_every_rpc_thread_gives_its_pool_back():
    """A real ServiceHost: a handler runs torch work on its gRPC thread; after the call the process has the
    threads it had before (with ALIGND_OMP_RELEASE=0, the control, one more: the pool left behind)."""
    body = """
        import grpc, sys
        sys.path.insert(0, "tests")
        from test_interceptor import SERVICE
        from alignd.config import ServerConfig
        from alignd.runtime.server import ServiceHost
        from conftest import secure_channel, tokens_file

        cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=-1, max_workers=1, grace_seconds=0,
                           auth={"tokens_file": str(tokens_file())})
        host = ServiceHost("probe", cfg, [SERVICE])
        handlers = {
            "Idle": grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"idle"),
            "Torch": grpc.unary_unary_rpc_method_handler(lambda req, ctx: str(parallel_work()).encode()),
        }
        host.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        host.start()
        ch = secure_channel(host.address)
        call = lambda m: ch.unary_unary(f"/{SERVICE}/{m}")(b"x", timeout=30)
        for _ in range(3):
            call("Idle")  # the worker thread and gRPC's own threads exist from here on
        base = threads()
        answers = [call("Torch") for _ in range(3)]
        after = threads()
        ch.close(); host.stop(0)
        print(json.dumps(dict(base=base, after=after, answers=[a.decode() for a in answers])))
        """
    got = run_case(body)
    assert got["answers"] == ["2.0"] * 3
    assert got["after"] == got["base"], got
    control = run_case(body, ALIGND_OMP_RELEASE="0")
    assert control["after"] == control["base"] + 1, control
