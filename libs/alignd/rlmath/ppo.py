"""The policy optimisation: PPO's clipped surrogate and clipped value losses, the PPO-ptx objective that adds
the pretraining loss, and the EMA of the policy weights (InstructGPT appendix C.4).

The references ([InstructGPT], [PPO], [GAE], [Ziegler], [KL-approx]) and the tensor
conventions are in the package docstring (`alignd.rlmath`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from alignd.paper import PAPER_DEFAULTS
from alignd.rlmath.masks import masked_mean


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mask: torch.Tensor,
    clip: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate loss, [PPO] eq. 7, as a token-level masked mean.

    weights (B, T), detached: per-token importance weights pi_old / pi_behaviour
    multiplying each token's clipped term (decoupled PPO, Hilton et al. 2022),
    for samples of an older policy than old_logprobs'; None: all 1.

    ratio = pi/pi_old; loss = masked_mean(max(-A ratio, -A clip(ratio, 1-eps, 1+eps)))
    = -masked_mean(min(ratio A, clip(ratio) A)). The log-ratio is zeroed on
    padding before the exp, so padded log-probs never overflow.

    Stats (detached scalars, over masked tokens): "clip_fraction" (the
    clipped term is the larger loss), "approx_kl" (k3 estimate of
    KL(pi_old || pi) from the old samples, [KL-approx]), "approx_kl_k2"
    (0.5 (log ratio)^2, TRL's estimator; TRL averages over all B*T
    positions, padding included, this averages over real tokens),
    "ratio_mean".

    logprobs (with grad), old_logprobs, advantages, mask: (B, T).
    Returns (loss (), stats).
    """
    m = mask.bool()  # (B, T)
    log_ratio = torch.where(m, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    surr = -advantages * ratio  # (B, T)
    surr_clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)  # (B, T)
    per_token = torch.max(surr, surr_clipped)  # (B, T)
    if weights is not None:
        per_token = per_token * weights.detach()
    loss = masked_mean(per_token, m)  # ()
    with torch.no_grad():
        log_r = -log_ratio  # (B, T) log pi_old/pi
        stats = {
            "clip_fraction": masked_mean((surr_clipped > surr).to(logprobs.dtype), m),
            "approx_kl": masked_mean((log_r.exp() - 1) - log_r, m),  # k3
            "approx_kl_k2": masked_mean(0.5 * log_ratio**2, m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    *,
    mask: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old +- eps) - R)^2)).

    The value-clipping form of OpenAI baselines' PPO2 and lm-human-preferences
    ([Ziegler]), used by TRL and OpenRLHF (not in [PPO] itself). clip=None
    turns clipping off (plain 0.5 MSE, clip fraction 0). Pass the value mask
    (`value_mask_for`) as `mask` so the score position's value is trained.

    values (with grad), old_values, returns, mask: (B, T).
    Returns (loss (), clip_fraction ()).
    """
    m = mask.bool()  # (B, T)
    losses = torch.square(values - returns)  # (B, T)
    if clip is None:
        return 0.5 * masked_mean(losses, m), values.new_zeros(())
    values_clipped = torch.clamp(values, old_values - clip, old_values + clip)  # (B, T)
    losses_clipped = torch.square(values_clipped - returns)  # (B, T)
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), m)  # ()
    with torch.no_grad():
        clip_fraction = masked_mean((losses_clipped > losses).to(values.dtype), m)  # ()
    return loss, clip_fraction


def ppo_ptx_objective(ppo_loss: torch.Tensor, ptx_lm_loss: torch.Tensor, gamma_ptx: float) -> torch.Tensor:
    """PPO-ptx as a loss to minimise: ppo_loss + gamma_ptx * ptx_lm_loss.

    [InstructGPT] eq. 2 maximises E_RL[r - beta log(pi/pi_SFT)] +
    gamma E_pretrain[log pi(x)]; negated, the pretraining log-likelihood
    term becomes + gamma * (LM loss on a pretraining batch), `lm_loss`.
    gamma = 27.8 in the paper; both gradients go into one optimizer step.

    ppo_loss, ptx_lm_loss: (). Returns ().
    """
    return ppo_loss + gamma_ptx * ptx_lm_loss


@torch.no_grad()
def ema_update(
    ema_params: Iterable[torch.Tensor],
    params: Iterable[torch.Tensor],
    decay: float = PAPER_DEFAULTS.ema_decay,
) -> None:
    """In place: ema <- decay * ema + (1 - decay) * param, for each pair.

    [InstructGPT] appendix C.4 evaluates an exponential moving average of
    the policy weights, decay 0.992. Both iterables must have the same
    length (ValueError otherwise); `params` may be another dtype.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    for ema, param in zip(ema_params, params, strict=True):
        ema.mul_(decay).add_(param.detach().to(ema.dtype), alpha=1.0 - decay)
