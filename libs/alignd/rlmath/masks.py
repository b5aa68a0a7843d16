"""Masks and masked statistics: response lengths (the right-padding check), the value mask of a score
position, and the masked mean, variance and whitening that every loss and advantage uses.

The references ([InstructGPT], [PPO], [GAE], [Ziegler], [KL-approx]) and the tensor
conventions are in the package docstring (`alignd.rlmath`).
"""

from __future__ import annotations

from typing import Literal

import torch

ScorePosition = Literal["last", "eos_plus_one"]
SCORE_POSITIONS: tuple[str, ...] = ("last", "eos_plus_one")


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
    *,
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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
