"""How the learner's policy reaches the policy replicas (LearnerService.PushWeights).

weight_sync "stream": the chunked ModelService.UpdateWeights stream; "filesystem": the policy is written once to a
shared directory and every replica loads it with LoadWeights; "auto": filesystem in shared memory (/dev/shm) when
every replica is on this host's loopback and there is room, else the stream; "collective": a torch.distributed
broadcast to the replicas whose engine joins a weight group (services/learner/collective.py), the stream to the
others and to all when the group fails.

stage_only: the replicas receive and check the weights but keep serving their own (ModelService stage_only); a
replica that already holds this version staged is skipped. Without it, a replica holding this version staged only
commits it (CommitWeights, nothing sent); one that lost it (restarted) gets the weights in full. A replica that
serves a version above the learner's (weights the learner never published) is re-synced, never skipped.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import grpc

from alignd.atomic import publish_dir
from alignd.config import LearnerConfig
from alignd.models.weights import push_weights, shared_memory_dir
from alignd.runtime.addresses import is_loopback
from alignd.runtime.client import make_channel
from alignd.runtime.errors import FailedPrecondition, Unavailable
from alignd.runtime.logging import get_logger
from alignd.v1 import learner_pb2, model_pb2, model_pb2_grpc

_log = get_logger("alignd.learner.publisher")
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)


class PolicySource(Protocol):
    """What the publisher reads from the learner: the policy, its version, and the lock that guards both."""

    lock: threading.Lock
    version: int

    def policy_module(self): ...


class WeightPublisher:
    """Pushes the learner's current policy to replicas; remembers whether shared memory works (weight_sync auto)."""

    def __init__(self, cfg: LearnerConfig, source: PolicySource, published_root: Path) -> None:
        self.cfg, self.source = cfg, source
        self.published_root = Path(cfg.weight_sync_dir) if cfg.weight_sync_dir else published_root
        self._shm_dir: Path | bool | None = None  # weight_sync auto: None = not decided, False = no room or unusable
        self._group = None  # weight_sync collective: the WeightGroup, formed on the first push

    def push(self, addresses: list[str], *, stage_only: bool = False) -> learner_pb2.PushWeightsResponse:
        """Sends the current policy to every replica not already at this version (module docstring)."""
        with self.source.lock:
            version = self.source.version
            mode, path = self._publish(version, addresses)
        t0 = time.perf_counter()
        push = _Push(self, version, mode, path=path, stage_only=stage_only)
        broadcast: dict[str, int] = {}
        if self.cfg.weight_sync == "collective":
            broadcast = self._broadcast(push, addresses)
        rest = [a for a in addresses if a not in broadcast]
        with ThreadPoolExecutor(max_workers=max(1, len(rest))) as pool:
            sent = list(pool.map(push.to_replica, rest)) + list(broadcast.values())
        return learner_pb2.PushWeightsResponse(
            version=version,
            bytes_per_replica=max(sent, default=0),
            duration_seconds=time.perf_counter() - t0,
            staged=stage_only,
            committed_replicas=len(push.committed),
        )

    def _broadcast(self, push: _Push, addresses: list[str]) -> dict[str, int]:
        """weight_sync collective: the version over the weight group to every replica that can join one and needs
        the full weights; {address: bytes received}. Empty when there are none or the group failed (logged): the
        replicas then get the stream."""
        from alignd.services.learner.collective import WeightGroup, WeightGroupFailed

        ranks: dict[str, int] = {}
        for a in addresses:
            try:
                with make_channel(a, credentials=self.cfg.client) as ch:
                    info = model_pb2_grpc.ModelServiceStub(ch).GetInfo(model_pb2.GetInfoRequest(), timeout=30).info
            except grpc.RpcError:  # the stream path reports it
                continue
            staged = info.staged_weight_version == push.version
            if info.weight_group_ranks > 0 and info.weight_version < push.version and not staged:
                ranks[a] = info.weight_group_ranks
        if not ranks:
            return {}
        if self._group is None:
            self._group = WeightGroup(self.cfg)
        try:
            self._group.ensure(ranks)
            return self._group.broadcast(push.policy_state(), push.version, stage_only=push.stage_only)
        except WeightGroupFailed as exc:
            _log.warning("weight_sync_fallback", to="stream", reason=str(exc)[:500])
            return {}

    def close(self) -> None:
        """Removes the shared-memory directory of this process, if it made one, and leaves the weight group."""
        if isinstance(self._shm_dir, Path):
            shutil.rmtree(self._shm_dir, ignore_errors=True)
        if self._group is not None:
            self._group.dissolve()

    @property
    def uses_shared_memory(self) -> bool:
        return self.cfg.weight_sync == "auto"

    def _mode(self, addresses: list[str]) -> tuple[str, Path | None]:
        """("stream" | "filesystem", the directory to publish in)."""
        if self.cfg.weight_sync in ("stream", "collective"):  # collective: the stream to replicas out of the group
            return "stream", None
        if self.cfg.weight_sync == "filesystem":
            return "filesystem", self.published_root
        if not all(is_loopback(a) for a in addresses):
            return "stream", None
        if self._shm_dir is None:  # room for three copies: two published, one in the making
            need = 3 * sum(p.numel() * p.element_size() for p in self.source.policy_module().parameters())
            self._shm_dir = shared_memory_dir(need) or False
        return ("filesystem", self._shm_dir) if self._shm_dir else ("stream", None)

    def _publish(self, version: int, addresses: list[str]) -> tuple[str, str | None]:
        """The mode of this push, and with "filesystem" the published directory (the lock held)."""
        mode, root = self._mode(addresses)
        if mode != "filesystem":
            return mode, None
        try:
            return mode, str(self._publish_dir(version, root).resolve())
        except OSError as err:  # shared memory full since it was checked: the stream, from now on
            if not self.uses_shared_memory:
                raise
            self.shared_memory_failed(str(err))
            return "stream", None

    def _publish_dir(self, version: int, root: Path) -> Path:
        """The policy of `version` as a save_pretrained directory in `root` (written once; one older one is kept
        for replicas still loading it)."""
        final = root / f"policy-v{version:08d}"
        if not final.exists():
            tmp = root / f".tmp-{final.name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            self.source.policy_module().save_pretrained(tmp)
            publish_dir(tmp, final)
            for old in sorted(p for p in root.glob("policy-v*") if p != final)[:-1]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def shared_memory_failed(self, why: str) -> None:
        """weight_sync auto: shared memory did not work (full, or a replica cannot see it); the stream from now on."""
        _log.warning("weight_sync_fallback", to="stream", reason=why)
        self.close()
        self._shm_dir = False


