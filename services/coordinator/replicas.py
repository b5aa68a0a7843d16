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
    *,
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
    return _FanOut(shards, rotation, step, launch=launch, cfg=cfg, on_out=on_out, wait_any=wait_any).run()


class _FanOut:
    """One step's fan-out: the attempts of each shard, the load of each replica, the fastest answer so far."""

    def __init__(self, shards, rotation: Rotation, step: int, *, launch, cfg: HedgingConfig, on_out, wait_any) -> None:
        self.shards, self.rotation, self.step = shards, rotation, step
        self.launch, self.cfg, self.on_out, self.wait_any = launch, cfg, on_out, wait_any
        self.events: queue.Queue[_Attempt] = queue.Queue()
        self.attempts: dict[int, list[_Attempt]] = {s: [] for s in shards}
        self.result = FanoutResult(responses={})
        self.load = dict.fromkeys(range(rotation.n), 0)  # attempts running per replica
        self.fastest: float | None = None

    def run(self) -> FanoutResult:
        active = self.rotation.active()
        own = [s for s in self.shards if self.rotation.is_in(s)]
        for shard in own:  # a replica in the rotation serves its own shard
            self._start(shard, shard)
        for i, shard in enumerate(s for s in self.shards if s not in own):  # the others go to the least loaded
            target = self._pick(set())
            self._start(shard, target if target is not None else active[i % len(active)])
        while len(self.result.responses) < len(self.shards):
            timeout = self._hedge_slow_shards()
            try:
                a = self.events.get(timeout=timeout)
            except queue.Empty:
                continue
            self.load[a.replica] -= 1
            if a.shard in self.result.responses or a.future.cancelled():
                continue
            if a.future.exception() is None:
                self._answered(a)
            else:
                self._failed(a)
        return self.result

    def _start(self, shard: int, replica: int) -> None:
        a = _Attempt(shard, replica, None, time.monotonic())  # type: ignore[arg-type]
        a.future = self.launch(shard, replica)
        self.attempts[shard].append(a)
        self.load[replica] += 1
        a.future.add_done_callback(lambda _f, a=a: self.events.put(a))

    def _pick(self, exclude: set[int], slow_ok: bool = False) -> int | None:
        """The least loaded replica in the rotation, not in `exclude`; with slow_ok, else one that is out for
        being slow (better than waiting for one that is down)."""
        rotation = self.rotation
        cands = [r for r in rotation.inside() if r not in exclude]
        if not cands and slow_ok:
            cands = [r for r in range(rotation.n) if rotation.reason[r] == "slow" and r not in exclude]
        return min(cands, key=lambda r: (self.load[r], r)) if cands else None

    def _take_out(self, replica: int, reason: str) -> None:
        if self.rotation.take_out(replica, self.step, reason):
            self.on_out(replica, reason)

    def _hedge_slow_shards(self) -> float | None:
        """Sends again every shard whose only attempt has run past the hedging threshold (to another replica in
        the rotation); returns the seconds until the next shard would pass it (None: nothing to wait for)."""
        cfg, timeout = self.cfg, None
        if not cfg.enabled or self.fastest is None:
            return None
        threshold = max(cfg.min_delay_seconds, cfg.delay_factor * self.fastest)
        now = time.monotonic()
        for shard, tries in self.attempts.items():
            if shard in self.result.responses or len(tries) != 1:
                continue
            age = now - tries[0].started
            if age < threshold:
                timeout = threshold - age if timeout is None else min(timeout, threshold - age)
                continue
            other = self._pick({tries[0].replica})
            if other is not None:
                _log.warning(
                    "shard_hedged",
                    step=self.step,
                    shard=shard,
                    slow_replica=tries[0].replica,
                    hedge_replica=other,
                    waited_seconds=round(age, 3),
                )
                self.result.hedged.append(shard)
                self._start(shard, other)
        return timeout

    def _answered(self, a: _Attempt) -> None:
        """The first answer of a shard wins: the other attempts are cancelled, a first replica beaten by its hedge
        leaves the rotation."""
        self.result.responses[a.shard] = a.future.result()
        self.result.served_by[a.shard] = a.replica
        took = time.monotonic() - a.started
        self.fastest = took if self.fastest is None else min(self.fastest, took)
        for other in self.attempts[a.shard]:
            if other is not a and not other.future.done():
                other.future.cancel()
                if other is self.attempts[a.shard][0]:  # the hedge beat the first replica
                    self._take_out(other.replica, "slow")

    def _failed(self, a: _Attempt) -> None:
        """A retryable failure takes the replica out and sends the shard elsewhere (or waits for a replica to
        return); any other error cancels every attempt and is raised."""
        err = a.future.exception()
        code = err.code() if isinstance(err, grpc.RpcError) else None
        if code not in RETRYABLE:
            for tries in self.attempts.values():
                for t in tries:
                    t.future.cancel()
            raise err
        self._take_out(a.replica, "unavailable" if code == grpc.StatusCode.UNAVAILABLE else "slow")
        if any(not t.future.done() for t in self.attempts[a.shard]):
            return  # another attempt of this shard is running
        other = self._pick({t.replica for t in self.attempts[a.shard]}, slow_ok=True)
        if other is not None:
            _log.warning(
                "shard_failed_over",
                step=self.step,
                shard=a.shard,
                failed_replica=a.replica,
                replica=other,
                code=code.name,
            )
            self.result.failed_over.append(a.shard)
            self._start(a.shard, other)
        else:
            self.result.responses[a.shard] = self.wait_any(a.shard)
            self.result.served_by[a.shard] = -1
