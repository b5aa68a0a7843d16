"""The learner's state machine: PPO steps, idempotency, checkpoints, weight pushes.

No gRPC here except the client side of the weight push. `TrainStep(step)`:
- step <= the last applied step: the stored result is returned (replayed);
- step == last + 1: the step is trained, its result stored, and (every
  `checkpoint_every_steps`) a checkpoint written before the call returns, so
  a result the coordinator saw survives a crash;
- anything else: FAILED_PRECONDITION (the coordinator must replay in order).

Under torchrun (ranks.py) every rank builds a `Learner`. On rank 0 the
state-changing methods (`train_step`, `reset`, `save_checkpoint`) check the
request, then run their part as a command (`self.ranks.command`) that the
other ranks execute through `apply`; the read-only ones (`text_loss`,
`push`) run on rank 0 alone. With one process `self.ranks` is a no-op.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from pathlib import Path

import numpy as np
import torch

from alignd import rlmath
from alignd.config import LearnerConfig
from alignd.models.handle import ModelHandle, load_causal_lm, load_scalar_head_model, load_tokenizer
from alignd.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from alignd.runtime.logging import get_logger
from alignd.services.learner import checkpoint, ranks
from alignd.services.learner.engine import TorchEngine
from alignd.services.learner.model import PolicyValue, disable_dropout
from alignd.services.learner.ppo import Batch, PPOTrainer, StepStats
from alignd.services.learner.publisher import WeightPublisher
from alignd.v1 import learner_pb2

_log = get_logger("alignd.learner")

RESULTS_KEPT = 64  # step results kept for replays
TEXT_BLOCK_TOKENS = 128  # EvaluateTextLoss block size when the request leaves it 0
TEXT_BLOCKS_PER_FORWARD = 8  # EvaluateTextLoss blocks per forward batch


def build_engine(cfg: LearnerConfig, module):
    if cfg.engine.kind == "deepspeed":
        from alignd.services.learner.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(module, cfg)
    return TorchEngine(module, cfg.optimizer, cfg.ppo.max_grad_norm)


class Learner:
    def __init__(self, cfg: LearnerConfig, run_dir: Path | None) -> None:
        self.cfg = cfg
        ranks.select_device(ranks.Launch.from_env())
        torch.manual_seed(cfg.seed)
        policy = load_causal_lm(cfg.model)
        value_model = None
        if not cfg.value_head_on_policy:
            if cfg.value_model is None:
                raise ValueError(
                    "learner: set value_model (e.g. the reward model's directory) or value_head_on_policy: true"
                )
            value_model = load_scalar_head_model(cfg.value_model, allow_new_head=True)
        self.tokenizer = load_tokenizer(cfg.model)
        self.module = PolicyValue(policy, value_model)
        disable_dropout(self.module)
        self.engine = build_engine(cfg, self.module)
        # After the engine, which initialised torch.distributed (every rank gets here in the same order).
        self.ranks = ranks.open_group(cfg)
        ptx = None
        if cfg.ppo.ptx_coef > 0:
            if not cfg.ppo.ptx_data:
                raise ValueError("learner: ppo.ptx_coef > 0 needs ppo.ptx_data (a text file, one document per line)")
            from alignd.services.learner.ptx import pack_blocks, ptx_batches

            ptx = ptx_batches(
                pack_blocks(self.tokenizer, cfg.ppo.ptx_data, cfg.ppo.ptx_max_tokens), cfg.ppo.ptx_batch_size, cfg.seed
            )
        self.trainer = PPOTrainer(self.module, self.engine, cfg.ppo, seed=cfg.seed, ptx_batches=ptx)
        self.handle = ModelHandle("learner", cfg.model, policy, tokenizer=self.tokenizer)
        self.ema = [p.detach().clone() for p in policy.parameters()] if cfg.ema_decay else None
        self.step = 0
        self.base_version = 0  # policy version = base_version + step (ResetPolicy moves the base)
        self.results: dict[int, bytes] = {}
        self.lock = threading.Lock()
        root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else (Path(run_dir or ".") / "learner" / "checkpoints")
        self.checkpoint_root = root
        self.restored_from: Path | None = None
        # The tag of a checkpoint that was due but could not be written (disk full); written before the next answer.
        self.checkpoint_pending: str | None = None
        self.publisher = WeightPublisher(cfg, self, root.parent / "published")
        last = checkpoint.latest(root)
        if last is not None:
            self._restore(last)
        self.ranks.agree(self.summary())  # every rank restored the same checkpoint from the same directory

    # -- state -------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.handle.version

    def summary(self) -> dict:
        """What every rank must agree on after each command (ranks.RankGroup.agree)."""
        return {
            "step": self.step,
            "version": self.version,
            "base_version": self.base_version,
            "checkpoint_root": str(self.checkpoint_root.resolve()),
        }

    def _trainer_state(self) -> dict:
        """What every rank shares (rank 0 writes it)."""
        return {
            "trainer": self.trainer.state_dict(),
            "ema": self.ema,
            "step": self.step,
            "version": self.version,
            "base_version": self.base_version,
            "results": self.results,
        }

    def _rank_state(self) -> dict:
        """This rank's engine state (its ZeRO partition) and RNGs."""
        return {
            "rank": self.ranks.rank,
            "engine": self.engine.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def _restore(self, path: Path) -> None:
        module_state, state, mine = checkpoint.load(path, self.ranks.rank, self.ranks.world_size)
        self.module.load_state_dict(module_state)  # first: ZeRO refreshes its fp32 partition from it
        self.engine.load_state_dict(mine["engine"])
        self.trainer.load_state_dict(state["trainer"])
        self.ema = state["ema"]
        self.step = state["step"]
        self.base_version = state.get("base_version", 0)
        self.handle.version = state["version"]
        self.results = state["results"]
        torch.set_rng_state(mine["rng"]["torch"])
        np.random.set_state(mine["rng"]["numpy"])
        random.setstate(mine["rng"]["python"])
        self.restored_from = path
        _log.info("checkpoint_restored", path=str(path), step=self.step, version=self.version, rank=self.ranks.rank)

    def _write_checkpoint(self, tag: str = "") -> Path:
        """Writes a checkpoint; with several ranks every rank calls it at the same point (its shard)."""
        t0 = time.perf_counter()
        lead = self.ranks.rank == 0
        path = checkpoint.save(
            self.checkpoint_root,
            self.step,
            module_state=self.module.state_dict() if lead else None,
            trainer_state=self._trainer_state() if lead else None,
            rank_state=self._rank_state(),
            policy=self.module.policy,
            tokenizer=self.tokenizer,
            tag=tag,
            keep=self.cfg.checkpoint_keep,
            ranks=self.ranks,
        )
        _log.info(
            "checkpoint_saved",
            path=str(path),
            step=self.step,
            rank=self.ranks.rank,
            world_size=self.ranks.world_size,
            seconds=round(time.perf_counter() - t0, 3),
        )
        return path

    def save_checkpoint(self, tag: str = "") -> tuple[Path, int]:
        """SaveCheckpoint: (path, step); every rank writes its part."""
        with self.lock:
            with self.ranks.command(ranks.SaveCheckpoint(tag), self.summary):
                path = self._write_checkpoint(tag)
            self.checkpoint_pending = None  # the state it was to hold is on disk now
            return path, self.step

    def apply(self, cmd: ranks.Command) -> None:
        """Ranks > 0: executes a command that rank 0 checked and broadcast (ranks.follow)."""
        with self.lock:
            if isinstance(cmd, ranks.TrainStep):
                self._train(cmd.step, cmd.batch)
            elif isinstance(cmd, ranks.ResetPolicy):
                policy_weights, value_weights = self._reset_weights(cmd.policy_dir, cmd.value_model_dir)
                self.handle.apply_weights(policy_weights, cmd.version, partial=False)
                self._reset(cmd.version, value_weights)
            elif isinstance(cmd, ranks.SaveCheckpoint):
                self._write_checkpoint(cmd.tag)
            else:
                raise TypeError(f"not a learner command: {cmd!r}")

    # -- training ----------------------------------------------------------
    def train_step(self, step: int, batch: Batch) -> learner_pb2.TrainStepResponse:
        """Applies `step` exactly once; a repeated step returns its stored result."""
        with self.lock:
            self._flush_pending()
            if step in self.results:
                resp = learner_pb2.TrainStepResponse.FromString(self.results[step])
                resp.replayed = True
                return resp
            if step <= self.step:
                raise FailedPrecondition(
                    f"step {step} was applied but its result is no longer kept (last step {self.step})"
                )
            if step != self.step + 1:
                raise FailedPrecondition(
                    f"step {step} out of order: the learner is at step {self.step}, expects {self.step + 1}"
                )
            with self.ranks.command(ranks.TrainStep(step, batch), self.summary):
                return self._train(step, batch)

    def _train(self, step: int, batch: Batch) -> learner_pb2.TrainStepResponse:
        """Trains `step` (every rank, its share of each minibatch); call with `lock` held."""
        stats = self.trainer.step(batch, self.version)  # the version before the step: rows of others are stale
        if self.ema is not None:
            rlmath.ema_update(self.ema, list(self.module.policy.parameters()), self.cfg.ema_decay)
        self.step = step
        self.handle.version = self.base_version + step
        resp = learner_pb2.TrainStepResponse(
            step=step, policy_version=self.version, stats=to_pb(stats), skipped=stats.updates_applied == 0
        )
        self.results[step] = resp.SerializeToString()
        for old in sorted(self.results)[:-RESULTS_KEPT]:
            del self.results[old]
        if self.cfg.checkpoint_every_steps and step % self.cfg.checkpoint_every_steps == 0:
            self._checkpoint_or_unavailable(step)
        return resp

    def _checkpoint_or_unavailable(self, step: int, tag: str = "") -> Path:
        """Writes the checkpoint due now. When that fails (disk full, I/O error), the previous checkpoint stays the
        latest, and the caller gets UNAVAILABLE: the coordinator retries, and the retry writes the checkpoint before
        it is answered from the stored result (a result is only seen once it is durable). With several ranks the
        error aborts the group (ranks.command), which restarts from the previous checkpoint."""
        try:
            path = self._write_checkpoint(tag)
        except checkpoint.CheckpointWriteError as err:
            self.checkpoint_pending = tag
            _log.error("checkpoint_failed", step=step, error=str(err), rank=self.ranks.rank)
            raise Unavailable(
                f"step {step} is applied but its checkpoint could not be written ({err}); "
                "the previous checkpoint is intact; retry"
            ) from None
        self.checkpoint_pending = None
        if tag == "reset" and self.ranks.rank == 0:
            checkpoint.remove_others(self.checkpoint_root, path.name)  # they belong to the previous PPO run
        return path

    def _flush_pending(self) -> None:
        """Writes a checkpoint that failed before (call with `lock` held)."""
        if self.checkpoint_pending is not None:
            with self.ranks.command(ranks.SaveCheckpoint(self.checkpoint_pending), self.summary):
                self._checkpoint_or_unavailable(self.step, self.checkpoint_pending)

    def reset(self, policy_dir: str, value_model_dir: str, version: int) -> bool:
        """Starts PPO afresh from these weights at `version`; False when already done (replay)."""
        with self.lock:
            self._flush_pending()
            if self.base_version == version and self.step == 0:
                return False
            if version <= self.version:
                raise FailedPrecondition(f"version {version} is not above the current policy version {self.version}")
            # Everything a bad request can fail on happens here, before the other ranks hear of it:
            # apply_weights checks every tensor before it copies any.
            policy_weights, value_weights = self._reset_weights(policy_dir, value_model_dir)
            self.handle.apply_weights(policy_weights, version, partial=False)
            with self.ranks.command(ranks.ResetPolicy(policy_dir, value_model_dir, version), self.summary):
                self._reset(version, value_weights)
            _log.info("policy_reset", policy_dir=policy_dir, value_model_dir=value_model_dir, version=version)
            return True

    def _reset_weights(self, policy_dir: str, value_model_dir: str) -> tuple[dict, dict | None]:
        """Reads and checks the weights of a reset (nothing changes here)."""
        from alignd.models.handle import read_weights_dir

        policy_weights = read_weights_dir(policy_dir)
        value_weights = read_weights_dir(value_model_dir) if value_model_dir else None
        if value_weights is not None:
            if self.module.value_model is None:
                raise FailedPrecondition("value_model_dir given, but the value function is a head on the policy")
            vstate = self.module.value_model.state_dict()
            unknown = [k for k in value_weights if k not in vstate]
            if unknown:
                raise InvalidArgument("value_model_dir", f"tensors unknown to the value model: {unknown[:3]}")
            wrong = [k for k, t in value_weights.items() if tuple(t.shape) != tuple(vstate[k].shape)]
            if wrong:
                raise InvalidArgument(
                    "value_model_dir", f"tensors of another shape than the value model's: {wrong[:3]}"
                )
        return policy_weights, value_weights

    def _reset(self, version: int, value_weights: dict | None) -> None:
        """The rest of a reset, once the policy weights are in (every rank); call with `lock` held."""
        if value_weights is not None:
            vstate = self.module.value_model.state_dict()
            with torch.no_grad():
                for k, t in value_weights.items():
                    vstate[k].copy_(t.to(vstate[k].dtype))
        elif self.module.value_head is not None:
            torch.nn.init.zeros_(self.module.value_head.weight)
            torch.nn.init.zeros_(self.module.value_head.bias)
        self.engine = build_engine(self.cfg, self.module)
        self.trainer = PPOTrainer(
            self.module, self.engine, self.cfg.ppo, seed=self.cfg.seed, ptx_batches=self.trainer.ptx_batches
        )
        self.ema = [p.detach().clone() for p in self.module.policy.parameters()] if self.cfg.ema_decay else None
        self.step = 0
        self.base_version = version
        self.results = {}
        self._checkpoint_or_unavailable(0, tag="reset")

    # -- evaluation --------------------------------------------------------
    def text_loss(self, text_path: str, max_tokens: int, max_blocks: int) -> learner_pb2.EvaluateTextLossResponse:
        """Mean per-token NLL of the current policy on packed held-out text (no dropout, no state change)."""
        from alignd.services.learner.ptx import pack_blocks, text_nll

        max_tokens = max_tokens or TEXT_BLOCK_TOKENS
        if not 2 <= max_tokens <= self.handle.max_context:
            raise InvalidArgument(
                "max_tokens", f"must be in [2, {self.handle.max_context}] (the policy's context), got {max_tokens}"
            )
        if not text_path:
            raise InvalidArgument("text_path", "must not be empty")
        try:
            blocks = pack_blocks(self.tokenizer, text_path, max_tokens, label="file")
        except ValueError as err:
            raise InvalidArgument("text_path", str(err)) from None
        if max_blocks:
            blocks = blocks[:max_blocks]
        t0 = time.perf_counter()
        with self.lock:
            policy = self.module.policy
            modes = [(m, m.training) for m in policy.modules()]
            policy.eval()
            try:
                nll, tokens = text_nll(policy, blocks, TEXT_BLOCKS_PER_FORWARD)
            finally:
                for m, training in modes:
                    m.training = training
            version = self.version
        loss = nll / tokens
        _log.info(
            "text_loss_evaluated",
            text_path=text_path,
            blocks=blocks.shape[0],
            tokens=tokens,
            loss=round(loss, 6),
            policy_version=version,
            seconds=round(time.perf_counter() - t0, 3),
        )
        return learner_pb2.EvaluateTextLossResponse(loss=loss, tokens=tokens, policy_version=version)

    # -- weight sync -------------------------------------------------------
    def policy_module(self):
        """The policy being trained (what the publisher sends)."""
        return self.module.policy

    def push(self, addresses: list[str], *, stage_only: bool = False) -> learner_pb2.PushWeightsResponse:
        """Sends the current policy to every replica not already at this version (services/learner/publisher.py)."""
        return self.publisher.push(addresses, stage_only=stage_only)


def to_pb(s: StepStats) -> learner_pb2.TrainStats:
    return learner_pb2.TrainStats(**dataclasses.asdict(s))
