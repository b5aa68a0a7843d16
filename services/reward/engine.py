"""Reward-model scoring: an LM backbone with a scalar head.

The model is a transformers `*ForSequenceClassification` with one label: its
backbone (`model.base_model`) and its linear head `model.score` (hidden ->
1). The score of (prompt, response) is the head applied to the final hidden
state of the last token of prompt + response, i.e. the last response token:
the same position Hugging Face's sequence classifiers pool, and TRL's
`get_reward` reads; or, for an RM trained with `rm.pooling: mean`, to the
mean over the response tokens (alignd.models.scoring). A checkpoint trained by alignd also carries a bias
(`alignd_score_bias` in config.json) that makes demonstrations score 0 on
average; it is added to every score.
"""

from __future__ import annotations

import torch

from alignd.models.batch import chunks
from alignd.models.handle import ModelHandle
from alignd.models.scoring import score_bias, score_sequences


class RewardEngine:
    def __init__(self, handle: ModelHandle, max_batch_size: int) -> None:
        self.handle = handle
        self.max_batch_size = max_batch_size

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[list[float], int]:
        """One score per (prompt ids, response ids); returns (scores, version)."""
        with self.handle.lock:
            version = self.handle.version
            out: list[float] = []
            for chunk in chunks(pairs, self.max_batch_size):
                out.extend(self._chunk([p + r for p, r in chunk], [len(p) for p, _r in chunk]))
            return out, version

    @torch.inference_mode()
    def _chunk(self, seqs: list[list[int]], starts: list[int]) -> list[float]:
        h = self.handle
        raw = score_sequences(h.model, seqs, h.pad_token_id, h.device, starts)  # (B,)
        return (raw + score_bias(h.model)).cpu().tolist()


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
