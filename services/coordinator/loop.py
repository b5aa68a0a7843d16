"""The PPO loop of one run: the coordinator's driver, one timed phase at a time.

Per iteration (DESIGN.md, "One PPO iteration"):
  generate      prompts from the resumable sampler -> every policy replica
  score         reward.Score            } concurrently
  reference     reference.LogProbs      }
  train         learner.TrainStep(step)  (idempotent per step)
  sync_weights  learner.PushWeights      (replicas already at the version are skipped)
With run.rollout_micro_batches the step's prompts are generated in micro-
batches, one after another, and each is scored and given reference log-probs
while the next one generates.
Then the step's metrics line is appended to metrics.jsonl (fsync) and
state.json replaced atomically. A coordinator killed at any point resumes from
state.json: the unfinished step is replayed with the same prompts, and the
learner answers a step it already applied from its stored result, so no step
is applied twice.

With run.async_rollouts the first three phases of the next max_staleness
steps run on a rollout thread while the learner trains (`_steps`): step j's
rollouts start once step j-1-max_staleness's weights are pushed, and a push
waits until the rollouts already started have generated (they keep the
weights they started with, so the staleness is exactly as planned and runs
are reproducible; with run.stage_weights the new weights are sent to the
replicas' staging buffers meanwhile, and the push after the generation only
applies them). The learner corrects for samples of older weights
(ppo.off_policy); each step records its staleness.
"""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from alignd.config import PPORunConfig
from alignd.data import load_prompts
from alignd.runtime.logging import get_logger
from alignd.services.coordinator import step_metrics
from alignd.services.coordinator.clients import RoleClients
from alignd.services.coordinator.errors import RunFailed, RunStopped
from alignd.services.coordinator.prompts import PromptSampler, SamplerState
from alignd.services.coordinator.replicas import Rotation, fan_out
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

# rollout: generate, score and reference together (wall time; with run.rollout_micro_batches scoring overlaps
# generation, so it is less than their sum). score / reference: the time of their calls, summed over micro-batches.
# wait_rollout / wait_generation: async runs only (waiting for the step's rollouts; for the next rollouts'
# generation before the push). stage_weights: async runs, when the new weights are sent to the replicas' staging
# buffers while they still generate (run.stage_weights); sync_weights then only commits them.
PHASES = (
    "generate",
    "score",
    "reference",
    "rollout",
    "train",
    "stage_weights",
    "sync_weights",
    "evaluate",
    "wait_rollout",
    "wait_generation",
)
RETURN_CHECK_BUDGET_S = 10.0  # checking and re-syncing a replica that returns to the rotation (not the phase budget)


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


