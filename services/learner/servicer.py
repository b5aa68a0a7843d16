"""alignd.v1.LearnerService: validation and conversion around `Learner`.

Under torchrun this runs on rank 0 only (ranks.py): every request is
validated here, before `Learner` broadcasts the state-changing ones
(TrainStep, ResetPolicy, SaveCheckpoint) to the other ranks; PushWeights,
EvaluateTextLoss, TrainSFT and TrainRewardModel run on rank 0 alone.
"""

from __future__ import annotations

import math
import re
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from alignd.models.inputs import check_batch, check_ids
from alignd.runtime.client import expand_addresses
from alignd.runtime.errors import FailedPrecondition, InvalidArgument
from alignd.runtime.logging import get_logger
from alignd.runtime.metrics import LATENCY_BUCKETS_SECONDS
from alignd.services.learner.ppo import Batch, collate
from alignd.v1 import learner_pb2, learner_pb2_grpc

_log = get_logger("alignd.learner.servicer")

# The step statistics exported as alignd_learner_step_stat{stat=...}: every real-valued field of TrainStats (the
# counts have counters of their own), so a statistic added to the proto is exported without another edit.
GAUGED_STATS = tuple(f.name for f in learner_pb2.TrainStats.DESCRIPTOR.fields if f.type == f.TYPE_DOUBLE)
CHECKPOINT_TAG = re.compile(r"[A-Za-z0-9._-]{0,64}")


class LearnerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.steps = Counter(
            "alignd_learner_steps_total", "PPO steps applied (replays not counted).", registry=registry
        )
        self.replays = Counter(
            "alignd_learner_step_replays_total", "TrainStep calls answered from the stored result.", registry=registry
        )
        self.skipped_updates = Counter(
            "alignd_learner_skipped_updates_total",
            "Optimizer updates skipped because a loss or gradient was not finite.",
            registry=registry,
        )
        self.step_seconds = Histogram(
            "alignd_learner_step_seconds",
            "Time of one PPO step, in seconds.",
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.tokens = Counter(
            "alignd_learner_trained_tokens_total", "Tokens trained on (prompt + response).", registry=registry
        )
        self.policy_version = Gauge(
            "alignd_learner_policy_version", "Policy version after the last step.", registry=registry
        )
        self.stat = Gauge("alignd_learner_step_stat", "Statistics of the last PPO step.", ["stat"], registry=registry)
        self.push_seconds = Histogram(
            "alignd_learner_weight_push_seconds",
            "Time to push weights to every policy replica, in seconds.",
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.push_bytes = Counter(
            "alignd_learner_weight_push_bytes_total", "Bytes of weights pushed.", registry=registry
        )


def parse_batch(
    request: learner_pb2.TrainStepRequest,
    vocab_size: int,
    max_context: int,
    *,
    pad_id: int,
    temperature: float = 1.0,
    fp32: bool = True,
) -> Batch:
    """Validates every experience (nothing is touched before this passes)."""
    if request.step < 1:
        raise InvalidArgument("step", f"must be >= 1, got {request.step}")
    check_batch(len(request.experiences), "experiences")
    if not (math.isfinite(request.rollout_temperature) and request.rollout_temperature >= 0):
        raise InvalidArgument("rollout_temperature", f"must be a finite number >= 0, got {request.rollout_temperature}")
    prompts, responses, refs, rollouts, scores, versions = [], [], [], [], [], []
    for i, e in enumerate(request.experiences):
        f = f"experiences[{i}]"
        prompt = check_ids(e.prompt_token_ids, vocab_size, f"{f}.prompt_token_ids")
        response = check_ids(e.response_token_ids, vocab_size, f"{f}.response_token_ids")
        if not prompt:
            raise InvalidArgument(f"{f}.prompt_token_ids", "empty prompt")
        if not response:
            raise InvalidArgument(f"{f}.response_token_ids", "empty response")
        if len(prompt) + len(response) > max_context:
            raise InvalidArgument(
                f, f"prompt + response of {len(prompt) + len(response)} tokens exceeds the context of {max_context}"
            )
        for name in ("rollout_logprobs", "reference_logprobs"):
            values = list(getattr(e, name))
            if len(values) != len(response):
                raise InvalidArgument(
                    f"{f}.{name}", f"{len(values)} values for {len(response)} response tokens (arrays must be parallel)"
                )
            for j, v in enumerate(values):
                if not math.isfinite(v):
                    raise InvalidArgument(f"{f}.{name}[{j}]", f"not finite ({v})")
        if e.policy_version >= 1 << 62:
            raise InvalidArgument(f"{f}.policy_version", f"out of range ({e.policy_version})")
        if not math.isfinite(e.score):
            raise InvalidArgument(f"{f}.score", f"not finite ({e.score})")
        prompts.append(prompt)
        responses.append(response)
        refs.append(list(e.reference_logprobs))
        rollouts.append(list(e.rollout_logprobs))
        scores.append(float(e.score))
        versions.append(e.policy_version)
    # rollout_temperature > 0: the rollout log-probs are the sampling policy's (else informational). They stand for
    # the learner's own only at the learner's temperature, and when it computes in fp32 (not bf16 mixed precision,
    # which the coordinator cannot see in the configured dtype).
    behaviour = request.rollout_temperature > 0
    exact = (
        behaviour
        and request.rollout_logprobs_exact
        and fp32
        and math.isclose(request.rollout_temperature, temperature, rel_tol=1e-6)
    )
    return collate(
        prompts,
        responses,
        refs,
        rollout_logprobs=rollouts,
        scores=scores,
        pad_id=pad_id,
        versions=versions if behaviour else None,
        rollout_exact=exact,
    )


# The path fields of each request: they must lie under the learner's roots (alignd.runtime.paths); optional ones may
# be empty.
PATH_FIELDS = {
    "TrainSFT": (
        ("demonstrations_path", True),
        ("validation_path", False),
        ("init_model_dir", False),
        ("output_dir", True),
    ),
    "TrainRewardModel": (
        ("init_model_dir", True),
        ("comparisons_path", True),
        ("validation_path", False),
        ("demonstrations_path", False),
        ("output_dir", True),
    ),
    "ResetPolicy": (("policy_dir", True), ("value_model_dir", False)),
    "EvaluateTextLoss": (("text_path", True),),
}


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    def __init__(self, loaded, metrics: LearnerMetrics, on_version, *, jobs, roots=None) -> None:
        self.loaded = loaded  # Loaded[Learner]
        self.metrics = metrics
        self.on_version = on_version  # keeps ModelService's version gauge in step
        self.jobs = jobs  # services/learner/jobs.Jobs: SFT and RM training
        self.roots = roots  # alignd.runtime.paths.Roots of the paths in requests

    def _paths(self, method: str, request):
        """`request` with each path field resolved under the roots (InvalidArgument naming the field otherwise)."""
        for name, required in PATH_FIELDS[method]:
            value = getattr(request, name)
            if not value:
                if required:
                    raise InvalidArgument(name, "must not be empty")
                continue
            if self.roots is not None:
                setattr(request, name, str(self.roots.check(value, name)))
        return request

    def ResetPolicy(self, request, context):
        learner = self.loaded.get()
        request = self._paths("ResetPolicy", request)
        done = learner.reset(request.policy_dir, request.value_model_dir, request.version)
        self.metrics.policy_version.set(learner.version)
        self.on_version(learner.version)
        return learner_pb2.ResetPolicyResponse(version=learner.version, replayed=not done)

    def TrainSFT(self, request, context):
        self.loaded.get()
        if not request.job_id:
            raise InvalidArgument("job_id", "must not be empty")
        return self.jobs.sft(self._paths("TrainSFT", request))

    def TrainRewardModel(self, request, context):
        self.loaded.get()
        if not request.job_id:
            raise InvalidArgument("job_id", "must not be empty")
        return self.jobs.reward_model(self._paths("TrainRewardModel", request))

    def GetJobProgress(self, request, context):
        if not request.job_id:
            raise InvalidArgument("job_id", "must not be empty")
        return self.jobs.progress.get(request.job_id)

    def TrainStep(self, request, context):
        learner = self.loaded.get()
        h = learner.handle
        cfg = learner.cfg
        batch = parse_batch(
            request,
            h.vocab_size,
            h.max_context,
            pad_id=h.pad_token_id,
            temperature=cfg.ppo.temperature,
            fp32=cfg.model.dtype == "float32" and not cfg.engine.bf16,
        )
        t0 = time.perf_counter()
        resp = learner.train_step(request.step, batch)
        if resp.replayed:
            self.metrics.replays.inc()
            _log.info("step_replayed", step=request.step)
            return resp
        elapsed = time.perf_counter() - t0
        m = self.metrics
        m.steps.inc()
        m.step_seconds.observe(elapsed)
        m.tokens.inc(float(batch.attention_mask.sum()))
        m.skipped_updates.inc(resp.stats.updates_skipped)
        m.policy_version.set(resp.policy_version)
        for field in GAUGED_STATS:
            m.stat.labels(field).set(getattr(resp.stats, field))
        if resp.stats.updates_skipped:
            _log.warning("nonfinite_updates_skipped", step=request.step, skipped=resp.stats.updates_skipped)
        self.on_version(resp.policy_version)
        _log.info(
            "step_applied",
            step=resp.step,
            seconds=round(elapsed, 3),
            mean_score=round(resp.stats.mean_score, 4),
            approx_kl=resp.stats.approx_kl,
            reference_kl=resp.stats.reference_kl,
        )
        return resp

    def EvaluateTextLoss(self, request, context):
        learner = self.loaded.get()
        request = self._paths("EvaluateTextLoss", request)
        return learner.text_loss(request.text_path, request.max_tokens, request.max_blocks)

    def SaveCheckpoint(self, request, context):
        learner = self.loaded.get()
        if not CHECKPOINT_TAG.fullmatch(request.tag):
            raise InvalidArgument(
                "tag", "at most 64 letters, digits, '.', '_' or '-' (it becomes part of a directory name)"
            )
        path, step = learner.save_checkpoint(tag=request.tag)  # every rank writes its shard
        return learner_pb2.SaveCheckpointResponse(path=str(path), step=step)

    def PushWeights(self, request, context):
        learner = self.loaded.get()
        # Every replica behind a headless Service name gets the weights (resolved on each push). A request may
        # choose some of the configured replicas, never another address.
        configured = expand_addresses(list(learner.cfg.policy_addresses))
        if not configured:
            raise FailedPrecondition("no policy replica is configured (policy_addresses)")
        for i, a in enumerate(request.addresses):
            if a not in configured:
                raise InvalidArgument(
                    f"addresses[{i}]",
                    "not one of the policy replicas this learner is configured "
                    "with (policy_addresses); the learner pushes to those only",
                )
        addresses = list(dict.fromkeys(request.addresses)) or configured
        resp = learner.push(addresses, stage_only=request.stage_only)
        self.metrics.push_seconds.observe(resp.duration_seconds)
        self.metrics.push_bytes.inc(resp.bytes_per_replica * len(addresses))
        _log.info(
            "weights_pushed",
            version=resp.version,
            replicas=len(addresses),
            seconds=round(resp.duration_seconds, 3),
            staged=resp.staged,
            committed_replicas=resp.committed_replicas,
        )
        return resp
