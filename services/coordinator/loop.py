"""The PPO loop of one run: the coordinator's driver, one timed phase at a time (rollouts.py makes the rollouts,
weight_sync.py moves the weights, step_metrics.py records the step).

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

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import grpc

from alignd.config import PPORunConfig
from alignd.runtime.logging import get_logger
from alignd.services.coordinator import step_metrics
from alignd.services.coordinator.clients import RoleClients
from alignd.services.coordinator.errors import RunFailed, RunStopped
from alignd.services.coordinator.rollouts import Rollout, Rollouts
from alignd.services.coordinator.runs import MetricsLog, RunRecord
from alignd.services.coordinator.step_metrics import PHASES, timed_phase
from alignd.services.coordinator.tracking import Tracker
from alignd.services.coordinator.weight_sync import PolicyPushPlan, VersionPlan, WeightSync
from alignd.v1 import learner_pb2, learner_pb2_grpc

__all__ = ["PHASES", "PPORun", "RunLoop", "RunThread"]

_log = get_logger("alignd.coordinator.loop")


def rollouts_exact(sampling, dtypes: set[str], engines: set[tuple[str, str]]) -> bool:
    """Whether the rollouts' log-probs are the learner's own (ppo.old_logprobs: auto takes them): untruncated
    sampling, every policy and the learner in float32, and no policy on vLLM on a GPU. They are then within the 1e-4
    alignd's engines are held to; vLLM on CPU is too (bench/results/vllm_logprobs.json: 3.2e-5 at most on SmolLM2),
    vLLM on GPUs, with other kernels, is not measured to be, and the learner recomputes (docs/vllm.md, "Log-probs").
    `engines`: (ModelInfo.engine, ModelInfo.device) of each policy replica."""
    vllm_on_gpu = any(engine == "vllm" and not device.startswith("cpu") for engine, device in engines)
    untruncated = sampling.temperature > 0 and sampling.top_k == 0 and sampling.top_p >= 1.0
    return untruncated and dtypes == {"float32"} and not vllm_on_gpu


class RunLoop:
    """The PPO steps of one run: rollouts, TrainStep, PushWeights, the step's metrics row and run state."""

    def __init__(
        self,
        record: RunRecord,
        run_cfg: PPORunConfig,
        roles: RoleClients,
        *,
        metrics,
        plan: VersionPlan | None = None,
        skip_bad: bool = False,
        rollout_texts: bool = False,
        step_extras=None,
    ) -> None:
        """plan: which weights each role must serve (a PPO run's: PolicyPushPlan); rollout_texts: samples come back
        with their texts even when the reward role scores token ids; step_extras(samples) -> more figures for
        each step's metrics row (the pipeline's gold judge)."""
        self.record = record
        self.cfg = run_cfg
        self.roles = roles
        self.metrics = metrics
        self.stop_requested = threading.Event()
        self.log = MetricsLog(record.path / "metrics.jsonl")
        self.sync = WeightSync(record, roles, metrics, plan=plan or PolicyPushPlan(record))
        self.rollouts = Rollouts(
            record, run_cfg, roles, metrics=metrics, sync=self.sync, skip_bad=skip_bad, texts=rollout_texts
        )
        self.step_extras = step_extras or (lambda samples: {})
        # TensorBoard / MLflow / W&B (run.tracking); FailedPrecondition here when a backend's package is missing.
        self.tracker = Tracker(record.path, run_cfg.tracking, roles.cfg.tracking, run_name=record.run_id)
        # Whether the rollouts' log-probs are the learner's own, so it need not recompute them (ppo.old_logprobs);
        # settled with the roles' infos at the start of each run (check_tokenizers).
        self._exact = False
        self._last_step_time = time.time()

    def close(self) -> None:
        self.rollouts.close()
        self.tracker.close()

    def check_tokenizers(self) -> bool:
        """True when the reward model shares the policy's tokenizer and chat template (then scores use token ids).
        Also settles
        whether the rollouts' log-probs are exact (self._exact), from the same answers."""
        pol = self.roles.info(self.roles.policy[0])
        dtypes = {pol.dtype, self.roles.info(self.roles.learner).dtype}
        engines = {(pol.engine, pol.device)}
        for ch in self.roles.policy[1:] + self.roles.reference:
            other = self.roles.info(ch)
            if other.tokenizer_hash != pol.tokenizer_hash:
                raise RunFailed(f"{other.role} {other.model_name} tokenizes differently from the policy")
            if other.role == "policy":
                dtypes.add(other.dtype)
                engines.add((other.engine, other.device))
        s = self.cfg.sampling
        # Untruncated sampling, policy and learner in fp32 (in bf16 the cached decoding and the training forward
        # differ by ~1e-2 in log-prob): see rollouts_exact.
        self._exact = rollouts_exact(s, dtypes, engines)
        rew = self.roles.info(self.roles.reward[0])
        # Token ids carry the policy's rendering of a prompt; a reward role with another chat template is sent the
        # conversation and reply instead, and renders them itself (docs/chat.md).
        return (rew.tokenizer_hash, rew.chat_template_sha256) == (pol.tokenizer_hash, pol.chat_template_sha256)

    # -- steps ---------------------------------------------------------------
    def steps(self, end: int, same_tokenizer: bool) -> bool:
        """PPO steps rec.step+1 .. end; False when a stop was requested first. On-policy: each step's rollouts are
        generated with the weights of the step before. Async (run.async_rollouts): see _async_steps."""
        rec = self.record
        self._last_step_time = time.time()
        if self.cfg.async_rollouts:
            return self._async_steps(end, same_tokenizer)
        while rec.step < end:
            if self.stop_requested.is_set():
                return False
            ro = self.rollouts.take_prompts(rec.step + 1)
            self.train(self.rollouts.make(ro, same_tokenizer, self.sync.expected_version("policy")))
        return True

    def _async_steps(self, end: int, same_tokenizer: bool) -> bool:
        """The rollouts of the next max_staleness steps are generated, scored and given reference log-probs while
        the learner trains; a step's samples come from weights at most max_staleness versions old (never across
        `end`, where the pipeline retrains the reward model)."""
        rec = self.record
        pending: dict[int, tuple[Rollout, Future]] = {}
        # Rollouts run one at a time, in step order (the policy serves one generation at a time anyway).
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        try:
            while rec.step < end:
                if self.stop_requested.is_set():
                    return False
                # Step j's rollout may start once the weights of step j - 1 - max_staleness are pushed.
                for j in range(rec.step + 1, min(end, rec.step + 1 + self.cfg.max_staleness) + 1):
                    if j not in pending:
                        ro = self.rollouts.take_prompts(j)
                        version = self.sync.expected_version("policy")
                        pending[j] = (ro, worker.submit(self.rollouts.make, ro, same_tokenizer, version))
                ro, fut = pending.pop(rec.step + 1)
                with timed_phase(self.metrics, "wait_rollout", ro.timings):
                    fut.result()
                self.train(ro, before_push=lambda ro=ro: self._before_push(ro, pending))
            return True
        finally:
            worker.shutdown(wait=False, cancel_futures=True)

    def _before_push(self, ro: Rollout, pending: dict[int, tuple[Rollout, Future]]) -> None:
        """The next rollouts were submitted with the weights before this step: they keep them (the staleness stays
        exactly what was planned, and runs are reproducible), so the push waits for their generation. The new
        weights are staged meanwhile, so that the push after the generation only applies them."""
        if (
            self.cfg.stage_weights
            and self.sync.stage_ok
            and not all(nxt.generated.is_set() for nxt, _ in pending.values())
        ):
            self.sync.stage(ro.step, ro.timings)
        with timed_phase(self.metrics, "wait_generation", ro.timings):
            for nxt, nxt_fut in pending.values():
                # (a rollout that ended early sets `generated` too; the checks only guard against a hang)
                while not nxt.generated.wait(1.0):
                    if nxt_fut.done() or self.stop_requested.is_set():
                        break

    def train(self, ro: Rollout, before_push=None) -> None:
        """TrainStep on ro, PushWeights, then the step's metrics line and run state."""
        rec = self.record
        trained_on = rec.policy_version  # the weights the learner holds before this step
        with timed_phase(self.metrics, "train", ro.timings):
            resp = self._train_step(ro)
        if before_push is not None:
            before_push()
        with timed_phase(self.metrics, "sync_weights", ro.timings):
            push = self.sync.push()
        now = time.time()
        iteration_seconds, self._last_step_time = now - self._last_step_time, now
        row = step_metrics.step_row(ro, resp, push, trained_on=trained_on, iteration_seconds=iteration_seconds, now=now)
        row.update(self.step_extras(ro.samples))
        self.log.append(row)
        self.tracker.step_metrics(ro.step, row)
        rec.step = ro.step
        rec.policy_version = push.version
        # The sampler after this step's prompts (async runs have taken later steps' too: those are taken again
        # after a restart).
        rec.sampler_epoch, rec.sampler_position = ro.sampler_after.epoch, ro.sampler_after.position
        rec.latest_metrics = step_metrics.numeric(row)
        rec.save()
        step_metrics.export(self.metrics, row, sampled=bool(ro.samples))
        _log.info(
            "step_completed",
            run_id=rec.run_id,
            step=ro.step,
            mean_score=round(row["mean_score"], 4),
            reference_kl=row["reference_kl"],
            seconds=round(iteration_seconds, 3),
            staleness=row["staleness"],
            replayed=resp.replayed,
        )

    def _train_step(self, ro: Rollout) -> learner_pb2.TrainStepResponse:
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
            for (_, s), r, sc in zip(ro.samples, ro.ref, ro.scores)
        ]
        req = learner_pb2.TrainStepRequest(
            step=ro.step,
            experiences=experiences,
            rollout_logprobs_exact=self._exact,
            rollout_temperature=self.cfg.sampling.temperature,
        )
        learner = learner_pb2_grpc.LearnerServiceStub(self.roles.learner)
        return self.roles.call("TrainStep", self.roles.learner, lambda t: learner.TrainStep(req, timeout=t))


