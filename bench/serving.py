"""What serving a model over gRPC costs, and what dynamic batching buys.

Run (from the repository root):

    .venv/bin/python bench/serving.py [--out bench/results/serving.json] [--quick]

Options: `--quick` runs fewer rounds (about half the time); `--threads N`
sets the torch thread count on both sides (default 2); `--malloc-tuned` runs
this process and every role with glibc malloc settings that keep freed
memory (see MALLOC_TUNED below); `--quiet-wait-s S` bounds how long the run
may wait for other processes to go idle (default 180); `--keep-workdir` keeps
the temporary directory with the models, role configs and role logs.

One run measures:

(a) Overhead of the reward role's `Score` and the reference role's `LogProbs`
    over gRPC, as the ratio (time over gRPC) / (time in process) at batch
    sizes 1, 8 and 32 (sequences of 128 tokens: prompt 64 + response 64).
    In process: the role's own engine (`RewardEngine.score`,
    `ReferenceEngine.logprobs`) on a model loaded with the role's own loading
    code (`load_scalar_head_model` / `load_causal_lm`, `load_tokenizer`,
    `ModelHandle`), called in this process, twice over: on the main thread
    ("in-proc") and on one long-lived worker thread while the main thread
    waits ("in-thread", which is how the role's batcher thread runs it).
    Over gRPC: the real role started as a subprocess (`python -m alignd.cli
    serve ROLE`), called through the generated stubs with token-id inputs on
    a channel from `alignd.runtime.client.make_channel` (what alignd's own
    clients use). The timed gRPC call includes building the request message
    and reading the result, since a caller holding token-id lists has to do
    both. Every role runs twice, with `batching.max_wait_ms` 5 (the default)
    and 0: a single caller never fills a batch at batch 1 or 8, so the
    batcher holds each such call for the whole max_wait_ms waiting for
    company that never comes; at batch 32 the batch is full on arrival and
    nobody waits. Server-side time is split using the role's own /metrics
    (batch seconds, queue wait, gRPC handling seconds) scraped between timed
    blocks, and minor page faults per call are counted on both sides.

(b) Dynamic batching: 32 concurrent single-prompt `Generate` calls (32
    threads released together, one call each, one shared channel) to the
    policy role (`batching.max_batch_size` 32) against 32 sequential
    in-process Hugging Face `model.generate` calls (use_cache=True), both
    sampling at temperature 1 (top-k/top-p off) with fixed seeds and EOS
    ignored, so every sample has exactly max_new_tokens (32) tokens. Also
    reported: the policy engine called in process on all 32 rows at once (the
    batching gain without gRPC). The policy role runs three times: the
    defaults (server.max_workers 16 RPC threads, max_wait_ms 5), max_workers
    48 with max_wait_ms 5, and max_workers 48 with max_wait_ms 20.

Threads: 2 cores here. Every timed section runs one side at a time: the
in-process engine with `torch.set_num_threads(T)` (via alignd's own
`set_torch_threads`) while the servers are idle, or a server with
`torch_threads: T` while this process only waits for the reply. T = 2 by
default, so each side gets both cores when it runs. Rounds alternate the
order (in-process first, then gRPC first, ...) and the reported numbers are
medians over rounds, so drift hits both sides alike.

Other load: the machine may be shared. Before each round the run waits
(within --quiet-wait-s in all) until other processes used < 3% of the cores
for a second, and records how much CPU they used during the round (from
/proc/stat, minus this process and its roles). Medians use the rounds with
<= 5% other load when there are at least 2 of them (extra rounds are run to
replace spoiled ones); otherwise all rounds, flagged CONTAMINATED.

Ports: every server binds port 0; readiness is the gRPC health status
SERVING (as in tests/conftest.py), no fixed sleeps. Every subprocess gets
SIGTERM at the end (also on errors), then is waited for.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from _hf import hf_sampling
from _launch import await_serving, log_tail, spawn_serve
from _proc import HZ, cpu_model, minor_faults, process_ticks, system_ticks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc  # noqa: E402
import torch  # noqa: E402

from alignd.config import ModelConfig  # noqa: E402
from alignd.models.handle import (  # noqa: E402
    ModelHandle,
    load_causal_lm,
    load_scalar_head_model,
    load_tokenizer,
    set_torch_threads,
)
from alignd.models.tiny import build_tiny_model  # noqa: E402
from alignd.services.policy.engine import PolicyEngine, Row, Sampling  # noqa: E402
from alignd.services.reference.engine import Item, ReferenceEngine  # noqa: E402
from alignd.services.reward.engine import RewardEngine  # noqa: E402
from alignd.v1 import (  # noqa: E402
    common_pb2,
    policy_pb2,
    policy_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 120.0

MODEL = dict(hidden=256, layers=4, heads=4, context=512, vocab_size=8192)  # the tokenizer caps the vocabulary
PROMPT_TOKENS = 64
RESPONSE_TOKENS = 64
BATCH_SIZES = (1, 8, 32)
GEN_CALLS = 32
GEN_NEW_TOKENS = 32
GEN_PROMPT_RANGE = (16, 32)  # prompt lengths, inclusive
WAITS_MS = (5.0, 0.0)  # batching.max_wait_ms of the two reward/reference servers (5 = default)
# glibc malloc settings for --malloc-tuned: one arena, no mmap for blocks up to 32 MB, no trimming,
# so the activations of one forward reuse the pages of the previous one instead of faulting in fresh ones.
MALLOC_TUNED = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
# policy role variants: (label, max_wait_ms, extra config)
POLICY_VARIANTS = [
    ("workers16-wait5ms", 5.0, {}),  # the defaults: 16 RPC threads, 5 ms
    ("workers48-wait5ms", 5.0, {"server": {"max_workers": 48}}),
    ("workers48-wait20ms", 20.0, {"server": {"max_workers": 48}}),
]


# --------------------------------------------------------------------------- CPU accounting


QUIET_FRACTION = 0.03  # a round starts once other processes used < 3% of the cores for 1 s ...
CLEAN_FRACTION = 0.05  # ... and counts as clean if they used <= 5% during the round


class CpuMeter:
    """CPU that processes other than this one and its servers used meanwhile.

    This machine may be shared: `wait_quiet` holds the next round back (up to a
    total budget for the whole run) until other processes are idle, and each
    round records how much CPU others used while it ran; summaries use the
    clean rounds only when there are enough of them.
    """

    def __init__(self, pids: list[int], quiet_budget_s: float) -> None:
        self.pids = pids
        self.quiet_budget_s = quiet_budget_s
        self.waited_s = 0.0

    def wait_quiet(self) -> float:
        """Samples 1 s windows until others are idle or the budget is spent; returns the last fraction."""
        while True:
            a = self.snapshot()
            time.sleep(1.0)  # a measurement window, not synchronisation
            frac = self.delta(a, self.snapshot())["foreign_cpu_fraction"]
            if frac < QUIET_FRACTION or self.waited_s >= self.quiet_budget_s:
                return frac
            self.waited_s += 1.0

    def snapshot(self) -> tuple[float, int, int, int]:
        busy, steal = system_ticks()
        ours = process_ticks(os.getpid()) + sum(process_ticks(p) for p in self.pids)
        return time.monotonic(), busy, steal, ours

    @staticmethod
    def delta(a, b) -> dict:
        wall = max(b[0] - a[0], 1e-9)
        ncpu = os.cpu_count() or 1
        foreign = max(0, (b[1] - a[1]) - (b[3] - a[3])) / HZ
        return {
            "wall_s": round(wall, 3),
            "foreign_cpu_s": round(foreign, 3),
            "foreign_cpu_fraction": round(foreign / (wall * ncpu), 4),  # of all cores
            "steal_fraction": round((b[2] - a[2]) / HZ / (wall * ncpu), 4),
        }


# --------------------------------------------------------------------------- role subprocesses
@dataclass
class Role:
    name: str  # label, e.g. "reward-wait5"
    role: str
    proc: subprocess.Popen
    endpoint: Path
    log_path: Path
    address: str = ""
    metrics_url: str | None = None
    channel: grpc.Channel | None = None

    def log_tail(self, n: int = 40) -> str:
        return log_tail(self.log_path, n)


def spawn_role(name: str, role: str, cfg: dict, workdir: Path) -> Role:
    """`alignd serve ROLE` in workdir/name, checking calls against the work directory's tokens (the children get
    HF_HUB_OFFLINE / TOKENIZERS_PARALLELISM as set above)."""
    from _auth import tokens_file, with_auth

    proc, endpoint, log_path = spawn_serve(role, with_auth(cfg, tokens_file(workdir)), workdir / name)
    return Role(name, role, proc, endpoint, log_path)


def wait_ready(r: Role, deadline: float) -> None:
    """Endpoint file (ports bound), then health SERVING (model loaded and warmed up)."""
    info, r.channel = await_serving(r.proc, r.endpoint, deadline, name=r.name, log_tail=r.log_tail)
    r.address, r.metrics_url = info["address"], info["metrics_url"]


def stop_roles(roles: list[Role]) -> dict[str, int | None]:
    for r in roles:
        if r.channel is not None:
            r.channel.close()
        if r.proc.poll() is None:
            r.proc.send_signal(signal.SIGTERM)
    codes: dict[str, int | None] = {}
    for r in roles:
        try:
            codes[r.name] = r.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            codes[r.name] = r.proc.wait()
    return codes


def scrape(url: str | None) -> dict[str, float]:
    """Counter/histogram sums and counts from a role's /metrics, keyed by name{labels}."""
    from prometheus_client.parser import text_string_to_metric_families

    if not url:
        return {}
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith(("_sum", "_count")):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k in ("grpc_method",))
                out[f"{s.name}{{{labels}}}"] = s.value
    return out


