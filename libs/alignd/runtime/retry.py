"""The retry backoff policy of alignd's clients: capped exponential backoff with full jitter (standard library only).

A client that retries a failed call pauses before each retry; `Backoff` says how long. The pause before retry k
(after the k-th failure) is uniform in [0, cap(k)], cap(k) = min(maximum, initial * 2**(k-1)): "full jitter", so
clients that failed together do not retry together. Used by the reward client SDK (alignd.reward_client) and the
coordinator's RoleClients.call (services/coordinator/clients.py); the
channel's own retries (alignd.runtime.client.service_config) are gRPC's and configured there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter, in seconds.

    initial: the cap of the first pause; each failure doubles it, up to `maximum`. rng: the generator of the
    jitter (inject a seeded random.Random for reproducible pauses); `delay(k, rng=...)` draws from another one for
    a single pause (e.g. one generator per call, so threads do not share its state).
    """

    initial: float
    maximum: float
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.initial < 0 or self.maximum < 0:
            raise ValueError(f"Backoff needs initial >= 0 and maximum >= 0, got {self.initial}, {self.maximum}")

    def cap(self, failures: int) -> float:
        """The longest pause after `failures` failures (>= 1): min(maximum, initial * 2**(failures-1))."""
        return min(self.maximum, self.initial * (2.0 ** min(failures - 1, 62)))  # 2**62: no float overflow

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """The pause before the next attempt after `failures` failures: uniform in [0, cap(failures)]."""
        return (self.rng if rng is None else rng).uniform(0.0, self.cap(failures))
