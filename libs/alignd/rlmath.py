"""The pure math of alignd's RLHF: KL estimators, per-token rewards, GAE,
the PPO policy and value losses, whitening, the KL controllers, the PPO-ptx
objective, the EMA update and the reward model's ranking loss.

This module imports torch and the standard library only (no grpc, no
transformers, no alignd service code), so the learner, the tests and any
notebook can use it without the rest of the stack. Every function cites the
paper (or blog post) it implements; `tests/test_rlmath.py` checks it against
TRL's PPO trainer and against naive loops.

Tensor conventions
------------------
- Batch first. B = batch (one sampled response per row), T = response
  length (the longest response in the batch), V = vocabulary, K = number of
  completions ranked for one prompt.
- Per-token tensors cover the response tokens only (the prompt is not in
  them): `logprobs[b, t]` is log pi(response[b, t] | prompt, response[b, :t]),
  `values[b, t]` is the value of the state before response token t.
- `mask` (B, T), bool or 0/1 float, marks real response tokens. Responses
  are right padded, so every row of `mask` is ones then zeros (functions that
  locate the last token check this and raise ValueError otherwise).
- Whatever sits at a padded position of an input (a fill value, garbage,
  -inf) never reaches a result: masked positions are selected away with
  `torch.where`, not multiplied by zero.
- Rewards, values and advantages are in the reward model's units; log-probs
  and KLs in nats.

Where peers differ (the RM score's position, biased vs unbiased variance,
the KL estimator, value clip, lambda), the difference is a parameter here and
`PAPER_DEFAULTS` holds the InstructGPT choice. See `per_token_rewards` and
`value_mask_for` for the score-position conventions (InstructGPT/OpenRLHF
"last" vs TRL "eos_plus_one").

References
----------
- [InstructGPT] Ouyang et al. 2022, "Training language models to follow
  instructions with human feedback", arXiv:2203.02155 (eq. 1 RM loss, eq. 2
  PPO-ptx objective, appendix C hyperparameters).
- [PPO] Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
  arXiv:1707.06347 (eq. 7 clipped surrogate).
- [GAE] Schulman et al. 2016, "High-Dimensional Continuous Control Using
  Generalized Advantage Estimation", arXiv:1506.02438 (eq. 16).
- [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human
  Preferences", arXiv:1909.08593 (section 2.2, adaptive KL coefficient).
- [KL-approx] J. Schulman, "Approximating KL Divergence", 2020,
  http://joschu.net/blog/kl-approx.html (k1, k2, k3).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from alignd.paper import PAPER_DEFAULTS, PaperDefaults

__all__ = [
    "PAPER_DEFAULTS",
    "AdaptiveKLController",
    "FixedKLController",
    "KLEstimator",
    "KL_ESTIMATORS",
    "SCORE_POSITIONS",
    "PaperDefaults",
    "ScorePosition",
    "ema_update",
    "entropy_from_logits",
    "exact_kl",
    "gae",
    "kl_estimate",
    "lm_loss",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "ppo_ptx_objective",
    "per_token_rewards",
    "ranking_pairs",
    "response_lengths",
    "rm_loss",
    "rm_ranking_loss",
    "value_loss",
    "value_mask_for",
]

KLEstimator = Literal["k1", "k2", "k3", "abs"]
ScorePosition = Literal["last", "eos_plus_one"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "abs")
SCORE_POSITIONS: tuple[str, ...] = ("last", "eos_plus_one")


# The paper's hyper-parameters live in alignd.paper (torch-free, so configuration takes its defaults from them).


# ---------------------------------------------------------------------------
# Masks and masked statistics
# ---------------------------------------------------------------------------


def response_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Number of real response tokens per row, checking right padding.

    Right padding means every row of `mask` is ones then zeros; any other
    pattern raises ValueError, since "the last token" would be ambiguous.

    mask: (B, T) bool or 0/1 float. Returns (B,) long.
    """
    m = mask.bool()  # (B, T)
    lengths = m.sum(dim=-1)  # (B,)
    positions = torch.arange(m.shape[-1], device=m.device)  # (T,)
    prefix = positions.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    if not torch.equal(prefix, m):
        raise ValueError("mask must be right padded: each row ones (real response tokens) then zeros")
    return lengths


