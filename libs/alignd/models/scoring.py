"""The reward model's score: the linear `score` head at the last token.

Shared by the reward role (serving) and the learner (RM training), so that the
trained and the served score are the same function.
"""

from __future__ import annotations

import torch

from alignd.models.batch import right_pad

SCORE_BIAS_KEY = "alignd_score_bias"  # config.json key of the normalisation bias (see score_bias)


def score_sequences(model, seqs: list[list[int]], pad_id: int, device="cpu") -> torch.Tensor:
    """Raw scores (N,): `model.score` applied to the backbone's final hidden state at each sequence's last token."""
    ids, mask = right_pad(seqs, pad_id, device)  # (N, L), (N, L)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (N, L, H)
    last = torch.tensor([len(s) - 1 for s in seqs], device=ids.device)  # (N,)
    pooled = hidden[torch.arange(len(seqs), device=ids.device), last]  # (N, H)
    return model.score(pooled).squeeze(-1).float()  # (N,)


def score_bias(model) -> float:
    """The bias added to every served score (set by RM training so demonstrations average 0)."""
    return float(getattr(model.config, SCORE_BIAS_KEY, 0.0) or 0.0)