def metric_delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


# --------------------------------------------------------------------------- helpers
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ms(x: float) -> str:
    return f"{x * 1e3:9.2f}"


def machine_info(threads: int) -> dict:
    import transformers

    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------- (a) Score / LogProbs
def make_sequences(vocab: int, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # ids >= 3: skip pad/bos/eos (0, 1, 2) so no special token sits inside a sequence
    return [torch.randint(3, vocab, (PROMPT_TOKENS + RESPONSE_TOKENS,), generator=g).tolist() for _ in range(n)]


def reward_request(seqs: list[list[int]]) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        items=[
            reward_pb2.ScoreItem(
                tokens=reward_pb2.TokenPair(prompt_token_ids=s[:PROMPT_TOKENS], response_token_ids=s[PROMPT_TOKENS:])
            )
            for s in seqs
        ]
    )


def reference_request(seqs: list[list[int]]) -> reference_pb2.LogProbsRequest:
    return reference_pb2.LogProbsRequest(
        items=[
            reference_pb2.LogProbsItem(prompt_token_ids=s[:PROMPT_TOKENS], response_token_ids=s[PROMPT_TOKENS:])
            for s in seqs
        ],
        temperature=1.0,
    )


@dataclass
class ForwardRole:
    """One role of part (a): how to call it in process and over gRPC."""

    role: str  # "reward" | "reference"
    method: str  # gRPC method name (for the metrics labels)
    inproc: callable  # (seqs) -> result
    grpc_call: callable  # (stub, seqs) -> result
    stub_cls: type
    servers: dict[str, Role] = field(default_factory=dict)  # label -> server


