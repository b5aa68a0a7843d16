"""alignd's extension of vLLM's workers (vLLM `worker_extension_cls`), called through `collective_rpc`.

Runs inside each vLLM worker process, beside its model runner: it loads new weights into the running model through
vLLM's in-place reload (the model's `load_weights`, which maps Hugging Face names onto vLLM's fused layers, then
each layer's processing), and digests the weights a
worker serves so tests and operators can compare replicas. No gRPC here.
"""

from __future__ import annotations

import hashlib

import torch


class AligndWorkerExtension:
    """Mixed into vLLM's worker class: `self.model_runner` is the worker's model runner."""

    def _alignd_model(self) -> torch.nn.Module:
        runner = self.model_runner  # type: ignore[attr-defined]
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

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

    def alignd_weights_digest(self) -> str:
        """SHA-256 over the served parameters (vLLM's names, sorted; bytes as stored): equal digests, equal
        weights."""
        h = hashlib.sha256()
        for name, p in sorted(self._alignd_model().state_dict().items()):
            t = p.detach().to("cpu").contiguous().reshape(-1)
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()
