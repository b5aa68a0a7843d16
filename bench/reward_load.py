"""Load generator for the reward role: many concurrent Score clients over real gRPC.

Run (from the repository root):

    .venv/bin/python bench/reward_load.py [--out bench/results/reward_load.json] [--quick]

It builds the built-in tiny reward model (`alignd.models.tiny.build_tiny_model`,
kind "reward", its default size) in a temporary directory and starts the real
reward role on it (`python -m alignd.cli serve reward`, port 0, loopback),
three times, one after the other (never two at once):

1. "dynamic": dynamic batching with the role's defaults
   (`batching.max_batch_size`, `max_wait_ms`);
2. "batch1": the batch-size-1 configuration (`batching.max_batch_size: 1`,
   `max_wait_ms: 0`), everything else the same;
3. "overload" (deliberate): the dynamic configuration with a small
   `batching.max_queue` (default 32), so the offered load exceeds what the
   queue accepts and the role must answer RESOURCE_EXHAUSTED, and nothing else.

All three use the same `torch_threads` (default 1: the load generator needs
the other core of a 2-core machine) and the same `server.max_workers`
(default 256 handler threads, so that all 200 clients can be inside a
handler, i.e. in the batcher's queue, at once). Runs 1 and 2 use
`batching.max_queue` 256 (>= the concurrency, so no call is refused).

Load: `--concurrency` (200) closed-loop clients: each sends a Score request,
waits for the answer and sends the next. They are coroutines of
`--client-procs` (1) separate client processes using grpc.aio on
`--channels` (1) channel(s) per process (separate TCP connections), not
threads, so the client side costs little CPU; its CPU use is measured
(getrusage) and reported, since client and server share the machine. Every
request is `--items-per-request` (1) items of token ids (prompt 44-52 tokens,
response 14-18, random ids below the vocabulary, fixed seed), pre-serialised;
the response is parsed and checked (one finite score per item). Every call
has a deadline (`--deadline-s`, 10 s). First a warm-up (`--warmup-s`, 5 s,
not measured), then the measured window (`--duration`, 60 s). Only calls that
complete inside the window count towards throughput and latency; calls still
in flight at its end are drained (their status still counts for errors). The
clients stop at the end of the window or after `--max-requests` calls per
configuration (warm-up included), whichever comes first.

Reported per configuration: calls ok, errors by status code, throughput
(requests/s, items/s), latency p50/p90/p99/max of the ok calls, the role's
resident memory (VmRSS from /proc/<pid>/status) before the load, at the start
and at the end of the window, the peak sampled every 0.5 s during the load,
the kernel's own peak (VmHWM) and after the drain; the mean executed batch
size, batches/s and batcher busy fraction from the role's /metrics (deltas of
alignd_reward_batch_size_sequences and alignd_reward_batch_seconds over the
window); the server's own count of Score calls by code; CPU used by the role,
by the clients and by other processes during the window.

Reference: before the roles start, the role's own engine (RewardEngine on a
model from the role's loaders) is timed in this process on one worker thread
with the same torch thread count, at batch 1 and at the default
max_batch_size, on the same request shapes: the batching gain of the model
alone, without gRPC and without other threads. Each configuration's batch
time in the role is reported against it (`--no-engine-ref` skips it).

Checks (exit status 1 if one fails, each named in the output):
- no error other than RESOURCE_EXHAUSTED in any phase;
- throughput(dynamic) / throughput(batch1) >= --min-ratio (4);
- the overload phase produced RESOURCE_EXHAUSTED (else it did not overload);
- memory bounded: the role's peak RSS below --rss-limit-mb and its growth over
  the measured window below --rss-growth-limit-mb.

Bounds: the clients stop at --duration / --max-requests; the whole run stops
at --time-limit-s (SIGALRM); roles get SIGTERM in `finally` (SIGKILL after a
grace), client processes are killed if they outlive their deadline.

Other load: the machine may be shared. Before each phase the run waits
(within --quiet-wait-s in all) until other processes use < 3% of the cores,
and records how much CPU they used during the window; a window with more than
5% is flagged CONTAMINATED.

`--quick`: duration 10 s, warm-up 2 s, overload 5 s, shorter engine reference.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import datetime as dt
import json
import math
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _launch import await_serving, log_tail, spawn_serve
from _proc import HZ, cpu_model, mem_total_mb, proc_status, process_ticks, system_ticks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Only grpc and the generated messages at module level: the client processes run this file too and
# must stay light (no torch).
import grpc  # noqa: E402
import grpc.aio  # noqa: E402

from alignd.v1 import reward_pb2  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCORE_METHOD = "/alignd.v1.RewardService/Score"
PROMPT_TOKENS = (14, 18)  # default inclusive ranges: 16 +- 2 (--prompt-tokens)
RESPONSE_TOKENS = (6, 10)  # 8 +- 2 (--response-tokens)
ITEMS_PER_REQUEST = 8  # a small score_many batch / an OpenRLHF micro-batch (--items-per-request)
REQUEST_POOL = 512  # distinct pre-serialised requests per client process
STARTUP_TIMEOUT_S = 300.0
STOP_GRACE_S = 30.0
RSS_SAMPLE_S = 0.5
QUEUE_SAMPLE_S = 2.0  # /metrics scrapes for the queue-depth gauge during the window
QUIET_FRACTION = 0.03
CLEAN_FRACTION = 0.05


def make_pair(rnd: random.Random, vocab: int, prompt_tokens=PROMPT_TOKENS, response_tokens=RESPONSE_TOKENS):
    """(prompt ids, response ids): random ids >= 3 (0-2 are pad/bos/eos), lengths drawn from the inclusive ranges."""
    p = [rnd.randrange(3, vocab) for _ in range(rnd.randint(*prompt_tokens))]
    r = [rnd.randrange(3, vocab) for _ in range(rnd.randint(*response_tokens))]
    return p, r


def token_range(text: str) -> tuple[int, int]:
    """ "48" -> (48, 48); "44-52" -> (44, 52)."""
    lo, _, hi = text.partition("-")
    out = (int(lo), int(hi or lo))
    if not 1 <= out[0] <= out[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or LO-HI with 1 <= LO <= HI")
    return out


# =========================================================================== client process
async def _client_main(spec: dict) -> dict:
    """Runs spec['coroutines'] closed-loop clients; returns raw results."""
    rnd = random.Random(spec["seed"])
    items = spec["items_per_request"]

    def item() -> reward_pb2.ScoreItem:
        p, r = make_pair(rnd, spec["vocab"], tuple(spec["prompt_tokens"]), tuple(spec["response_tokens"]))
        return reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=p, response_token_ids=r))

    pool = [
        reward_pb2.ScoreRequest(items=[item() for _ in range(items)]).SerializeToString() for _ in range(REQUEST_POOL)
    ]
    options = [
        ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel object
        ("grpc.enable_retries", 0),  # every status reaches the caller as is
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    channels = [grpc.aio.insecure_channel(spec["address"], options=options) for _ in range(spec["channels"])]
    from _auth import operator_metadata

    metadata = operator_metadata(Path(spec["tokens_file"]))
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), timeout=30)
    calls = [
        ch.unary_unary(SCORE_METHOD, request_serializer=None, response_deserializer=reward_pb2.ScoreResponse.FromString)
        for ch in channels
    ]
    # Ready: wait for the orchestrator's "GO t0 t1" (time.monotonic() is system-wide on Linux).
    print("READY", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    _go, t0_s, t1_s = line.split()
    t0, t1 = float(t0_s), float(t1_s)
    t_go = time.monotonic()

    budget = spec["max_requests"]
    deadline = spec["deadline_s"]
    backoff = spec["backoff_on_exhausted_s"]
    n = spec["coroutines"]
    st = {"sent": 0}
    lat_ok = array.array("d")  # seconds, ok calls completed inside [t0, t1]
    codes: dict[str, dict[str, int]] = {"warmup": {}, "window": {}, "drain": {}}
    last_end = [t0]
    ru: dict[str, resource.struct_rusage] = {}

    async def rusage_marks() -> None:
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        ru["t0"] = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(max(0.0, t1 - time.monotonic()))
        ru["t1"] = resource.getrusage(resource.RUSAGE_SELF)

    async def client(i: int) -> None:
        call = calls[i % len(calls)]
        k = i
        while True:
            start = time.monotonic()
            if start >= t1 or st["sent"] >= budget:
                return
            st["sent"] += 1
            req = pool[k % REQUEST_POOL]
            k += n
            try:
                resp = await call(req, timeout=deadline, metadata=metadata)
                code = (
                    "OK" if len(resp.scores) == items and all(math.isfinite(s) for s in resp.scores) else "BAD_RESPONSE"
                )
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            except Exception as err:  # noqa: BLE001 - counted, reported by type
                code = f"CLIENT_{type(err).__name__}"
            end = time.monotonic()
            phase = "warmup" if end < t0 else ("window" if end <= t1 else "drain")
            codes[phase][code] = codes[phase].get(code, 0) + 1
            if phase == "window":
                last_end[0] = end
                if code == "OK":
                    lat_ok.append(end - start)
            if code == "RESOURCE_EXHAUSTED" and backoff > 0:
                await asyncio.sleep(backoff)

    marks = asyncio.create_task(rusage_marks())
    await asyncio.gather(*(client(i) for i in range(n)))
    t_done = time.monotonic()
    if "t1" not in ru:  # stopped early (max requests)
        marks.cancel()
        ru.setdefault("t0", resource.getrusage(resource.RUSAGE_SELF))
        ru["t1"] = resource.getrusage(resource.RUSAGE_SELF)
    for ch in channels:
        await ch.close()
    window_end = t1 if st["sent"] < budget else min(t1, last_end[0])

    def cpu(r: resource.struct_rusage) -> float:
        return r.ru_utime + r.ru_stime

    total = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "proc": spec["proc"],
        "coroutines": n,
        "channels": len(channels),
        "sent": st["sent"],
        "budget_exhausted": st["sent"] >= budget,
        "t_go": t_go,
        "t0": t0,
        "t1": t1,
        "window_end": window_end,
        "t_done": t_done,
        "codes": codes,
        "latencies_ok_s": lat_ok.tolist(),
        "cpu_window_s": cpu(ru["t1"]) - cpu(ru["t0"]),
        "cpu_total_s": cpu(total),
        "max_rss_kb": total.ru_maxrss,
    }


def client_entry(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    res = asyncio.run(_client_main(spec))
    tmp = Path(spec["result_path"] + ".tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, spec["result_path"])
    return 0


# =========================================================================== orchestrator helpers
class RunTimeout(Exception):
    """The whole run exceeded --time-limit-s (or a signal stopped it)."""


def rss_mb(pid: int) -> float | None:
    kb = proc_status(pid).get("VmRSS")
    return None if kb is None else kb / 1024


class Cpu:
    """CPU used by the role, by the client processes, and by every other process, between two snapshots."""

    def __init__(self, role_pid: int, client_pids: list[int]) -> None:
        self.role_pid, self.client_pids = role_pid, client_pids

    def snap(self) -> tuple[float, int, int, int, int]:
        return (
            time.monotonic(),
            system_ticks()[0],
            process_ticks(self.role_pid),
            sum(process_ticks(p) for p in self.client_pids),
            process_ticks(os.getpid()),
        )

    @staticmethod
    def delta(a, b) -> dict:
        wall = max(b[0] - a[0], 1e-9)
        ncpu = os.cpu_count() or 1
        role, clients, me = (b[2] - a[2]) / HZ, (b[3] - a[3]) / HZ, (b[4] - a[4]) / HZ
        foreign = max(0.0, (b[1] - a[1]) / HZ - role - clients - me)
        return {
            "wall_s": round(wall, 3),
            "role_cores": round(role / wall, 3),
            "clients_cores_proc_stat": round(clients / wall, 3),
            "orchestrator_cores": round(me / wall, 3),
            "foreign_cores": round(foreign / wall, 3),
            "foreign_fraction_of_machine": round(foreign / (wall * ncpu), 4),
        }


class Quiet:
    """Waits (within a total budget) until other processes leave the machine idle."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s, self.waited_s = budget_s, 0.0

    def wait(self, our_pids: list[int]) -> float:
        while True:
            a = (system_ticks()[0], sum(process_ticks(p) for p in [os.getpid(), *our_pids]))
            time.sleep(1.0)  # a measurement window
            b = (system_ticks()[0], sum(process_ticks(p) for p in [os.getpid(), *our_pids]))
            frac = max(0, (b[0] - a[0]) - (b[1] - a[1])) / HZ / (os.cpu_count() or 1)
            if frac < QUIET_FRACTION or self.waited_s >= self.budget_s:
                return round(frac, 4)
            self.waited_s += 1.0


