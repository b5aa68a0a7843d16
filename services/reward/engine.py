"""Reward-model scoring: an LM backbone with a scalar head.

The model is a transformers `*ForSequenceClassification` with one label: its
backbone (`model.base_model`) and its linear head `model.score` (hidden ->
1). The score of (prompt, response) is the head applied to the final hidden
state of the last token of prompt + response, i.e. the last response token:
the same position Hugging Face's sequence classifiers pool, and TRL's
`get_reward` reads.
"""

from __future__ import annotations

import torch

from alignd.models.batch import chunks, right_pad
from alignd.models.handle import ModelHandle


class RewardEngine:
    def __init__(self, handle: ModelHandle, max_batch_size: int) -> None:
        self.handle = handle
        self.max_batch_size = max_batch_size

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[list[float], int]:
        """One score per (prompt ids, response ids); returns (scores, version)."""
        with self.handle.lock:
            version = self.handle.version
            out: list[float] = []
            for chunk in chunks([p + r for p, r in pairs], self.max_batch_size):
                out.extend(self._chunk(chunk))
            return out, version

    @torch.inference_mode()
    def _chunk(self, seqs: list[list[int]]) -> list[float]:
        h = self.handle
        ids, mask = right_pad(seqs, h.pad_token_id, h.device)
        hidden = h.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
        last = torch.tensor([len(s) - 1 for s in seqs], device=h.device)  # (B,)
        pooled = hidden[torch.arange(len(seqs), device=h.device), last]  # (B, H)
        return h.model.score(pooled).squeeze(-1).float().cpu().tolist()  # (B,)


class FunctionRewardEngine:
    """Scores with a programmatic reward function (alignd.rewards) instead of the model's head."""

    def __init__(self, handle: ModelHandle, fn, args: dict) -> None:
        self.handle = handle
        self.fn = fn
        self.args = dict(args)

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[list[float], int]:
        with self.handle.lock:
            tok = self.handle.tokenizer
            return [float(self.fn(p, r, tok, **self.args)) for p, r in pairs], self.handle.version
