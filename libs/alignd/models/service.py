"""alignd.v1.ModelService, shared by every role that serves a model."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from alignd.models.handle import ModelHandle, read_weights_dir, read_weights_shapes
from alignd.models.scoring import POOLINGS, SCORE_BIAS_KEY, SCORE_POOLING_KEY
from alignd.models.weights import receive_stream
from alignd.runtime.auth import caller_is_admin
from alignd.runtime.errors import Aborted, FailedPrecondition, InvalidArgument
from alignd.runtime.logging import get_logger
from alignd.runtime.server import ServiceHost
from alignd.v1 import model_pb2, model_pb2_grpc

_log = get_logger("alignd.model_service")


def _score_config_of(path: str) -> tuple[float, str]:
    """(bias, pooling) of a reward model directory's config.json (0 and "last" when it does not say)."""
    import json
    from pathlib import Path

    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return 0.0, "last"
    try:
        data = json.loads(cfg.read_text())
        bias, pooling = float(data.get(SCORE_BIAS_KEY, 0.0) or 0.0), data.get(SCORE_POOLING_KEY) or "last"
    except (ValueError, TypeError, AttributeError):
        raise InvalidArgument("path", f"{cfg}: unreadable config.json") from None
    if pooling not in POOLINGS:
        raise InvalidArgument("path", f"{cfg}: {SCORE_POOLING_KEY} {pooling!r} is not one of {', '.join(POOLINGS)}")
    return bias, pooling


class WeightMetrics:
    """alignd_<slug>_weight_* metrics of one role."""

    def __init__(self, slug: str, registry: CollectorRegistry) -> None:
        self.version = Gauge(f"alignd_{slug}_weight_version", "Weight version being served.", registry=registry)
        self.updates = Counter(
            f"alignd_{slug}_weight_updates_total",
            "Weight updates by result (applied, rejected, staged: received and checked, applied later by "
            "CommitWeights).",
            ["result"],
            registry=registry,
        )
        for result in ("applied", "rejected", "staged"):  # exported at 0 from the start, so rate() sees the first one
            self.updates.labels(result)
        self.bytes = Counter(
            f"alignd_{slug}_weight_update_bytes_total", "Bytes of weights received.", registry=registry
        )
        self.memory = Gauge(
            f"alignd_{slug}_model_memory_bytes",
            "Bytes of the served model's parameters and buffers, by device (cpu, cuda:N).",
            ["device"],
            registry=registry,
        )
        self.gpu_memory = Gauge(
            f"alignd_{slug}_gpu_memory_allocated_bytes",
            "torch.cuda.memory_allocated of the role's CUDA device (exported only when the model is on a GPU).",
            ["device"],
            registry=registry,
        )
        self.seconds = Histogram(
            f"alignd_{slug}_weight_update_seconds",
            "Time to receive and apply a weight update, in seconds.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry,
        )


