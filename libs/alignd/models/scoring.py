"""The reward model's score: the linear `score` head on the backbone's final hidden states.

Shared by the reward role (serving) and the learner (RM training), so that the
trained and the served score are the same function. Two poolings, recorded in
the checkpoint's config.json (`alignd_score_pooling`) by RM training:

- "last" (the default, and what a checkpoint without the key means): the
  head reads the last token of prompt + response, like Hugging Face's
  `*ForSequenceClassification` and TRL's `get_reward`;
- "mean": the head reads the mean of the response tokens' final hidden
  states, so the score is the mean of per-token scores. A lexical preference
  (sentiment, a style) is spread over the response; measured on SmolLM2-135M
  and VADER, a linear head finds it in the mean far better than in the last
  token (docs/real-model-preset.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignd.models.batch import right_pad

SCORE_BIAS_KEY = "alignd_score_bias"  # config.json key of the normalisation bias (see score_bias)
SCORE_POOLING_KEY = "alignd_score_pooling"  # config.json key of the pooling (see score_pooling)
POOLINGS = ("last", "mean")


def score_pooling(model) -> str:
    """The pooling a model was trained with ("last" when its config does not say)."""
    pooling = getattr(model.config, SCORE_POOLING_KEY, None) or "last"
    if pooling not in POOLINGS:
        raise ValueError(f"config.json {SCORE_POOLING_KEY}: {pooling!r} is not one of {', '.join(POOLINGS)}")
    return pooling


def pooled_features(model, seqs: list[list[int]], starts: Sequence[int], *, pad_id: int, device="cpu") -> torch.Tensor:
    """(N, H): what the head reads for each sequence, per the model's pooling.

    `starts[i]` is the index of the first response token of `seqs[i]` (the
    prompt's length); "mean" averages positions starts[i] .. len-1 (the last
    token alone when the response is empty)."""
    ids, mask = right_pad(seqs, pad_id, device)  # (N, L), (N, L)
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (N, L, H)
    n = len(seqs)
    if score_pooling(model) == "last":
        last = torch.tensor([len(s) - 1 for s in seqs], device=ids.device)  # (N,)
        return hidden[torch.arange(n, device=ids.device), last]  # (N, H)
    pos = torch.arange(ids.shape[1], device=ids.device)[None, :]  # (1, L)
    lengths = torch.tensor([len(s) for s in seqs], device=ids.device)[:, None]  # (N, 1)
    first = torch.tensor([min(int(b), len(s) - 1) for b, s in zip(starts, seqs)], device=ids.device)[:, None]  # (N, 1)
    weights = ((pos >= first) & (pos < lengths)).to(hidden.dtype)  # (N, L): the response tokens
    return (hidden * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)  # (N, H)


def score_sequences(
    model, seqs: list[list[int]], pad_id: int, *, device="cpu", starts: Sequence[int] | None = None
) -> torch.Tensor:
    """Raw scores (N,): `model.score` applied to the pooled final hidden states.

    `starts` (the prompt length of each sequence) is required by the "mean"
    pooling; "last" ignores it."""
    if starts is None:
        if score_pooling(model) == "mean":
            raise ValueError("the mean pooling needs the response start of every sequence")
        starts = [len(s) - 1 for s in seqs]
    return model.score(pooled_features(model, seqs, starts, pad_id=pad_id, device=device)).squeeze(-1).float()  # (N,)


def score_bias(model) -> float:
    """The bias added to every served score (set by RM training so demonstrations average 0)."""
    return float(getattr(model.config, SCORE_BIAS_KEY, 0.0) or 0.0)
