"""The reward model's ranking loss (InstructGPT eq. 1): the pairs of a ranking, the loss of one prompt and the
loss of a batch of prompts.

The references ([InstructGPT], [PPO], [GAE], [Ziegler], [KL-approx]) and the tensor
conventions are in the package docstring (`alignd.rlmath`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def ranking_pairs(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """All C(K, 2) (winner, loser) index pairs of a ranking ([InstructGPT] section 3.5).

    ranking: a permutation of 0..K-1 listing completion indices best first,
    K >= 2. Raises ValueError otherwise. Returns pairs in order
    (ranking[i], ranking[j]) for i < j.
    """
    try:
        order = [operator.index(i) for i in ranking]
    except TypeError as exc:
        raise ValueError(f"ranking must be a sequence of ints, got {ranking!r}") from exc
    k = len(order)
    if k < 2:
        raise ValueError(f"a ranking needs at least 2 completions, got K={k}")
    if sorted(order) != list(range(k)):
        raise ValueError(f"ranking must be a permutation of 0..{k - 1} (best first), got {order}")
    return [(order[i], order[j]) for i in range(k) for j in range(i + 1, k)]


def _pairs_of(ranking_or_pairs: Sequence[int] | Sequence[tuple[int, int]], k: int) -> list[tuple[int, int]]:
    """Pairs from a ranking (a permutation of 0..k-1) or from explicit pairs."""
    items = list(ranking_or_pairs)
    if items and all(isinstance(p, (tuple, list)) for p in items):
        pairs = []
        for p in items:
            if len(p) != 2:
                raise ValueError(f"a pair is (winner, loser), got {p!r}")
            win, lose = operator.index(p[0]), operator.index(p[1])
            if not (0 <= win < k and 0 <= lose < k) or win == lose:
                raise ValueError(f"pair {p!r} is not two different indices in 0..{k - 1}")
            pairs.append((win, lose))
        return pairs
    if len(items) != k:
        raise ValueError(f"ranking has {len(items)} entries but there are K={k} rewards")
    return ranking_pairs(items)


def rm_ranking_loss(
    rewards: torch.Tensor,
    ranking_or_pairs: Sequence[int] | Sequence[tuple[int, int]],
) -> torch.Tensor:
    """The RM loss of one prompt, [InstructGPT] eq. 1:
    -1/C(K,2) * sum over pairs log sigmoid(r_w - r_l).

    All pairs of one prompt form one batch element (the paper's fix for
    overfitting). `ranking_or_pairs` is a ranking (permutation, best first)
    or explicit (winner, loser) pairs (then the mean is over those pairs).

    rewards: (K,). Returns ().
    """
    pairs = _pairs_of(ranking_or_pairs, rewards.shape[0])
    winners = torch.tensor([win for win, _ in pairs], device=rewards.device)  # (P,)
    losers = torch.tensor([lose for _, lose in pairs], device=rewards.device)  # (P,)
    return -F.logsigmoid(rewards[winners] - rewards[losers]).mean()  # ()


def rm_loss(
    rewards_list: Sequence[torch.Tensor] | torch.Tensor,
    rankings: Sequence[Sequence[int] | Sequence[tuple[int, int]]],
) -> torch.Tensor:
    """The RM loss of a batch of prompts: the mean over prompts of `rm_ranking_loss`.

    [InstructGPT] eq. 1 with each prompt one batch element; K may differ
    between prompts. Computed in one gather: every pair gets weight
    1 / (n_prompts * n_pairs of its prompt).

    rewards_list: B tensors of shape (K_b,) (or a (B, K) tensor);
    rankings: B rankings or pair lists. Returns ().
    """
    if len(rewards_list) != len(rankings) or len(rankings) == 0:
        raise ValueError(
            f"need one ranking per prompt and at least one prompt; got "
            f"{len(rewards_list)} reward vectors and {len(rankings)} rankings"
        )
    winners: list[int] = []
    losers: list[int] = []
    weights: list[float] = []
    offset = 0
    for r, ranking in zip(rewards_list, rankings, strict=True):
        pairs = _pairs_of(ranking, r.shape[0])
        winners += [offset + win for win, _ in pairs]
        losers += [offset + lose for _, lose in pairs]
        weights += [1.0 / (len(rankings) * len(pairs))] * len(pairs)
        offset += r.shape[0]
    flat = torch.cat(list(rewards_list))  # (sum K_b,)
    dev = flat.device
    margin = flat[torch.tensor(winners, device=dev)] - flat[torch.tensor(losers, device=dev)]  # (P,)
    w = torch.tensor(weights, dtype=flat.dtype, device=dev)  # (P,)
    return -(w * F.logsigmoid(margin)).sum()  # ()
