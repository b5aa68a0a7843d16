"""alignd's extension of vLLM's workers (vLLM `worker_extension_cls`), called through `collective_rpc`.

Runs inside each vLLM worker process, beside its model runner: it loads new weights into the running model through
vLLM's in-place reload (the model's `load_weights`, which maps Hugging Face names onto vLLM's fused layers, then
each layer's processing), and joins a learner's weight group to receive its broadcasts (learner.weight_sync:
collective). No gRPC here.
"""

from __future__ import annotations

import datetime
import hashlib

import torch

from alignd.models.tensors import tensor_bytes

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8)
}


class AligndWorkerExtension:
    """Mixed into vLLM's worker class: `self.model_runner` is the worker's model runner."""

    def _alignd_model(self) -> torch.nn.Module:
        runner = self.model_runner  # type: ignore[attr-defined]
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    # --- a learner's weight group (ModelService.JoinWeightGroup / ReceiveWeights) -----------------------------------

    def alignd_join_group(self, req: dict) -> int:
        """Joins the group (req: JoinWeightGroupRequest's fields) as rank rank_offset + this worker's rank; returns
        the rank. Returns once every rank joined (gloo and NCCL connect all ranks when the group is made)."""
        from torch.distributed import PrefixStore, TCPStore

        self.alignd_leave_group()
        group, world_size = req["group"], req["world_size"]
        host, port = req["store_address"].rsplit(":", 1)
        timeout = datetime.timedelta(seconds=req["timeout_seconds"])
        rank = req["rank_offset"] + int(getattr(self, "rank", 0))
        store = PrefixStore(group, TCPStore(host.strip("[]"), int(port), world_size, False, timeout=timeout))
        if req["backend"] == "nccl":
            pg = torch.distributed.ProcessGroupNCCL(store, rank, world_size)
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            pg = torch.distributed.ProcessGroupGloo(store, rank, world_size, timeout)
            device = torch.device("cpu")
        self._alignd_group = (group, pg, device, timeout)
        self._alignd_received = None
        return rank

    def alignd_receive(self, group: str, specs: list[tuple[str, str, list[int]]], sha256: str) -> int:
        """Receives the tensors rank 0 broadcasts, in order, and keeps them for alignd_apply_received; raises (keeping
        nothing) when the SHA-256 of their bytes is not `sha256`. Returns the bytes received."""
        name, pg, device, timeout = self._alignd_joined(group)
        self._alignd_received = None
        digest, received, total = hashlib.sha256(), {}, 0
        for tname, dtype, shape in specs:
            t = torch.empty(shape, dtype=_DTYPES[dtype], device=device)
            pg.broadcast(t, 0, timeout).wait(timeout)
            data = tensor_bytes(t)
            digest.update(data)
            total += len(data)
            received[tname] = t
        if digest.hexdigest() != sha256:
            raise ValueError(f"sha256: received {digest.hexdigest()}, the learner sent {sha256}")
        self._alignd_received = received
        return total

    def alignd_apply_received(self) -> int:
        """Loads the received tensors into the served model (as alignd_load_weights); returns how many."""
        received, self._alignd_received = getattr(self, "_alignd_received", None), None
        if received is None:
            raise RuntimeError("no received weights to apply")
        with torch.no_grad():
            self.model_runner.reload_weights(weights_iterator=iter(received.items()), is_checkpoint_format=True)  # type: ignore[attr-defined]
            self._alignd_repack_kept_cpu_weights()
        return len(received)

    def alignd_drop_received(self) -> None:
        self._alignd_received = None

    def alignd_leave_group(self, group: str | None = None) -> None:
        """Leaves the weight group (`group`, or any)."""
        current = getattr(self, "_alignd_group", None)
        if current is not None and (group is None or current[0] == group):
            self._alignd_group = None
            self._alignd_received = None
            try:
                current[1].abort() if hasattr(current[1], "abort") else None
            except Exception:  # noqa: BLE001 - a group whose peers are gone: nothing left to release cleanly
                pass

    def _alignd_joined(self, group: str):
        current = getattr(self, "_alignd_group", None)
        if current is None or current[0] != group:
            raise RuntimeError(f"not in weight group {group!r}")
        return current

    # --- files -------------------------------------------------------------------------------------------------------

    def alignd_load_weights(self, files: list[str]) -> int:
        """Loads every tensor of these safetensors files (Hugging Face names) into the served model; returns how
        many tensors it read. The caller holds new requests back and resets the prefix cache afterwards."""
        from safetensors.torch import load_file

        count = 0

        def tensors():
            nonlocal count
            for f in files:
                for name, t in load_file(f).items():
                    count += 1
                    yield name, t

        # reload_weights, not the model's load_weights alone: after the first load the workers process weights into
        # their kernels' layout (CPU GEMM repacking, quantisation), and the in-place reload redoes that layer by layer.
        with torch.no_grad():
            self.model_runner.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)  # type: ignore[attr-defined]
            self._alignd_repack_kept_cpu_weights()
        return count

    def _alignd_repack_kept_cpu_weights(self) -> None:
        """CPU workers multiply with a packed copy of each linear layer's weight (oneDNN or SGL kernels, made by
        `dispatch_cpu_unquantized_gemm`). The reload repacks the layers it processes, but a layer whose weight is
        another's (GPT-2's and SmolLM2's lm_head, tied to the embedding) keeps its weight and the packed copy of the
        old one: greedy output after an update was neither model's. Repack every such layer from its weight."""
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        for module in self._alignd_model().modules():
            weight = getattr(module, "weight", None)
            if hasattr(module, "cpu_linear") and weight is not None and weight.ndim == 2 and weight.numel():
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
