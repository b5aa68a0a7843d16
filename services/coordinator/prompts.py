"""Prompt sets and the resumable prompt sampler (no torch)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from alignd.config import PromptsConfig


class DataError(ValueError):
    """A data file is unreadable or malformed; the message names file and line."""


def load_prompts(cfg: PromptsConfig) -> list[str]:
    path = Path(cfg.path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read prompts: {err}") from None
    prompts: list[str] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            value = obj.get(cfg.field) if isinstance(obj, dict) else None
            if not isinstance(value, str) or not value:
                raise DataError(f"{path}:{n}: missing or empty string field {cfg.field!r}")
            prompts.append(value)
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


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
