"""What a reward model gets wrong on held-out rankings, pair by pair (issue 18).

Pure Python; no torch, no gRPC. A task is one prompt's K completions with the
RM's scores, the gold judge's scores and each labeler's ranking (best first).
Every one of its C(K, 2) pairs is judged by the RM, by gold and by the
labelers; `breakdown` pools the pairs of all tasks into accuracies, each with
its pair count:

- `rm_vs_labeler`: the RM against the labels it was trained on (the first
  labeler's), over every pair: the accuracy the learner reports.
- `rm_vs_labeler_gold_untied` / `rm_vs_labeler_gold_tied`: the same, on pairs
  the gold judge orders / scores equally (on a tied pair the labelers flip a
  coin, so nobody can beat 50% there).
- `rm_vs_labeler_when_labelers_agree`: on pairs every labeler orders alike.
- `rm_vs_gold`: the RM against the gold judge itself, on pairs gold orders.
- `gold_vs_labeler`: a perfect RM (the gold judge) against the same labels,
  over every pair (a gold tie counts half): the ceiling of `rm_vs_labeler`.
- `labeler_vs_gold`: the training labeler against gold on untied pairs: how
  much of the labels is signal.
- `labelers_agreement`: the labelers with each other (all pairs; what the
  pipeline reports as the labelers' agreement, on these tasks only).
- `gold_tie_fraction`: the share of pairs gold scores equally.

A pair the RM scores equally counts half, as a tie does in a win rate.
Accuracies are null where no pair qualifies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

__all__ = ["Task", "breakdown", "KEYS"]

KEYS = (
    "rm_vs_labeler",
    "rm_vs_labeler_gold_untied",
    "rm_vs_labeler_gold_tied",
    "rm_vs_labeler_when_labelers_agree",
    "rm_vs_gold",
    "gold_vs_labeler",
    "labeler_vs_gold",
    "labelers_agreement",
)


@dataclass(frozen=True)
class Task:
    rm_scores: Sequence[float]  # (K,)
    gold_scores: Sequence[float]  # (K,)
    rankings: Mapping[str, Sequence[int]]  # labeler -> completion indices, best first (the first: the trained one)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _agree(a: int, b: int) -> float:
    """1 when two preferences (+1/-1/0) agree, 0 when opposite, 0.5 when either is a tie."""
    if a == 0 or b == 0:
        return 0.5
    return 1.0 if a == b else 0.0


def breakdown(tasks: Sequence[Task], labeler: str | None = None) -> dict:
    """Pooled pair accuracies (see the module docstring); `labeler`: the one the RM trained on (default: each
    task's first ranking)."""
    sums = {k: [0.0, 0] for k in KEYS}
    pairs = tied = 0

    def add(key: str, v: float) -> None:
        sums[key][0] += v
        sums[key][1] += 1

    for t in tasks:
        k = len(t.rm_scores)
        if len(t.gold_scores) != k:
            raise ValueError(f"a task has {k} RM scores and {len(t.gold_scores)} gold scores")
        names = list(t.rankings)
        if not names:
            continue
        main = labeler if labeler is not None else names[0]
        if main not in t.rankings:
            continue
        ranks = {}
        for name, order in t.rankings.items():
            if sorted(order) != list(range(k)):
                raise ValueError(f"labeler {name!r}: ranking {list(order)} is not a permutation of 0..{k - 1}")
            ranks[name] = {c: r for r, c in enumerate(order)}  # completion -> rank (0 best)
        for i, j in combinations(range(k), 2):
            pairs += 1
            label = {n: _sign(r[j] - r[i]) for n, r in ranks.items()}  # +1: i preferred
            rm = _sign(t.rm_scores[i] - t.rm_scores[j])
            gold = _sign(t.gold_scores[i] - t.gold_scores[j])
            lab = label[main]
            add("rm_vs_labeler", _agree(rm, lab))
            add("gold_vs_labeler", _agree(gold, lab))
            if gold == 0:
                tied += 1
                add("rm_vs_labeler_gold_tied", _agree(rm, lab))
            else:
                add("rm_vs_labeler_gold_untied", _agree(rm, lab))
                add("rm_vs_gold", _agree(rm, gold))
                add("labeler_vs_gold", _agree(lab, gold))
            others = [label[n] for n in names if n != main]
            if others:
                if all(o == lab for o in others):
                    add("rm_vs_labeler_when_labelers_agree", _agree(rm, lab))
                for o in others:
                    add("labelers_agreement", 1.0 if o == lab else 0.0)
    out: dict = {"pairs": pairs, "gold_tie_fraction": tied / pairs if pairs else None}
    for key, (s, n) in sums.items():
        out[key] = {"accuracy": s / n if n else None, "n": n}
    return out