class RunLoop(threading.Thread):
    def __init__(
        self, record: RunRecord, run_cfg: PPORunConfig, roles: RoleClients, metrics, *, skip_bad: bool = False
    ) -> None:
        super().__init__(name=f"run-{record.run_id}", daemon=True)
        self.record = record
        self.cfg = run_cfg
        self.roles = roles
        self.metrics = metrics
        self.stop_requested = threading.Event()
        self.log = MetricsLog(record.path / "metrics.jsonl")
        self.prompts, self.prompts_report = load_prompts(
            run_cfg.prompts.path, field=run_cfg.prompts.field, skip_bad=skip_bad
        )
        self.sampler = PromptSampler(
            len(self.prompts), run_cfg.seed, SamplerState(record.sampler_epoch, record.sampler_position)
        )
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(roles.policy)), thread_name_prefix="fanout")
        self.rotation = Rotation(len(roles.policy), roles.cfg.hedging.out_of_rotation_steps)
        metrics.replicas_in_rotation.set(len(roles.policy))
        # Whether the rollouts' log-probs are the learner's own, so it need not recompute them (ppo.old_logprobs);
        # settled with the roles' infos at the start of each run (_check_tokenizers).
        self._exact = False
        # One weight update of a role at a time: the main thread's pushes (and staging) and the rollout thread's
        # re-syncs would otherwise race for a replica's single update slot; concurrent micro-batches may find the
        # same restarted reward or reference replica.
        self._push_lock = threading.Lock()
        self._resync_locks = {role: threading.Lock() for role in ("policy", "reward", "reference")}
        self._stage_ok = True  # run.stage_weights, until a learner or replica shows it cannot stage
        self._last_step_time = time.time()

    # -- helpers -----------------------------------------------------------
    @contextmanager
    def _phase(self, name: str, timings: dict):
        t0 = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - t0
        self.metrics.phase_seconds.labels(name).observe(timings[name])

    def _check_tokenizers(self) -> bool:
        """True when the reward model shares the policy's tokenizer (then scores use token ids). Also settles
        whether the rollouts' log-probs are exact (self._exact), from the same answers."""
        pol = self.roles.info(self.roles.policy[0])
        dtypes = {pol.dtype, self.roles.info(self.roles.learner).dtype}
        for ch in self.roles.policy[1:] + self.roles.reference:
            other = self.roles.info(ch)
            if other.tokenizer_hash != pol.tokenizer_hash:
                raise RunFailed(f"{other.role} {other.model_name} tokenizes differently from the policy")
            if other.role == "policy":
                dtypes.add(other.dtype)
        s = self.cfg.sampling
        # Untruncated sampling, policy and learner in fp32 (in bf16 the cached decoding and the training forward
        # differ by ~1e-2 in log-prob): the rollouts' log-probs are then the learner's own.
        self._exact = s.temperature > 0 and s.top_k == 0 and s.top_p >= 1.0 and dtypes == {"float32"}
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
        except RunStopped as stop:
            rec.state = "stopped"
            _log.info("run_stopped", run_id=rec.run_id, stage=rec.stage, step=rec.step, where=str(stop))
        except Exception as exc:  # noqa: BLE001 - the run fails with a message; the coordinator keeps serving
            rec.state = "failed"
            detail = (
                f"{exc.code().name}: {exc.details()}"
                if isinstance(exc, grpc.RpcError)
                else f"{type(exc).__name__}: {exc}"
            )
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
        if not self._steps(rec.total_steps, same_tokenizer):
            rec.state = "stopped"
            return
        rec.state = "succeeded"

    def _generate_request(
        self, step: int, shard: int, prompt_idx: list[int], return_text: bool, micro_batch: int | None = None
    ) -> policy_pb2.GenerateRequest:
        """Shard `shard` of the step (of its micro-batch, with run.rollout_micro_batches): its seed depends on the
        shard, not on the replica that serves it."""
        s = self.cfg.sampling
        key = f"{self.cfg.seed}:{step}:{shard}" + ("" if micro_batch is None else f":{micro_batch}")
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1
        return policy_pb2.GenerateRequest(
            prompts=[policy_pb2.Prompt(text=self.prompts[i]) for i in prompt_idx],
            sampling=policy_pb2.SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                max_new_tokens=s.max_new_tokens,
                stop_token_ids=s.stop_token_ids,
                ignore_eos=s.ignore_eos,
                seed=seed,
                num_samples=self.cfg.samples_per_prompt,
                # The probability of each token under the distribution sampled: the behaviour policy's, which the
                # learner's importance weights and (untruncated) old log-probs need.
                logprob_mode=policy_pb2.LOGPROB_MODE_SAMPLED,
            ),
            return_text=return_text,
        )

    def _generate(
        self, step: int, prompt_idx: list[int], return_text: bool, micro_batch: int | None = None
    ) -> list[tuple[str, policy_pb2.Sample]]:
        """The step's rollouts (or one micro-batch of them): one shard per configured replica, hedged and failed
        over (replicas.fan_out)."""
        n_rep = len(self.roles.policy)
        shards = [prompt_idx[i::n_rep] for i in range(n_rep)]
        reqs = {
            r: self._generate_request(step, r, shards[r], return_text, micro_batch) for r in range(n_rep) if shards[r]
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
                sorted(reqs), self.rotation, step, launch, self.roles.cfg.hedging, self._replica_out, wait_for
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

    # -- replicas in the rotation, and what every role must serve ----------
    def _replica_out(self, replica: int, reason: str) -> None:
        _log.warning(
            "replica_out_of_rotation",
            run_id=self.record.run_id,
            replica=self.roles.policy_addresses[replica],
            reason=reason,
            steps=self.rotation.out_steps,
        )
        self.metrics.replicas_out.labels(reason).inc()
        self.metrics.replicas_in_rotation.set(len(self.rotation.inside()))

    def _return_replicas(self, step: int) -> None:
        """Replicas whose time out of the rotation is over come back once they answer and serve the current weights
        (a replica that does not answer is looked up again: a Kubernetes pod that was replaced has a new address)."""
        for r in self.rotation.due(step):
            try:
                try:
                    info = self._replica_info(r)
                except grpc.RpcError:
                    if not self.roles.refresh_policy(r):
                        raise
                    info = self._replica_info(r)
                if info.weight_version != self.expected_version("policy"):  # behind, or ahead: never published
                    self.resync("policy", [r])
            except (grpc.RpcError, RunFailed) as err:
                _log.warning(
                    "replica_still_out",
                    run_id=self.record.run_id,
                    replica=self.roles.policy_addresses[r],
                    error=str(err.details() if isinstance(err, grpc.RpcError) else err),
                )
                self.rotation.take_out(r, step, "unavailable")
                continue
            self.rotation.put_back(r)
            _log.info("replica_back_in_rotation", run_id=self.record.run_id, replica=self.roles.policy_addresses[r])
            self.metrics.replicas_in_rotation.set(len(self.rotation.inside()))

    def _replica_info(self, r: int) -> model_pb2.ModelInfo:
        stub = model_pb2_grpc.ModelServiceStub(self.roles.policy[r])
        return stub.GetInfo(model_pb2.GetInfoRequest(), timeout=RETURN_CHECK_BUDGET_S).info

    def expected_version(self, role: str) -> int | None:
        """The weight version `role`'s replicas must serve now; 0: the weights in their own configuration; None: a
        PPO run does not manage the reward and reference weights (they serve what they were given)."""
        return self.record.policy_version if role == "policy" else None

    def resync(self, role: str, replicas: list[int] | None = None) -> None:
        """Brings `role`'s replicas (policy: those given, else every one in the rotation) to expected_version."""
        if role == "policy":
            self._push(replicas, budget=RETURN_CHECK_BUDGET_S if replicas is not None else None)

    def _push(
        self, replicas: list[int] | None = None, budget: float | None = None, stage_only: bool = False
    ) -> learner_pb2.PushWeightsResponse:
        """PushWeights to `replicas`, else to every replica but those out of the rotation for being unavailable
        (the learner's configured set when every replica is in the rotation). A push that fails because a replica
        is down takes the replicas that do not answer out of the rotation (if others remain), and is retried
        without them."""
        learner = learner_pb2_grpc.LearnerServiceStub(self.roles.learner)

        def push(timeout: float):
            if replicas is not None:
                addresses = [self.roles.policy_addresses[r] for r in replicas]
            elif len(self.rotation.inside()) == self.rotation.n:
                addresses = []
            else:  # slow replicas still get the weights: a fail-over may need them
                addresses = [
                    self.roles.policy_addresses[r]
                    for r in range(self.rotation.n)
                    if self.rotation.reason[r] != "unavailable"
                ]
            try:
                with self._push_lock:
                    return learner.PushWeights(
                        learner_pb2.PushWeightsRequest(addresses=addresses, stage_only=stage_only), timeout=timeout
                    )
            except grpc.RpcError as err:
                # (staging runs while the rollout thread generates: it leaves the rotation to the push after it)
                if (
                    err.code() == grpc.StatusCode.UNAVAILABLE
                    and replicas is None
                    and self.rotation.n > 1
                    and not stage_only
                ):
                    self._take_out_unreachable()
                raise

        return self.roles.call("PushWeights", self.roles.learner, push, budget=budget)

    def _take_out_unreachable(self) -> None:
        """Replicas in the rotation that do not answer GetInfo leave it, unless none would be left."""
        inside = self.rotation.inside()
        down = []
        for r in inside:
            try:
                model_pb2_grpc.ModelServiceStub(self.roles.policy[r]).GetInfo(model_pb2.GetInfoRequest(), timeout=5)
            except grpc.RpcError:
                down.append(r)
        if down and len(down) < len(inside):
            for r in down:
                self.rotation.take_out(r, self.record.step + 1, "unavailable")
                self._replica_out(r, "unavailable")

    def _call_at_run_version(self, role: str, fn, version_of, want: int | None = None):
        """fn() -> a response; when version_of(response) is below what `role` must serve (`want`, else
        expected_version: a replica that restarted from the weights in its configuration), the replicas are
        re-synced and fn is called again."""
        for attempt in range(3):
            resp = fn()
            want, got = (self.expected_version(role) if want is None else want), version_of(resp)
            # The policy may be ahead of `want` (async rollouts take any version from it on); the reward and
            # reference replicas of a pipeline serve exactly the run's version: one ahead of it serves weights the
            # run never published, and is re-synced too.
            if want is None or got == want or (role == "policy" and got > want):
                return resp
            _log.warning(
                "role_resync",
                run_id=self.record.run_id,
                role=role,
                expected_version=want,
                found_version=got,
                attempt=attempt + 1,
            )
            self.metrics.resyncs.labels(role).inc()
            with self._resync_locks[role]:  # a second caller finds the replicas at the version, and skips them
                self.resync(role)
        raise RunFailed(f"{role} replicas still serve weight version {got} after 3 re-syncs; expected {want}")

    def _score(self, samples, same_tokenizer: bool) -> list[float]:
        if same_tokenizer:
            items = [
                reward_pb2.ScoreItem(
                    tokens=reward_pb2.TokenPair(prompt_token_ids=s.prompt_token_ids, response_token_ids=s.token_ids)
                )
                for _, s in samples
            ]
        else:
            items = [reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt=p, response=s.text)) for p, s in samples]
        req = reward_pb2.ScoreRequest(items=items)

        def call():
            return self.roles.call_any(
                "Score", self.roles.reward, lambda ch, t: reward_pb2_grpc.RewardServiceStub(ch).Score(req, timeout=t)
            )

        return list(self._call_at_run_version("reward", call, lambda r: r.weight_version).scores)

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

        resp = self._call_at_run_version("reference", call, lambda r: r.weight_version)
        return [list(r.logprobs) for r in resp.results]

    # -- rollouts ----------------------------------------------------------
    def _take_prompts(self, step: int) -> Rollout:
        """The prompts of `step`, from the sampler (on the loop's thread: the order of steps is the order taken)."""
        before = SamplerState(self.sampler.state.epoch, self.sampler.state.position)
        idx = self.sampler.take(self.cfg.prompts_per_step)
        after = SamplerState(self.sampler.state.epoch, self.sampler.state.position)
        return Rollout(step=step, prompt_idx=idx, sampler_before=before, sampler_after=after)

    def _rollout(self, ro: Rollout, same_tokenizer: bool, min_version: int) -> Rollout:
        """Generates ro's samples with weights of at least `min_version` (older ones: the policy is re-synced and
        they are generated again); scores them and takes their reference log-probs, concurrently. With
        run.rollout_micro_batches the prompts are generated in micro-batches, one after another, and each one is
        scored and given reference log-probs while the next one generates."""
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
            self._return_replicas(ro.step)
            with self._phase("generate", ro.timings):
                for k, idx in enumerate(batches):
                    got = self._call_at_run_version(
                        "policy",
                        lambda idx=idx, k=k: self._generate(
                            ro.step,
                            idx,
                            return_text=self.rollout_texts or not same_tokenizer,
                            micro_batch=None if n == 1 else k,
                        ),
                        lambda got: min((s.weight_version for _, s in got), default=1 << 62),
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
        for score, ref in jobs:
            ro.scores.extend(score.result())
            ro.ref.extend(ref.result())
        for name, seconds in (*spent.items(), ("rollout", time.perf_counter() - t0)):
            ro.timings[name] = seconds
            self.metrics.phase_seconds.labels(name).observe(seconds)
        return ro

    # Whether rollouts come back with their texts even when the reward role can score the token ids (a subclass
    # judging the texts itself sets it: the pipeline's gold judge per step).
    rollout_texts = False

    def _step_extras(self, samples) -> dict:
        """More figures for a step's metrics row, from its samples [(prompt index, policy_pb2.Sample)]."""
        return {}

    # -- steps ---------------------------------------------------------------
    def _steps(self, end: int, same_tokenizer: bool) -> bool:
        """PPO steps rec.step+1 .. end; False when a stop was requested first. On-policy: each step's rollouts are
        generated with the weights of the step before. Async (run.async_rollouts): the rollouts of the next
        max_staleness steps are generated, scored and given reference log-probs while the learner trains; a step's
        samples come from weights at most max_staleness versions old (never across `end`, where the pipeline
        retrains the reward model)."""
        rec = self.record
        self._last_step_time = time.time()
        if not self.cfg.async_rollouts:
            while rec.step < end:
                if self.stop_requested.is_set():
                    return False
                ro = self._rollout(self._take_prompts(rec.step + 1), same_tokenizer, self.expected_version("policy"))
                self._train(ro)
            return True
        ahead = self.cfg.max_staleness
        pending: dict[int, tuple[Rollout, Future]] = {}
        # Rollouts run one at a time, in step order (the policy serves one generation at a time anyway).
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        try:
            while rec.step < end:
                if self.stop_requested.is_set():
                    return False
                # Step j's rollout may start once the weights of step j - 1 - max_staleness are pushed.
                for j in range(rec.step + 1, min(end, rec.step + 1 + ahead) + 1):
                    if j not in pending:
                        ro = self._take_prompts(j)
                        pending[j] = (
                            ro,
                            worker.submit(self._rollout, ro, same_tokenizer, self.expected_version("policy")),
                        )
                ro, fut = pending.pop(rec.step + 1)
                with self._phase("wait_rollout", ro.timings):
                    fut.result()

                def before_push(ro=ro):
                    # The next rollouts were submitted with the weights before this step: they keep them (the
                    # staleness stays exactly what was planned, and runs are reproducible). The new weights are
                    # staged meanwhile, so that the push after the generation only applies them.
                    if (
                        self.cfg.stage_weights
                        and self._stage_ok
                        and not all(nxt.generated.is_set() for nxt, _ in pending.values())
                    ):
                        self._stage(ro)
                    with self._phase("wait_generation", ro.timings):
                        for nxt, nxt_fut in pending.values():
                            # (a rollout that ended early sets `generated` too; the checks only guard against a hang)
                            while not nxt.generated.wait(1.0):
                                if nxt_fut.done() or self.stop_requested.is_set():
                                    break

                self._train(ro, before_push)
            return True
        finally:
            worker.shutdown(wait=False, cancel_futures=True)

    def _stage(self, ro: Rollout) -> None:
        """PushWeights(stage_only): the replicas receive the new weights while they generate. Best effort: the
        push that follows sends them in full to any replica that does not hold them staged."""
        try:
            with self._phase("stage_weights", ro.timings):
                staged = self._push(budget=RETURN_CHECK_BUDGET_S, stage_only=True).staged
        except (grpc.RpcError, RunFailed) as err:  # (the phase is not recorded then)
            # FAILED_PRECONDITION: a replica predates staging (it applied the weights at once)
            staged = not (isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.FAILED_PRECONDITION)
            _log.warning(
                "weight_staging_failed",
                run_id=self.record.run_id,
                step=ro.step,
                error=str(err.details() if isinstance(err, grpc.RpcError) else err),
            )
        if not staged:  # a learner that predates staging answers with a full push
            self._stage_ok = False
            _log.warning(
                "weight_staging_off",
                run_id=self.record.run_id,
                step=ro.step,
                reason="the learner or a policy replica does not stage weights",
            )

    def _train(self, ro: Rollout, before_push=None) -> None:
        """TrainStep on ro, PushWeights, then the step's metrics line and run state."""
        rec = self.record
        step, samples, scores, timings = ro.step, ro.samples, ro.scores, ro.timings
        trained_on = rec.policy_version  # the weights the learner holds before this step
        experiences = [
            learner_pb2.Experience(
                prompt_token_ids=s.prompt_token_ids,
                response_token_ids=s.token_ids,
                rollout_logprobs=s.logprobs,
                reference_logprobs=r,
                score=sc,
                policy_version=s.weight_version,
                finish_reason=s.finish_reason,
            )
            for (_, s), r, sc in zip(samples, ro.ref, scores)
        ]
        learner = learner_pb2_grpc.LearnerServiceStub(self.roles.learner)
        with self._phase("train", timings):
            req = learner_pb2.TrainStepRequest(
                step=step,
                experiences=experiences,
                rollout_logprobs_exact=self._exact,
                rollout_temperature=self.cfg.sampling.temperature,
            )
            resp = self.roles.call("TrainStep", self.roles.learner, lambda t: learner.TrainStep(req, timeout=t))
        if before_push is not None:
            before_push()
        with self._phase("sync_weights", timings):
            push = self._push()
        now = time.time()
        n_tokens = sum(len(s.token_ids) for _, s in samples)
        versions = [s.weight_version for _, s in samples]
        rollout_version = min(versions) if versions else 0
        iteration_seconds = now - self._last_step_time
        self._last_step_time = now
        row = {
            "step": step,
            "mean_score": statistics.fmean(scores),
            **step_metrics.train_stats(resp.stats),
            "replayed": resp.replayed,
            "policy_version": push.version,
            "rollout_policy_version": rollout_version,
            # Versions between the weights that sampled and those trained on (0: on-policy).
            "staleness": max(0, trained_on - rollout_version) if versions else 0,
            "response_tokens": n_tokens,
            "mean_response_tokens": n_tokens / max(1, len(samples)),
            "iteration_seconds": iteration_seconds,
            "tokens_per_second": n_tokens / max(1e-9, iteration_seconds),
            "weight_sync_bytes": push.bytes_per_replica,
            # Replicas whose push only applied weights staged during the generation (run.stage_weights).
            "weights_committed_replicas": push.committed_replicas,
            "phase_seconds": timings,
            "sampler": {"epoch": ro.sampler_after.epoch, "position": ro.sampler_after.position},
            "sampler_before": {"epoch": ro.sampler_before.epoch, "position": ro.sampler_before.position},
            "time": now,
        }
        row.update(self._step_extras(samples))
        self.log.append(row)
        rec.step = step
        rec.policy_version = push.version
        # The sampler after this step's prompts (async runs have taken later steps' too: those are taken again
        # after a restart).
        rec.sampler_epoch, rec.sampler_position = ro.sampler_after.epoch, ro.sampler_after.position
        rec.latest_metrics = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        rec.save()
        m = self.metrics
        m.steps.inc()
        m.rollout_tokens.inc(n_tokens)
        m.step.set(step)
        m.mean_score.set(row["mean_score"])
        m.kl.set(row["reference_kl"])
        m.policy_lag.set(push.version - rollout_version - 1 if versions else 0)
        _log.info(
            "step_completed",
            run_id=rec.run_id,
            step=step,
            mean_score=round(row["mean_score"], 4),
            reference_kl=row["reference_kl"],
            seconds=round(iteration_seconds, 3),
            staleness=row["staleness"],
            replayed=resp.replayed,
        )
