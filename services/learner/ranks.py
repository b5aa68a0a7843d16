"""The learner under torchrun: rank 0 serves, every other rank follows it.

    torchrun --nnodes R --nproc-per-node G --master-addr A --master-port P \\
        -m alignd.cli serve learner --config FILE

starts R x G processes (the Helm chart does so when R x G > 1); each reads
RANK / WORLD_SIZE / LOCAL_RANK from the environment (`Launch`).

Rank 0 is the learner as it is with one process: it binds the gRPC port
(LearnerService, ModelService, health, reflection) and the /metrics port and
writes the endpoint file. Ranks > 0 serve no API (their training is rank
0's, whose step metrics cover the whole group; their logs carry `rank`); the
first process of each other node (LOCAL_RANK 0: one per learner pod) binds
the role's ports for gRPC health and /metrics alone, so the pod's probes see
it (LearnerApp.follow). They build the same learner (model, DeepSpeed engine, the
same checkpoint restored) and then run `follow`: receive each state-changing
command from rank 0 and execute it, in rank 0's order.

Commands (broadcast with `broadcast_object_list` over a gloo group of its
own, so they travel on CPU whatever the training backend):

| RPC (rank 0)        | what every rank does                                   |
|---------------------|--------------------------------------------------------|
| TrainStep           | `TrainStep(step, batch)`: the parsed, VALIDATED batch; each rank trains its share (ppo.py) |
| ResetPolicy         | `ResetPolicy(dirs, version)`: rank 0 first reads and checks the weights; every rank then |
|                     | loads them (the directories must be readable from every rank: the shared volume)         |
| SaveCheckpoint      | `SaveCheckpoint(tag)`: each rank writes its ZeRO shard, rank 0 the rest (checkpoint.py) |
| (SIGTERM)           | `Shutdown`, after rank 0's server drained                |

Rank 0 alone, no command: PushWeights and EvaluateTextLoss (they read rank
0's module, which holds the full weights with ZeRO stages 0-2 and equals
every other rank's after each step; stage 3 is refused with world size > 1),
ModelService.GetInfo, and the jobs TrainSFT / TrainRewardModel (jobs.py:
they train a copy of a model loaded from disk, on rank 0 only, while the
other ranks idle). ModelService.UpdateWeights / LoadWeights are refused by
the learner (it owns its weights), so nothing else changes the trained model.

A request is checked on rank 0 before its command is broadcast (replayed or
out-of-order steps, INVALID_ARGUMENT, FAILED_PRECONDITION), so a bad request
never reaches the other ranks. After each command every rank reports
(step, version, ...) and all must agree (`agree`).

Failure. The process groups have a timeout (`engine.collective_timeout_seconds`,
given to `init_process_group` and to the command group): when a rank dies or
hangs, the others' next collective fails after at most that long instead of
hanging. Any failure of a collective, or an error while a command runs after
it was broadcast (the ranks may then disagree), ends the process at once with
exit code 1 (`abort`, event `rank_group_failed` / `command_failed`); torchrun
then stops the other local ranks and fails, and Kubernetes restarts the pod,
which resumes from the latest checkpoint. While rank 0 has no command, it
broadcasts a `Heartbeat` every min(10 s, timeout / 4), so an idle learner
does not time out its followers and a dead follower is noticed by the next
heartbeat's send. Ranks under a launcher also get SIGTERM when their launcher
process dies (`die_with_launcher`).

Shutdown. SIGTERM to torchrun reaches every rank. Ranks > 0 log it and keep
following (rank 0's in-flight step still needs them); rank 0 stops serving
(health NOT_SERVING, in-flight RPCs get `server.grace_seconds`), then
broadcasts `Shutdown`, and every rank exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from alignd.config import ConfigError, LearnerConfig
from alignd.runtime.logging import get_logger

if TYPE_CHECKING:
    from alignd.services.learner.ppo import Batch

_log = get_logger("alignd.learner.ranks")

PENDING_SIGNALS: list[int] = []  # stop signals received by a follower, logged by `follow`
EXIT_GROUP_FAILED = 1  # what a rank exits with when the group is broken (torchrun then fails the job)
HEARTBEAT_MAX_SECONDS = 10.0


# -- where this process is ---------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Launch:
        try:
            rank = int(os.environ.get("RANK", "0"))
            world = int(os.environ.get("WORLD_SIZE", "1"))
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError as err:
            raise ConfigError(
                f"RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them): {err}"
            ) from None
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"RANK {rank} is not in [0, WORLD_SIZE {world})")
        return cls(rank, world, local)

    @property
    def follower(self) -> bool:
        return self.rank > 0


def check_config(cfg: LearnerConfig, launch: Launch) -> None:
    """What a learner of world size > 1 needs; a ConfigError names the key."""
    if launch.world_size == 1:
        return
    if cfg.engine.kind != "deepspeed":
        raise ConfigError(
            f"engine.kind: {cfg.engine.kind!r} trains in one process; a learner of world size {launch.world_size} "
            "(torchrun) needs engine.kind: deepspeed"
        )
    if cfg.engine.zero_stage > 2:
        raise ConfigError(
            "engine.zero_stage: 3 partitions the weights, but rank 0 serves PushWeights, EvaluateTextLoss and the "
            "checkpoint's module from its full copy; use zero_stage 0-2 with world size > 1"
        )
    for name, model in (("model", cfg.model), ("value_model", cfg.value_model)):
        if model is not None and model.device.startswith("cuda:"):
            raise ConfigError(
                f'{name}.device: {model.device!r} puts every rank on one GPU; use "cuda" '
                "(each rank takes the GPU of its LOCAL_RANK)"
            )


def select_device(launch: Launch) -> None:
    """On GPUs, "cuda" means this rank's GPU (LOCAL_RANK) from here on."""
    import torch

    if launch.world_size > 1 and torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank)