class RunThread(threading.Thread):
    """The thread of one run: body() over a RunLoop, then how the run ended, recorded: succeeded, stopped
    (a stop request, or RunStopped from any stage) or failed (with the stage and the error)."""

    def __init__(self, loop: RunLoop) -> None:
        super().__init__(name=f"run-{loop.record.run_id}", daemon=True)
        self.loop = loop
        self.record = loop.record
        self.metrics = loop.metrics
        self.stop_requested = loop.stop_requested

    def body(self) -> str:
        """The run's work; returns how it ended ("succeeded" or "stopped") unless it raises."""
        raise NotImplementedError

    def run(self) -> None:
        rec = self.record
        error = ""
        try:
            rec.state = "running"
            rec.save()
            self.loop.log.truncate_after(rec.step)
            self.loop.tracker.run_config(rec.config_yaml)
            state = self.body()
        except RunStopped as stop:
            state = "stopped"
            _log.info("run_stopped", run_id=rec.run_id, stage=rec.stage, step=rec.step, where=str(stop))
        except Exception as exc:  # noqa: BLE001 - the run fails with a message; the coordinator keeps serving
            state = "failed"
            detail = (
                f"{exc.code().name}: {exc.details()}"
                if isinstance(exc, grpc.RpcError)
                else f"{type(exc).__name__}: {exc}"
            )
            error = f"{rec.stage}: {detail}"
            _log.error("run_failed", run_id=rec.run_id, stage=rec.stage, error=error, exc_info=exc)
        # Durable before GetRun shows it: a caller that sees the run ended finds state.json saying so.
        replace(rec, state=state, error=error or rec.error).save()
        rec.state, rec.error = state, error or rec.error
        self.metrics.runs.labels(rec.state).inc()
        _log.info("run_ended", run_id=rec.run_id, state=rec.state, step=rec.step)
        self.loop.close()


class PPORun(RunThread):
    """A plain PPO run (kind: ppo): its steps against the reward model the reward role serves."""

    def __init__(self, record: RunRecord, run_cfg: PPORunConfig, roles: RoleClients, *, metrics) -> None:
        super().__init__(RunLoop(record, run_cfg, roles, metrics=metrics))

    def body(self) -> str:
        rec = self.record
        same_tokenizer = self.loop.check_tokenizers()
        _log.info("run_started", run_id=rec.run_id, step=rec.step, total_steps=rec.total_steps)
        return "succeeded" if self.loop.steps(rec.total_steps, same_tokenizer) else "stopped"
