"""Per-token log-probs of given response tokens under the frozen model.

For an item (prompt p of length P, response r of length R) the sequence
p + r is run through the model once; the logits at position P-1+t predict
response token t, so

    logprob[t] = log_softmax(logits[P-1+t] / temperature)[r[t]],  t = 0..R-1.

The LM head runs at those positions only (alignd.models.heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignd.models.batch import chunks, right_pad
from alignd.models.handle import ModelHandle
from alignd.models.heads import PositionLogits, response_positions


@dataclass
class Item:
    prompt_ids: list[int]
    response_ids: list[int]
    temperature: float  # > 0


class ReferenceEngine:
    def __init__(self, handle: ModelHandle, max_batch_size: int) -> None:
        self.handle = handle
        self.max_batch_size = max_batch_size
        self._logits: PositionLogits | None = None  # of handle.model (made again if the model is replaced)

    def logprobs(self, items: list[Item]) -> tuple[list[list[float]], int]:
        with self.handle.lock:
            version = self.handle.version
            out: list[list[float]] = []
            for chunk in chunks(items, self.max_batch_size):
                out.extend(self._chunk(chunk))
            return out, version

    @torch.inference_mode()
    def _chunk(self, items: list[Item]) -> list[list[float]]:
        h = self.handle
        if self._logits is None or self._logits.model is not h.model:
            self._logits = PositionLogits(h.model, "reference")
        ids, mask = right_pad([it.prompt_ids + it.response_ids for it in items], h.pad_token_id, h.device)
        lengths = [(len(it.prompt_ids), len(it.response_ids)) for it in items]
        positions = response_positions(lengths, max(r for _, r in lengths), ids.device)
        logits, _ = self._logits(ids, mask, positions)  # (B, T, V)
        out = []
        for i, it in enumerate(items):
            P, R = len(it.prompt_ids), len(it.response_ids)
            step_logits = logits[i, :R].float() / it.temperature  # (R, V)
            targets = ids[i, P : P + R]  # (R,)
            lp = torch.log_softmax(step_logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # (R,)
            out.append(lp.cpu().tolist())
        return out
