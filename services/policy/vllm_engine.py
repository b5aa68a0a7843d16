"""The policy's vLLM engine (policy.engine: vllm): PolicyService.Generate and ModelService's weight updates on
vLLM's AsyncLLM.

vLLM runs in its own processes (an engine core and one worker per GPU); this module drives it from the role's
process through an asyncio loop on a thread of its own. Every row (one prompt, one sample) is one vLLM request with
its own seed, sent as it arrives: vLLM's continuous batching replaces the role's batcher, and prefix caching lets
the K samples of a prompt share its KV cache.

Weights are swapped in place: the update is written to a private safetensors file in /dev/shm, the workers load it
with the model's own `load_weights` (alignd.services.policy.vllm_worker, through `collective_rpc`), then the prefix
cache is reset. A gate makes the swap atomic for requests: Generate calls hold it shared for their whole run, a
swap holds it exclusively, so no sample sees two weight versions and none is served from the old weights' cache.

Log-probs: vLLM computes one kind per engine (policy.vllm.logprobs_mode); see `check_logprob_mode`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError as FutureCancelled
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from alignd.config import PolicyConfig
from alignd.models.handle import ModelHandle, log_weights_applied
from alignd.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from alignd.runtime.logging import get_logger
from alignd.services.policy.engine import Row, RowResult, Sampling

_log = get_logger("alignd.policy.vllm")

WORKER_EXTENSION = "alignd.services.policy.vllm_worker.AligndWorkerExtension"
_VLLM_LOGPROBS = {"sampled": "processed_logprobs", "raw": "raw_logprobs"}


class SwapGate:
    """Readers (Generate calls) share it; a writer (a weight swap) waits for the readers in flight and holds new
    ones back until it is done. Writers go first: a stream of requests cannot starve an update."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._writer or self._writers_waiting:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DeadlineExceeded("deadline exceeded while a weight update was applied")
                self._cv.wait(left)
            self._readers += 1
        try:
            yield
        finally:
            with self._cv:
                self._readers -= 1
                self._cv.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cv:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cv.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cv:
                self._writer = False
                self._cv.notify_all()


def check_logprob_mode(s: Sampling, engine_mode: str) -> None:
    """FailedPrecondition when the request's log-prob kind differs from the engine's and so do their values.

    sampled = log_softmax(logits / T) after top-k/top-p; raw = log_softmax(logits). They are equal at temperature 1
    without truncation, and for greedy rows (vLLM takes a greedy row's log-probs before any processing; alignd
    answers 0 for a greedy row in sampled mode, as the transformers engine does)."""
    wants = "sampled" if s.logprobs_sampled else "raw"
    if wants == engine_mode or s.temperature == 0.0:
        return
    if s.temperature == 1.0 and s.top_k == 0 and s.top_p >= 1.0:
        return
    raise FailedPrecondition(
        f"sampling.logprob_mode: this policy's vLLM engine returns {engine_mode} log-probs "
        f"(policy.vllm.logprobs_mode), which differ from {wants} ones at temperature {s.temperature:g}, "
        f"top_k {s.top_k}, top_p {s.top_p:g}; ask for {engine_mode} log-probs or sample at temperature 1 without "
        "top-k/top-p"
    )


@dataclass
class Generated:
    """What an engine answers for a Generate call's rows."""

    results: list[RowResult]
    version: int  # the weights every row ran with
    queue_seconds: float  # waiting for a batch (transformers) or for a weight swap to end (vLLM)
    generate_seconds: float
    batch_size: int  # rows of the batch that ran them (transformers); with vLLM, the call's rows


