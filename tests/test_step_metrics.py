"""Step statistics are defined once, by alignd.v1.TrainStats: the learner's StepStats has its fields one for one,
the learner's gauges and the coordinator's metrics row take them by name."""

from __future__ import annotations

import dataclasses

from alignd.services.coordinator import step_metrics
from alignd.services.learner import learner, servicer
from alignd.services.learner.ppo import StepStats
from alignd.v1 import learner_pb2

FIELDS = [f.name for f in learner_pb2.TrainStats.DESCRIPTOR.fields]


def test_step_stats_are_train_stats_field_for_field():
    assert [f.name for f in dataclasses.fields(StepStats)] == FIELDS
    stats = StepStats(
        **{name: i + 1 for i, name in enumerate(FIELDS) if name != "old_logprobs_from_rollout"},
        old_logprobs_from_rollout=True,
    )
    pb = learner.to_pb(stats)
    assert {name: getattr(pb, name) for name in FIELDS} == dataclasses.asdict(stats)


def test_metrics_row_and_gauges_take_every_statistic():
    pb = learner_pb2.TrainStats(**{f: i + 1 for i, f in enumerate(FIELDS) if f != "old_logprobs_from_rollout"})
    row = step_metrics.train_stats(pb)
    # Every statistic but those the coordinator measures end to end reaches metrics.jsonl, with its value.
    assert set(row) == set(FIELDS) - set(step_metrics.MEASURED_BY_COORDINATOR)
    assert all(row[f] == getattr(pb, f) for f in row)
    assert {"reference_kl", "learning_rate", "value_clip_fraction", "updates_applied"} <= set(row)
    # The learner exports every real-valued one as alignd_learner_step_stat{stat=...}; the counts are counters.
    assert "learning_rate" in servicer.GAUGED_STATS and "updates_skipped" not in servicer.GAUGED_STATS
    assert set(servicer.GAUGED_STATS) | {"updates_applied", "updates_skipped", "old_logprobs_from_rollout"} == set(
        FIELDS
    )
