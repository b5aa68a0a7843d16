"""grpc.aio against a sync thread-pool gRPC server, for alignd's kind of workload.

Run (from the repository root):

    .venv/bin/python bench/server_mode.py [--out bench/results/server_mode.json] [--quick]

Self-contained (no alignd code, no .proto): this script starts itself twice
as a server subprocess, once as a sync `grpc.server` with a
ThreadPoolExecutor (16 workers, like alignd's ServiceHost) and once as a
`grpc.aio` server, each serving generic unary methods on raw bytes (identity
serializers). Requests carry 4 KB, replies 4 KB. Methods:

  Echo      no work: the cost of the RPC machinery alone.
  Inline    the handler itself runs a torch matmul of a few ms (the GIL is
            released inside torch). On the aio server this blocks the event
            loop for the matmul, which is what a naive async handler does.
  ToThread  aio only: the handler awaits `asyncio.to_thread(matmul)`, the
            usual fix (a thread pool behind the loop).
  Worker    the handler hands the matmul to ONE worker thread that owns the
            "model" and waits for its result (sync: Future.result(); aio:
            await asyncio.wrap_future): the pattern of alignd's roles, where a
            dynamic batcher thread owns the model and RPC handlers only parse
            and wait.

The client is this process (sync stubs, one thread per concurrent client,
one shared channel); it measures per-call latency (p50/p95) and throughput
for 1 and 16 concurrent clients. The matmul is sized once here (about
`--work-ms`, default 3 ms, on one thread) and both servers get the same
shape. Server torch threads: 1 (`--torch-threads`), so that concurrent
Inline/ToThread handlers can use both cores without oversubscribing them.
Each (method, clients) pair measures sync and aio back to back, alternating
which goes first, 4 times (2 with `--quick`); numbers are medians.

Other load: the machine may be shared. Each measurement pair waits (within
`--quiet-wait-s` in all) until other processes used < 3% of the cores for a
second and records how much CPU they used while it ran; pairs with more than
5% are repeated, and medians use the clean ones when there are at least 2
(otherwise all, flagged CONTAMINATED).

Ports: each server binds port 0 and prints the port; the client waits for
the channel to be ready (no fixed sleeps). Both servers get SIGTERM at the
end (also on errors) and are waited for.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from _proc import HZ, process_ticks, system_ticks

REPO = Path(__file__).resolve().parent.parent
SERVICE = "bench.Work"
PAYLOAD = 4096
QUIET_FRACTION = 0.03  # a measurement starts once other processes used < 3% of the cores for 1 s ...
CLEAN_FRACTION = 0.05  # ... and counts as clean if they used <= 5% while it ran
SYNC_WORKERS = 16
METHODS = {"sync": ["Echo", "Inline", "Worker"], "aio": ["Echo", "Inline", "ToThread", "Worker"]}


# --------------------------------------------------------------------------- server side
def calibrate(work_ms: float) -> int:
    """Columns n such that (128x512) @ (512xn) takes about `work_ms` on one thread (run once, in the client)."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(128, 512)
    n = 64
    while True:
        b = torch.randn(512, n)
        for _ in range(10):
            a @ b
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t0)
        med = statistics.median(ts) * 1e3
        if med >= work_ms or n >= 1 << 15:
            return n
        n = int(n * max(1.1, min(4.0, work_ms / max(med, 1e-3))))


def make_work(torch_threads: int, cols: int):
    """The handler's CPU work: one float32 matmul; returns (fn, its median ms here)."""
    import torch

    torch.set_num_threads(torch_threads)
    a, b = torch.randn(128, 512), torch.randn(512, cols)
    for _ in range(20):
        a @ b
    ts = []
    for _ in range(50):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)

    def work() -> None:
        a @ b

    return work, statistics.median(ts) * 1e3


def reply(request: bytes) -> bytes:
    return request[:PAYLOAD]  # 4 KB back


def serve_sync(work) -> grpc.Server:
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def echo(req, ctx):
        return reply(req)

    def inline(req, ctx):
        work()
        return reply(req)

    def by_worker(req, ctx):
        worker.submit(work).result()
        return reply(req)

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Inline": grpc.unary_unary_rpc_method_handler(inline),
        "Worker": grpc.unary_unary_rpc_method_handler(by_worker),
    }
    server = grpc.server(ThreadPoolExecutor(max_workers=SYNC_WORKERS), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    return server


async def serve_aio(work) -> None:
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def echo(req, ctx):
        return reply(req)

    async def inline(req, ctx):
        work()  # blocks the event loop for the matmul
        return reply(req)

    async def to_thread(req, ctx):
        await asyncio.to_thread(work)
        return reply(req)

    async def by_worker(req, ctx):
        await asyncio.wrap_future(worker.submit(work))
        return reply(req)

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Inline": grpc.unary_unary_rpc_method_handler(inline),
        "ToThread": grpc.unary_unary_rpc_method_handler(to_thread),
        "Worker": grpc.unary_unary_rpc_method_handler(by_worker),
    }
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(5)


