"""Rewards and advantages: the per-token rewards of InstructGPT eq. 2 (the KL penalty on every token, the RM
score once) and generalised advantage estimation (GAE) with its returns.

The references ([InstructGPT], [PPO], [GAE], [Ziegler], [KL-approx]) and the tensor
conventions are in the package docstring (`alignd.rlmath`).
"""

from __future__ import annotations

import torch

from alignd.rlmath.masks import SCORE_POSITIONS, ScorePosition, _check_choice, response_lengths


def per_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    score_position: ScorePosition = "last",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * KL_t on every response token, plus the RM score once.

    [InstructGPT] eq. 2 (following [Ziegler] section 2.2): the reward of a
    response is r(x, y) - beta log(pi(y|x) / pi_SFT(y|x)); spread over tokens
    the KL term is paid per token and the scalar score once, at
    `score_position`:
    - "last": the last real response token (InstructGPT/OpenRLHF).
    - "eos_plus_one": one past the last real token if that fits inside T,
      else the last token (TRL's `actual_end`). Use
      `value_mask_for(mask, "eos_plus_one")` as GAE's value mask with it, so
      that the score position carries a value.

    scores: (B,) RM score per response. kl: (B, T) per-token KL estimate
    (`kl_estimate`). mask: (B, T) real response tokens, right padded.
    Returns (rewards (B, T), non_score_rewards (B, T)); both 0 on padding,
    except the score itself under "eos_plus_one".
    Raises ValueError for an empty response under "last" (no token to carry
    the score); under "eos_plus_one" an empty row gets its score at t = 0,
    as in TRL.
    """
    _check_choice("score_position", score_position, SCORE_POSITIONS)
    lengths = response_lengths(mask)  # (B,)
    B, T = kl.shape
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    non_score = torch.where(mask.bool(), -kl_coef * kl, zero)  # (B, T)
    if score_position == "last":
        if (lengths == 0).any():
            raise ValueError("score_position='last' needs at least one response token in every row")
        end = lengths - 1  # (B,) last real token
    else:
        end = torch.where(lengths < T, lengths, lengths - 1)  # (B,) TRL's actual_end
    rows = torch.arange(B, device=kl.device)  # (B,)
    rewards = non_score.clone()  # (B, T)
    rewards[rows, end] += scores.to(kl.dtype)  # (B, T) score added once per row
    return rewards, non_score


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
    value_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, [GAE] eq. 16, computed backwards over T.

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = sum_l (gamma lam)^l delta_{t+l};
    returns R_t = A_t + V_t are the value targets.

    Padding: `value_mask` (default: `mask`) marks the positions that carry a
    value and a reward. Values outside it are taken as 0 (whatever the input
    holds there), so the step after the last value-masked position is
    terminal with V = 0 and the advantages and returns outside `value_mask`
    are 0. Rewards outside `value_mask` must be 0 (ValueError otherwise, as
    a reward there would be silently lost; with score_position="eos_plus_one"
    pass `value_mask=value_mask_for(mask, "eos_plus_one")`). `mask` (the
    policy's tokens) is not otherwise used: whitening and the policy loss
    use it. Given TRL's masks (mask = ~padding_mask, value_mask =
    ~padding_mask_p1) this reproduces TRL's loop exactly.

    rewards, values, mask, value_mask: (B, T). Returns (advantages (B, T),
    returns (B, T)), not whitened.
    """
    vm = (mask if value_mask is None else value_mask).bool()  # (B, T)
    response_lengths(vm)  # right padding check
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    if torch.where(vm, zero, rewards).any():
        raise ValueError(
            "rewards must be 0 outside value_mask (a score one past the last token "
            "needs value_mask=value_mask_for(mask, 'eos_plus_one'))"
        )
    values = torch.where(vm, values, zero)  # (B, T) V = 0 beyond the value mask
    B, T = values.shape
    next_values = torch.cat([values[:, 1:], values.new_zeros(B, 1)], dim=1)  # (B, T) V_{t+1}
    deltas = rewards + gamma * next_values - values  # (B, T) TD residuals
    lastgaelam = values.new_zeros(B)  # (B,) A_{t+1}
    advantages_reversed = []
    for t in reversed(range(T)):
        lastgaelam = deltas[:, t] + gamma * lam * lastgaelam  # (B,) A_t
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = advantages + values  # (B, T)
    return advantages, returns