def value_mask_for(mask: torch.Tensor, score_position: ScorePosition) -> torch.Tensor:
    """The mask of positions that carry values and rewards, for a score position.

    - "last" (InstructGPT/OpenRLHF): the score sits on the last real token,
      so values and rewards live on the response tokens: `mask` itself.
    - "eos_plus_one" (TRL): the score sits one past the last real token, so
      the value mask keeps one more position per row (TRL's
      `~padding_mask_p1`), except where the row already fills T.

    mask: (B, T). Returns (B, T) bool.
    """
    _check_choice("score_position", score_position, SCORE_POSITIONS)
    lengths = response_lengths(mask)  # (B,)
    if score_position == "last":
        return mask.bool()  # (B, T)
    positions = torch.arange(mask.shape[-1], device=mask.device)  # (T,)
    return positions.unsqueeze(0) <= lengths.unsqueeze(1)  # (B, T), one more per row


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is true.

    The token-level mean (every real token weighs the same), as TRL's and
    OpenRLHF's `masked_mean`; padded positions are selected away, so a
    non-finite fill there does not matter. An empty mask gives nan.

    x: (B, T) (any shape that `mask` matches). dim None -> scalar, else
    reduced over `dim`.
    """
    m = mask.bool()  # (B, T)
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=dim)
    return total / m.sum(dim=dim)  # () or reduced shape


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the masked positions (a scalar).

    unbiased=True applies Bessel's correction n/(n-1), as TRL's
    `masked_var` (from lm-human-preferences); unbiased=False is the biased
    (population) variance, as OpenRLHF's whitening. Raises ValueError if the
    mask holds fewer than 2 (unbiased) or 1 (biased) positions, where the
    result would be inf or nan.

    x, mask: (B, T). Returns ().
    """
    n = int(mask.bool().sum())
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} masked positions, got {n}")
    mean = masked_mean(x, mask)  # ()
    variance = masked_mean((x - mean) ** 2, mask)  # ()
    if unbiased:
        variance = variance * (n / (n - 1))  # () Bessel's correction
    return variance


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Normalise `x` to zero mean, unit variance using masked statistics.

    (x - mean) * rsqrt(var + eps); with shift_mean=False the mean is added
    back (only the scale changes), as used for reward whitening. Matches
    TRL's `masked_whiten` with unbiased=True and eps=1e-8. Advantage
    normalisation is standard PPO practice (OpenAI baselines; [PPO] does not
    state it). Padded positions are transformed too: callers that need zeros
    there mask the result.

    x, mask: (B, T). Returns (B, T).
    """
    mean = masked_mean(x, mask)  # ()
    var = masked_var(x, mask, unbiased=unbiased)  # ()
    whitened = (x - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean  # (B, T)
    return whitened


# ---------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    With log r = logp_ref - logp of the sampled token ([KL-approx]):
    - "k1" = -log r = logp - logp_ref: unbiased, high variance, can be
      negative; the per-token term of InstructGPT eq. 2 (beta log pi/pi_SFT).
    - "k2" = 0.5 (log r)^2: biased, low variance, always >= 0.
    - "k3" = (r - 1) - log r: unbiased, low variance, always >= 0.
    - "abs" = |log r|: biased, always >= 0 (used by some peers as a penalty).

    logprobs, ref_logprobs: (B, T). Returns (B, T) (unmasked: padded
    positions hold whatever the inputs give; `per_token_rewards` masks).
    """
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    log_ratio = logprobs - ref_logprobs  # (B, T) log pi/pi_ref = -log r
    if estimator == "k1":
        return log_ratio  # (B, T)
    if estimator == "k2":
        return 0.5 * log_ratio**2  # (B, T)
    if estimator == "k3":
        logr = -log_ratio  # (B, T) log r = log pi_ref/pi
        return (logr.exp() - 1) - logr  # (B, T)
    return log_ratio.abs()  # (B, T)