def scrape(url: str | None) -> dict[str, float]:
    """Every sample of a role's /metrics, keyed by name{label=value,...}; {} when unavailable."""
    from prometheus_client.parser import text_string_to_metric_families

    if not url:
        return {}
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def metrics_delta(m0: dict, m1: dict, window_s: float) -> dict:
    def d(key: str) -> float | None:
        if key not in m1:
            return None
        return m1[key] - m0.get(key, 0.0)

    out: dict = {}
    bs_sum, bs_n = d("alignd_reward_batch_size_sequences_sum{}"), d("alignd_reward_batch_size_sequences_count{}")
    if bs_n:
        out["batches"] = int(bs_n)
        out["batches_per_s"] = round(bs_n / window_s, 2)
        out["mean_batch_size_sequences"] = round(bs_sum / bs_n, 2)
        # histogram buckets: share of batches at the largest sizes
        buckets = {}
        for k in m1:
            if k.startswith("alignd_reward_batch_size_sequences_bucket{"):
                buckets[k.split("le=")[1].rstrip("}")] = d(k)
        out["batch_size_cumulative_buckets"] = buckets
    bt_sum, bt_n = d("alignd_reward_batch_seconds_sum{}"), d("alignd_reward_batch_seconds_count{}")
    if bt_n:
        out["mean_batch_seconds_ms"] = round(bt_sum / bt_n * 1e3, 3)
        out["batcher_busy_fraction"] = round(bt_sum / window_s, 3)  # engine time / wall time
    qw_sum, qw_n = d("alignd_reward_queue_wait_seconds_sum{}"), d("alignd_reward_queue_wait_seconds_count{}")
    if qw_n:
        out["mean_queue_wait_ms"] = round(qw_sum / qw_n * 1e3, 3)
    handled: dict[str, int] = {}
    for k in m1:
        if k.startswith("grpc_server_handled_total{") and "grpc_method=Score" in k:
            code = k.split("grpc_code=")[1].split(",")[0].rstrip("}")
            v = d(k)
            if v:
                handled[code] = int(v)
    out["server_score_calls_by_code"] = handled
    hs = [k for k in m1 if k.startswith("grpc_server_handling_seconds_sum{") and "grpc_method=Score" in k]
    if hs:
        s, n = d(hs[0]), d(hs[0].replace("_sum{", "_count{"))
        if n:
            out["server_mean_handling_ms"] = round(s / n * 1e3, 3)
    return out


