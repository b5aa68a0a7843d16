"""The DeepSpeed training engine: `TorchEngine`'s optimizer under ZeRO, data parallel.

Same optimizer semantics as `engine.TorchEngine`: torch AdamW (a client
optimizer, so no fused/cpu Adam op is built) with the two parameter groups of
`engine.param_groups` (policy at `lr`, value at `value_lr`), betas, eps,
weight decay, the warm-up schedule of `engine.warmup_factor` (a LambdaLR on
the optimizer DeepSpeed steps), global grad-norm clipping at
`ppo.max_grad_norm` (DeepSpeed's `gradient_clipping`) and a skipped update
when the gradient norm is not finite. ZeRO stage from `engine.zero_stage`,
bf16 from `engine.bf16`.

Processes: one (the learner as it is; torch.distributed is initialised over
gloo on a free loopback port when nobody did) or N under `torchrun`
(`torchrun --nproc_per_node N ...`: RANK/WORLD_SIZE/MASTER_* come from the
environment; the learner service then serves from rank 0 and the other ranks
follow its commands, ranks.py). Backend: NCCL when CUDA is available, else
gloo. Every collective times out after `engine.collective_timeout_seconds`
(given to `init_process_group`): a rank that died or hangs makes the others
fail instead of waiting forever. Every rank must call `PPOTrainer.step` with
the same batch; the trainer gives each rank its share of every minibatch
(`reduction.py`). DeepSpeed AVERAGES gradients
over ranks, while the shares' gradients must be SUMMED (each rank's loss is
already normalised by the global token count), so `backward` scales the loss
by the world size: mean_r(W * grad L_r) = sum_r grad L_r = grad L. (ZeRO-2's
reduce-scatter path refuses `gradient_predivide_factor`, so the scaling is in
the loss; with one process it is a multiplication by 1.0.)

DeepSpeed's first `initialize` JIT-compiles its shared-memory collective op
with g++ (1-2 minutes on CPU); gloo does not need it, so it is skipped
(`_skip_shm_op`).

Checkpoint (`state_dict`, one file per rank in the learner's checkpoints,
checkpoint.py): this rank's ZeRO optimizer state (for stage >= 1
its partition of the fp32 master weights and Adam moments; for stage 0 the
whole torch optimizer), the LR scheduler, the world size and the ZeRO stage.
The module's weights are not in it (the learner saves them with the module
state dict, and `load_state_dict` refreshes ZeRO's fp32 master copy from
them), so restore the module first, then the engine, with the same world size
and stage. Stage 3 partitions the parameters themselves: `module.state_dict()`
then holds placeholders, which the learner's checkpoints and weight pushes do
not gather yet (use stage 0-2 with the learner; a learner of world size > 1
refuses stage 3 at start-up, ranks.check_config).
"""

from __future__ import annotations

import importlib
import math
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from alignd.config import LearnerConfig
from alignd.services.learner.engine import param_groups, warmup_factor


def _skip_shm_op() -> None:
    """No JIT build of DeepSpeed's shm comm op (ENV.md: 1-2 min of g++; gloo does not use it).

    The module must be fetched with importlib: `import deepspeed.comm.torch
    as m` binds the torch package that `deepspeed.comm` re-exports under the
    same name, and the patch would miss.
    """
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> None:
    """torch.distributed from torchrun's environment, or a one-process group on loopback.

    timeout_s: how long any collective (and the rendezvous) may wait for the other ranks.
    """
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=timeout_s)
    if all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:
        os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize insists on it
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timeout
        )


def ds_config(cfg: LearnerConfig) -> dict:
    """The DeepSpeed config: ZeRO stage, bf16, clipping; batch sizes are nominal (the trainer feeds minibatches)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.ppo.max_grad_norm,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": cfg.engine.bf16},
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    def __init__(self, module: nn.Module, cfg: LearnerConfig) -> None:
        import deepspeed

        _skip_shm_op()
        init_distributed(timeout_s=cfg.engine.collective_timeout_seconds)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.module = module
        self.cfg = cfg
        self.zero_stage = cfg.engine.zero_stage
        self.dp_rank = dist.get_rank()
        self.dp_world_size = dist.get_world_size()
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(
            param_groups(module, o), betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
        )
        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=module,
            optimizer=self.optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: warmup_factor(s, o.warmup_steps, o.warmup_start_factor)
            ),
            config=ds_config(cfg),
            dist_init_required=False,
        )

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; the trainer's per-rank losses
        # are shares of the minibatch loss whose gradients must add up (module docstring).
        self.ds.backward(loss * self.dp_world_size)

    def step(self) -> tuple[float, bool]:
        """Clips, applies the reduced gradients; returns (grad_norm before clipping, applied)."""
        if self.zero_stage == 0:
            # Without ZeRO, DeepSpeed neither reports the norm nor skips a
            # non-finite update: the gradients are whole on every rank here.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if not math.isfinite(norm):
                self.ds.zero_grad()
                return norm, False
            self.ds.step()
            return norm, True
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        applied = not getattr(self.ds.optimizer, "overflow", False)
        return norm, applied

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        """This rank's optimizer state and the schedule (module docstring)."""
        return {
            "world_size": self.dp_world_size,
            "zero_stage": self.zero_stage,
            "optimizer": self.ds.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()`; call after the module's weights are restored."""
        if (state["world_size"], state["zero_stage"]) != (self.dp_world_size, self.zero_stage):
            raise ValueError(
                f"engine state of world size {state['world_size']}, ZeRO stage {state['zero_stage']} cannot be "
                f"restored into world size {self.dp_world_size}, stage {self.zero_stage}"
            )
        if self.zero_stage == 0:
            self.ds.optimizer.load_state_dict(state["optimizer"])
        else:
            # ZeRO indexes the list by data-parallel rank; fp32 masters come from the module's weights.
            shards = [state["optimizer"]] * self.dp_world_size
            self.ds.optimizer.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=False)
        self.scheduler.load_state_dict(state["scheduler"])
