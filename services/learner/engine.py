"""Training engines: how the learner turns losses into parameter updates.

Everything above the engine (the PPO step, checkpoints, the servicer) is the
same for both implementations:

- `TorchEngine`: torch AdamW (fused where available) with two parameter groups (policy, value),
  global grad-norm clipping, and the InstructGPT schedule (linear warm-up from
  a tenth of the peak LR, then constant). The CPU default.
- `DeepSpeedEngine` (services/learner/deepspeed_engine.py): the same
  optimizer and schedule under DeepSpeed ZeRO (stage from config), over gloo
  on CPU or NCCL on GPUs.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from alignd.config import OptimizerConfig


class TrainEngine(Protocol):
    module: nn.Module

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> tuple[float, bool]:
        """Clips, applies the accumulated gradients; returns (grad_norm, applied)."""

    def zero_grad(self) -> None: ...

    def lr(self) -> float: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def adamw(params, fused: bool | None = None, **kwargs) -> torch.optim.AdamW:
    """torch AdamW; fused=None takes the fused kernel where torch has it for every parameter (CPU and CUDA floating
    point tensors): one pass per parameter instead of a loop of per-tensor ops, about 5x faster on 2 CPU cores for
    a 135M model (bench/NOTES.md). TRL's default optimizer (adamw_torch_fused) is the same kernel."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if fused is None:
        fused = bool(tensors) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in tensors)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def warmup_factor(step: int, warmup_steps: int, start_factor: float) -> float:
    """LR multiplier: start_factor at step 0 rising linearly to 1 at warmup_steps, then 1."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return start_factor + (1.0 - start_factor) * step / warmup_steps


def param_groups(module, cfg: OptimizerConfig) -> list[dict]:
    return [
        {"params": [p for p in module.policy_parameters() if p.requires_grad], "lr": cfg.lr, "name": "policy"},
        {
            "params": [p for p in module.value_parameters() if p.requires_grad],
            "lr": cfg.value_lr or cfg.lr,
            "name": "value",
        },
    ]


class TorchEngine:
    def __init__(self, module: nn.Module, cfg: OptimizerConfig, max_grad_norm: float) -> None:
        self.module = module
        self.cfg = cfg
        self.max_grad_norm = max_grad_norm
        self.optimizer = adamw(
            param_groups(module, cfg), cfg.fused, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_factor(s, cfg.warmup_steps, cfg.warmup_start_factor)
        )
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, bool]:
        norm = float(torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return norm, False
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
