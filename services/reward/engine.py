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

from alignd.models.handle import ModelHandle
from alignd.models.scoring import score_bias, score_sequences


def plan_chunks(lengths: list[int], max_rows: int, max_tokens: int | None) -> list[list[int]]:
    """Indices of `lengths` grouped into forward passes: sorted by length (little padding), each pass at most
    `max_rows` rows and `max_tokens` padded tokens (rows x its longest row); a row longer than the budget
    runs alone."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        # sorted ascending: this row is the longest of the pass if it joins
        if cur and (len(cur) >= max_rows or (max_tokens is not None and (len(cur) + 1) * lengths[i] > max_tokens)):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


class RewardEngine:
    def __init__(self, handle: ModelHandle, max_batch_size: int, max_batch_tokens: int | None = None) -> None:
        self.handle = handle
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> tuple[list[float], int]:
        """One score per (prompt ids, response ids), in order; returns (scores, version)."""
        with self.handle.lock:
            version = self.handle.version
            out: list[float] = [0.0] * len(pairs)
            plan = plan_chunks([len(p) + len(r) for p, r in pairs], self.max_batch_size, self.max_batch_tokens)
            for idx in plan:
                chunk = [pairs[i] for i in idx]
                for i, s in zip(idx, self._chunk([p + r for p, r in chunk], [len(p) for p, _r in chunk])):
                    out[i] = s
            return out, version

    @torch.inference_mode()
    def _chunk(self, seqs: list[list[int]], starts: list[int]) -> list[float]:
        h = self.handle
        raw = score_sequences(h.model, seqs, h.pad_token_id, device=h.device, starts=starts)  # (B,)
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
