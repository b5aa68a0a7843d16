"""learner.weight_sync: collective: the learner (rank 0) broadcasts the policy to the vLLM workers of the policy
replicas through a torch.distributed group: NCCL on GPUs, gloo on CPU (what CI runs).

The group is formed on the first push (ModelService.JoinWeightGroup on each replica that reports
ModelInfo.weight_group_ranks > 0, while this process hosts the group's TCPStore and takes rank 0) and kept for
later pushes. A push calls ReceiveWeights on every member, with the tensors' names, shapes, dtypes and the SHA-256
of their bytes, and broadcasts the tensors in that order meanwhile; each replica checks and applies (or stages)
them as it would a stream. Whatever fails (a replica that cannot join, one that dies mid-broadcast, a timeout), the
group is dissolved and WeightGroupFailed raised: the publisher then sends that push by stream, and forms a new group
on the next one.
"""

from __future__ import annotations

import datetime
import hashlib
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from alignd.config import LearnerConfig
from alignd.models.tensors import TORCH_TO_PB, tensor_bytes
from alignd.models.weights import unique_tensors
from alignd.runtime.addresses import is_loopback
from alignd.runtime.client import make_channel
from alignd.runtime.logging import get_logger
from alignd.v1 import model_pb2, model_pb2_grpc

_log = get_logger("alignd.learner.collective")


class WeightGroupFailed(Exception):
    """The group could not be formed or a broadcast failed; the group is gone."""


class WeightGroup:
    """This learner's weight group: rank 0, the store, and the member replicas with their first ranks."""

    def __init__(self, cfg: LearnerConfig) -> None:
        self.cfg = cfg
        self.timeout = datetime.timedelta(seconds=cfg.weight_group_timeout_s)
        self.backend = cfg.weight_group_backend
        if self.backend == "auto":
            self.backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.members: dict[str, int] = {}  # address -> first rank
        self.name: str | None = None
        self._pg = None
        self._store = None

    def _stub(self, address: str, fn):
        with make_channel(address, credentials=self.cfg.client) as ch:
            return fn(model_pb2_grpc.ModelServiceStub(ch))

    def _host(self, addresses: list[str]) -> str:
        if self.cfg.weight_group_host:
            return self.cfg.weight_group_host
        if all(is_loopback(a) for a in addresses):
            return "127.0.0.1"
        return socket.gethostbyname(socket.gethostname())

    def ensure(self, ranks_by_address: dict[str, int]) -> None:
        """Keeps the group when its members are these replicas, else forms a new one with them (ranks_by_address:
        each replica's ModelInfo.weight_group_ranks, all > 0). WeightGroupFailed when it cannot be formed."""
        if self._pg is not None and set(self.members) == set(ranks_by_address):
            return
        self.dissolve()
        from torch.distributed import PrefixStore, TCPStore

        addresses = sorted(ranks_by_address)
        offsets, world = {}, 1
        for a in addresses:
            offsets[a] = world
            world += ranks_by_address[a]
        name = f"alignd-weights-{uuid.uuid4().hex[:12]}"
        host = self._host(addresses)
        timeout_s = self.cfg.weight_group_timeout_s
        try:
            store = TCPStore(host, 0, world, True, timeout=self.timeout, wait_for_workers=False)
        except (RuntimeError, OSError) as exc:
            raise WeightGroupFailed(f"the group store could not listen on {host}: {exc}") from None
        address = f"{host}:{store.port}"

        def join(a: str):
            req = model_pb2.JoinWeightGroupRequest(
                group=name,
                store_address=address,
                world_size=world,
                rank_offset=offsets[a],
                backend=self.backend,
                timeout_seconds=timeout_s,
            )
            return self._stub(a, lambda stub: stub.JoinWeightGroup(req, timeout=timeout_s + 60))

        with ThreadPoolExecutor(max_workers=len(addresses)) as pool:
            joins = {a: pool.submit(join, a) for a in addresses}
            try:
                pg = self._make_pg(PrefixStore(name, store), world)
                for f in joins.values():
                    f.result()
            except (grpc.RpcError, RuntimeError) as exc:
                for f in joins.values():
                    f.cancel()
                self._leave(addresses, name)
                why = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                raise WeightGroupFailed(f"the weight group did not form: {why}") from None
        self.name, self.members, self._pg, self._store = name, offsets, pg, store
        _log.info("weight_group_formed", group=name, replicas=len(addresses), world_size=world, backend=self.backend)

    def _make_pg(self, store, world: int):
        if self.backend == "nccl":
            return torch.distributed.ProcessGroupNCCL(store, 0, world)
        return torch.distributed.ProcessGroupGloo(store, 0, world, self.timeout)

    def broadcast(self, state: dict[str, torch.Tensor], version: int, *, stage_only: bool) -> dict[str, int]:
        """Sends `state` (the policy's state dict) as `version` to every member; bytes received by each replica.
        WeightGroupFailed (the group dissolved) when a replica fails or the broadcast does not finish in time."""
        tensors = unique_tensors(state)
        specs = [
            model_pb2.TensorSpec(name=n, dtype=TORCH_TO_PB[t.dtype], shape=list(t.shape)) for n, t in tensors.items()
        ]
        req = model_pb2.ReceiveWeightsRequest(
            group=self.name, version=version, tensors=specs, sha256=self.digest(tensors), stage_only=stage_only
        )
        wait_s = 2 * self.cfg.weight_group_timeout_s + 120
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        with ThreadPoolExecutor(max_workers=len(self.members)) as pool:
            calls = {
                a: pool.submit(self._stub, a, lambda stub: stub.ReceiveWeights(req, timeout=wait_s))
                for a in self.members
            }
            try:
                for t in tensors.values():
                    self._pg.broadcast(t.detach().to(device).contiguous(), 0, self.timeout).wait(self.timeout)
                done = {a: int(f.result().received_bytes) for a, f in calls.items()}
            except (grpc.RpcError, RuntimeError) as exc:
                failed = self.name
                self.dissolve()
                why = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                raise WeightGroupFailed(f"the broadcast of version {version} over {failed} failed: {why}") from None
        return done

    @staticmethod
    def digest(tensors: dict[str, torch.Tensor]) -> str:
        """Hex SHA-256 over the tensors' bytes in order: what each receiving worker checks."""
        h = hashlib.sha256()
        for t in tensors.values():
            h.update(tensor_bytes(t))
        return h.hexdigest()

    def _leave(self, addresses, name: str) -> None:
        for a in addresses:
            try:
                self._stub(
                    a, lambda stub: stub.LeaveWeightGroup(model_pb2.LeaveWeightGroupRequest(group=name), timeout=10)
                )
            except grpc.RpcError:  # a replica that is gone has left
                pass

    def dissolve(self) -> None:
        """Tells the members to leave and drops rank 0's group and store."""
        if self.name is None:
            return
        name, members, pg = self.name, list(self.members), self._pg
        self.name, self.members, self._pg, self._store = None, {}, None, None
        try:
            if pg is not None and hasattr(pg, "abort"):
                pg.abort()
        except RuntimeError:
            pass
        self._leave(members, name)
        _log.info("weight_group_dissolved", group=name)