INPROC_MODES = ("inproc", "inproc_thread")


def select_rounds(foreign: list[float], min_clean: int = 2) -> tuple[list[int], bool]:
    """Indices of the rounds to summarise, and whether other load contaminated them."""
    clean = [i for i, f in enumerate(foreign) if f <= CLEAN_FRACTION]
    if len(clean) >= min_clean:
        return clean, False
    return list(range(len(foreign))), True


def bench_forward(fr: ForwardRole, seqs: list[list[int]], rounds: int, reps: dict[int, int], meter: CpuMeter) -> dict:
    """Modes: "inproc" = engine called on this (main) thread; "inproc_thread" = engine called on one
    long-lived worker thread while this thread waits (the role's batcher thread does the same);
    one mode per server. Each round runs every mode at every batch size, alternating the order."""
    modes = [*INPROC_MODES, *fr.servers]
    stubs = {label: fr.stub_cls(srv.channel) for label, srv in fr.servers.items()}
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inproc-engine")

    def call(mode: str, batch: list[list[int]]):
        if mode == "inproc":
            return fr.inproc(batch)
        if mode == "inproc_thread":
            return worker.submit(fr.inproc, batch).result()
        return fr.grpc_call(stubs[mode], batch)

    slug = fr.role
    recs: list[dict] = []  # one per round: {"foreign": f, "gate": f, B: {mode: {...}}}
    try:
        # Warm-up: every mode and batch size, untimed.
        for B in BATCH_SIZES:
            for mode in modes:
                for _ in range(2):
                    call(mode, seqs[:B])

        # Check: the same numbers in process and over gRPC (float32 on the wire).
        check = {}
        ref = fr.inproc(seqs[:8])
        for label in fr.servers:
            got = call(label, seqs[:8])
            flat_ref = [x for r in ref for x in (r if isinstance(r, list) else [r])]
            flat_got = [x for r in got for x in (r if isinstance(r, list) else [r])]
            check[label] = max(abs(a - b) for a, b in zip(flat_ref, flat_got))

        build_s = {B: [] for B in BATCH_SIZES}  # request building + serialising alone (client side)
        req = reward_request if fr.role == "reward" else reference_request
        for B in BATCH_SIZES:
            for _ in range(reps[B]):
                t0 = time.perf_counter()
                req(seqs[:B]).SerializeToString()
                build_s[B].append(time.perf_counter() - t0)

        cpu0 = meter.snapshot()
        max_rounds = rounds + rounds // 2  # extra rounds replace ones spoiled by other load
        rnd = 0
        while rnd < max_rounds:
            if rnd >= rounds and sum(r["foreign"] <= CLEAN_FRACTION for r in recs) >= rounds:
                break
            gate = meter.wait_quiet()
            r0 = meter.snapshot()
            order = modes if rnd % 2 == 0 else list(reversed(modes))
            rec: dict = {"gate": gate}
            for B in BATCH_SIZES:
                batch = seqs[:B]
                rec[B] = {}
                for mode in order:
                    srv = fr.servers.get(mode)
                    before = scrape(srv.metrics_url) if srv else None
                    fpid = srv.proc.pid if srv else os.getpid()
                    f0 = minor_faults(fpid)
                    ts = []
                    for _ in range(reps[B]):
                        t0 = time.perf_counter()
                        call(mode, batch)
                        ts.append(time.perf_counter() - t0)
                    m = {"ts": ts, "faults": minor_faults(fpid) - f0}
                    if srv:
                        after = scrape(srv.metrics_url)
                        m["batch_s"] = metric_delta(before, after, f"alignd_{slug}_batch_seconds_sum{{}}")
                        m["queue_s"] = metric_delta(before, after, f"alignd_{slug}_queue_wait_seconds_sum{{}}")
                        m["handling_s"] = metric_delta(
                            before, after, f"grpc_server_handling_seconds_sum{{grpc_method={fr.method}}}"
                        )
                    rec[B][mode] = m
            rec["foreign"] = CpuMeter.delta(r0, meter.snapshot())["foreign_cpu_fraction"]
            recs.append(rec)
            rnd += 1
        cpu = CpuMeter.delta(cpu0, meter.snapshot())
    finally:
        worker.shutdown(wait=True)

    foreign = [r["foreign"] for r in recs]
    used, contaminated = select_rounds(foreign)
    out = {
        "max_abs_diff_inproc_vs_grpc": check,
        "cpu": cpu,
        "rounds_run": len(recs),
        "round_foreign_cpu_fraction": foreign,
        "round_gate_foreign_cpu_fraction": [r["gate"] for r in recs],
        "rounds_used": used,
        "contaminated_by_other_load": contaminated,
        "batches": {},
    }
    for B in BATCH_SIZES:

        def pooled(mode: str, key: str = "ts"):
            if key == "ts":
                return [t for i in used for t in recs[i][B][mode]["ts"]]
            return sum(recs[i][B][mode][key] for i in used)

        calls = len(used) * reps[B]
        entry = {"request_build_and_serialize_median_s": median(build_s[B]), "calls_per_mode": calls}
        for base in INPROC_MODES:
            entry[base] = {
                "median_s": median(pooled(base)),
                "samples_s": pooled(base),
                "minor_page_faults_per_call": pooled(base, "faults") / calls,
            }
        entry["servers"] = {}
        for m in fr.servers:
            g = median(pooled(m))
            per_round = {
                base: [median(recs[i][B][m]["ts"]) / median(recs[i][B][base]["ts"]) for i in used]
                for base in INPROC_MODES
            }
            batch_s, queue_s, handling_s = pooled(m, "batch_s"), pooled(m, "queue_s"), pooled(m, "handling_s")
            entry["servers"][m] = {
                "grpc_median_s": g,
                "grpc_samples_s": pooled(m),
                "minor_page_faults_per_call_server": pooled(m, "faults") / calls,
                "ratio_vs_inproc": g / entry["inproc"]["median_s"],
                "ratio_vs_inproc_thread": g / entry["inproc_thread"]["median_s"],
                "ratio_vs_inproc_median_of_rounds": median(per_round["inproc"]),
                "ratio_vs_inproc_thread_median_of_rounds": median(per_round["inproc_thread"]),
                "ratio_vs_inproc_per_round": per_round["inproc"],
                "overhead_vs_inproc_ms": (g - entry["inproc"]["median_s"]) * 1e3,
                "overhead_vs_inproc_thread_ms": (g - entry["inproc_thread"]["median_s"]) * 1e3,
                "server_mean_ms": {
                    "engine_batch": batch_s / calls * 1e3,
                    "queue_wait": queue_s / calls * 1e3,
                    "handler_total": handling_s / calls * 1e3,
                    "handler_other": (handling_s - batch_s - queue_s) / calls * 1e3,
                },
                "client_mean_ms": statistics.fmean(pooled(m)) * 1e3,
            }
            # What gRPC adds on top of the server's own engine time (means over the same calls), which
            # does not depend on how fast the engine happens to run in the server process vs this one.
            sv = entry["servers"][m]
            engine_ms = sv["server_mean_ms"]["engine_batch"]
            sv["overhead_excl_engine_mean_ms"] = sv["client_mean_ms"] - engine_ms
            sv["outside_handler_mean_ms"] = sv["client_mean_ms"] - sv["server_mean_ms"]["handler_total"]
            sv["overhead_over_engine"] = (
                sv["overhead_excl_engine_mean_ms"] / engine_ms if engine_ms > 0 else float("nan")
            )
        out["batches"][str(B)] = entry
    return out


