"""alignd.rm_breakdown: a hand-computed case and invariants."""

from __future__ import annotations

import random

import pytest

from alignd.rm_breakdown import Task, breakdown


def test_hand_computed_three_completions():
    # Pairs (0,1), (0,2), (1,2). Labeler a prefers 0 > 2 > 1, b 2 > 0 > 1; the RM 0 > 2 > 1; gold ties 0 and 1.
    t = Task(rm_scores=[3.0, 1.0, 2.0], gold_scores=[0.5, 0.5, -0.2], rankings={"a": [0, 2, 1], "b": [2, 0, 1]})
    got = breakdown([t])
    acc = {k: (v["accuracy"], v["n"]) for k, v in got.items() if isinstance(v, dict)}
    assert got["pairs"] == 3 and got["gold_tie_fraction"] == pytest.approx(1 / 3)
    assert acc["rm_vs_labeler"] == (1.0, 3)
    assert acc["gold_vs_labeler"] == (0.5, 3)  # a tie (half), agree on (0,2), disagree on (1,2)
    assert acc["rm_vs_labeler_gold_tied"] == (1.0, 1) and acc["rm_vs_labeler_gold_untied"] == (1.0, 2)
    assert acc["rm_vs_gold"] == (0.5, 2) and acc["labeler_vs_gold"] == (0.5, 2)
    assert acc["rm_vs_labeler_when_labelers_agree"] == (1.0, 2)
    assert acc["labelers_agreement"][0] == pytest.approx(2 / 3)
    # Against b's labels (b: 0>1, 2>0, 2>1; the RM: 0>1, 0>2, 2>1): two of three.
    assert breakdown([t], labeler="b")["rm_vs_labeler"]["accuracy"] == pytest.approx(2 / 3)


def test_an_rm_equal_to_gold_reaches_the_ceiling_and_noise_free_labels_are_gold():
    rng = random.Random(0)
    tasks = []
    for _ in range(200):
        gold = [rng.choice([-1.0, 0.0, 0.5, 1.0]) for _ in range(4)]
        noisy = sorted(range(4), key=lambda c: -(gold[c] + rng.gauss(0, 0.6)))
        clean = sorted(range(4), key=lambda c: (-gold[c], rng.random()))
        tasks.append(Task(rm_scores=gold, gold_scores=gold, rankings={"a": noisy, "b": clean}))
    got = breakdown(tasks)
    assert got["rm_vs_gold"]["accuracy"] == 1.0
    assert got["rm_vs_labeler"]["accuracy"] == got["gold_vs_labeler"]["accuracy"] < 1.0
    clean = breakdown(tasks, labeler="b")
    assert clean["labeler_vs_gold"]["accuracy"] == 1.0 and clean["rm_vs_labeler_gold_untied"]["accuracy"] == 1.0
    assert clean["rm_vs_labeler_gold_tied"]["accuracy"] == 0.5  # the RM ties where gold ties: half each
    assert got["pairs"] == 200 * 6


def test_bad_tasks_are_refused():
    with pytest.raises(ValueError, match="not a permutation"):
        breakdown([Task([1.0, 2.0], [0.0, 1.0], {"a": [0, 0]})])
    with pytest.raises(ValueError, match="2 RM scores and 3 gold"):
        breakdown([Task([1.0, 2.0], [0.0, 1.0, 2.0], {"a": [0, 1]})])
    empty = breakdown([])
    assert empty["pairs"] == 0 and empty["rm_vs_gold"] == {"accuracy": None, "n": 0}


def test_the_pipeline_reads_back_rankings_whose_texts_hold_unicode_line_breaks(tmp_path):
    """Completions may carry U+2028 and friends unescaped (write_jsonl_atomic writes UTF-8): str.splitlines would
    cut such a record in two (a SmolLM2 run failed so); the pipeline's reader splits at newlines only."""
    from alignd.data import write_jsonl_atomic
    from alignd.services.coordinator.runs import read_jsonl

    recs = [
        {"prompt": "Call me\u2028Ishmael", "completions": ["a\u2029b", "c\x85d\x1ce"], "ranking": [1, 0]},
        {"prompt": "second", "completions": ["x", "y"], "ranking": [0, 1]},
    ]
    write_jsonl_atomic(tmp_path / "r.jsonl", recs)
    assert read_jsonl(tmp_path / "r.jsonl") == recs