def server_main(mode: str, torch_threads: int, cols: int) -> int:
    work, med = make_work(torch_threads, cols)
    print(f"WORK {med:.3f}", flush=True)
    if mode == "sync":
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        server = serve_sync(work)
        stop.wait()
        server.stop(5).wait()
    else:
        asyncio.run(serve_aio(work))
    return 0


# --------------------------------------------------------------------------- client side


def cpu_snapshot(pids: list[int]) -> tuple[float, int, int]:
    """(time, user+nice+system ticks of the machine, ticks of this process and `pids`)."""
    return time.monotonic(), system_ticks()[0], process_ticks(os.getpid()) + sum(process_ticks(p) for p in pids)


def foreign_cpu_fraction(a, b) -> float:
    """Share of all cores that other processes used between two snapshots."""
    return max(0, (b[1] - a[1]) - (b[2] - a[2])) / HZ / (max(b[0] - a[0], 1e-9) * (os.cpu_count() or 1))


class Server:
    def __init__(self, mode: str, torch_threads: int, cols: int) -> None:
        self.mode = mode
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                mode,
                "--torch-threads",
                str(torch_threads),
                "--work-cols",
                str(cols),
            ],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.work_ms = None
        self.port = None
        for line in self.proc.stdout:  # blocks until the child prints (or exits)
            if line.startswith("WORK "):
                self.work_ms = float(line.split()[1])
            elif line.startswith("PORT "):
                self.port = int(line.split()[1])
                break
        if self.port is None:
            raise RuntimeError(f"{mode} server exited with {self.proc.wait()} before binding a port")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        grpc.channel_ready_future(self.channel).result(timeout=60)

    def callable(self, method: str):
        return self.channel.unary_unary(f"/{SERVICE}/{method}")  # bytes in, bytes out

    def stop(self) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def run_load(call, clients: int, calls_per_client: int) -> dict:
    payload = os.urandom(PAYLOAD)
    lat: list[list[float]] = [[] for _ in range(clients)]
    ready = threading.Barrier(clients + 1)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            ready.wait()
            for _ in range(calls_per_client):
                t0 = time.perf_counter()
                out = call(payload, timeout=60)
                lat[i].append(time.perf_counter() - t0)
                if len(out) != PAYLOAD:
                    raise AssertionError("short reply")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    flat = sorted(x for xs in lat for x in xs)
    return {
        "calls": len(flat),
        "wall_s": wall,
        "throughput_calls_per_s": len(flat) / wall,
        "latency_p50_ms": flat[len(flat) // 2] * 1e3,
        "latency_p95_ms": flat[min(len(flat) - 1, int(len(flat) * 0.95))] * 1e3,
    }


def client_main(args) -> int:
    rounds = 2 if args.quick else 4
    budget_s = 0.6 if args.quick else 1.2  # target wall time per measurement
    info = {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "server_torch_threads": args.torch_threads,
        "sync_server_workers": SYNC_WORKERS,
        "payload_bytes": PAYLOAD,
        "loadavg_at_start": os.getloadavg(),
        "rounds": rounds,
        "quick": args.quick,
    }
    import torch

    info["torch"] = torch.__version__
    servers: dict[str, Server] = {}
    results: dict = {}
    try:
        cols = calibrate(args.work_ms)
        for mode in ("sync", "aio"):
            servers[mode] = Server(mode, args.torch_threads, cols)
        info["work_ms_measured_in_server"] = {m: s.work_ms for m, s in servers.items()}
        info["work_matmul"] = f"(128x512) @ (512x{cols}) float32"
        cases = [
            (m, meth, c)
            for meth in ("Echo", "Inline", "ToThread", "Worker")
            for c in (1, 16)
            for m in ("sync", "aio")
            if meth in METHODS[m]
        ]
        # Warm-up and sizing: calls per client so that one measurement takes about budget_s.
        sizing: dict[tuple, int] = {}
        for m, meth, c in cases:
            r = run_load(servers[m].callable(meth), c, 5)
            per_call = r["wall_s"] / r["calls"]
            sizing[(m, meth, c)] = max(5, min(2000, int(budget_s / per_call / c)))
        # Each (method, clients) pair of measurements (sync and aio back to back, order alternating) waits
        # until other processes are idle, and records how much CPU they used meanwhile; a pair with
        # more than CLEAN_FRACTION is run again (up to `rounds` extra times in all).
        pids = [s.proc.pid for s in servers.values()]
        waited = [0.0]

        def wait_quiet() -> None:
            while waited[0] < args.quiet_wait_s:
                a = cpu_snapshot(pids)
                time.sleep(1.0)  # a measurement window, not synchronisation
                if foreign_cpu_fraction(a, cpu_snapshot(pids)) < QUIET_FRACTION:
                    return
                waited[0] += 1.0

        pairs = [(meth, c) for meth in ("Echo", "Inline", "ToThread", "Worker") for c in (1, 16)]
        raw: dict[tuple, list[dict]] = {k: [] for k in cases}
        pair_foreign: dict[tuple, list[float]] = {p: [] for p in pairs}
        cpu0 = cpu_snapshot(pids)
        for meth, c in pairs:
            extra = rounds
            rnd = 0
            while sum(f <= CLEAN_FRACTION for f in pair_foreign[(meth, c)]) < rounds and (rnd < rounds or extra > 0):
                if rnd >= rounds:
                    extra -= 1
                wait_quiet()
                a = cpu_snapshot(pids)
                for m in ["sync", "aio"] if rnd % 2 == 0 else ["aio", "sync"]:
                    if meth in METHODS[m]:
                        raw[(m, meth, c)].append(run_load(servers[m].callable(meth), c, sizing[(m, meth, c)]))
                pair_foreign[(meth, c)].append(round(foreign_cpu_fraction(a, cpu_snapshot(pids)), 4))
                rnd += 1
        info["foreign_cpu_fraction"] = round(foreign_cpu_fraction(cpu0, cpu_snapshot(pids)), 4)
        info["waited_for_quiet_s"] = waited[0]
        for (m, meth, c), rs in raw.items():
            fr = pair_foreign[(meth, c)]
            clean = [i for i, f in enumerate(fr) if f <= CLEAN_FRACTION]
            used = clean if len(clean) >= 2 else list(range(len(fr)))
            sel = [rs[i] for i in used]
            key = f"{meth}.clients{c}.{m}"
            results[key] = {
                "throughput_calls_per_s": statistics.median(r["throughput_calls_per_s"] for r in sel),
                "latency_p50_ms": statistics.median(r["latency_p50_ms"] for r in sel),
                "latency_p95_ms": statistics.median(r["latency_p95_ms"] for r in sel),
                "calls_per_round": rs[0]["calls"],
                "round_foreign_cpu_fraction": fr,
                "rounds_used": used,
                "contaminated_by_other_load": len(clean) < 2,
                "rounds": rs,
            }
    finally:
        codes = {m: s.stop() for m, s in servers.items()}
    info["loadavg_at_end"] = os.getloadavg()
    out = {"machine": info, "results": results, "server_exit_codes": codes}

    print(
        f"server mode benchmark: {info['cpu_count']} CPUs, 4 KB request/reply, server torch threads "
        f"{args.torch_threads}, work {info['work_matmul']} ~{info['work_ms_measured_in_server']['sync']:.2f} ms"
    )
    print(f"   other processes' CPU during the measurement: {info['foreign_cpu_fraction'] * 100:.1f}% of all cores")
    print("   method    clients  server  calls/s   p50 ms   p95 ms   aio/sync throughput   other load per round")
    for meth in ("Echo", "Inline", "ToThread", "Worker"):
        for c in (1, 16):
            for m in ("sync", "aio"):
                k = f"{meth}.clients{c}.{m}"
                if k not in results:
                    continue
                r = results[k]
                rel = ""
                if m == "aio":
                    base = results.get(f"{meth}.clients{c}.sync")
                    if base:
                        rel = f"{r['throughput_calls_per_s'] / base['throughput_calls_per_s']:.2f}x"
                load = " ".join(f"{f * 100:.0f}%" for f in r["round_foreign_cpu_fraction"])
                flag = " CONTAMINATED" if r["contaminated_by_other_load"] else ""
                print(
                    f"   {meth:<9} {c:>7}  {m:<6} {r['throughput_calls_per_s']:8.1f} {r['latency_p50_ms']:8.2f}"
                    f" {r['latency_p95_ms']:8.2f}   {rel:<19} {load if m == 'aio' else ''}{flag}"
                )
    summary = {}
    for k, r in results.items():
        meth, c, m = k.split(".")
        if m == "aio" and f"{meth}.{c}.sync" in results:
            summary[f"{meth}.{c}.aio_over_sync_throughput"] = round(
                r["throughput_calls_per_s"] / results[f"{meth}.{c}.sync"]["throughput_calls_per_s"], 3
            )
    out["summary"] = summary
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}; server exit codes {codes}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "server_mode.json"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads in the servers (default 1)")
    ap.add_argument(
        "--quiet-wait-s",
        type=float,
        default=120.0,
        help="total seconds the run may wait for other processes to go idle (default 120)",
    )
    ap.add_argument("--work-ms", type=float, default=3.0, help="target single-thread matmul time per call (default 3)")
    ap.add_argument("--serve", choices=["sync", "aio"], help=argparse.SUPPRESS)  # internal: run as a server
    ap.add_argument("--work-cols", type=int, default=1024, help=argparse.SUPPRESS)  # internal: the server's matmul
    args = ap.parse_args()
    if args.serve:
        return server_main(args.serve, args.torch_threads, args.work_cols)

    def on_sigterm(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through client_main's finally

    signal.signal(signal.SIGTERM, on_sigterm)
    return client_main(args)


if __name__ == "__main__":
    sys.exit(main())