def quantile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_xs:
        return float("nan")
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def machine_info() -> dict:
    import torch
    import transformers

    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "mem_total_mb": mem_total_mb(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
    }


# =========================================================================== in-process reference
def engine_reference(
    rm_dir: Path, vocab: int, torch_threads: int, batch_sizes: list[int], seed: int, lengths, seconds: float
) -> dict:
    """The role's own engine (RewardEngine on a model from the role's loaders) called in this process on one
    worker thread (as the role's batcher thread calls it), with the role's torch thread count, on batches of
    the same request shapes, while no role runs: the batching gain of the model alone, without gRPC and without
    other threads competing for the GIL."""
    import statistics
    import threading

    from alignd.config import ModelConfig, RewardConfig
    from alignd.models.handle import ModelHandle, load_scalar_head_model, load_tokenizer, set_torch_threads
    from alignd.services.reward.engine import RewardEngine

    set_torch_threads(torch_threads)
    mc = ModelConfig(path=str(rm_dir))
    handle = ModelHandle("reward", mc, load_scalar_head_model(mc, allow_new_head=False), tokenizer=load_tokenizer(mc))
    default_b = RewardConfig.model_fields["batching"].get_default(call_default_factory=True)
    extra = {}
    if "max_batch_tokens" in type(default_b).model_fields:  # the token-budget batcher, where present
        extra["max_batch_tokens"] = default_b.max_batch_tokens
    rnd = random.Random(seed)
    out: dict = {"torch_threads": torch_threads, "thread": "one worker thread", "batches": {}}

    def work() -> None:
        for b in batch_sizes:
            eng = RewardEngine(handle, b, **extra)
            pairs = [make_pair(rnd, vocab, *lengths) for _ in range(b)]
            for _ in range(3):
                eng.score(pairs)  # warm-up
            times = []
            t_end = time.perf_counter() + seconds
            while time.perf_counter() < t_end or len(times) < 5:
                t = time.perf_counter()
                eng.score(pairs)
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            out["batches"][str(b)] = {
                "median_ms": round(med * 1e3, 3),
                "calls": len(times),
                "sequences_per_s": round(b / med, 1),
            }

    th = threading.Thread(target=work, name="engine-ref")
    th.start()
    th.join()
    bs = [str(b) for b in batch_sizes]
    out["ratio_largest_over_batch1_sequences_per_s"] = round(
        out["batches"][bs[-1]]["sequences_per_s"] / out["batches"][bs[0]]["sequences_per_s"], 3
    )
    handle = None  # freed (the closure above refers to it)
    import gc

    gc.collect()
    return out