def die_with_launcher() -> None:
    """SIGTERM when the launcher (torchrun) dies, even by SIGKILL: no orphan holds the port or the GPU."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux/glibc
        pass


def ignore_stop_signals(rank: int) -> None:
    """Ranks > 0: SIGTERM/SIGINT are logged; the rank stops when rank 0 broadcasts Shutdown."""

    def on_signal(signum, _frame):
        # No lock in a handler (see runtime/role.py): the follower loop logs it at its next command or heartbeat.
        PENDING_SIGNALS.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


# -- commands ----------------------------------------------------------------
@dataclass(frozen=True)
class TrainStep:
    step: int
    batch: Batch  # validated on rank 0 (servicer.parse_batch)


@dataclass(frozen=True)
class ResetPolicy:
    policy_dir: str
    value_model_dir: str
    version: int


@dataclass(frozen=True)
class SaveCheckpoint:
    tag: str


@dataclass(frozen=True)
class Heartbeat:
    """Keeps idle followers within the collective timeout."""


@dataclass(frozen=True)
class Shutdown:
    pass


Command = TrainStep | ResetPolicy | SaveCheckpoint | Heartbeat | Shutdown


def abort(event: str, exc: BaseException | None = None, **fields: Any) -> NoReturn:
    """Ends this process now (exit 1): the group is broken or the ranks may disagree."""
    _log.error(event, error=repr(exc) if exc is not None else None, exit_code=EXIT_GROUP_FAILED, exc_info=exc, **fields)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    os._exit(EXIT_GROUP_FAILED)


# -- the groups --------------------------------------------------------------
class SingleRank:
    """One process: commands run in place, nothing is broadcast."""

    rank = 0
    world_size = 1

    @contextmanager
    def command(self, cmd: Command, summary: Callable[[], dict]) -> Iterator[None]:
        yield

    def agree(self, summary: dict) -> None:
        pass

    def barrier(self) -> None:
        pass

    def start_heartbeat(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class RankGroup:
    """Rank 0 sends commands, ranks > 0 receive them, over a gloo group of their own.

    Rank 0 holds `_lock` from a command's broadcast to the end of its
    execution, so the collectives of two commands (or of a command and a
    heartbeat) never interleave; learner.py takes its own lock first.
    """

    def __init__(self, timeout_s: float) -> None:
        import torch.distributed as dist

        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.timeout_s = timeout_s
        self.heartbeat_s = min(HEARTBEAT_MAX_SECONDS, timeout_s / 4)
        # Every rank creates it at the same point (Learner.__init__), as new_group requires.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self._lock = threading.Lock()
        self._last_sent = time.monotonic()
        self._closed = False
        self._stop = threading.Event()

    # rank 0 ------------------------------------------------------------------
    @contextmanager
    def command(self, cmd: Command, summary: Callable[[], dict]) -> Iterator[None]:
        """Rank 0: broadcasts `cmd`, runs the body (rank 0's part), then every rank agrees on `summary()`."""
        from alignd.runtime.errors import Unavailable

        name = type(cmd).__name__
        with self._lock:
            if self._closed:
                raise Unavailable("the learner is shutting down")
            self._send(cmd)
            try:
                yield
            except BaseException as exc:  # noqa: BLE001 - the followers ran (or run) it: we cannot undo
                abort("command_failed", exc, command=name, rank=self.rank)
            self.agree(summary())

    def _send(self, cmd: Command) -> None:
        import torch.distributed as dist

        try:
            dist.broadcast_object_list([cmd], src=0, group=self.group)
        except BaseException as exc:  # noqa: BLE001
            abort("rank_group_failed", exc, command=type(cmd).__name__, rank=self.rank, world_size=self.world_size)
        self._last_sent = time.monotonic()

    def start_heartbeat(self) -> None:
        threading.Thread(target=self._beat, name="rank-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s / 2):
            with self._lock:
                if self._closed:
                    return
                if time.monotonic() - self._last_sent >= self.heartbeat_s:
                    self._send(Heartbeat())

    def shutdown(self) -> None:
        """Rank 0, after its server stopped: every rank leaves its loop."""
        self._stop.set()
        with self._lock:  # waits for a command still running
            if self._closed:
                return
            self._closed = True
            self._send(Shutdown())
            self._barrier_or_abort("Shutdown")
        _log.info("ranks_stopped", world_size=self.world_size)
        self._destroy()

    # ranks > 0 ---------------------------------------------------------------
    def receive(self) -> Command:
        import torch.distributed as dist

        box: list[Any] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except BaseException as exc:  # noqa: BLE001 - rank 0 died, hung, or went silent past the timeout
            abort("rank_group_failed", exc, rank=self.rank, world_size=self.world_size, waiting_for="command")
        return box[0]

    def close(self) -> None:
        """Ranks > 0, on Shutdown."""
        self._barrier_or_abort("Shutdown")
        self._destroy()

    # every rank --------------------------------------------------------------
    def agree(self, summary: dict) -> None:
        """Every rank's `summary` must be equal (the same state after the same commands)."""
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, summary, group=self.group)
        except BaseException as exc:  # noqa: BLE001
            abort("rank_group_failed", exc, rank=self.rank, world_size=self.world_size, waiting_for="agreement")
        if any(s != out[0] for s in out):
            abort("ranks_diverged", rank=self.rank, summaries=out)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def _barrier_or_abort(self, after: str) -> None:
        try:
            self.barrier()
        except BaseException as exc:  # noqa: BLE001
            abort("rank_group_failed", exc, rank=self.rank, world_size=self.world_size, waiting_for=after)

    def _destroy(self) -> None:
        import torch.distributed as dist

        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - exiting anyway
            _log.warning("process_group_destroy_failed", error=repr(exc))


def open_group(cfg: LearnerConfig) -> SingleRank | RankGroup:
    """The learner's group: a RankGroup once torch.distributed runs with several ranks, else SingleRank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return RankGroup(cfg.engine.collective_timeout_seconds)
    return SingleRank()


def command_name(cmd: Command) -> str:
    return type(cmd).__name__


def follow(learner) -> int:
    """Ranks > 0: executes rank 0's commands until Shutdown; returns the exit code (0)."""
    group: RankGroup = learner.ranks
    _log.info(
        "follower_ready", rank=group.rank, world_size=group.world_size, step=learner.step, version=learner.version
    )
    while True:
        cmd = group.receive()
        while PENDING_SIGNALS:
            _log.info(
                "signal_received",
                signal=signal.Signals(PENDING_SIGNALS.pop(0)).name,
                rank=group.rank,
                action="wait_for_rank0_shutdown",
            )
        if isinstance(cmd, Heartbeat):
            continue
        if isinstance(cmd, Shutdown):
            group.close()
            _log.info("follower_stopped", rank=group.rank, step=learner.step)
            return 0
        t0 = time.perf_counter()
        try:
            learner.apply(cmd)
        except BaseException as exc:  # noqa: BLE001 - rank 0 ran it: this rank now differs
            abort("command_failed", exc, command=command_name(cmd), rank=group.rank)
        # Logged before the agreement that lets rank 0 answer: a caller that sees the answer finds this line.
        _log.info(
            "command_applied",
            command=command_name(cmd),
            rank=group.rank,
            step=learner.step,
            version=learner.version,
            seconds=round(time.perf_counter() - t0, 3),
        )
        group.agree(learner.summary())