@dataclass
class Staged:
    """Weights received and checked by a stage_only update, waiting for CommitWeights."""

    version: int
    apply: Callable[[], int]  # applies them (under the handle's lock); returns the tensor count


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    """GetInfo / UpdateWeights / LoadWeights / CommitWeights over a ModelHandle.

    The handle is set once the role's model is loaded; until then calls
    answer UNAVAILABLE (and health says NOT_SERVING). A stage_only update
    keeps the weights it received (one set at most: a later update replaces
    them) until CommitWeights applies them.
    """

    def __init__(self, slug: str, host: ServiceHost, *, accepts_updates: bool = True, roots=None) -> None:
        self.slug = slug
        self.roots = roots  # alignd.runtime.paths.Roots: where LoadWeights may read from
        self.host = host
        self.handle: ModelHandle | None = None
        self.accepts_updates = accepts_updates
        self.metrics = WeightMetrics(slug, host.registry)
        self.staged: Staged | None = None  # set and cleared with the update slot held

    def attach(self, handle: ModelHandle) -> None:
        self.handle = handle
        self.metrics.version.set(handle.version)
        by_device = self._report_memory(handle)
        in_process = not any(p.is_meta for p in handle.model.parameters())  # else no CUDA memory of this process
        for device in by_device:
            if device.startswith("cuda") and in_process:
                import torch

                self.metrics.gpu_memory.labels(device).set_function(lambda d=device: torch.cuda.memory_allocated(d))

    def _report_memory(self, handle: ModelHandle) -> dict[str, int]:
        """alignd_<slug>_model_memory_bytes{device} of the served model; returns the bytes by device."""
        by_device: dict[str, int] = {}
        for t in [*handle.model.parameters(), *handle.model.buffers()]:
            # Meta tensors: the weights live in an engine's workers (vLLM), on the configured device.
            device = str(handle.device) if t.is_meta else str(t.device)
            by_device[device] = by_device.get(device, 0) + t.numel() * t.element_size()
        for device, n in by_device.items():
            self.metrics.memory.labels(device).set(n)
        return by_device

    def _handle(self, context) -> ModelHandle:
        if self.handle is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "model is still loading")
        return self.handle

    def GetInfo(self, request, context):
        info = self._handle(context).info()
        if self.host.authenticator is not None and not caller_is_admin():
            info.model_path = ""  # where the weights live is for admins (docs/security.md)
        staged = self.staged
        info.staged_weight_version = staged.version if staged is not None else 0
        return model_pb2.GetInfoResponse(info=info)

    def _drop_outdated_staged(self, handle: ModelHandle) -> None:
        """Staged weights no newer than those now served are of no use any more (a stage_only update replaces
        the staged set instead)."""
        if self.staged is not None and self.staged.version <= handle.version:
            self.staged = None

    def _swap(self, handle: ModelHandle, fn):
        """Runs `fn` with the update slot held and health NOT_SERVING."""
        if not self.accepts_updates:
            raise FailedPrecondition(f"the {self.slug} role owns its weights and does not accept updates")
        if not handle.begin_update():
            raise Aborted("another weight update is in progress")
        try:
            return fn()
        finally:
            handle.end_update()

    def _counted_swap(self, handle: ModelHandle, fn, start: float) -> tuple[int, float]:
        """_swap(fn), counting a failure as a rejected update; (fn's result, seconds since start)."""
        try:
            n = self._swap(handle, fn)
        except Exception:
            self.metrics.updates.labels("rejected").inc()
            raise
        return n, time.perf_counter() - start

    def UpdateWeights(self, request_iterator, context):
        handle = self._handle(context)
        start = time.perf_counter()

        def run():
            try:
                received = receive_stream(request_iterator, handle.state_dict())
                handle.check_version(received.version, replace_newer=received.replace_newer)
                if received.stage_only:
                    handle.check_tensors(received.tensors, partial=received.partial)
            except Exception:
                self.metrics.updates.labels("rejected").inc()
                raise
            if received.stage_only:
                self.staged = Staged(
                    received.version,
                    lambda: handle.apply_weights(received.tensors, received.version, partial=received.partial),
                )
                return received, len(received.tensors)
            self.host.set_serving(False)
            try:
                n = handle.apply_weights(
                    received.tensors, received.version, partial=received.partial, replace_newer=received.replace_newer
                )
            finally:
                self.host.set_serving(True)
            self._drop_outdated_staged(handle)
            return received, n

        try:
            received, n = self._swap(handle, run)
        except (InvalidArgument, FailedPrecondition) as exc:
            _log.info("weights_rejected", error=exc.message)
            raise
        elapsed = time.perf_counter() - start
        self.metrics.updates.labels("staged" if received.stage_only else "applied").inc()
        self.metrics.bytes.inc(received.received_bytes)
        self.metrics.seconds.observe(elapsed)
        self.metrics.version.set(handle.version)
        _log.info(
            "weights_staged" if received.stage_only else "weights_updated",
            version=received.version,
            received_bytes=received.received_bytes,
            seconds=round(elapsed, 4),
        )
        return model_pb2.UpdateWeightsResponse(
            version=handle.version,
            received_bytes=received.received_bytes,
            num_tensors=n,
            duration_seconds=elapsed,
            staged=received.stage_only,
        )

    def LoadWeights(self, request, context):
        handle = self._handle(context)
        if not request.path:
            raise InvalidArgument("path", "must not be empty")
        if self.roots is not None:
            request.path = str(self.roots.check(request.path, "path"))
        start = time.perf_counter()
        bias, pooling = 0.0, "last"

        def apply(tensors) -> int:
            n = handle.apply_weights(tensors, request.version, partial=False, replace_newer=request.replace_newer)
            # A reward model's normalisation bias and pooling travel in its config.json.
            setattr(handle.model.config, SCORE_BIAS_KEY, bias)
            setattr(handle.model.config, SCORE_POOLING_KEY, pooling)
            return n

        def run():
            nonlocal bias, pooling
            if request.stage_only and request.replace_newer:
                raise InvalidArgument("replace_newer", "not with stage_only: a re-sync is applied at once")
            handle.check_version(request.version, replace_newer=request.replace_newer)
            bias, pooling = _score_config_of(request.path)
            reload = handle.reloader is not None and not handle.fits(read_weights_shapes(request.path))
            if reload and request.stage_only:
                raise InvalidArgument(
                    "stage_only",
                    f"{request.path} holds another architecture: it is loaded as a model, which cannot be staged",
                )
            tensors = None if reload else read_weights_dir(request.path)  # a reload reads the directory itself
            if request.stage_only:
                handle.check_tensors(tensors, partial=False)
                self.staged = Staged(request.version, lambda: apply(tensors))
                return len(tensors)
            self.host.set_serving(False)
            try:
                if reload:
                    # Another architecture (a reward model of another depth): load the directory as a model.
                    try:
                        model = handle.reloader(request.path)
                    except (ValueError, OSError) as exc:
                        raise InvalidArgument("path", f"{request.path}: {exc}") from None
                    n = handle.replace_model(model, request.version, replace_newer=request.replace_newer)
                else:
                    n = apply(tensors)
            finally:
                self.host.set_serving(True)
            self._drop_outdated_staged(handle)
            return n

        n, elapsed = self._counted_swap(handle, run, start)
        if request.stage_only:
            self.metrics.updates.labels("staged").inc()
            _log.info("weights_staged", version=request.version, seconds=round(elapsed, 4))
            return model_pb2.LoadWeightsResponse(
                version=handle.version, num_tensors=n, duration_seconds=elapsed, staged=True
            )
        self.metrics.updates.labels("applied").inc()
        self.metrics.version.set(handle.version)
        self._report_memory(handle)
        _log.info("weights_loaded", version=handle.version, seconds=round(elapsed, 4))
        return model_pb2.LoadWeightsResponse(version=handle.version, num_tensors=n, duration_seconds=elapsed)

    def CommitWeights(self, request, context):
        handle = self._handle(context)
        start = time.perf_counter()

        def run():
            staged = self.staged
            if staged is None or staged.version != request.version:
                have = f"version {staged.version} is" if staged is not None else "none are"
                raise FailedPrecondition(f"version: no weights of version {request.version} are staged ({have})")
            self.staged = None
            handle.check_version(staged.version)
            self.host.set_serving(False)
            try:
                return staged.apply()
            finally:
                self.host.set_serving(True)

        n, elapsed = self._counted_swap(handle, run, start)
        self.metrics.updates.labels("applied").inc()
        self.metrics.seconds.observe(elapsed)
        self.metrics.version.set(handle.version)
        _log.info("weights_committed", version=handle.version, seconds=round(elapsed, 4))
        return model_pb2.CommitWeightsResponse(version=handle.version, num_tensors=n, duration_seconds=elapsed)

    # --- a learner's weight group (learner.weight_sync: collective) -------------------------------------------------

    def _group_handle(self, context) -> ModelHandle:
        handle = self._handle(context)
        if not self.accepts_updates:
            raise FailedPrecondition(f"the {self.slug} role owns its weights and does not accept updates")
        if handle.weight_group_ranks == 0:
            raise FailedPrecondition(
                f"this {self.slug} replica's engine cannot join a weight group (ModelInfo.weight_group_ranks is 0); "
                "send its weights with UpdateWeights or LoadWeights"
            )
        return handle

    def JoinWeightGroup(self, request, context):
        handle = self._group_handle(context)
        if not request.group:
            raise InvalidArgument("group", "must not be empty")
        host, _, port = request.store_address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument("store_address", f"must be host:port, got {request.store_address!r}")
        if request.backend not in ("gloo", "nccl"):
            raise InvalidArgument("backend", f"must be gloo or nccl, got {request.backend!r}")
        if request.rank_offset < 1 or request.rank_offset + handle.weight_group_ranks > request.world_size:
            raise InvalidArgument(
                "rank_offset",
                f"ranks {request.rank_offset}..{request.rank_offset + handle.weight_group_ranks - 1} do not fit a "
                f"world of {request.world_size} with the learner at 0",
            )
        if not 0 < request.timeout_seconds <= 3600:
            raise InvalidArgument("timeout_seconds", f"must be in (0, 3600], got {request.timeout_seconds}")
        ranks = handle.join_weight_group(request)
        _log.info("weight_group_joined", group=request.group, ranks=ranks, rank_offset=request.rank_offset)
        return model_pb2.JoinWeightGroupResponse(ranks=ranks)

    def LeaveWeightGroup(self, request, context):
        handle = self._group_handle(context)
        handle.leave_weight_group(request.group)
        return model_pb2.LeaveWeightGroupResponse()

    def ReceiveWeights(self, request, context):
        import torch

        from alignd.models.tensors import PB_TO_TORCH

        handle = self._group_handle(context)
        start = time.perf_counter()
        if not request.tensors:
            raise InvalidArgument("tensors", "must name at least one tensor")
        if len(request.sha256) != 64:
            raise InvalidArgument("sha256", "must be 64 hex digits")
        specs, meta = [], {}
        for i, spec in enumerate(request.tensors):
            if spec.dtype not in PB_TO_TORCH:
                raise InvalidArgument(f"tensors[{i}].dtype", f"unknown dtype {spec.dtype}")
            if any(d < 0 for d in spec.shape):
                raise InvalidArgument(f"tensors[{i}].shape", f"negative dimension in {list(spec.shape)}")
            if spec.name in meta:
                raise InvalidArgument(f"tensors[{i}].name", f"{spec.name!r} twice")
            dtype = PB_TO_TORCH[spec.dtype]
            meta[spec.name] = torch.empty(list(spec.shape), dtype=dtype, device="meta")
            specs.append((spec.name, str(dtype).removeprefix("torch."), list(spec.shape)))

        def run():
            handle.check_version(request.version, replace_newer=request.replace_newer)
            handle.check_tensors(meta, partial=request.partial)
            received = handle.receive_weights(request, specs)
            self.metrics.bytes.inc(received)
            if request.stage_only:
                self.staged = Staged(request.version, lambda: handle.apply_received(request.version))
                return received, len(specs)
            self.host.set_serving(False)
            try:
                n = handle.apply_received(request.version, replace_newer=request.replace_newer)
            finally:
                self.host.set_serving(True)
            self._drop_outdated_staged(handle)
            return received, n

        (received, n), elapsed = self._counted_swap(handle, run, start)  # a failure counts as a rejected update
        self.metrics.updates.labels("staged" if request.stage_only else "applied").inc()
        self.metrics.seconds.observe(elapsed)
        self.metrics.version.set(handle.version)
        _log.info(
            "weights_staged" if request.stage_only else "weights_received",
            version=request.version,
            received_bytes=received,
            seconds=round(elapsed, 4),
        )
        return model_pb2.ReceiveWeightsResponse(
            version=handle.version,
            num_tensors=n,
            received_bytes=received,
            duration_seconds=elapsed,
            staged=request.stage_only,
        )