class _Push:
    """One push of one version to a set of replicas (PushWeights), one thread per replica."""

    def __init__(self, publisher: WeightPublisher, version: int, mode: str, *, path: str | None, stage_only: bool):
        self.p, self.version, self.mode, self.path, self.stage_only = publisher, version, mode, path, stage_only
        self.committed: list[str] = []
        self._state: dict | None = None

    def to_replica(self, address: str) -> int:
        """Bytes sent to `address`. A replica that is down, restarting or busy: Unavailable (the coordinator retries
        the push); one that refuses the weights (version, architecture, credentials): FailedPrecondition."""
        try:
            return self._send(address)
        except grpc.RpcError as err:
            if err.code() in _RETRYABLE:
                raise Unavailable(
                    f"policy replica {address} is unavailable ({err.code().name}); retry the push"
                ) from None
            raise FailedPrecondition(
                f"policy replica {address} refused the weights: {err.code().name}: {(err.details() or '')[:300]}"
            ) from None

    def _send(self, address: str) -> int:
        with make_channel(address, credentials=self.p.cfg.client) as ch:
            stub = model_pb2_grpc.ModelServiceStub(ch)
            info = stub.GetInfo(model_pb2.GetInfoRequest(), timeout=30).info
            if info.weight_version == self.version or (self.stage_only and info.staged_weight_version == self.version):
                return 0
            if info.weight_version > self.version:
                _log.warning(
                    "replica_version_unknown",
                    replica=address,
                    replica_version=info.weight_version,
                    version=self.version,
                )
                return self._resync_newer(stub, ch)
            if info.staged_weight_version == self.version and self._commit(stub, address):
                return 0
            resp, sent = self._load(stub, address) if self.mode == "filesystem" else self._stream(ch)
            if self.stage_only and not resp.staged:
                raise FailedPrecondition(
                    f"policy replica {address} applied version {self.version} instead of staging it "
                    "(it predates stage_only); push without stage_only"
                )
            return sent

    def _commit(self, stub, address: str) -> bool:
        """Applies the weights the replica holds staged; False when it must get them in full (no longer staged)."""
        try:
            stub.CommitWeights(model_pb2.CommitWeightsRequest(version=self.version), timeout=600)
            self.committed.append(address)
            return True
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            # Replaced or restarted since GetInfo: sent in full, unless another push applied it meanwhile.
            _log.info("staged_weights_lost", replica=address, version=self.version, error=err.details())
            return stub.GetInfo(model_pb2.GetInfoRequest(), timeout=30).info.weight_version == self.version

    def _load(self, stub, address: str):
        """LoadWeights of the published directory: (response, 0 bytes sent)."""
        try:
            req = model_pb2.LoadWeightsRequest(path=self.path, version=self.version, stage_only=self.stage_only)
            return stub.LoadWeights(req, timeout=600), 0
        except grpc.RpcError as err:
            if not self.p.uses_shared_memory or err.code() in _RETRYABLE[:2]:
                raise
            # On loopback but not sharing this /dev/shm (a container of its own): the stream from now on; the
            # caller retries the push.
            self.p.shared_memory_failed(f"{address}: {err.details()}")
            raise Unavailable(
                f"policy replica {address} cannot read {self.path}; retry the push (as a stream)"
            ) from None

    def _stream(self, ch, **kw):
        """The UpdateWeights stream: (response, bytes sent)."""
        resp = push_weights(
            ch,
            self.policy_state(),
            self.version,
            chunk_bytes=self.p.cfg.push_chunk_bytes,
            stage_only=self.stage_only,
            **kw,
        )
        return resp, int(resp.received_bytes)

    def _resync_newer(self, stub, ch) -> int:
        """The full policy to a replica that serves a version above ours (applied at once, never staged)."""
        if self.mode == "filesystem":
            req = model_pb2.LoadWeightsRequest(path=self.path, version=self.version, replace_newer=True)
            stub.LoadWeights(req, timeout=600)
            return 0
        resp = push_weights(
            ch, self.policy_state(), self.version, chunk_bytes=self.p.cfg.push_chunk_bytes, replace_newer=True
        )
        return int(resp.received_bytes)

    def policy_state(self) -> dict:
        """The stream's copy of the policy, made once, and only when a replica needs more than a commit."""
        with self.p.source.lock:
            if self._state is None:
                if self.p.source.version != self.version:
                    raise Unavailable(f"the policy changed from version {self.version} during the push; retry it")
                self._state = {k: v.detach().clone() for k, v in self.p.source.policy_module().state_dict().items()}
            return self._state
