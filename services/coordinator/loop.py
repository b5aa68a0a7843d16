"""The PPO loop of one run: the coordinator's driver, one timed phase at a time.

Per iteration (DESIGN.md, "One PPO iteration"):
  generate      prompts from the resumable sampler -> every policy replica
  score         reward.Score            } concurrently
  reference     reference.LogProbs      }
  train         learner.TrainStep(step)  (idempotent per step)
  sync_weights  learner.PushWeights      (replicas already at the version are skipped)
then the step's metrics line is appended to metrics.jsonl (fsync) and
state.json replaced atomically. A coordinator killed at any point resumes from
state.json: the unfinished step is replayed with the same prompts, and the
learner answers a step it already applied from its stored result, so no step
is applied twice.
"""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc

from alignd.config import CoordinatorConfig, PPORunConfig
from alignd.runtime.client import expand_addresses, make_channel, wait_for_serving
from alignd.runtime.errors import FailedPrecondition
from alignd.runtime.logging import get_logger
from alignd.data import load_prompts
from alignd.services.coordinator.prompts import PromptSampler, SamplerState
from alignd.services.coordinator.runs import MetricsLog, RunRecord
from alignd.v1 import (
    learner_pb2,
    learner_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

_log = get_logger("alignd.coordinator.loop")

PHASES = ("generate", "score", "reference", "train", "sync_weights", "evaluate")


class RunFailed(RuntimeError):
    pass


class Roles:
    """Channels to every role, and calls that survive a role restarting."""

    def __init__(self, cfg: CoordinatorConfig) -> None:
        missing = [
            name for name, v in (
                ("policy_addresses", cfg.policy_addresses), ("reward_addresses", cfg.reward_addresses),
                ("reference_addresses", cfg.reference_addresses), ("learner_address", cfg.learner_address),
            ) if not v
        ]
        if missing:
            raise FailedPrecondition(f"coordinator is not configured with {', '.join(missing)}")
        self.cfg = cfg
        # A headless Service name becomes one channel per replica (resolved when the run starts).
        self.policy = [make_channel(a) for a in expand_addresses(cfg.policy_addresses)]
        self.reward = [make_channel(a, credentials=cfg.reward_client) for a in expand_addresses(cfg.reward_addresses)]
        self.reference = [make_channel(a) for a in expand_addresses(cfg.reference_addresses)]
        self.learner = make_channel(cfg.learner_address)
        self._rr = 0

    def next_rr(self) -> int:
        self._rr += 1
        return self._rr

    def call(self, what: str, channel: grpc.Channel, fn):
        """fn(timeout) with recovery: on UNAVAILABLE, wait for the role's health, then call again."""
        deadline = time.monotonic() + self.cfg.recovery_timeout_seconds
        attempt = 0
        while True:
            try:
                return fn(self.cfg.rpc_timeout_seconds)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RunFailed(f"{what}: role unavailable for {self.cfg.recovery_timeout_seconds:.0f}s") from err
                _log.warning("role_unavailable", call=what, error=err.details())
                try:
                    wait_for_serving(channel, timeout=remaining)
                except TimeoutError as exc:
                    raise RunFailed(f"{what}: role did not come back: {exc}") from err
                # The role may serve while what it depends on does not (the learner while a policy replica
                # restarts, for PushWeights): back off before calling again.
                attempt += 1
                time.sleep(min(2.0, 0.1 * 2 ** attempt, max(0.0, deadline - time.monotonic())))

    def info(self, channel) -> model_pb2.ModelInfo:
        stub = model_pb2_grpc.ModelServiceStub(channel)
        return self.call("GetInfo", channel, lambda t: stub.GetInfo(model_pb2.GetInfoRequest(), timeout=t)).info

    def close(self) -> None:
        for ch in [*self.policy, *self.reward, *self.reference, self.learner]:
            ch.close()


class RunLoop(threading.Thread):
    def __init__(self, record: RunRecord, run_cfg: PPORunConfig, roles: Roles, metrics, *, skip_bad: bool = False) -> None:
        super().__init__(name=f"run-{record.run_id}", daemon=True)
        self.record = record
        self.cfg = run_cfg
        self.roles = roles
        self.metrics = metrics
        self.stop_requested = threading.Event()
        self.log = MetricsLog(record.path / "metrics.jsonl")
        self.prompts, self.prompts_report = load_prompts(run_cfg.prompts.path, field=run_cfg.prompts.field, skip_bad=skip_bad)
        self.sampler = PromptSampler(
            len(self.prompts), run_cfg.seed, SamplerState(record.sampler_epoch, record.sampler_position)
        )
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(roles.policy)), thread_name_prefix="fanout")

    # -- helpers -----------------------------------------------------------
    @contextmanager
    def _phase(self, name: str, timings: dict):
        t0 = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - t0
        self.metrics.phase_seconds.labels(name).observe(timings[name])

    def _check_tokenizers(self) -> bool:
        """True when the reward model shares the policy's tokenizer (then scores use token ids)."""
        pol = self.roles.info(self.roles.policy[0])
        for ch in self.roles.policy[1:] + self.roles.reference:
            other = self.roles.info(ch)
            if other.tokenizer_hash != pol.tokenizer_hash:
                raise RunFailed(f"{other.role} {other.model_name} tokenizes differently from the policy")
        return self.roles.info(self.roles.reward[0]).tokenizer_hash == pol.tokenizer_hash

    # -- the loop ----------------------------------------------------------
    def run(self) -> None:
        """Runs the body, then records how the run ended (shared by PipelineLoop)."""
        rec = self.record
        try:
            rec.state = "running"
            rec.save()
            self.log.truncate_after(rec.step)
            self._body()
        except Exception as exc:  # noqa: BLE001 - the run fails with a message; the coordinator keeps serving
            rec.state = "failed"
            detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.RpcError) else f"{type(exc).__name__}: {exc}"
            rec.error = f"{rec.stage}: {detail}"
            _log.error("run_failed", run_id=rec.run_id, stage=rec.stage, error=rec.error, exc_info=exc)
        rec.save()
        self.metrics.runs.labels(rec.state).inc()
        _log.info("run_ended", run_id=rec.run_id, state=rec.state, step=rec.step)
        self._pool.shutdown(wait=False)

    def _body(self) -> None:
        """The PPO iterations; sets the final state (succeeded or stopped)."""
        rec = self.record
        same_tokenizer = self._check_tokenizers()
        _log.info("run_started", run_id=rec.run_id, step=rec.step, total_steps=rec.total_steps)
        while rec.step < rec.total_steps:
            if self.stop_requested.is_set():
                rec.state = "stopped"
                return
            self._iteration(rec.step + 1, same_tokenizer)
        rec.state = "succeeded"

    def _generate(self, step: int, prompt_idx: list[int], return_text: bool) -> list[tuple[str, policy_pb2.Sample]]:
        s = self.cfg.sampling
        n_rep = len(self.roles.policy)
        shards = [prompt_idx[i::n_rep] for i in range(n_rep)]

        def one(r: int):
            if not shards[r]:
                return []
            ch = self.roles.policy[r]
            stub = policy_pb2_grpc.PolicyServiceStub(ch)
            seed = int.from_bytes(hashlib.sha256(f"{self.cfg.seed}:{step}:{r}".encode()).digest()[:8], "little") >> 1
            req = policy_pb2.GenerateRequest(
                prompts=[policy_pb2.Prompt(text=self.prompts[i]) for i in shards[r]],
                sampling=policy_pb2.SamplingParams(
                    temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens,
                    stop_token_ids=s.stop_token_ids, ignore_eos=s.ignore_eos, seed=seed,
                    num_samples=self.cfg.samples_per_prompt,
                ),
                return_text=return_text,
            )
            resp = self.roles.call("Generate", ch, lambda t: stub.Generate(req, timeout=t))
            return [(self.prompts[shards[r][smp.prompt_index]], smp) for smp in resp.samples]

        out = []
        for part in self._pool.map(one, range(n_rep)):
            out.extend(part)
        return out

    def _score(self, samples, same_tokenizer: bool) -> list[float]:
        ch = self.roles.reward[self.roles.next_rr() % len(self.roles.reward)]
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        if same_tokenizer:
            items = [
                reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=s.prompt_token_ids, response_token_ids=s.token_ids))
                for _, s in samples
            ]
        else:
            items = [reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt=p, response=s.text)) for p, s in samples]
        req = reward_pb2.ScoreRequest(items=items)
        return list(self.roles.call("Score", ch, lambda t: stub.Score(req, timeout=t)).scores)

    def _reference(self, samples) -> list[list[float]]:
        ch = self.roles.reference[self.roles.next_rr() % len(self.roles.reference)]
        stub = reference_pb2_grpc.ReferenceServiceStub(ch)
        req = reference_pb2.LogProbsRequest(
            items=[reference_pb2.LogProbsItem(prompt_token_ids=s.prompt_token_ids, response_token_ids=s.token_ids) for _, s in samples],
            temperature=self.cfg.sampling.temperature or 1.0,
        )
        resp = self.roles.call("LogProbs", ch, lambda t: stub.LogProbs(req, timeout=t))
        return [list(r.logprobs) for r in resp.results]

    def _iteration(self, step: int, same_tokenizer: bool) -> None:
        rec = self.record
        timings: dict[str, float] = {}
        sampler_before = SamplerState(self.sampler.state.epoch, self.sampler.state.position)
        prompt_idx = self.sampler.take(self.cfg.prompts_per_step)
        with self._phase("generate", timings):
            samples = self._generate(step, prompt_idx, return_text=not same_tokenizer)
            samples = self._resync_stale(step, prompt_idx, samples, same_tokenizer)
        # score and reference run concurrently; each is timed on its own.
        t_score = self._pool.submit(self._timed, "score", timings, self._score, samples, same_tokenizer)
        t_ref = self._pool.submit(self._timed, "reference", timings, self._reference, samples)
        scores, ref = t_score.result(), t_ref.result()
        experiences = [
            learner_pb2.Experience(
                prompt_token_ids=s.prompt_token_ids, response_token_ids=s.token_ids, rollout_logprobs=s.logprobs,
                reference_logprobs=r, score=sc, policy_version=s.weight_version, finish_reason=s.finish_reason,
            )
            for (_, s), r, sc in zip(samples, ref, scores)
        ]
        learner = learner_pb2_grpc.LearnerServiceStub(self.roles.learner)
        with self._phase("train", timings):
            req = learner_pb2.TrainStepRequest(step=step, experiences=experiences)
            resp = self.roles.call("TrainStep", self.roles.learner, lambda t: learner.TrainStep(req, timeout=t))
        with self._phase("sync_weights", timings):
            push = self.roles.call(
                "PushWeights", self.roles.learner, lambda t: learner.PushWeights(learner_pb2.PushWeightsRequest(), timeout=t)
            )
        n_tokens = sum(len(s.token_ids) for _, s in samples)
        versions = [s.weight_version for _, s in samples]
        row = {
            "step": step,
            "mean_score": statistics.fmean(scores),
            "approx_kl": resp.stats.approx_kl,
            "reference_kl": resp.stats.reference_kl,
            "kl_coef": resp.stats.kl_coef,
            "policy_loss": resp.stats.policy_loss,
            "value_loss": resp.stats.value_loss,
            "clip_fraction": resp.stats.clip_fraction,
            "entropy": resp.stats.entropy,
            "grad_norm": resp.stats.grad_norm,
            "ratio_mean": resp.stats.ratio_mean,
            "updates_skipped": resp.stats.updates_skipped,
            "ptx_loss": resp.stats.ptx_loss,
            "replayed": resp.replayed,
            "policy_version": push.version,
            "rollout_policy_version": min(versions) if versions else 0,
            "response_tokens": n_tokens,
            "mean_response_tokens": n_tokens / max(1, len(samples)),
            "tokens_per_second": n_tokens / max(1e-9, sum(timings.values())),
            "weight_sync_bytes": push.bytes_per_replica,
            "phase_seconds": timings,
            "sampler": {"epoch": self.sampler.state.epoch, "position": self.sampler.state.position},
            "sampler_before": {"epoch": sampler_before.epoch, "position": sampler_before.position},
            "time": time.time(),
        }
        self.log.append(row)
        rec.step = step
        rec.policy_version = push.version
        rec.sampler_epoch, rec.sampler_position = self.sampler.state.epoch, self.sampler.state.position
        rec.latest_metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        rec.save()
        m = self.metrics
        m.steps.inc()
        m.rollout_tokens.inc(n_tokens)
        m.step.set(step)
        m.mean_score.set(row["mean_score"])
        m.kl.set(row["reference_kl"])
        m.policy_lag.set(push.version - row["rollout_policy_version"] - 1 if versions else 0)
        _log.info("step_completed", run_id=rec.run_id, step=step, mean_score=round(row["mean_score"], 4),
                  reference_kl=row["reference_kl"], seconds=round(sum(timings.values()), 3), replayed=resp.replayed)

    def _resync_stale(self, step: int, prompt_idx: list[int], samples, same_tokenizer: bool):
        """Samples from a policy replica behind the last pushed version (a replica that restarted from its
        configured weights) are not used: the learner pushes its weights again (to every replica not at its
        version) and the step's rollouts are generated again, with the same seeds."""
        expected = self.record.policy_version
        for attempt in range(3):
            stale = [s.weight_version for _, s in samples if s.weight_version < expected]
            if not stale:
                return samples
            _log.warning("policy_resync", run_id=self.record.run_id, step=step, expected_version=expected,
                         found_version=min(stale), stale_samples=len(stale), attempt=attempt + 1)
            learner = learner_pb2_grpc.LearnerServiceStub(self.roles.learner)
            self.roles.call(
                "PushWeights", self.roles.learner, lambda t: learner.PushWeights(learner_pb2.PushWeightsRequest(), timeout=t)
            )
            samples = self._generate(step, prompt_idx, return_text=not same_tokenizer)
        return samples

    def _timed(self, name, timings, fn, *args):
        with self._phase(name, timings):
            return fn(*args)
