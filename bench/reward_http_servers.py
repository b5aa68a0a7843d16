"""The reward role's HTTP API under attack: the hand-written stdlib server it had vs the uvicorn + starlette server.

Run (from the repository root):

    .venv/bin/python bench/reward_http_servers.py [--out bench/results/reward_http_servers.json]
        [--duration 8] [--quick]

Servers (each a subprocess, a fresh one per scenario, so that RSS and stderr are per scenario):
  current  the threaded stdlib server alignd had until this measurement (bench/baselines/stdlib_reward_http.py,
           frozen; max_connections 256, idle_timeout_seconds 30, max_body_bytes = server.max_message_bytes 64 MiB);
  uvicorn  what the reward role serves now: services/reward/http.py RewardHTTPApp on alignd.runtime.http
           (uvicorn h11 + starlette; header timeout 10 s, 256 connections with eviction of header-phase ones,
           64 per client IP, body limit 4 MiB, JSON depth 64).
The first measurement (bench/results/reward_http_servers.json) was taken with the prototype this server was
built from.
Both serve the same fake scorer (a RewardAPI whose text_pair skips the tokenizer and whose score sleeps 2 ms
per request), real bearer-token auth (alignd.runtime.auth over a temporary tokens file) and alignd's JSON
logging on stderr.

Scenarios (interleaved per server so that both run side by side in time; each `--duration` s measured):
  undisturbed     4 keep-alive clients, each a closed loop of POST /get_reward (8 queries, with prompts)
  slowloris       + 512 connections from 127.0.0.2 sending a request line, then one header byte a second
                    (reconnecting 1 s after the server closes one)
  slowloris_spread + the same 512 spread over 64 source addresses 127.0.0.2-65 (8 each: under a per-IP cap)
  big_body        + one client posting a 64 MiB JSON body (22M empty objects) with Content-Length,
                    again and again, with a valid token
  big_chunked     + the same body chunked (Transfer-Encoding: chunked)
  deep_json       + one client posting {"query": [[[...]]]} nested 10^6 deep (2 MB), keep-alive, in a loop
Legitimate clients connect from 127.0.0.1; a /health probe opens a new connection every 0.25 s (as a kubelet
does). At the end of a scenario the attackers hang up (mid-headers for slowloris).

Per server and scenario: legitimate requests ok/s, p50/p99 latency of the ok ones, errors by kind; /health
answered 200 / probes and p50/p99; the server's peak RSS growth over its post-warm-up baseline (VmRSS sampled
every 0.1 s, and VmHWM), peak thread count, CPU; stderr lines that are not JSON and tracebacks; the prototype's
connection-policy counters; what the attacker saw. Everything shares 2 cores with the clients: compare the two
servers within a scenario (ratios), not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import _proc

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("undisturbed", "slowloris", "slowloris_spread", "big_body", "big_chunked", "deep_json")
SERVERS = ("current", "uvicorn")
BASELINES = ("current_nodelay",)  # undisturbed only: the current server with TCP_NODELAY (one class attribute)
SCORE_MS = 2.0
BIG_BODY_BYTES = 64 << 20
DEEP = 10**6


# ---- server side (a subprocess: --serve KIND) ---------------------------------------------------------------------


def serve(kind: str, tokens_file: str) -> None:
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from alignd.config import RewardLimitsConfig
    from alignd.runtime.auth import Authenticator, TokenFile
    from alignd.runtime.errors import InvalidArgument
    from alignd.runtime.logging import configure_logging
    from alignd.services.reward.api import RewardAPI, RewardAPIMetrics

    configure_logging("info", role="reward")

    class FakeRewardAPI(RewardAPI):
        """The real RewardAPI checks and metrics; no tokenizer, and a scorer that sleeps SCORE_MS per request."""

        def __init__(self) -> None:
            state = SimpleNamespace(handle=SimpleNamespace(tokenizer=SimpleNamespace(pad_token="<pad>")))
            super().__init__(
                SimpleNamespace(get=lambda: state),
                RewardLimitsConfig(),
                RewardAPIMetrics(CollectorRegistry()),
                batch_metrics=None,
            )

        def text_pair(self, handle, prompt, response, field, prompt_field, response_field):
            if not response:
                raise InvalidArgument(response_field, "empty response")
            return [0] * (len(prompt) // 4), [0] * max(1, len(response) // 4)

        def score(self, state, pairs, timeout):
            time.sleep(SCORE_MS / 1000)
            return [0.0] * len(pairs), 1

    api = FakeRewardAPI()
    auth = Authenticator(TokenFile(tokens_file))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if kind in ("current", "current_nodelay"):
        sys.path.insert(0, str(Path(__file__).resolve().parent / "baselines"))
        from stdlib_reward_http import RewardHTTPHandler, RewardHTTPServer

        server = RewardHTTPServer(
            ("127.0.0.1", 0),
            api,
            authenticator=auth,
            tls=None,
            serving=lambda: True,
            max_body_bytes=64 * 1024 * 1024,
            max_connections=256,
            timeout_seconds=120.0,
            idle_timeout_seconds=30.0,
        )
        if kind == "current_nodelay":
            # socketserver.StreamRequestHandler.disable_nagle_algorithm is False: http.server writes the head and
            # the body in two send()s, so Nagle holds the body for the client's delayed ACK (~40 ms per answer).
            server.RequestHandlerClass = type("NoDelayHandler", (RewardHTTPHandler,), {"disable_nagle_algorithm": True})
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True).start()
        port = server.server_address[1]
        print(f"READY {port}", flush=True)
        while not stop.wait(0.2):
            pass
        server.shutdown()
        server.server_close()
        print("STATS {}", flush=True)
    else:
        from alignd.config import RewardHTTPConfig
        from alignd.runtime.http import ConnectionPolicy, HTTPServer
        from alignd.services.reward.http import RewardHTTPApp

        cfg = RewardHTTPConfig(max_connections=256)
        policy = ConnectionPolicy(
            header_timeout=cfg.header_timeout_seconds,
            max_connections=cfg.max_connections,
            max_per_ip=cfg.max_connections_per_client,
        )
        app = RewardHTTPApp(api, cfg, authenticator=auth, serving=lambda: True)
        srv = HTTPServer(app, "127.0.0.1", 0, policy=policy, keep_alive_seconds=cfg.idle_timeout_seconds).start()
        print(f"READY {srv.sock.getsockname()[1]}", flush=True)
        while not stop.wait(0.2):
            pass
        stats = dict(policy.stats, open_at_stop=policy.count)
        srv.stop()
        print("STATS " + json.dumps(stats), flush=True)
    sys.stdout.flush()
    os._exit(0)


# ---- attackers (a subprocess: --attack KIND) ----------------------------------------------------------------------


def big_json_body() -> bytes:
    """64 MiB of {"query": [{}, {}, ...]}: 22M empty objects, ~64 bytes of Python heap per 3 bytes of JSON."""
    n = (BIG_BODY_BYTES - 16) // 3
    return b'{"query": [' + b"{}," * (n - 1) + b"{}]}"


def attack(kind: str, port: int, token: str, n_slow: int) -> None:
    stats: Counter = Counter()
    stop = threading.Event()

    def report(*_):
        stop.set()

    if kind in ("slowloris", "slowloris_spread"):
        ips = ["127.0.0.2"] if kind == "slowloris" else [f"127.0.0.{i}" for i in range(2, 66)]
        asyncio.run(_slowloris(port, n_slow, ips, stats))
    else:
        signal.signal(signal.SIGTERM, report)
        if kind == "deep_json":
            body = b'{"query": ' + b"[" * DEEP + b"]" * DEEP + b"}"
        else:
            body = big_json_body()

        def loop() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = _post_raw(port, token, body, chunked=kind == "big_chunked", stop=stop)
                except OSError as exc:
                    status = type(exc).__name__
                if stop.is_set():
                    break
                stats[f"answer_{status}"] += 1
                stats["attempt_seconds_total"] += time.perf_counter() - t0

        threading.Thread(target=loop, daemon=True).start()
        while not stop.wait(0.2):
            pass
    print("ATTACK " + json.dumps(stats), flush=True)
    os._exit(0)


def _post_raw(port: int, token: str, body: bytes, *, chunked: bool, stop: threading.Event):
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        head = (
            f"POST /get_reward HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\n"
        )
        head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {len(body)}\r\n\r\n"
        s.sendall(head.encode())
        step = 1 << 20
        try:
            for i in range(0, len(body), step):
                piece = body[i : i + step]
                s.sendall(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                if stop.is_set():
                    return "stopped"
            if chunked:
                s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered early and closed: read its answer
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return "closed_without_answer" if not data else "partial"
            data += chunk
        return data.split(b" ", 2)[1].decode()
    finally:
        s.close()


async def _slowloris(port: int, n: int, ips: list[str], stats: Counter) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    writers: set = set()

    async def one(i: int) -> None:
        ip = ips[i % len(ips)]
        while not done.is_set():
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0)), 10
                )
            except (TimeoutError, OSError):
                stats["connect_failed"] += 1
                await asyncio.sleep(1)
                continue
            stats["connected"] += 1
            writers.add(writer)
            closed = asyncio.Event()
            answer = bytearray()

            async def read() -> None:
                try:
                    while True:
                        data = await reader.read(4096)
                        if not data:
                            break
                        answer.extend(data)
                except OSError:
                    pass
                closed.set()

            rt = asyncio.create_task(read())
            try:
                writer.write(b"POST /get_reward HTTP/1.1\r\nHost: x\r\n")
                trickle = b"X-Slow: " + b"a" * 10000
                j = 0
                while not done.is_set() and not closed.is_set():
                    writer.write(trickle[j % len(trickle) : j % len(trickle) + 1])
                    j += 1
                    try:
                        await asyncio.wait_for(closed.wait(), 1.0)
                    except TimeoutError:
                        pass
            except OSError:
                pass
            if closed.is_set():
                status = answer.split(b" ", 2)[1].decode(errors="replace") if answer.startswith(b"HTTP/") else "none"
                stats[f"closed_by_server_{status}"] += 1
            writers.discard(writer)
            rt.cancel()
            writer.close()
            if not done.is_set():
                await asyncio.sleep(1)

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    await done.wait()
    stats["open_at_end"] = len(writers)
    for i, w in enumerate(list(writers)):  # hang up mid-headers: half with FIN, half with RST
        w.close() if i % 2 else w.transport.abort()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---- the measuring side -------------------------------------------------------------------------------------------


def legit_body() -> bytes:
    prompts = [f"<pad><pad>Question {i}: what is {i} plus {i}? " + "context " * 20 for i in range(8)]
    return json.dumps(
        {"query": [p + f"The answer is {2 * i}." for i, p in enumerate(prompts)], "prompts": prompts, "labels": None}
    ).encode()


class Conn(http.client.HTTPConnection):
    """TCP_NODELAY, as urllib3 (requests, OpenRLHF's client) sets it: http.client sends a body over 2920 bytes
    in a second send(), which Nagle would hold for the server's delayed ACK (40 ms)."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def proc_status(pid: int) -> dict:
    """Memory and thread count (kB, /proc/PID/status) and CPU seconds so far of a server process."""
    return {**_proc.proc_status(pid), "cpu_s": _proc.process_ticks(pid) / _proc.HZ}


class Server:
    def __init__(self, kind: str, tokens_file: str, workdir: Path, tag: str) -> None:
        self.stderr_path = workdir / f"{tag}.stderr"
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--tokens-file", tokens_file],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"{kind} server did not start: {line!r}; see {self.stderr_path}")
        self.port = int(line.split()[1])

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        stats = {}
        try:
            out, _ = self.proc.communicate(timeout=20)
            for line in out.decode().splitlines():
                if line.startswith("STATS "):
                    stats = json.loads(line[6:])
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            stats = {"note": "killed after 20 s (did not stop on SIGTERM)"}
        self.stderr.close()
        return stats

    def stderr_report(self) -> dict:
        lines = self.stderr_path.read_bytes().decode(errors="replace").splitlines()
        non_json, events = [], Counter()
        for line in lines:
            try:
                events[json.loads(line).get("event", "?")] += 1
            except ValueError:
                non_json.append(line)
        return {
            "lines": len(lines),
            "non_json_lines": len(non_json),
            "tracebacks": sum("Traceback (most recent call last)" in ln for ln in lines),
            "first_non_json": non_json[:3],
            "json_events": dict(events.most_common(8)),
        }


def run_clients(port: int, token: str, seconds: float, n_clients: int, pid: int) -> dict:
    body = legit_body()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    t_start = time.perf_counter()
    t_end = t_start + seconds
    lat: list[float] = []
    errors: Counter = Counter()
    hlat: list[float] = []
    hstat: Counter = Counter()
    samples: list[dict] = []
    lock = threading.Lock()

    def worker() -> None:
        conn = None
        while time.perf_counter() < t_end:
            if conn is None:
                conn = Conn("127.0.0.1", port, timeout=10)
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/get_reward", body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                t1 = time.perf_counter()
                good = r.status == 200 and len(json.loads(data)["rewards"]) == 8
                with lock:
                    if t1 <= t_end:
                        (lat.append(t1 - t0) if good else errors.update([f"http_{r.status}"]))
                if r.will_close:
                    conn.close()
                    conn = None
                if not good:
                    time.sleep(0.05)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                with lock:
                    if time.perf_counter() <= t_end + 10:
                        errors[type(exc).__name__] += 1
                conn.close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    def prober() -> None:
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            conn = Conn("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/health")
                r = conn.getresponse()
                r.read()
                hstat[str(r.status)] += 1
                if r.status == 200:
                    hlat.append(time.perf_counter() - t0)
            except (OSError, http.client.HTTPException) as exc:
                hstat[type(exc).__name__] += 1
            finally:
                conn.close()
            time.sleep(max(0.0, 0.25 - (time.perf_counter() - t0)))

    def sampler() -> None:
        while time.perf_counter() < t_end + 0.5:
            samples.append(proc_status(pid))
            time.sleep(0.1)

    threads = [threading.Thread(target=worker) for _ in range(n_clients)]
    threads += [threading.Thread(target=prober), threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    probes = sum(hstat.values())
    return {
        "ok": len(lat),
        "ok_per_s": round(len(lat) / seconds, 1),
        "p50_ms": _ms(pct(lat, 0.5)),
        "p99_ms": _ms(pct(lat, 0.99)),
        "max_ms": _ms(max(lat) if lat else None),
        "errors": dict(errors),
        "health_ok": hstat.get("200", 0),
        "health_probes": probes,
        "health_results": dict(hstat),
        "health_p50_ms": _ms(pct(hlat, 0.5)),
        "health_p99_ms": _ms(pct(hlat, 0.99)),
        "rss_peak_kb": max((s.get("VmRSS", 0) for s in samples), default=0),
        "threads_peak": max((s.get("Threads", 0) for s in samples), default=0),
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


def run_scenario(kind: str, scenario: str, args, tokens_file: str, token: str, workdir: Path) -> dict:
    srv = Server(kind, tokens_file, workdir, f"{kind}-{scenario}")
    attacker = None
    try:
        run_clients(srv.port, token, 0.7, args.clients, srv.proc.pid)  # warm-up (not reported)
        base = proc_status(srv.proc.pid)
        if scenario != "undisturbed":
            attacker = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--attack",
                    scenario,
                    "--port",
                    str(srv.port),
                    "--token",
                    token,
                    "--slowloris",
                    str(args.slowloris),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                cwd=ROOT,
            )
            time.sleep(3.0 if scenario.startswith("slowloris") else 1.0)  # connections up / first body under way
        res = run_clients(srv.port, token, args.duration, args.clients, srv.proc.pid)
        end = proc_status(srv.proc.pid)
        attack_stats = {}
        if attacker is not None:
            attacker.send_signal(signal.SIGTERM)  # the attackers hang up (mid-headers for slowloris)
            try:
                out, _ = attacker.communicate(timeout=20)
                for line in out.decode().splitlines():
                    if line.startswith("ATTACK "):
                        attack_stats = json.loads(line[7:])
            except subprocess.TimeoutExpired:
                attacker.kill()
            attacker = None
            time.sleep(1.0)
        after = run_clients(srv.port, token, 0.6, 1, srv.proc.pid)  # recovered?
        res.update(
            {
                "rss_base_mb": round(base.get("VmRSS", 0) / 1024, 1),
                "rss_peak_growth_mb": round(
                    (max(res["rss_peak_kb"], end.get("VmHWM", 0)) - base.get("VmRSS", 0)) / 1024, 1
                ),
                "cpu_s": round(end.get("cpu_s", 0) - base.get("cpu_s", 0), 2),
                "attacker": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in attack_stats.items()},
                "after_attack": {
                    "ok": after["ok"],
                    "errors": after["errors"],
                    "health_ok": after["health_ok"],
                    "health_probes": after["health_probes"],
                },
            }
        )
        res.pop("rss_peak_kb")
    finally:
        if attacker is not None:
            attacker.kill()
        res_stop = srv.stop()
    res["server_stats"] = res_stop
    res["stderr"] = srv.stderr_report()
    return res


def table(results: dict) -> str:
    cols = (
        "server",
        "scenario",
        "ok/s",
        "p50ms",
        "p99ms",
        "errors",
        "health ok",
        "h p50",
        "h p99",
        "RSS+MB",
        "thr",
        "cpu s",
        "stderr non-JSON/tb",
    )
    rows = [cols]
    for scenario, per in results.items():
        for kind, r in per.items():
            errs = ",".join(f"{k}:{v}" for k, v in r["errors"].items()) or "-"
            rows.append(
                (
                    kind,
                    scenario,
                    r["ok_per_s"],
                    r["p50_ms"],
                    r["p99_ms"],
                    errs[:34],
                    f"{r['health_ok']}/{r['health_probes']}",
                    r["health_p50_ms"],
                    r["health_p99_ms"],
                    r["rss_peak_growth_mb"],
                    r["threads_peak"],
                    r["cpu_s"],
                    f"{r['stderr']['non_json_lines']}/{r['stderr']['tracebacks']}",
                )
            )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench/results/reward_http_servers.json"))
    p.add_argument("--duration", type=float, default=8.0, help="measured seconds per server and scenario")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--slowloris", type=int, default=512)
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--quick", action="store_true", help="4 s per scenario")
    # internal modes
    p.add_argument(
        "--no-nodelay-baseline",
        action="store_true",
        help="skip current_nodelay (the current server with TCP_NODELAY) in the undisturbed scenario",
    )
    p.add_argument("--serve", choices=SERVERS + BASELINES)
    p.add_argument("--tokens-file")
    p.add_argument("--attack", choices=SCENARIOS[1:])
    p.add_argument("--port", type=int)
    p.add_argument("--token")
    args = p.parse_args()
    if args.serve:
        return serve(args.serve, args.tokens_file)
    if args.attack:
        return attack(args.attack, args.port, args.token, args.slowloris)
    if args.quick:
        args.duration = 4.0

    import starlette
    import uvicorn

    token = secrets.token_hex(16)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="alignd-http-bench-") as tmp:
        workdir = Path(tmp)
        tokens_file = workdir / "tokens.yaml"
        tokens_file.write_text(f"bench:\n  token: {token}\n  scopes: [score]\n")
        results: dict = {}
        for scenario in args.scenarios.split(","):
            results[scenario] = {}
            kinds = args.servers.split(",")
            if scenario == "undisturbed" and "current" in kinds and not args.no_nodelay_baseline:
                kinds.insert(kinds.index("current") + 1, "current_nodelay")
            for kind in kinds:
                print(f"[{time.time() - started:5.0f}s] {kind:8s} {scenario} ...", flush=True)
                results[scenario][kind] = run_scenario(kind, scenario, args, str(tokens_file), token, workdir)
    out = {
        "benchmark": "reward_http_servers",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(), "python": sys.version.split()[0]},
        "versions": {"uvicorn": uvicorn.__version__, "starlette": starlette.__version__},
        "settings": {
            "duration_s": args.duration,
            "clients": args.clients,
            "slowloris": args.slowloris,
            "score_ms": SCORE_MS,
            "big_body_bytes": BIG_BODY_BYTES,
            "deep_json": DEEP,
            "current": {"max_connections": 256, "idle_timeout_s": 30, "max_body_bytes": 64 << 20},
            "uvicorn": {
                "header_timeout_s": 10,
                "max_connections": 256,
                "max_per_ip": 64,
                "max_body_bytes": 4 << 20,
                "max_json_depth": 64,
            },
        },
        "wall_s": round(time.time() - started, 1),
        "results": results,
    }
    print(table(results))
    from alignd.atomic import write_json_atomic  # a temporary file, then os.replace

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), out)
    print(f"wrote {args.out} ({out['wall_s']} s)")


if __name__ == "__main__":
    main()