# =========================================================================== one phase
class Phase:
    def __init__(self, name: str, batching: dict, duration_s: float, warmup_s: float, backoff_s: float, note: str):
        self.name, self.batching, self.duration_s, self.warmup_s = name, batching, duration_s, warmup_s
        self.backoff_s, self.note = backoff_s, note


class RoleProc:
    def __init__(self, proc: subprocess.Popen, d: Path, log_path: Path) -> None:
        self.proc, self.dir, self.log_path = proc, d, log_path
        self.pid = proc.pid
        self.address = ""
        self.metrics_url: str | None = None

    def log_tail(self, n: int = 30) -> str:
        return log_tail(self.log_path, n)


def start_role(cfg: dict, d: Path, deadline: float) -> RoleProc:
    """The reward role served in directory d, once it is SERVING (a channel to it only to wait for that)."""
    proc, endpoint, log_path = spawn_serve("reward", cfg, d)
    r = RoleProc(proc, d, log_path)
    info, channel = await_serving(proc, endpoint, deadline, name="reward role", log_tail=r.log_tail)
    channel.close()
    r.address, r.metrics_url = info["address"], info.get("metrics_url")
    r.pid = int(info.get("pid") or proc.pid)
    return r


def stop_role(r: RoleProc | None) -> int | None:
    if r is None:
        return None
    if r.proc.poll() is None:
        r.proc.send_signal(signal.SIGTERM)
    try:
        return r.proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        r.proc.kill()
        return r.proc.wait()


