"""What a reward client call returns (ScoreResult, ScoreManyResult) or raises (RewardClientError).

The SDK's usage and behaviour are in the package docstring (`alignd.reward_client`).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


class RewardClientError(Exception):
    """A call that failed: `code` (grpc.StatusCode), `details` (the server's message), `attempts` (calls made)."""

    def __init__(self, code: grpc.StatusCode, details: str, attempts: int = 1) -> None:
        super().__init__(code, details, attempts)
        self.code = code
        self.details = details
        self.attempts = attempts

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


@dataclass(frozen=True)
class ScoreResult:
    """One request's answer: a score per item, in order, and the reward-model version that produced them."""

    scores: list[float]
    weight_version: int


@dataclass(frozen=True)
class ScoreManyResult:
    """The answer of `score_many`: a score and a weight version per item, in input order.

    Each request of the batch reports its own version, so the versions differ
    when the reward model was reloaded while the batches ran.
    """

    scores: list[float]
    weight_versions: list[int]

    @property
    def weight_version(self) -> int | None:
        """The version of every item; None when items were scored by different versions (or there are none)."""
        versions = set(self.weight_versions)
        return versions.pop() if len(versions) == 1 else None
