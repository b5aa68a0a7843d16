"""Data-parallel reduction of the PPO losses: the same loss however a minibatch is split.

The PPO losses (`rlmath.policy_loss`, `rlmath.value_loss`, the entropy and
`rlmath.lm_loss`) are token-level means over a minibatch:

    L = (1 / N) * sum_{t in minibatch, mask_t} l_t        N = masked tokens of the minibatch

With W data-parallel ranks, rank r holds the rows S_r of the minibatch and
N_r of its N masked tokens. If every rank takes the token mean of its own
rows, L_r = (1 / N_r) sum_{t in S_r} l_t, and the ranks' gradients are
averaged, the result is (1 / W) sum_r L_r: a mean of per-rank means, which
weighs a token by 1 / (W N_r) instead of 1 / N. It differs from L whenever
the ranks hold different numbers of tokens (responses of different lengths,
uneven splits), so the update would depend on the number of ranks.

Normalising every rank by the GLOBAL count instead,

    L_r = (1 / N) sum_{t in S_r} l_t = (N_r / N) * masked_mean_r,

makes the shards add up: sum_r L_r = (1 / N) sum_t l_t = L exactly, for any
partition of the rows (one rank holding everything, empty ranks included).
The gradient is linear, so summing the ranks' gradients gives grad L: the
gradient of the single-process loss. `token_share` computes N_r / N (one
all-reduce of the count); multiplying an `rlmath` token mean by it turns the
mean into the rank's share, so `rlmath` is reused unchanged. Engines whose
all-reduce averages rather than sums (DeepSpeed divides by W) undo the 1 / W
themselves (`DeepSpeedEngine.backward` scales the loss by W).

Statistics reduce the same way: each rank's share of a token mean, summed
over ranks (`DataParallel.all_reduce_sum`), is the minibatch's token mean.

With one rank, N_r = N and the share is exactly 1.0: results are bit for bit
those of the single-process code. This module imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the data-parallel ranks (the default process group)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def of(cls, engine) -> DataParallel:
        """From an engine's `dp_rank` / `dp_world_size` (an engine without them is one process)."""
        return cls(int(getattr(engine, "dp_rank", 0)), int(getattr(engine, "dp_world_size", 1)))

    def shard(self, idx: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """This rank's rows of a minibatch: a contiguous, near-equal slice of `idx`.

        Every rank must run a forward and backward for each minibatch (the
        gradient reduction is collective), so a rank whose slice is empty
        (fewer rows than ranks) gets the first row instead, flagged `empty`:
        its share is 0 (see `token_share`), so that row adds nothing.

        idx: (M,) row indices. Returns (local idx (M_r,), empty).
        """
        if self.world_size == 1:
            return idx, False
        local = idx.tensor_split(self.world_size)[self.rank]  # (M_r,)
        if local.numel() == 0:
            return idx[:1], True
        return local, False

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over ranks (x itself, untouched, with one rank)."""
        if self.world_size == 1:
            return x
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x


def token_share(mask: torch.Tensor, dp: DataParallel, empty: bool = False) -> torch.Tensor:
    """N_r / N: this rank's fraction of the minibatch's masked tokens (all ranks).

    Multiply a token mean over this rank's rows (`rlmath.masked_mean` and the
    losses built on it) by this to get the rank's share of the minibatch's
    token mean; the shares of all ranks sum to that mean (module docstring).
    `empty`: the rank holds a placeholder row (`DataParallel.shard`) and
    counts no tokens. N = 0 (no masked token anywhere) gives nan, as
    `masked_mean` does for an empty mask.

    mask: (M_r, T) this rank's mask. Returns () float32 (exactly 1.0 with one rank).
    """
    if dp.world_size == 1:
        return torch.ones((), device=mask.device)  # () N_r = N
    n_local = mask.bool().sum(dtype=torch.float64) * (0.0 if empty else 1.0)  # ()
    n_global = dp.all_reduce_sum(n_local)  # ()
    return (n_local / n_global).to(torch.float32)  # ()
