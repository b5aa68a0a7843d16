"""KL: the per-token estimators of KL(pi || pi_ref) (k1, k2, k3, abs), the exact KL of categorical
distributions they approximate, and the KL coefficient's controllers (fixed, adaptive).

The references ([InstructGPT], [PPO], [GAE], [Ziegler], [KL-approx]) and the tensor
conventions are in the package docstring (`alignd.rlmath`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from alignd.rlmath.masks import _check_choice

KLEstimator = Literal["k1", "k2", "k3", "abs"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "abs")


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


def _check_keys(state: dict[str, Any], expected: set[str]) -> None:
    if set(state) != expected:
        raise ValueError(f"state dict keys {sorted(state)} != expected {sorted(expected)}")
