"""The pure math of alignd's RLHF: KL estimators, per-token rewards, GAE,
the PPO policy and value losses, whitening, the KL controllers, the PPO-ptx
objective, the EMA update and the reward model's ranking loss.

This package imports torch and the standard library only (no grpc, no
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

Layout
------
Every name is importable from `alignd.rlmath`; the modules split it by concern:
- `masks`: response lengths, the value mask, masked mean / variance / whitening.
- `kl`: the KL estimators, the exact KL, the fixed and adaptive KL controllers.
- `advantages`: per-token rewards (eq. 2) and GAE.
- `ppo`: the clipped policy and value losses, the PPO-ptx objective, the EMA update.
- `lm`: log-probs and entropy from logits, the LM loss.
- `rm`: the reward model's ranking loss (eq. 1).

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

# The paper's hyper-parameters live in alignd.paper (torch-free, so configuration takes its defaults from them).
from alignd.paper import PAPER_DEFAULTS, PaperDefaults
from alignd.rlmath.advantages import gae, per_token_rewards
from alignd.rlmath.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, KLEstimator, exact_kl, kl_estimate
from alignd.rlmath.lm import entropy_from_logits, lm_loss, logprobs_from_logits
from alignd.rlmath.masks import (
    SCORE_POSITIONS,
    ScorePosition,
    masked_mean,
    masked_var,
    masked_whiten,
    response_lengths,
    value_mask_for,
)
from alignd.rlmath.ppo import ema_update, policy_loss, ppo_ptx_objective, value_loss
from alignd.rlmath.rm import ranking_pairs, rm_loss, rm_ranking_loss

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