def exact_kl(p: Sequence[float] | torch.Tensor, q: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) = sum_i p_i log(p_i / q_i) of categorical distributions, in nats.

    The quantity the estimators of `kl_estimate` approximate ([KL-approx]);
    0 log 0 = 0. Lists become float64 tensors. Raises ValueError if p or q
    is not a probability vector (non-negative, sums to 1 within 1e-6).

    p, q: (..., C). Returns (...).
    """
    p_t = torch.as_tensor(p, dtype=torch.float64) if not torch.is_tensor(p) else p
    q_t = torch.as_tensor(q, dtype=torch.float64) if not torch.is_tensor(q) else q
    for name, d in (("p", p_t), ("q", q_t)):
        total = d.sum(-1)  # (...)
        if (d < 0).any() or not torch.allclose(total, torch.ones_like(total), atol=1e-6, rtol=0):
            raise ValueError(f"{name} must be a probability vector (>= 0, summing to 1)")
    return (torch.xlogy(p_t, p_t) - torch.xlogy(p_t, q_t)).sum(-1)  # (...)


# ---------------------------------------------------------------------------
# Rewards and advantages
# ---------------------------------------------------------------------------


def per_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
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


# ---------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
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


# ---------------------------------------------------------------------------
# Logits -> log-probs, entropy, LM loss
# ---------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position, without a (B, T, V) log-softmax.

    The log-likelihood of the sampled tokens that PPO ([PPO]) and the KL
    penalty ([InstructGPT] eq. 2) use. In float32/64: gathered logit minus
    logsumexp, one batch row at a time to bound peak memory; in 16-bit
    dtypes (where that subtraction loses precision): a row-wise log_softmax
    and gather. Same as TRL's `selective_log_softmax`.

    logits: (B, T, V) (logits[b, t] predicts tokens[b, t]); tokens: (B, T)
    long. Returns (B, T).
    """
    index = tokens.unsqueeze(-1)  # (B, T, 1)
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index).squeeze(-1)  # (B, T)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # (B, T)
        return selected - lse  # (B, T)
    rows = [
        F.log_softmax(row, dim=-1).gather(dim=-1, index=row_index).squeeze(-1)  # (T,)
        for row, row_index in zip(logits, index, strict=True)
    ]
    return torch.stack(rows)  # (B, T)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy H = -sum_v p_v log p_v (nats) of each position's distribution.

    A policy statistic of PPO training ([PPO] section 5 adds it as an
    optional bonus; InstructGPT does not). Computed over chunks of flattened
    positions to bound peak memory, as TRL's `entropy_from_logits`.

    logits: (B, T, V) (any leading shape). Returns (B, T).
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
    chunks = []
    for chunk in flat.split(chunk_size, dim=0):  # (<=chunk_size, V)
        logp = F.log_softmax(chunk, dim=-1)  # (c, V)
        chunks.append(-(logp.exp() * logp).sum(-1))  # (c,)
    return torch.cat(chunks).reshape(logits.shape[:-1])  # (B, T)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, a masked mean over tokens: -mean log pi(x_t | x_<t).

    The pretraining term of PPO-ptx ([InstructGPT] eq. 2, as a loss).
    Aligned like `logprobs_from_logits`: logits[:, t] predicts labels[:, t],
    so the caller shifts (for a model run on `ids`: `lm_loss(logits[:, :-1],
    ids[:, 1:], mask[:, 1:])`).

    logits: (B, T, V); labels: (B, T) long; mask: (B, T) labels that count.
    Returns ().
    """
    logp = logprobs_from_logits(logits, labels)  # (B, T)
    return -masked_mean(logp, mask)  # ()


def ppo_ptx_objective(ppo_loss: torch.Tensor, ptx_lm_loss: torch.Tensor, gamma_ptx: float) -> torch.Tensor:
    """PPO-ptx as a loss to minimise: ppo_loss + gamma_ptx * ptx_lm_loss.

    [InstructGPT] eq. 2 maximises E_RL[r - beta log(pi/pi_SFT)] +
    gamma E_pretrain[log pi(x)]; negated, the pretraining log-likelihood
    term becomes + gamma * (LM loss on a pretraining batch), `lm_loss`.
    gamma = 27.8 in the paper; both gradients go into one optimizer step.

    ppo_loss, ptx_lm_loss: (). Returns ().
    """
    return ppo_loss + gamma_ptx * ptx_lm_loss


# ---------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient beta ([InstructGPT]: 0.02, fixed).

    Same interface as `AdaptiveKLController`: `.value`, `.update(...)` (a
    no-op), `state_dict()` / `load_state_dict()`.
    """

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the (unchanged) coefficient."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys(state, {"value"})
        self.value = float(state["value"])


class AdaptiveKLController:
    """The adaptive KL coefficient of [Ziegler] section 2.2 (eq. before 2.3).

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon).
    `n_steps` and `horizon` are in the same unit: episodes (responses) in
    lm-human-preferences (target 6 nats, horizon 10000).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                "AdaptiveKLController needs init_kl_coef >= 0, target > 0, horizon > 0; "
                f"got {init_kl_coef}, {target}, {horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move beta towards the target KL; returns the new coefficient.

        current_kl: the measured KL(pi || pi_ref) per response, nats
        (a float or a 0-d tensor); n_steps: episodes since the last update.
        """
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)  # proportional
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_keys(state, {"value", "target", "horizon"})
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


# ---------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Reward model ranking loss
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_keys(state: dict[str, Any], expected: set[str]) -> None:
    if set(state) != expected:
        raise ValueError(f"state dict keys {sorted(state)} != expected {sorted(expected)}")
