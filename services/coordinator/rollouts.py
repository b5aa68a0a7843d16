"""The rollouts of a run's PPO steps, and the role calls that make them.

A step's prompts come from the resumable sampler (prompts.PromptSampler); its samples from every policy replica
in the rotation, one shard each, hedged and failed over (replicas.fan_out); then the reward role scores them and
the reference role gives their log-probs, concurrently. With run.rollout_micro_batches the prompts are generated
in micro-batches, one after another, and each is scored and given reference log-probs while the next one
generates. Every answer comes from the weights the run expects (WeightSync.call_at_run_version).
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from alignd.config import PPORunConfig, SamplingConfig
from alignd.conversations import chat_score_item, policy_prompt
from alignd.data import load_prompts
from alignd.services.coordinator.clients import RoleClients
from alignd.services.coordinator.prompts import PromptSampler, SamplerState
from alignd.services.coordinator.replicas import fan_out
from alignd.services.coordinator.runs import RunRecord
from alignd.services.coordinator.step_metrics import timed_phase
from alignd.services.coordinator.weight_sync import WeightSync
from alignd.v1 import policy_pb2, policy_pb2_grpc, reference_pb2, reference_pb2_grpc, reward_pb2, reward_pb2_grpc

# Samples per Generate request of sample_texts' parts (times n / gcd): a power of two, so that any power-of-two
# max_batch_size up to it batches the parts as it would batch one request.
PART_ROWS = 512
NO_SAMPLES = 1 << 62  # the weight version of an answer without samples (above any: it needs no re-sync)


@dataclass
class Rollout:
    """One step's samples, with their scores and reference log-probs, and the timings of making them."""

    step: int
    prompt_idx: list[int]
    sampler_before: SamplerState
    sampler_after: SamplerState
    samples: list = field(default_factory=list)  # (prompt, policy_pb2.Sample)
    scores: list[float] = field(default_factory=list)
    ref: list[list[float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    generated: threading.Event = field(default_factory=threading.Event)  # set when generation ended (or failed)


def sampling_params(
    s: SamplingConfig, *, seed: int, num_samples: int, logprob_mode: int = 0
) -> policy_pb2.SamplingParams:
    """A GenerateRequest's sampling parameters from a run's sampling configuration."""
    return policy_pb2.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        max_new_tokens=s.max_new_tokens,
        stop_token_ids=s.stop_token_ids,
        ignore_eos=s.ignore_eos,
        seed=seed,
        num_samples=num_samples,
        logprob_mode=logprob_mode,
    )


def sample_version(samples) -> int:
    """The oldest weight version among samples (NO_SAMPLES without any)."""
    return min((s.weight_version for s in samples), default=NO_SAMPLES)


def score(roles: RoleClients, sync: WeightSync, items: list[reward_pb2.ScoreItem]) -> list[float]:
    """The reward role's scores of items, from the RM the run expects it to serve."""
    req = reward_pb2.ScoreRequest(items=items)

    def call():
        return roles.call_any(
            "Score", roles.reward, lambda ch, t: reward_pb2_grpc.RewardServiceStub(ch).Score(req, timeout=t)
        )

    return list(sync.call_at_run_version("reward", call, lambda r: r.weight_version).scores)


class Rollouts:
    def __init__(
        self,
        record: RunRecord,
        cfg: PPORunConfig,
        roles: RoleClients,
        *,
        metrics,
        sync: WeightSync,
        skip_bad: bool = False,
        texts: bool = False,
    ) -> None:
        self.cfg = cfg
        self.roles = roles
        self.metrics = metrics
        self.sync = sync
        # Whether samples come back with their texts even when the reward role can score the token ids (the
        # pipeline's gold judge of every step reads them).
        self.texts = texts
        self.prompts, self.prompts_report = load_prompts(cfg.prompts.path, field=cfg.prompts.field, skip_bad=skip_bad)
        self.sampler = PromptSampler(
            len(self.prompts), cfg.seed, SamplerState(record.sampler_epoch, record.sampler_position)
        )
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(roles.policy)), thread_name_prefix="fanout")

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def take_prompts(self, step: int) -> Rollout:
        """The prompts of `step`, from the sampler (on the loop's thread: the order of steps is the order taken)."""
        before = SamplerState(self.sampler.state.epoch, self.sampler.state.position)
        idx = self.sampler.take(self.cfg.prompts_per_step)
        after = SamplerState(self.sampler.state.epoch, self.sampler.state.position)
        return Rollout(step=step, prompt_idx=idx, sampler_before=before, sampler_after=after)

    def make(self, ro: Rollout, same_tokenizer: bool, min_version: int) -> Rollout:
        """Generates ro's samples with weights of at least `min_version` (older ones: the policy is re-synced and
        they are generated again); scores them and takes their reference log-probs, concurrently, micro-batch by
        micro-batch (run.rollout_micro_batches)."""
        t0 = time.perf_counter()
        n = self.cfg.rollout_micro_batches
        bounds = [len(ro.prompt_idx) * k // n for k in range(n + 1)]
        batches = [ro.prompt_idx[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        spent = {"score": 0.0, "reference": 0.0}
        lock = threading.Lock()

        def timed(name: str, fn, *args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                with lock:
                    spent[name] += time.perf_counter() - start

        jobs = []
        try:
            self.sync.return_replicas(ro.step)
            with timed_phase(self.metrics, "generate", ro.timings):
                for k, idx in enumerate(batches):
                    got = self.sync.call_at_run_version(
                        "policy",
                        lambda idx=idx, k=k: self._generate(
                            ro.step,
                            idx,
                            return_text=self.texts or not same_tokenizer,
                            micro_batch=None if n == 1 else k,
                        ),
                        lambda got: sample_version(s for _, s in got),
                        want=min_version,
                    )
                    ro.samples.extend(got)
                    jobs.append(
                        (
                            self._pool.submit(timed, "score", self._score, got, same_tokenizer),
                            self._pool.submit(timed, "reference", self._reference, got),
                        )
                    )
        finally:
            ro.generated.set()
        for scores, ref in jobs:
            ro.scores.extend(scores.result())
            ro.ref.extend(ref.result())
        for name, seconds in (*spent.items(), ("rollout", time.perf_counter() - t0)):
            ro.timings[name] = seconds
            self.metrics.phase_seconds.labels(name).observe(seconds)
        return ro

    # -- the role calls ---------------------------------------------------------
    def _generate_request(
        self, step: int, shard: int, prompt_idx: list[int], *, return_text: bool, micro_batch: int | None = None
    ) -> policy_pb2.GenerateRequest:
        """Shard `shard` of the step (of its micro-batch, with run.rollout_micro_batches): its seed depends on the
        shard, not on the replica that serves it."""
        key = f"{self.cfg.seed}:{step}:{shard}" + ("" if micro_batch is None else f":{micro_batch}")
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1
        return policy_pb2.GenerateRequest(
            prompts=[policy_prompt(self.prompts[i], self.cfg.prompts.system) for i in prompt_idx],
            # The probability of each token under the distribution sampled: the behaviour policy's, which the
            # learner's importance weights and (untruncated) old log-probs need.
            sampling=sampling_params(
                self.cfg.sampling,
                seed=seed,
                num_samples=self.cfg.samples_per_prompt,
                logprob_mode=policy_pb2.LOGPROB_MODE_SAMPLED,
            ),
            return_text=return_text,
        )

    def _generate(
        self, step: int, prompt_idx: list[int], return_text: bool, *, micro_batch: int | None = None
    ) -> list[tuple[str, policy_pb2.Sample]]:
        """The step's rollouts (or one micro-batch of them): one shard per configured replica, hedged and failed
        over (replicas.fan_out)."""
        n_rep = len(self.roles.policy)
        shards = [prompt_idx[i::n_rep] for i in range(n_rep)]
        reqs = {
            r: self._generate_request(step, r, shards[r], return_text=return_text, micro_batch=micro_batch)
            for r in range(n_rep)
            if shards[r]
        }

        def wait_for(shard: int):
            ch = self.roles.policy[shard]
            stub = policy_pb2_grpc.PolicyServiceStub(ch)
            return self.roles.call("Generate", ch, lambda t: stub.Generate(reqs[shard], timeout=t))

        if n_rep == 1:
            resps = {r: wait_for(r) for r in reqs}
        else:

            def launch(shard: int, replica: int):
                stub = policy_pb2_grpc.PolicyServiceStub(self.roles.policy[replica])
                return stub.Generate.future(reqs[shard], timeout=self.roles.cfg.rpc_timeout_seconds)

            res = fan_out(
                sorted(reqs),
                self.sync.rotation,
                step,
                launch=launch,
                cfg=self.roles.cfg.hedging,
                on_out=self.sync.replica_out,
                wait_any=wait_for,
            )
            resps = res.responses
            if res.hedged:
                self.metrics.hedged_shards.inc(len(res.hedged))
            if res.failed_over:
                self.metrics.failed_over_shards.inc(len(res.failed_over))
        out = []
        for r in sorted(resps):
            out.extend((self.prompts[shards[r][smp.prompt_index]], smp) for smp in resps[r].samples)
        return out

    def _score(self, samples, same_tokenizer: bool) -> list[float]:
        if same_tokenizer:
            items = [
                reward_pb2.ScoreItem(
                    tokens=reward_pb2.TokenPair(prompt_token_ids=s.prompt_token_ids, response_token_ids=s.token_ids)
                )
                for _, s in samples
            ]
        else:
            # Another tokenizer or chat template: the reward role renders the conversation and reply itself.
            system = self.cfg.prompts.system
            items = [chat_score_item(p, s.text, system) for p, s in samples]
        return score(self.roles, self.sync, items)

    def _reference(self, samples) -> list[list[float]]:
        req = reference_pb2.LogProbsRequest(
            items=[
                reference_pb2.LogProbsItem(prompt_token_ids=s.prompt_token_ids, response_token_ids=s.token_ids)
                for _, s in samples
            ],
            temperature=self.cfg.sampling.temperature or 1.0,
        )

        def call():
            return self.roles.call_any(
                "LogProbs",
                self.roles.reference,
                lambda ch, t: reference_pb2_grpc.ReferenceServiceStub(ch).LogProbs(req, timeout=t),
            )

        resp = self.sync.call_at_run_version("reference", call, lambda r: r.weight_version)
        return [list(r.logprobs) for r in resp.results]

    def sample_texts(
        self,
        prompts: list,
        n: int,
        sampling: SamplingConfig,
        *,
        seed: int,
        system: str | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[list]:
        """n samples per prompt from one policy replica in the rotation, texts included; grouped by prompt (the
        pipeline's labeling rounds and evaluation); `system`: the system message of prompts given as text.

        Sent in parts of lcm(n, PART_ROWS) samples, one after the other, with on_progress(samples done, samples in
        all) after each: the parts sample what one request would (SamplingParams.first_prompt_index), and a policy
        whose max_batch_size divides PART_ROWS batches them as it would batch the one request."""
        per_part = math.lcm(n, PART_ROWS) // n
        out: list[list] = [[] for _ in prompts]
        channels = [self.roles.policy[r] for r in self.sync.rotation.active()]
        for start in range(0, len(prompts), per_part):
            part = prompts[start : start + per_part]
            params = sampling_params(sampling, seed=seed, num_samples=n)
            params.first_prompt_index = start
            req = policy_pb2.GenerateRequest(
                prompts=[policy_prompt(p, system) for p in part], sampling=params, return_text=True
            )

            def call(req=req):
                return self.roles.call_any(
                    "Generate", channels, lambda ch, t: policy_pb2_grpc.PolicyServiceStub(ch).Generate(req, timeout=t)
                )

            resp = self.sync.call_at_run_version("policy", call, lambda r: sample_version(r.samples))
            for s in resp.samples:
                out[start + s.prompt_index].append(s)
            if on_progress is not None:
                on_progress(min(len(prompts), start + per_part) * n, len(prompts) * n)
        return out
