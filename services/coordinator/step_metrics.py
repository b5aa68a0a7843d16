"""The metrics row of one PPO step (RUN_DIR/metrics.jsonl), from what the learner reports and what the coordinator
measures."""

from __future__ import annotations

from alignd.v1 import learner_pb2

# TrainStats fields the coordinator measures itself, end to end (the learner's are of its own part of the step).
MEASURED_BY_COORDINATOR = ("mean_score", "tokens_per_second")


def train_stats(stats: learner_pb2.TrainStats) -> dict:
    """Every field of the learner's TrainStats but those the coordinator measures, by name: a statistic added to
    the proto reaches metrics.jsonl without another edit."""
    return {
        f.name: getattr(stats, f.name)
        for f in learner_pb2.TrainStats.DESCRIPTOR.fields
        if f.name not in MEASURED_BY_COORDINATOR
    }