def print_load(res: dict) -> None:
    print(
        f"   other processes' CPU during this phase: {res['cpu']['foreign_cpu_fraction'] * 100:.1f}% of all cores"
        f" (steal {res['cpu']['steal_fraction'] * 100:.1f}%); per round: "
        + " ".join(f"{f * 100:.0f}%" for f in res["round_foreign_cpu_fraction"])
        + f"; medians over {len(res['rounds_used'])} of {res['rounds_run']} rounds"
        + (
            " -- CONTAMINATED: fewer than 2 rounds without other load"
            if res["contaminated_by_other_load"]
            else f" (those with <= {CLEAN_FRACTION * 100:.0f}% other load)"
        )
    )


def print_forward(role: str, res: dict) -> None:
    print(
        f"\n== {role}: over gRPC / in process, sequences of {PROMPT_TOKENS}+{RESPONSE_TOKENS} tokens (medians, ms) =="
    )
    print_load(res)
    print("   in-proc = engine on the main thread; in-thr = engine on a worker thread (as the role's batcher)")
    print(
        "   batch server       in-proc    in-thr      gRPC  gRPC/in-proc  gRPC/in-thr  (per-round medians)"
        "  | server means: engine queue other outside | gRPC-engine  /engine"
        " | page faults/call: in-proc in-thr server"
    )
    for B, e in res["batches"].items():
        for m, s in e["servers"].items():
            sm = s["server_mean_ms"]
            print(
                f"   {B:>5} {m:<10} {ms(e['inproc']['median_s'])} {ms(e['inproc_thread']['median_s'])}"
                f" {ms(s['grpc_median_s'])}  {s['ratio_vs_inproc']:11.3f} {s['ratio_vs_inproc_thread']:12.3f}"
                f"  ({s['ratio_vs_inproc_median_of_rounds']:.3f} {s['ratio_vs_inproc_thread_median_of_rounds']:.3f})"
                f"       | {sm['engine_batch']:13.2f} {sm['queue_wait']:5.2f} {sm['handler_other']:5.2f}"
                f" {s['outside_handler_mean_ms']:7.2f} | {s['overhead_excl_engine_mean_ms']:11.2f}"
                f" {s['overhead_over_engine'] * 100:7.1f}%"
                f" | {e['inproc']['minor_page_faults_per_call']:8.0f} "
                f"{e['inproc_thread']['minor_page_faults_per_call']:6.0f}"
                f" {s['minor_page_faults_per_call_server']:6.0f}"
            )
    print(
        "   server means (ms, from the role's /metrics): engine = batch time, queue = batcher wait, other = rest of"
        " the handler (parse, validate, response), outside = client call time - handler time (serialisation,"
        " transport, thread hand-offs); gRPC-engine = client call time - engine time (means), /engine = that"
        " over the engine time"
    )
    print(
        "   max |in-proc - gRPC| result difference:",
        ", ".join(f"{k}: {v:.2e}" for k, v in res["max_abs_diff_inproc_vs_grpc"].items()),
    )