class VllmEngine:
    """vLLM's AsyncLLM on a loop thread of its own; thread-safe `generate` and `load_files`."""

    def __init__(self, cfg: PolicyConfig, *, max_context: int) -> None:
        self.cfg = cfg
        self.mode = cfg.vllm.logprobs_mode
        self.max_in_flight = cfg.batching.max_queue  # Generate calls in flight (as the batcher's queued requests)
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="policy-vllm-loop", daemon=True)
        self._thread.start()
        try:
            self.llm = self._call(self._start(max_context), cfg.vllm.start_timeout_s)
        except BaseException:
            self._stop_loop()
            raise

    # --- plumbing -------------------------------------------------------------------------------------------------

    def _call(self, coro, timeout: float | None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _engine_args(self, max_context: int):
        from vllm.engine.arg_utils import AsyncEngineArgs

        v, m = self.cfg.vllm, self.cfg.model
        from alignd.models.handle import check_model_dir

        path = str(check_model_dir(m.path))
        on_gpu = torch.cuda.is_available()
        kv_gib = v.kv_cache_gib if v.kv_cache_gib is not None else (None if on_gpu else 2.0)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines are not alignd's JSON events
        if not on_gpu:
            # The role shares the host with others: no pinning of vLLM's OpenMP threads to cores (the operator's
            # VLLM_CPU_OMP_THREADS_BIND wins), and the role's torch_threads for its worker.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            if self.cfg.torch_threads > 0:
                os.environ.setdefault("OMP_NUM_THREADS", str(self.cfg.torch_threads))
        return AsyncEngineArgs(
            model=path,
            tokenizer=path,
            skip_tokenizer_init=True,  # prompts arrive as token ids; alignd decodes with the role's tokenizer
            trust_remote_code=m.trust_remote_code,
            dtype=m.dtype if v.dtype == "auto" else v.dtype,
            max_model_len=v.max_model_len or max_context,
            tensor_parallel_size=v.tensor_parallel_size,
            gpu_memory_utilization=v.gpu_memory_utilization,
            enable_sleep_mode=v.enable_sleep_mode,
            enable_prefix_caching=v.enable_prefix_caching,
            enforce_eager=v.enforce_eager or not on_gpu,
            kv_cache_memory_bytes=None if kv_gib is None else int(kv_gib * (1 << 30)),
            max_num_seqs=v.max_num_seqs,
            max_num_batched_tokens=max(v.max_num_batched_tokens, v.max_model_len or max_context),
            logprobs_mode=_VLLM_LOGPROBS[v.logprobs_mode],
            worker_extension_cls=WORKER_EXTENSION,
            seed=0,
            disable_log_stats=True,
        )

    async def _start(self, max_context: int):
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(self._engine_args(max_context))

    # --- generation -----------------------------------------------------------------------------------------------

    @staticmethod
    def _params(row: Row):
        from vllm import SamplingParams

        s = row.sampling
        return SamplingParams(
            n=1,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else 0,
            max_tokens=s.max_new_tokens,
            seed=None if s.temperature == 0.0 else row.seed,
            stop_token_ids=sorted(s.stop_token_ids),
            ignore_eos=True,  # EOS is among the stop ids unless the request ignores it (servicer.parse_sampling)
            logprobs=0,  # the sampled token's log-prob
            detokenize=False,
            skip_special_tokens=False,
        )

    async def _one(self, row: Row, request_id: str) -> RowResult:
        final = None
        async for out in self.llm.generate({"prompt_token_ids": list(row.prompt_ids)}, self._params(row), request_id):
            final = out
        c = final.outputs[0]
        tokens = list(c.token_ids)
        if row.sampling.temperature == 0.0 and row.sampling.logprobs_sampled:
            logprobs = [0.0] * len(tokens)  # a greedy row's sampled distribution is a point mass
        else:
            logprobs = [float(step[tok].logprob) for step, tok in zip(c.logprobs, tokens)]
        # vLLM ends a row on a stop token (kept in the output) or at max_tokens.
        stopped = bool(tokens) and tokens[-1] in row.sampling.stop_token_ids and c.finish_reason == "stop"
        return RowResult(tokens, logprobs, stopped)

    async def _many(self, rows: list[Row], prefix: str) -> list[RowResult]:
        return list(await asyncio.gather(*(self._one(r, f"{prefix}-{i}") for i, r in enumerate(rows))))

    def generate(self, rows: list[Row], timeout: float | None, on_done: Callable | None = None) -> list[RowResult]:
        """Every row through vLLM at once; DeadlineExceeded after `timeout` s (its requests are aborted)."""
        with self._count_lock:
            if self._in_flight >= self.max_in_flight:
                raise ResourceExhausted(
                    f"{self._in_flight} Generate calls are in flight, the limit (policy.batching.max_queue); "
                    "retry later"
                )
            self._in_flight += 1
        try:
            fut = asyncio.run_coroutine_threadsafe(self._many(rows, f"g{next(self._ids)}"), self._loop)
            if on_done is not None:
                on_done(fut.cancel)  # a cancelled call aborts its vLLM requests
            try:
                return fut.result(timeout)
            except TimeoutError:
                fut.cancel()
                raise DeadlineExceeded("deadline exceeded while generating") from None
            except FutureCancelled:
                raise DeadlineExceeded("the caller cancelled the request") from None
        finally:
            with self._count_lock:
                self._in_flight -= 1

    # --- weights --------------------------------------------------------------------------------------------------

    def load_files(self, files: list[str]) -> int:
        """Loads these safetensors files into every worker, then drops the prefix cache (no KV of the old weights
        is reused). The caller holds the gate exclusively."""
        counts = self.rpc("alignd_load_weights", files)
        self.reset_prefix_cache()
        return int(counts[0])

    def rpc(self, method: str, *args, timeout: float | None = None) -> list:
        """Every worker's answer to AligndWorkerExtension.`method`(*args)."""
        return list(self._call(self.llm.collective_rpc(method, args=args), timeout))

    def reset_prefix_cache(self) -> None:
        if not self._call(self.llm.reset_prefix_cache(), None):
            raise RuntimeError("vLLM did not reset its prefix cache after a weight update")

    def close(self) -> None:
        llm, self.llm = self.llm, None
        try:
            if llm is not None:
                llm.shutdown()
        finally:
            self._stop_loop()
            del llm  # collected now, while the modules its __del__ uses are still there


def _shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class VllmHandle(ModelHandle):
    """A ModelHandle whose weights live in vLLM's workers: its model is on the meta device (names, shapes, tied
    weights: what an update is checked against), and applying weights loads them into the workers under the gate."""

    engine_name = "vllm"

    def __init__(self, role: str, cfg, model, *, tokenizer) -> None:
        super().__init__(role, cfg, model, tokenizer=tokenizer)
        # Where vLLM runs the model (GetInfo's device; the coordinator's ppo.old_logprobs choice reads it): its
        # platform's device, whatever policy.model.device says.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.gate = SwapGate()
        self.engine: VllmEngine | None = None
        self.broken: str | None = None  # set when a load failed in the workers after it began
        self.group: tuple[str, float] | None = None  # (name, timeout) of the learner's weight group joined

    def apply_weights(
        self, tensors: Mapping[str, torch.Tensor], version: int, *, partial: bool, replace_newer: bool = False
    ) -> int:
        self.check_tensors(tensors, partial=partial)
        if self.broken and partial:
            raise FailedPrecondition(f"the engine's weights are incomplete ({self.broken}); send a full update")
        tmp = tempfile.mkdtemp(prefix="alignd-vllm-weights-", dir=_shm_dir())
        try:
            from safetensors.torch import save_file

            t0 = time.perf_counter()
            path = str(Path(tmp) / "update.safetensors")
            save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, path)
            self._swap_in(version, lambda: self.engine.load_files([path]), replace_newer=replace_newer)
            log_weights_applied(version, len(tensors), partial=partial, t0=t0)
            return len(tensors)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def replace_model(self, model, version: int, *, replace_newer: bool = False) -> int:
        raise FailedPrecondition("the vLLM engine loads weights of its own architecture only")

    # --- a learner's weight group ---------------------------------------------------------------------------------

    @property
    def weight_group_ranks(self) -> int:
        return self.engine.cfg.vllm.tensor_parallel_size if self.engine is not None else 0

    def join_weight_group(self, req) -> int:
        """Every worker joins the group (JoinWeightGroup); returns the ranks taken."""
        try:
            spec = {
                "group": req.group,
                "store_address": req.store_address,
                "world_size": int(req.world_size),
                "rank_offset": int(req.rank_offset),
                "backend": req.backend,
                "timeout_seconds": float(req.timeout_seconds),
            }
            ranks = self.engine.rpc("alignd_join_group", spec, timeout=float(req.timeout_seconds) + 30)
        except Exception as exc:  # noqa: BLE001 - the group did not form: the learner sends another way
            self.engine.rpc("alignd_leave_group", req.group, timeout=60)
            raise Unavailable(f"weight group {req.group!r} did not form: {exc}") from None
        self.group = (req.group, float(req.timeout_seconds))
        return len(ranks)

    def leave_weight_group(self, group: str) -> None:
        self.engine.rpc("alignd_leave_group", group, timeout=60)
        if getattr(self, "group", None) and self.group[0] == group:
            self.group = None

    def receive_weights(self, req, specs: list[tuple[str, str, list[int]]]) -> int:
        """Every worker receives the broadcast and checks its digest; returns the bytes each received. The caller
        checked the version and the specs. On failure the workers keep nothing and leave the group."""
        group = getattr(self, "group", None)
        if group is None or group[0] != req.group:
            raise FailedPrecondition(f"group: this replica is not in weight group {req.group!r}")
        try:
            received = self.engine.rpc("alignd_receive", req.group, specs, req.sha256, timeout=group[1] * 2 + 60)
        except Exception as exc:  # noqa: BLE001 - a dead peer or a digest mismatch: nothing applied
            self.engine.rpc("alignd_drop_received", timeout=60)
            if "sha256" in str(exc):
                raise InvalidArgument("sha256", str(exc).split("sha256:", 1)[-1].strip()[:200]) from None
            self.leave_weight_group(req.group)
            raise Unavailable(f"the broadcast of version {req.version} failed: {exc}") from None
        return int(received[0])

    def apply_received(self, version: int, *, replace_newer: bool = False) -> int:
        """Serves the weights the workers received (under the gate, the prefix cache reset after)."""
        t0 = time.perf_counter()

        def load() -> int:
            counts = self.engine.rpc("alignd_apply_received")
            self.engine.reset_prefix_cache()
            return int(counts[0])

        n = self._swap_in(version, load, replace_newer=replace_newer)
        log_weights_applied(version, n, partial=False, t0=t0)
        return n

    def _swap_in(self, version: int, load, *, replace_newer: bool):
        """Runs `load` (the workers load new weights) with the gate held alone, then serves `version`. A failure
        inside the workers marks the engine broken until a full update succeeds."""
        with self.gate.exclusive():
            self.check_version(version, replace_newer=replace_newer)
            try:
                out = load()
            except Exception as exc:
                self.broken = f"version {version} failed to load: {exc}"
                _log.error("weights_load_failed", version=version, error=str(exc))
                raise
            self.broken = None
            self.version = version
        return out

    def generate(self, rows: list[Row], timeout: float | None, on_done=None) -> Generated:
        if timeout is not None and timeout > 86400:  # gRPC's remaining time of a call without a deadline
            timeout = None
        t0 = time.perf_counter()
        with self.gate.shared(timeout):
            if self.broken:
                raise Unavailable(f"the policy's weights are incomplete ({self.broken}); awaiting a full update")
            waited = time.perf_counter() - t0
            version = self.version
            left = None if timeout is None else max(0.0, timeout - waited)
            results = self.engine.generate(rows, left, on_done)
        return Generated(results, version, waited, time.perf_counter() - t0 - waited, len(rows))
