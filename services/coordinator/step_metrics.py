"""The metrics of a run's steps: the timed phases, and the row of one PPO step (RUN_DIR/metrics.jsonl) from what
the learner reports and what the coordinator measures, also exported as the coordinator's gauges."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

from alignd.v1 import learner_pb2

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

# TrainStats fields the coordinator measures itself, end to end (the learner's are of its own part of the step).
MEASURED_BY_COORDINATOR = ("mean_score", "tokens_per_second")


@contextmanager
def timed_phase(metrics, name: str, timings: dict[str, float]):
    """Times the block as phase `name` of a step: into timings[name] and the phase histogram. A block that raises
    records nothing."""
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0
    metrics.phase_seconds.labels(name).observe(timings[name])


def train_stats(stats: learner_pb2.TrainStats) -> dict:
    """Every field of the learner's TrainStats but those the coordinator measures, by name: a statistic added to
    the proto reaches metrics.jsonl without another edit."""
    return {
        f.name: getattr(stats, f.name)
        for f in learner_pb2.TrainStats.DESCRIPTOR.fields
        if f.name not in MEASURED_BY_COORDINATOR
    }


def step_row(
    ro,
    resp: learner_pb2.TrainStepResponse,
    push: learner_pb2.PushWeightsResponse,
    *,
    trained_on: int,
    iteration_seconds: float,
    now: float,
) -> dict:
    """The metrics row of step ro.step (a rollouts.Rollout), trained on the weights of version `trained_on`."""
    samples = ro.samples
    n_tokens = sum(len(s.token_ids) for _, s in samples)
    versions = [s.weight_version for _, s in samples]
    rollout_version = min(versions) if versions else 0
    return {
        "step": ro.step,
        "mean_score": statistics.fmean(ro.scores),
        **train_stats(resp.stats),
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
        "phase_seconds": ro.timings,
        "sampler": {"epoch": ro.sampler_after.epoch, "position": ro.sampler_after.position},
        "sampler_before": {"epoch": ro.sampler_before.epoch, "position": ro.sampler_before.position},
        "time": now,
    }


def numeric(row: dict) -> dict:
    """The row's numbers (GetRun's latest_metrics)."""
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def export(metrics, row: dict, *, sampled: bool) -> None:
    """The step's gauges and counters (the coordinator's Prometheus metrics); sampled: the step had samples."""
    metrics.steps.inc()
    metrics.rollout_tokens.inc(row["response_tokens"])
    metrics.step.set(row["step"])
    metrics.mean_score.set(row["mean_score"])
    metrics.kl.set(row["reference_kl"])
    metrics.policy_lag.set(row["policy_version"] - row["rollout_policy_version"] - 1 if sampled else 0)