# --------------------------------------------------------------------------- (b) dynamic batching
def make_prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = GEN_PROMPT_RANGE
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (L,), generator=g).tolist() for L in lengths]


def hf_generate_sequential(model, prompts: list[list[int]], pad: int) -> float:
    """32 sequential in-process `model.generate` calls; returns the wall time."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            torch.manual_seed(1000 + i)
            ids = torch.tensor([p], dtype=torch.long)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **hf_sampling(GEN_NEW_TOKENS, pad))
            if out.shape[1] - len(p) != GEN_NEW_TOKENS:
                raise AssertionError(f"HF generate produced {out.shape[1] - len(p)} tokens, not {GEN_NEW_TOKENS}")
    return time.perf_counter() - t0


def engine_batch(engine: PolicyEngine, prompts: list[list[int]]) -> float:
    s = Sampling(1.0, 1.0, 0, GEN_NEW_TOKENS, frozenset(), False)
    t0 = time.perf_counter()
    results, _ = engine.generate([Row(p, s, 1000 + i) for i, p in enumerate(prompts)])
    dt_ = time.perf_counter() - t0
    if any(len(r.token_ids) != GEN_NEW_TOKENS for r in results):
        raise AssertionError("policy engine produced a sample of the wrong length")
    return dt_


def generate_request(prompt: list[int], seed: int) -> policy_pb2.GenerateRequest:
    return policy_pb2.GenerateRequest(
        prompts=[policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=prompt))],
        sampling=policy_pb2.SamplingParams(
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=GEN_NEW_TOKENS,
            ignore_eos=True,
            seed=seed,
            logprob_mode=policy_pb2.LOGPROB_MODE_RAW,
        ),
    )


def grpc_concurrent(stub, prompts: list[list[int]]) -> tuple[float, list[int], list[float], list[float]]:
    """One thread per prompt, released together; returns (wall, batch size per call, per-call latency,
    per-call time in the server's batching queue)."""
    n = len(prompts)
    ready = threading.Barrier(n + 1)
    go = threading.Event()
    ends = [0.0] * n
    sizes = [0] * n
    queued = [0.0] * n
    errors: list[BaseException] = []
    t0_box = [0.0]

    def worker(i: int) -> None:
        try:
            req = generate_request(prompts[i], 1000 + i)
            ready.wait()
            go.wait()
            resp = stub.Generate(req, timeout=CALL_TIMEOUT_S)
            ends[i] = time.perf_counter()
            if len(resp.samples) != 1 or len(resp.samples[0].token_ids) != GEN_NEW_TOKENS:
                raise AssertionError("Generate returned a sample of the wrong length")
            sizes[i] = resp.batch_size
            queued[i] = resp.queue_seconds
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    t0_box[0] = time.perf_counter()
    go.set()
    for t in threads:
        t.join(CALL_TIMEOUT_S + 10)
    if errors:
        raise errors[0]
    return max(ends) - t0_box[0], sizes, [e - t0_box[0] for e in ends], queued


def bench_generate(
    model, engine: PolicyEngine, pad: int, servers: dict[str, Role], prompts, rounds: int, meter: CpuMeter
) -> dict:
    stubs = {label: policy_pb2_grpc.PolicyServiceStub(srv.channel) for label, srv in servers.items()}
    # Warm-up, untimed.
    hf_generate_sequential(model, prompts[:4], pad)
    engine_batch(engine, prompts)
    for stub in stubs.values():
        grpc_concurrent(stub, prompts)
    modes = ["hf_sequential", "engine_batch32", *[f"grpc_{k}" for k in servers]]
    recs: list[dict] = []
    cpu0 = meter.snapshot()
    max_rounds = rounds + rounds // 2 + 1
    rnd = 0
    while rnd < max_rounds:
        if rnd >= rounds and sum(r["foreign"] <= CLEAN_FRACTION for r in recs) >= rounds:
            break
        gate = meter.wait_quiet()
        r0 = meter.snapshot()
        rec: dict = {"gate": gate}
        for mode in modes if rnd % 2 == 0 else list(reversed(modes)):
            if mode == "hf_sequential":
                rec[mode] = {"wall": hf_generate_sequential(model, prompts, pad)}
            elif mode == "engine_batch32":
                rec[mode] = {"wall": engine_batch(engine, prompts)}
            else:
                wall, sizes, lat, queued = grpc_concurrent(stubs[mode[5:]], prompts)
                rec[mode] = {"wall": wall, "sizes": sorted(set(sizes)), "lat": lat, "queued": queued}
        rec["foreign"] = CpuMeter.delta(r0, meter.snapshot())["foreign_cpu_fraction"]
        recs.append(rec)
        rnd += 1
    cpu = CpuMeter.delta(cpu0, meter.snapshot())
    foreign = [r["foreign"] for r in recs]
    used, contaminated = select_rounds(foreign)
    n_tokens = GEN_CALLS * GEN_NEW_TOKENS
    out = {
        "calls": GEN_CALLS,
        "new_tokens_per_call": GEN_NEW_TOKENS,
        "cpu": cpu,
        "rounds_run": len(recs),
        "round_foreign_cpu_fraction": foreign,
        "round_gate_foreign_cpu_fraction": [r["gate"] for r in recs],
        "rounds_used": used,
        "contaminated_by_other_load": contaminated,
        "modes": {},
    }
    walls = {m: [recs[i][m]["wall"] for i in used] for m in modes}
    base = median(walls["hf_sequential"])
    for m in modes:
        w = median(walls[m])
        entry = {
            "wall_median_s": w,
            "wall_samples_s": walls[m],
            "wall_samples_all_rounds_s": [r[m]["wall"] for r in recs],
            "sequences_per_s": GEN_CALLS / w,
            "generated_tokens_per_s": n_tokens / w,
            "speedup_vs_hf_sequential": base / w,
        }
        if m.startswith("grpc_"):
            entry["server_batch_sizes_per_round"] = [recs[i][m]["sizes"] for i in used]
            entry["call_latency_median_s"] = median([x for i in used for x in recs[i][m]["lat"]])
            entry["queue_seconds_median"] = median([x for i in used for x in recs[i][m]["queued"]])
            entry["queue_seconds_max_per_round"] = [max(recs[i][m]["queued"]) for i in used]
            entry["ratio_vs_engine_batch32"] = w / median(walls["engine_batch32"])
        out["modes"][m] = entry
    return out


def print_generate(res: dict) -> None:
    print(f"\n== dynamic batching: {res['calls']} single-prompt calls x {res['new_tokens_per_call']} new tokens ==")
    print_load(res)
    print(
        "   mode                        wall s   seq/s  gen tok/s  speed-up vs HF sequential  server batches per round"
    )
    for m, e in res["modes"].items():
        sizes = e.get("server_batch_sizes_per_round", "")
        print(
            f"   {m:<26} {e['wall_median_s']:7.3f} {e['sequences_per_s']:7.1f} {e['generated_tokens_per_s']:10.1f}"
            f"  {e['speedup_vs_hf_sequential']:8.2f}x                 {sizes}"
        )
    print(
        "   (hf_sequential: 32 in-process model.generate calls one after another; engine_batch32: the policy"
        " engine in process on all 32 rows at once; grpc_*: 32 concurrent Generate calls to the policy role)"
    )


# --------------------------------------------------------------------------- main
def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "serving.json"))
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, in process and in every role (default 2)")
    ap.add_argument("--keep-workdir", action="store_true")
    ap.add_argument(
        "--quiet-wait-s",
        type=float,
        default=180.0,
        help="total seconds the run may wait, before rounds, for other processes to go idle (default 180)",
    )
    ap.add_argument(
        "--malloc-tuned",
        action="store_true",
        help=f"run this process and every role with {' '.join(f'{k}={v}' for k, v in MALLOC_TUNED.items())}"
        " (glibc malloc keeps freed memory instead of returning it to the kernel after every forward)",
    )
    args = ap.parse_args(argv)
    if args.malloc_tuned and any(os.environ.get(k) != v for k, v in MALLOC_TUNED.items()):
        # glibc reads these at process start: re-run this script with them set.
        env = {**os.environ, **MALLOC_TUNED}
        os.execve(
            sys.executable, [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)], env
        )

    def on_sigterm(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)

    rounds_fwd = 3 if args.quick else 8
    reps = {1: 10, 8: 4, 32: 2} if args.quick else {1: 16, 8: 6, 32: 3}
    rounds_gen = 3 if args.quick else 5

    set_torch_threads(args.threads)
    info = machine_info(args.threads)
    t_start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="alignd-bench-")
    workdir = Path(tmp)
    roles: list[Role] = []
    meter: CpuMeter | None = None
    result: dict = {"machine": info}
    try:
        print(f"alignd serving benchmark: {info['cpu_count']} CPUs, torch threads {args.threads}, workdir {workdir}")
        lm_dir = build_tiny_model(workdir / "models" / "lm", seed=0, **MODEL)
        rm_dir = build_tiny_model(workdir / "models" / "reward", kind="reward", seed=1, **MODEL)

        # Start every role at once (their start-up overlaps), then load the in-process models.
        def cfg(path: Path, wait_ms: float, extra: dict | None = None) -> dict:
            c = {
                "model": {"path": str(path)},
                "torch_threads": args.threads,
                "batching": {"max_batch_size": 32, "max_wait_ms": wait_ms},
            }
            for k, v in (extra or {}).items():
                c[k] = v
            return c

        servers: dict[str, dict[str, Role]] = {"reward": {}, "reference": {}, "policy": {}}
        for w in WAITS_MS:
            label = f"wait{w:g}ms"
            servers["reward"][label] = spawn_role(f"reward-{label}", "reward", cfg(rm_dir, w), workdir)
            servers["reference"][label] = spawn_role(f"reference-{label}", "reference", cfg(lm_dir, w), workdir)
        for label, wait_ms, extra in POLICY_VARIANTS:
            servers["policy"][label] = spawn_role(f"policy-{label}", "policy", cfg(lm_dir, wait_ms, extra), workdir)
        roles = [r for group in servers.values() for r in group.values()]

        rm_cfg, lm_cfg = ModelConfig(path=str(rm_dir)), ModelConfig(path=str(lm_dir))
        rm_handle = ModelHandle(
            "reward", rm_cfg, load_scalar_head_model(rm_cfg, allow_new_head=False), tokenizer=load_tokenizer(rm_cfg)
        )
        lm_handle = ModelHandle("reference", lm_cfg, load_causal_lm(lm_cfg), tokenizer=load_tokenizer(lm_cfg))
        reward_engine = RewardEngine(rm_handle, 32)
        reference_engine = ReferenceEngine(lm_handle, 32)
        policy_engine = PolicyEngine(lm_handle, 32)

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for r in roles:
            wait_ready(r, deadline)
        print(
            f"roles SERVING after {time.monotonic() - t_start:.1f}s: "
            + ", ".join(f"{r.name} {r.address}" for r in roles)
        )
        meter = CpuMeter([r.proc.pid for r in roles], args.quiet_wait_s)

        vocab = lm_handle.vocab_size
        result["workload"] = {
            "model": {
                **MODEL,
                "vocab_size_requested": MODEL["vocab_size"],
                "vocab_size": vocab,
                "reward_params": rm_handle.num_parameters,
                "lm_params": lm_handle.num_parameters,
                "arch": "gpt2",
                "dtype": "float32",
            },
            "sequence_tokens": {"prompt": PROMPT_TOKENS, "response": RESPONSE_TOKENS},
            "batch_sizes": list(BATCH_SIZES),
            "rounds_forward": rounds_fwd,
            "calls_per_round_forward": reps,
            "rounds_generate": rounds_gen,
            "generate": {
                "calls": GEN_CALLS,
                "max_new_tokens": GEN_NEW_TOKENS,
                "prompt_tokens": list(GEN_PROMPT_RANGE),
                "sampling": "temperature 1, top-k/top-p off, fixed seed per call, EOS ignored",
            },
            "role_config": {
                "torch_threads": args.threads,
                "batching.max_batch_size": 32,
                "reward/reference batching.max_wait_ms": list(WAITS_MS),
                "policy variants (label, batching.max_wait_ms, extra config)": POLICY_VARIANTS,
            },
            "client_channel": "alignd.runtime.client.make_channel (retries on, as alignd's clients)",
            "malloc_env": {k: os.environ.get(k) for k in MALLOC_TUNED},
            "quick": args.quick,
        }

        seqs = make_sequences(vocab, max(BATCH_SIZES), seed=0)
        fwd_roles = [
            ForwardRole(
                "reward",
                "Score",
                inproc=lambda b: reward_engine.score([(s[:PROMPT_TOKENS], s[PROMPT_TOKENS:]) for s in b])[0],
                grpc_call=lambda stub, b: list(stub.Score(reward_request(b), timeout=CALL_TIMEOUT_S).scores),
                stub_cls=reward_pb2_grpc.RewardServiceStub,
                servers=servers["reward"],
            ),
            ForwardRole(
                "reference",
                "LogProbs",
                inproc=lambda b: reference_engine.logprobs(
                    [Item(s[:PROMPT_TOKENS], s[PROMPT_TOKENS:], 1.0) for s in b]
                )[0],
                grpc_call=lambda stub, b: [
                    list(r.logprobs) for r in stub.LogProbs(reference_request(b), timeout=CALL_TIMEOUT_S).results
                ],
                stub_cls=reference_pb2_grpc.ReferenceServiceStub,
                servers=servers["reference"],
            ),
        ]
        for fr in fwd_roles:
            t0 = time.monotonic()
            res = bench_forward(fr, seqs, rounds_fwd, reps, meter)
            res["seconds"] = round(time.monotonic() - t0, 1)
            result[fr.role] = res
            print_forward(fr.role, res)

        prompts = make_prompts(vocab, GEN_CALLS, seed=1)
        t0 = time.monotonic()
        gen = bench_generate(
            lm_handle.model, policy_engine, lm_handle.pad_token_id, servers["policy"], prompts, rounds_gen, meter
        )
        gen["seconds"] = round(time.monotonic() - t0, 1)
        result["dynamic_batching"] = gen
        print_generate(gen)
    finally:
        codes = stop_roles(roles)
        result["role_exit_codes"] = codes
        if args.keep_workdir:
            print(f"workdir kept: {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)

    info["loadavg_at_end"] = os.getloadavg()
    info["waited_for_quiet_s"] = meter.waited_s if meter is not None else None
    info["total_seconds"] = round(time.monotonic() - t_start, 1)
    result["summary"] = summarize(result)
    print_summary(result["summary"])
    write_json_atomic(Path(args.out), result)
    print(f"\nwrote {args.out} ({info['total_seconds']}s); role exit codes: {codes}")
    return 0


def summarize(result: dict) -> dict:
    s: dict = {
        "targets": {
            "forward_ratio_at_batch32_max": 1.10,
            "forward_ratio_at_batch32_goal": 1.05,
            "dynamic_batching_speedup_min": 3.0,
        },
        "contaminated_by_other_load": {
            k: result[k]["contaminated_by_other_load"] for k in ("reward", "reference", "dynamic_batching")
        },
        "ratios": {},
        "speedups": {},
    }
    for role in ("reward", "reference"):
        for B, e in result[role]["batches"].items():
            for m, v in e["servers"].items():
                s["ratios"][f"{role}.batch{B}.{m}.grpc_over_inproc"] = round(v["ratio_vs_inproc"], 4)
                s["ratios"][f"{role}.batch{B}.{m}.grpc_over_inproc_thread"] = round(v["ratio_vs_inproc_thread"], 4)
                s["ratios"][f"{role}.batch{B}.{m}.overhead_over_engine"] = round(v["overhead_over_engine"], 4)
    for m, e in result["dynamic_batching"]["modes"].items():
        s["speedups"][f"{m}.speedup_vs_hf_sequential"] = round(e["speedup_vs_hf_sequential"], 3)
    return s


def print_summary(s: dict) -> None:
    print(
        "\n== summary (targets: Score/LogProbs over gRPC <= 1.10x in-process at batch 32, goal 1.05x;"
        " dynamic batching >= 3x) =="
    )
    r = s["ratios"]
    print("   gRPC time / in-process time         wait5ms (default)                wait0ms")
    print("                                  /in-proc /in-thread 1+ovh/eng  /in-proc /in-thread 1+ovh/eng")
    for role in ("reward", "reference"):
        for B in BATCH_SIZES:
            row = ""
            for w in ("wait5ms", "wait0ms"):
                row += "".join(f"{r[f'{role}.batch{B}.{w}.grpc_over_{b}']:9.3f}" for b in INPROC_MODES)
                row += f"{1 + r[f'{role}.batch{B}.{w}.overhead_over_engine']:10.3f} "
            print(f"   {role:<9} batch {B:>2}             {row}")
    print(
        "   (1+ovh/eng: 1 + (gRPC call time - the server's own engine time) / engine time, i.e. the ratio"
        " with the engine's speed difference between two processes taken out)"
    )
    for k, v in s["speedups"].items():
        print(f"   generate {k:<55} {v:6.2f}x")
    dirty = [k for k, v in s["contaminated_by_other_load"].items() if v]
    if dirty:
        print(f"   WARNING: other processes loaded the CPU during every round of: {', '.join(dirty)}")
    print(
        "   note: at batch 1 and 8 a single caller never fills a batch (max_batch_size 32), so with"
        " max_wait_ms 5 the batcher holds every such call ~5 ms for company; the wait0ms servers show"
        " the cost without that wait. At batch 32 the batch is full on arrival and nobody waits."
    )


if __name__ == "__main__":
    sys.exit(main())
