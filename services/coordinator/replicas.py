"""Policy replicas in and out of the rotation, and the hedged fan-out of a step's rollouts.

The prompts of a step are cut into one shard per configured replica; shard r
always carries the seed of shard r, whichever replica serves it, so the
rollouts do not depend on which replica answered. A replica in the rotation
serves its own shard. A replica out of the rotation (it was slow or
unavailable) serves none: its shard goes to a replica in the rotation. After
`out_of_rotation_steps` steps it comes back, once the caller has checked it
and re-synced its weights.

Hedging (Dean & Barroso, "The tail at scale"): a shard still running
`delay_factor` times longer than the step's fastest finished shard (and at
least `min_delay_seconds`) is sent again to a replica that is done. The first
answer wins; the other call is cancelled. A replica whose shard was won by
its hedge is out of the rotation. A replica that answers UNAVAILABLE (or
passes its deadline) is out too, and its shard is sent to another replica at
once.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from alignd.config import HedgingConfig
from alignd.runtime.logging import get_logger

_log = get_logger("alignd.coordinator.replicas")

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class Rotation:
    """Which replicas serve shards of their own; a replica taken out comes back after `out_steps` steps."""

    def __init__(self, n: int, out_steps: int) -> None:
        self.n = n
        self.out_steps = out_steps
        self.out_until = [0] * n  # first step at which the replica may serve again
        self.reason = [""] * n  # why it is out ("" = in the rotation)

    def is_in(self, r: int) -> bool:
        return not self.reason[r]

    def inside(self) -> list[int]:
        """Replicas in the rotation (possibly none)."""
        return [r for r in range(self.n) if self.is_in(r)]

    def active(self) -> list[int]:
        """Replicas in the rotation; every replica when all are out (someone must serve)."""
        return self.inside() or list(range(self.n))

    def take_out(self, r: int, step: int, reason: str) -> bool:
        """True when the replica was in the rotation until now."""
        was_in = self.is_in(r)
        self.reason[r] = reason
        self.out_until[r] = step + self.out_steps
        return was_in

    def due(self, step: int) -> list[int]:
        """Replicas out of the rotation whose time out has passed (the caller checks, re-syncs and `put_back`s them)."""
        return [r for r in range(self.n) if self.reason[r] and step >= self.out_until[r]]

    def put_back(self, r: int) -> None:
        self.reason[r] = ""


@dataclass
class _Attempt:
    shard: int
    replica: int
    future: grpc.Future
    started: float


@dataclass
class FanoutResult:
    responses: dict[int, object]  # shard -> response
    hedged: list[int] = field(default_factory=list)  # shards sent a second time because their replica was slow
    failed_over: list[int] = field(default_factory=list)  # shards re-sent because their replica was unavailable
    served_by: dict[int, int] = field(default_factory=dict)  # shard -> replica whose answer was used


def fan_out(
    shards: list[int],
    rotation: Rotation,
    step: int,
    launch: Callable[[int, int], grpc.Future],
    cfg: HedgingConfig,
    on_out: Callable[[int, str], None],
    wait_any: Callable[[int], object],
) -> FanoutResult:
    """Runs every shard (launch(shard, replica) -> a gRPC future) with hedging and fail-over.

    on_out(replica, reason) is told each replica taken out of the rotation. When no replica in the rotation is
    left for a shard whose replica failed, wait_any(shard) serves it the slow way (waiting for a replica to come
    back, within the phase's retry budget) and returns the response.
    """
    events: queue.Queue[_Attempt] = queue.Queue()
    attempts: dict[int, list[_Attempt]] = {s: [] for s in shards}
    result = FanoutResult(responses={})
    active = rotation.active()
    load = dict.fromkeys(range(rotation.n), 0)  # attempts running per replica
    fastest: float | None = None

    def start(shard: int, replica: int) -> None:
        a = _Attempt(shard, replica, None, time.monotonic())  # type: ignore[arg-type]
        a.future = launch(shard, replica)
        attempts[shard].append(a)
        load[replica] += 1
        a.future.add_done_callback(lambda _f, a=a: events.put(a))

    def pick(exclude: set[int], slow_ok: bool = False) -> int | None:
        """The least loaded replica in the rotation, not in `exclude`; with slow_ok, else one that is out for
        being slow (better than waiting for one that is down)."""
        cands = [r for r in rotation.inside() if r not in exclude]
        if not cands and slow_ok:
            cands = [r for r in range(rotation.n) if rotation.reason[r] == "slow" and r not in exclude]
        return min(cands, key=lambda r: (load[r], r)) if cands else None

    def take_out(replica: int, reason: str) -> None:
        if rotation.take_out(replica, step, reason):
            on_out(replica, reason)

    own = [s for s in shards if rotation.is_in(s)]
    for shard in own:  # a replica in the rotation serves its own shard
        start(shard, shard)
    for i, shard in enumerate(s for s in shards if s not in own):  # the others go to the least loaded
        target = pick(set())
        start(shard, target if target is not None else active[i % len(active)])

    while len(result.responses) < len(shards):
        timeout = None
        if cfg.enabled and fastest is not None:
            threshold = max(cfg.min_delay_seconds, cfg.delay_factor * fastest)
            now = time.monotonic()
            for shard, tries in attempts.items():
                if shard in result.responses or len(tries) != 1:
                    continue
                age = now - tries[0].started
                if age >= threshold:
                    other = pick({tries[0].replica})
                    if other is not None:
                        _log.warning(
                            "shard_hedged",
                            step=step,
                            shard=shard,
                            slow_replica=tries[0].replica,
                            hedge_replica=other,
                            waited_seconds=round(age, 3),
                        )
                        result.hedged.append(shard)
                        start(shard, other)
                else:
                    left = threshold - age
                    timeout = left if timeout is None else min(timeout, left)
        try:
            a = events.get(timeout=timeout)
        except queue.Empty:
            continue
        load[a.replica] -= 1
        if a.shard in result.responses or a.future.cancelled():
            continue
        err = a.future.exception()
        if err is None:
            result.responses[a.shard] = a.future.result()
            result.served_by[a.shard] = a.replica
            took = time.monotonic() - a.started
            fastest = took if fastest is None else min(fastest, took)
            for other in attempts[a.shard]:
                if other is not a and not other.future.done():
                    other.future.cancel()
                    if other is attempts[a.shard][0]:  # the hedge beat the first replica
                        take_out(other.replica, "slow")
            continue
        code = err.code() if isinstance(err, grpc.RpcError) else None
        if code not in RETRYABLE:
            for tries in attempts.values():
                for t in tries:
                    t.future.cancel()
            raise err
        take_out(a.replica, "unavailable" if code == grpc.StatusCode.UNAVAILABLE else "slow")
        if any(not t.future.done() for t in attempts[a.shard]):
            continue  # another attempt of this shard is running
        other = pick({t.replica for t in attempts[a.shard]}, slow_ok=True)
        if other is not None:
            _log.warning(
                "shard_failed_over", step=step, shard=a.shard, failed_replica=a.replica, replica=other, code=code.name
            )
            result.failed_over.append(a.shard)
            start(a.shard, other)
        else:
            result.responses[a.shard] = wait_any(a.shard)
            result.served_by[a.shard] = -1
    return result