def kill_clients(clients: list[subprocess.Popen]) -> None:
    for c in clients:
        if c.poll() is None:
            c.kill()
    for c in clients:
        try:
            c.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def run_phase(phase: Phase, args, rm_dir: Path, vocab: int, workdir: Path, quiet: Quiet, live: dict) -> dict:
    from alignd.config import RewardConfig

    # A partial `batching` mapping is validated as a whole new BatchingConfig, whose class defaults differ from
    # the role's (RewardConfig's default batching has max_wait_ms 0, BatchingConfig's own default is 5): start
    # from the role's default batching section and change only the keys this phase sets.
    batching = RewardConfig.model_fields["batching"].get_default(call_default_factory=True).model_dump(mode="json")
    batching.update(phase.batching)
    from _auth import tokens_file, with_auth

    tokens = tokens_file(workdir)
    # 200 clients share one token here: the per-client bound on calls in flight is lifted to the client count
    # (it is what this benchmark loads the batcher with; production keeps one token per caller).
    cfg = with_auth(
        {
            "model": {"path": str(rm_dir)},
            "torch_threads": args.torch_threads,
            "server": {"max_workers": args.max_workers},
            "batching": batching,
        },
        tokens,
        max_concurrent_calls_per_client=max(32, args.concurrency * 2),
    )
    effective = RewardConfig.model_validate(cfg)
    res: dict = {
        "note": phase.note,
        "role_config_written": cfg,
        "effective_batching": effective.batching.model_dump(),
        "effective_server": {"max_workers": effective.server.max_workers},
        "torch_threads": effective.torch_threads,
        "duration_s": phase.duration_s,
        "warmup_s": phase.warmup_s,
        "backoff_on_resource_exhausted_s": phase.backoff_s,
    }
    d = workdir / phase.name
    t_start = time.monotonic()
    role = start_role(cfg, d, t_start + STARTUP_TIMEOUT_S)
    live["role"] = role
    clients: list[subprocess.Popen] = []
    live["clients"] = clients
    try:
        res["startup_s"] = round(time.monotonic() - t_start, 2)
        res["address"] = role.address
        res["quiet_gate_foreign_fraction"] = quiet.wait([role.pid])
        st0 = proc_status(role.pid)
        res["rss_mb_before_load"] = round(st0.get("VmRSS", 0) / 1024, 1)
        res["threads_before_load"] = st0.get("Threads")

        # client processes: coroutines and max requests split as evenly as possible
        procs = args.client_procs
        per = [args.concurrency // procs + (1 if i < args.concurrency % procs else 0) for i in range(procs)]
        budgets = [args.max_requests // procs + (1 if i < args.max_requests % procs else 0) for i in range(procs)]
        result_paths = []
        for i in range(procs):
            spec = {
                "tokens_file": str(tokens),
                "proc": i,
                "address": role.address,
                "coroutines": per[i],
                "channels": args.channels,
                "vocab": vocab,
                "items_per_request": args.items_per_request,
                "seed": args.seed + i,
                "prompt_tokens": list(args.prompt_tokens),
                "response_tokens": list(args.response_tokens),
                "deadline_s": args.deadline_s,
                "max_requests": budgets[i],
                "backoff_on_exhausted_s": phase.backoff_s,
                "result_path": str(d / f"client{i}.result.json"),
            }
            sp = d / f"client{i}.spec.json"
            sp.write_text(json.dumps(spec))
            result_paths.append(Path(spec["result_path"]))
            clients.append(
                subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--client-spec", str(sp)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=open(d / f"client{i}.log", "wb"),
                    text=True,
                )
            )
        for i, c in enumerate(clients):
            line = c.stdout.readline()  # bounded: a client that cannot connect exits after 30 s
            if line.strip() != "READY":
                raise RuntimeError(f"client {i} not ready: {line!r}; see {d / f'client{i}.log'}")
        cpu = Cpu(role.pid, [c.pid for c in clients])
        t_go = time.monotonic()
        t0 = t_go + phase.warmup_s
        t1 = t0 + phase.duration_s
        for c in clients:
            c.stdin.write(f"GO {t0!r} {t1!r}\n")
            c.stdin.flush()
            c.stdin.close()

        rss_samples: list[tuple[float, float]] = []  # (seconds since GO, MB)
        queue_depth: list[float] = []
        m0 = m1 = None
        c0 = c1 = None
        rss_t0 = rss_t1 = None
        next_rss = t_go
        next_q = t0 + QUEUE_SAMPLE_S / 2
        while True:
            now = time.monotonic()
            alive = any(c.poll() is None for c in clients)
            if m0 is None and now >= t0:
                c0, m0, rss_t0 = cpu.snap(), scrape(role.metrics_url), rss_mb(role.pid)
            if m0 is not None and (now >= t1 or not alive):
                c1, m1, rss_t1 = cpu.snap(), scrape(role.metrics_url), rss_mb(role.pid)
                break
            if not alive:  # ended before the window started: a client failed
                break
            if now >= next_rss:
                v = rss_mb(role.pid)
                if v is not None:
                    rss_samples.append((round(now - t_go, 2), round(v, 1)))
                next_rss += RSS_SAMPLE_S
            if m0 is not None and now >= next_q:
                qd = scrape(role.metrics_url).get("alignd_reward_queue_depth_requests{}")
                if qd is not None:
                    queue_depth.append(qd)
                next_q += QUEUE_SAMPLE_S
            targets = [next_rss, t1 if m0 is not None else t0]
            if m0 is not None:
                targets.append(next_q)
            time.sleep(max(0.0, min(targets) - time.monotonic()))
        # drain: clients finish in-flight calls (each bounded by its deadline), then write their results
        drain_deadline = time.monotonic() + args.deadline_s + 30
        for c in clients:
            try:
                c.wait(timeout=max(0.1, drain_deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
        res["client_exit_codes"] = [c.returncode for c in clients]
        time.sleep(1.0)  # let the role settle after the drain
        st1 = proc_status(role.pid)
        res["rss_mb_after_drain"] = round(st1.get("VmRSS", 0) / 1024, 1)
        res["rss_mb_hwm_kernel"] = round(st1.get("VmHWM", 0) / 1024, 1)
        res["threads_after_load"] = st1.get("Threads")
        if m0 is None or m1 is None:
            raise RuntimeError(
                f"clients ended before the measured window: exit codes {res['client_exit_codes']}; see {d}/client*.log"
            )

        results = []
        for i, p in enumerate(result_paths):
            if not p.exists():
                raise RuntimeError(
                    f"client {i} wrote no result (exit {clients[i].returncode}); see {d / f'client{i}.log'}"
                )
            results.append(json.loads(p.read_text()))
    finally:
        kill_clients(clients)
        res["role_exit_code"] = stop_role(role)
        live["role"] = None
        if res["role_exit_code"] not in (0, None):
            res["role_log_tail"] = role.log_tail()

    # ---- aggregate
    window_end = max(r["window_end"] for r in results)
    window = max(1e-9, window_end - t0)
    lat = sorted(x for r in results for x in r["latencies_ok_s"])
    codes: dict[str, dict[str, int]] = {"warmup": {}, "window": {}, "drain": {}}
    for r in results:
        for ph, cs in r["codes"].items():
            for k, v in cs.items():
                codes[ph][k] = codes[ph].get(k, 0) + v
    all_codes: dict[str, int] = {}
    for cs in codes.values():
        for k, v in cs.items():
            all_codes[k] = all_codes.get(k, 0) + v
    ok = len(lat)
    errors = {k: v for k, v in all_codes.items() if k != "OK"}
    cpu_d = Cpu.delta(c0, c1)
    client_cpu_window = sum(r["cpu_window_s"] for r in results)
    rss_during = [v for _t, v in rss_samples]
    res.update(
        {
            "window_s": round(window, 3),
            "max_requests_reached": any(r["budget_exhausted"] for r in results),
            "calls_sent": sum(r["sent"] for r in results),
            "ok_in_window": ok,
            "codes_by_phase": codes,
            "errors_total_by_code": errors,
            "errors_other_than_resource_exhausted": {k: v for k, v in errors.items() if k != "RESOURCE_EXHAUSTED"},
            "throughput_rps": round(ok / window, 2),
            "throughput_items_per_s": round(ok * args.items_per_request / window, 2),
            "latency_ms": {
                "p50": round(quantile(lat, 0.50) * 1e3, 2),
                "p90": round(quantile(lat, 0.90) * 1e3, 2),
                "p99": round(quantile(lat, 0.99) * 1e3, 2),
                "max": round(lat[-1] * 1e3, 2) if lat else float("nan"),
                "mean": round(sum(lat) / ok * 1e3, 2) if ok else float("nan"),
            },
            "client": {
                "procs": len(results),
                "coroutines": [r["coroutines"] for r in results],
                "channels_per_proc": args.channels,
                "cpu_window_s_getrusage": round(client_cpu_window, 3),
                "cpu_window_cores_getrusage": round(client_cpu_window / window, 3),
                "cpu_total_s": round(sum(r["cpu_total_s"] for r in results), 3),
                "max_rss_mb": round(max(r["max_rss_kb"] for r in results) / 1024, 1),
            },
            "cpu_window": cpu_d,
            "contaminated_by_other_load": cpu_d["foreign_fraction_of_machine"] > CLEAN_FRACTION,
            "rss_mb_window_start": None if rss_t0 is None else round(rss_t0, 1),
            "rss_mb_end_of_load": None if rss_t1 is None else round(rss_t1, 1),
            "rss_mb_peak_sampled": round(max(rss_during), 1) if rss_during else None,
            "rss_mb_growth_over_window": None if rss_t0 is None or rss_t1 is None else round(rss_t1 - rss_t0, 1),
            "rss_samples_mb": rss_samples,
            "server_queue_depth_samples": queue_depth,
            "server_metrics_window": metrics_delta(m0, m1, window),
        }
    )
    return res


def default_max_batch_size() -> int:
    from alignd.config import RewardConfig

    return RewardConfig.model_fields["batching"].get_default(call_default_factory=True).max_batch_size


# =========================================================================== report
def fmt_codes(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "0"


def markdown_table(phases: dict[str, dict]) -> str:
    head = (
        "| configuration | max_batch_size / max_wait_ms / max_queue | ok calls | errors (all phases) | req/s | items/s "
        "| p50 ms | p90 ms | p99 ms | max ms | mean batch | role CPU cores | client CPU cores | other CPU cores "
        "| RSS MB before / window start / end / peak sampled / HWM / after drain |"
    )
    lines = [head, "|" + "---|" * 16]
    for name, r in phases.items():
        b = r["effective_batching"]
        m = r["server_metrics_window"]
        L = r["latency_ms"]
        lines.append(
            f"| {name} | {b['max_batch_size']} / {b['max_wait_ms']:g} / {b['max_queue']} | {r['ok_in_window']:,} "
            f"| {fmt_codes(r['errors_total_by_code'])} | {r['throughput_rps']:,.1f} | "
            f"{r['throughput_items_per_s']:,.1f} "
            f"| {L['p50']:.1f} | {L['p90']:.1f} | {L['p99']:.1f} | {L['max']:.1f} "
            f"| {m.get('mean_batch_size_sequences', float('nan')):.2f} | {r['cpu_window']['role_cores']:.2f} "
            f"| {r['client']['cpu_window_cores_getrusage']:.2f} | {r['cpu_window']['foreign_cores']:.2f} "
            f"| {r['rss_mb_before_load']:.0f} / {r['rss_mb_window_start']:.0f} / {r['rss_mb_end_of_load']:.0f} / "
            f"{r['rss_mb_peak_sampled']:.0f} / {r['rss_mb_hwm_kernel']:.0f} / {r['rss_mb_after_drain']:.0f} |"
        )
    return "\n".join(lines)


# =========================================================================== main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--client-spec", help=argparse.SUPPRESS)  # internal: run as a client process
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "reward_load.json"))
    ap.add_argument("--quick", action="store_true", help="duration 10 s, warm-up 2 s, overload 5 s")
    ap.add_argument("--concurrency", type=int, default=200, help="closed-loop clients (default 200)")
    ap.add_argument("--duration", type=float, default=None, help="measured seconds per configuration (default 60)")
    ap.add_argument("--warmup-s", type=float, default=None, help="unmeasured load before the window (default 5)")
    ap.add_argument(
        "--max-requests",
        type=int,
        default=1_000_000,
        help="most Score calls per configuration, warm-up included (default 1,000,000)",
    )
    ap.add_argument(
        "--items-per-request",
        type=int,
        default=ITEMS_PER_REQUEST,
        help=f"pairs per Score call (default {ITEMS_PER_REQUEST})",
    )
    ap.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="batching.max_batch_size of the dynamic run (default: the role's default)",
    )
    ap.add_argument(
        "--prompt-tokens",
        type=token_range,
        default=PROMPT_TOKENS,
        metavar="N|LO-HI",
        help="prompt length of each item, tokens (default 14-18)",
    )
    ap.add_argument(
        "--response-tokens",
        type=token_range,
        default=RESPONSE_TOKENS,
        metavar="N|LO-HI",
        help="response length of each item, tokens (default 6-10)",
    )
    ap.add_argument("--deadline-s", type=float, default=10.0, help="deadline of every call (default 10)")
    ap.add_argument("--client-procs", type=int, default=1, help="client processes (default 1)")
    ap.add_argument("--channels", type=int, default=1, help="gRPC channels (TCP connections) per client process")
    ap.add_argument("--torch-threads", type=int, default=1, help="the role's torch_threads (default 1)")
    ap.add_argument("--max-workers", type=int, default=256, help="the role's server.max_workers (default 256)")
    ap.add_argument("--max-queue", type=int, default=256, help="batching.max_queue of the two main runs (default 256)")
    ap.add_argument("--overload-max-queue", type=int, default=32, help="batching.max_queue of the overload phase")
    ap.add_argument(
        "--overload-s", type=float, default=None, help="measured seconds of the overload phase (default 10)"
    )
    ap.add_argument(
        "--overload-backoff-ms",
        type=float,
        default=5.0,
        help="a client sleeps this long after RESOURCE_EXHAUSTED, as a polite client would (default 5)",
    )
    ap.add_argument("--no-overload", action="store_true", help="skip the overload phase")
    ap.add_argument(
        "--no-engine-ref",
        action="store_true",
        help="skip the in-process engine reference (batch 1 and the default max_batch_size, no gRPC)",
    )
    ap.add_argument("--min-ratio", type=float, default=4.0, help="required throughput(dynamic)/throughput(batch1)")
    ap.add_argument("--rss-limit-mb", type=float, default=1024.0, help="bound on the role's peak RSS (default 1024)")
    ap.add_argument(
        "--rss-growth-limit-mb",
        type=float,
        default=64.0,
        help="bound on the role's RSS growth over a measured window (default 64)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quiet-wait-s",
        type=float,
        default=120.0,
        help="total seconds the run may wait for other processes to go idle (default 120)",
    )
    ap.add_argument("--time-limit-s", type=float, default=900.0, help="hard limit of the whole run (default 900)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep role configs, logs and raw client results")
    args = ap.parse_args(argv)
    if args.client_spec:
        return client_entry(args.client_spec)

    duration = args.duration if args.duration is not None else (10.0 if args.quick else 60.0)
    warmup = args.warmup_s if args.warmup_s is not None else (2.0 if args.quick else 5.0)
    overload_s = args.overload_s if args.overload_s is not None else (5.0 if args.quick else 10.0)
    if args.max_queue < args.concurrency:
        print(
            f"warning: --max-queue {args.max_queue} < --concurrency {args.concurrency}: RESOURCE_EXHAUSTED possible"
            " in the main runs"
        )

    def on_alarm(signum, _frame):
        raise RunTimeout(f"signal {signal.Signals(signum).name}: time limit {args.time_limit_s:.0f}s or stop request")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_alarm)
    signal.alarm(max(1, int(args.time_limit_s)))

    from alignd.models.tiny import build_tiny_model

    t_start = time.monotonic()
    info = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="alignd-reward-load-"))
    live: dict = {"role": None, "clients": []}
    result: dict = {"machine": info}
    phases_out: dict[str, dict] = {}
    failed_phase: str | None = None
    quiet = Quiet(args.quiet_wait_s)
    try:
        rm_dir = build_tiny_model(workdir / "models" / "reward", kind="reward", seed=1)
        mcfg = json.loads((rm_dir / "config.json").read_text())
        vocab = int(mcfg["vocab_size"])
        n_params = None
        try:
            from safetensors import safe_open

            with safe_open(str(rm_dir / "model.safetensors"), "pt") as f:
                n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        except Exception:  # noqa: BLE001 - informational only
            pass
        result["settings"] = {
            "concurrency": args.concurrency,
            "duration_s": duration,
            "warmup_s": warmup,
            "max_requests_per_configuration": args.max_requests,
            "items_per_request": args.items_per_request,
            "prompt_tokens": list(args.prompt_tokens),
            "response_tokens": list(args.response_tokens),
            "deadline_s": args.deadline_s,
            "client_procs": args.client_procs,
            "channels_per_proc": args.channels,
            "client": "grpc.aio coroutines, closed loop, pre-serialised requests, retries off",
            "torch_threads": args.torch_threads,
            "server.max_workers": args.max_workers,
            "batching.max_queue (main runs)": args.max_queue,
            "overload": {
                "enabled": not args.no_overload,
                "batching.max_queue": args.overload_max_queue,
                "duration_s": overload_s,
                "backoff_after_resource_exhausted_ms": args.overload_backoff_ms,
            },
            "min_ratio": args.min_ratio,
            "rss_limit_mb": args.rss_limit_mb,
            "rss_growth_limit_mb": args.rss_growth_limit_mb,
            "seed": args.seed,
            "quick": args.quick,
            "time_limit_s": args.time_limit_s,
            "model": {
                "builder": "alignd.models.tiny.build_tiny_model(kind='reward', seed=1) defaults",
                "arch": mcfg.get("model_type"),
                "hidden": mcfg.get("n_embd"),
                "layers": mcfg.get("n_layer"),
                "heads": mcfg.get("n_head"),
                "context": mcfg.get("n_positions"),
                "vocab_size": vocab,
                "parameters": n_params,
                "dtype": "float32",
            },
        }
        print(
            f"reward load: {info['cpu_count']} CPUs ({info['cpu_model']}), {args.concurrency} clients, "
            f"{duration:g}s window after {warmup:g}s warm-up, torch_threads {args.torch_threads}, "
            f"max_workers {args.max_workers}; model {n_params} params, vocab {vocab}; workdir {workdir}",
            flush=True,
        )

        phases = [
            Phase(
                "dynamic",
                {
                    "max_queue": args.max_queue,
                    **({"max_batch_size": args.max_batch_size} if args.max_batch_size else {}),
                },
                duration,
                warmup,
                0.0,
                "dynamic batching, the role's default max_wait_ms"
                + ("" if args.max_batch_size else " and max_batch_size"),
            ),
            Phase(
                "batch1",
                {"max_batch_size": 1, "max_wait_ms": 0.0, "max_queue": args.max_queue},
                duration,
                warmup,
                0.0,
                "batch-size-1 configuration",
            ),
        ]
        if not args.no_overload:
            phases.append(
                Phase(
                    "overload",
                    {"max_queue": args.overload_max_queue},
                    overload_s,
                    min(warmup, 2.0),
                    args.overload_backoff_ms / 1e3,
                    f"DELIBERATE overload: dynamic batching with max_queue {args.overload_max_queue} < "
                    f"{args.concurrency} "
                    "clients; RESOURCE_EXHAUSTED is the expected answer to the excess, any other error is a failure",
                )
            )
        if not args.no_engine_ref:
            failed_phase = "engine_reference"
            quiet.wait([])
            sizes = sorted({1, default_max_batch_size()})
            t0 = time.monotonic()
            ref = engine_reference(
                rm_dir,
                vocab,
                args.torch_threads,
                sizes,
                args.seed,
                (args.prompt_tokens, args.response_tokens),
                3.0 if not args.quick else 1.5,
            )
            ref["seconds"] = round(time.monotonic() - t0, 1)
            result["engine_inprocess_reference"] = ref
            print(
                "\n-- engine in process (no gRPC, one worker thread, torch_threads "
                f"{args.torch_threads}): "
                + "; ".join(
                    f"batch {b}: {v['median_ms']} ms, {v['sequences_per_s']} seq/s" for b, v in ref["batches"].items()
                )
                + f"; batching gain {ref['ratio_largest_over_batch1_sequences_per_s']}x",
                flush=True,
            )
        for ph in phases:
            failed_phase = ph.name
            print(f"\n-- {ph.name}: {ph.note}", flush=True)
            r = run_phase(ph, args, rm_dir, vocab, workdir, quiet, live)
            phases_out[ph.name] = r
            L = r["latency_ms"]
            print(
                f"   ok {r['ok_in_window']:,} in {r['window_s']:.1f}s = {r['throughput_rps']:,.1f} req/s; "
                f"p50/p90/p99/max {L['p50']}/{L['p90']}/{L['p99']}/{L['max']} ms; errors "
                f"{fmt_codes(r['errors_total_by_code'])}; "
                f"mean batch {r['server_metrics_window'].get('mean_batch_size_sequences')}; "
                f"role {r['cpu_window']['role_cores']} cores, clients {r['client']['cpu_window_cores_getrusage']}, "
                f"others {r['cpu_window']['foreign_cores']}; RSS MB before {r['rss_mb_before_load']}, "
                f"window {r['rss_mb_window_start']} -> {r['rss_mb_end_of_load']}, peak {r['rss_mb_peak_sampled']}, "
                f"after {r['rss_mb_after_drain']}",
                flush=True,
            )
        failed_phase = None
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - any failure is recorded in the results file
        result["error"] = f"{type(exc).__name__} in phase {failed_phase}: {exc}"
        print(f"\nERROR: {result['error']}", file=sys.stderr, flush=True)
    finally:
        signal.alarm(0)
        kill_clients(live.get("clients") or [])
        if live.get("role") is not None:
            stop_role(live["role"])
        if args.keep_workdir:
            print(f"workdir kept: {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)

    result["phases"] = phases_out
    ref = result.get("engine_inprocess_reference")
    if ref:
        for r in phases_out.values():
            m = r["server_metrics_window"]
            b = m.get("mean_batch_size_sequences")
            key = None if b is None else str(round(b))
            if key in ref["batches"] and m.get("mean_batch_seconds_ms"):
                m["inprocess_ms_same_batch"] = ref["batches"][key]["median_ms"]
                m["server_batch_time_over_inprocess"] = round(
                    m["mean_batch_seconds_ms"] / ref["batches"][key]["median_ms"], 2
                )
    checks: dict[str, dict] = {}
    for name, r in phases_out.items():
        other = r["errors_other_than_resource_exhausted"]
        checks[f"{name}: no error other than RESOURCE_EXHAUSTED"] = {"ok": not other, "detail": fmt_codes(other)}
        checks[f"{name}: peak RSS <= {args.rss_limit_mb:g} MB"] = {
            "ok": max(r["rss_mb_peak_sampled"] or 0, r["rss_mb_hwm_kernel"]) <= args.rss_limit_mb,
            "detail": f"peak sampled {r['rss_mb_peak_sampled']} MB, VmHWM {r['rss_mb_hwm_kernel']} MB",
        }
        if name != "overload":  # the overload window is short; its growth is reported, not judged
            g = r["rss_mb_growth_over_window"]
            checks[f"{name}: RSS growth over the window <= {args.rss_growth_limit_mb:g} MB"] = {
                "ok": g is not None and g <= args.rss_growth_limit_mb,
                "detail": f"{g} MB",
            }
    if "dynamic" in phases_out and "batch1" in phases_out:
        b1 = phases_out["batch1"]["throughput_rps"]
        ratio = phases_out["dynamic"]["throughput_rps"] / b1 if b1 > 0 else float("inf")
        result["throughput_ratio_dynamic_over_batch1"] = round(ratio, 3)
        checks[f"throughput dynamic / batch1 >= {args.min_ratio:g}"] = {
            "ok": ratio >= args.min_ratio,
            "detail": f"{ratio:.2f}x",
        }
    if "overload" in phases_out:
        re_n = phases_out["overload"]["errors_total_by_code"].get("RESOURCE_EXHAUSTED", 0)
        checks["overload: RESOURCE_EXHAUSTED answered (load did exceed the queue)"] = {
            "ok": re_n > 0,
            "detail": f"{re_n} calls",
        }
    if "error" in result:
        checks["run completed"] = {"ok": False, "detail": result["error"]}
    result["checks"] = checks
    result["passed"] = all(c["ok"] for c in checks.values()) and bool(phases_out)
    info["loadavg_at_end"] = os.getloadavg()
    info["waited_for_quiet_s"] = quiet.waited_s
    info["total_seconds"] = round(time.monotonic() - t_start, 1)

    if phases_out:
        print("\n" + markdown_table(phases_out))
    if ref:
        print(
            "\nengine in process, one thread, no gRPC: "
            + "; ".join(
                f"batch {b} {v['median_ms']} ms ({v['sequences_per_s']:,.0f} seq/s)" for b, v in ref["batches"].items()
            )
            + f"; gain {ref['ratio_largest_over_batch1_sequences_per_s']}x"
        )
        for name, r in phases_out.items():
            m = r["server_metrics_window"]
            if "server_batch_time_over_inprocess" in m:
                print(
                    f"  {name}: the role's batch time {m['mean_batch_seconds_ms']} ms at mean batch "
                    f"{m['mean_batch_size_sequences']} = {m['server_batch_time_over_inprocess']}x the in-process time; "
                    f"batcher busy {m.get('batcher_busy_fraction')}"
                )
    if "throughput_ratio_dynamic_over_batch1" in result:
        print(
            f"\nthroughput dynamic / batch1: {result['throughput_ratio_dynamic_over_batch1']:.2f}x "
            f"(required >= {args.min_ratio:g}x)"
        )
    for name, r in phases_out.items():
        if r["contaminated_by_other_load"]:
            print(
                f"WARNING: {name}: other processes used {r['cpu_window']['foreign_cores']} cores during the window"
                " (CONTAMINATED)"
            )
        if r["role_exit_code"] not in (0, None):
            print(f"WARNING: {name}: the role exited with {r['role_exit_code']} after SIGTERM")
    print("\nchecks:")
    for k, c in checks.items():
        print(f"  [{'ok' if c['ok'] else 'FAIL'}] {k}: {c['detail']}")
    from alignd.atomic import write_json_atomic

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), result)
    print(f"\nwrote {args.out} ({info['total_seconds']}s) -> {'PASS' if result['passed'] else 'FAIL'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
