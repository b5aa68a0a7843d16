"""The resumable prompt sampler (no torch). Prompt files are read by alignd.data.load_prompts."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0


class PromptSampler:
    """Without replacement, reshuffled every epoch; its state is part of the run state."""

    def __init__(self, n: int, seed: int, state: SamplerState | None = None) -> None:
        self.n = n
        self.seed = seed
        self.state = state or SamplerState()
        self._order = self._order_for(self.state.epoch)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.state.position >= self.n:
                self.state = SamplerState(self.state.epoch + 1, 0)
                self._order = self._order_for(self.state.epoch)
            out.append(self._order[self.state.position])
            self.state.position += 1
        return out
