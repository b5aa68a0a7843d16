"""One PPO (or PPO-ptx) iteration over a batch of experiences.

InstructGPT's RL step (Ouyang et al. 2022, sec. 3.5 and appendix C.4), with
the math in `alignd.rlmath`:

1. Old log-probs and values under the current weights: one no-grad forward,
   or (ppo.old_logprobs: auto) the rollout log-probs when the coordinator
   marks them exact and every sample comes from the current weights, so only
   the separate value model runs (TRL takes them from generation too).
   Samples of older weights (async rollouts), ppo.off_policy:
   - behaviour (default): their old log-probs are the rollouts', so the PPO
     ratio pi / pi_behaviour is itself the importance weight and the clip
     bounds the update from the policy that sampled (no extra forward);
   - decoupled (Hilton et al. 2022, "Batch size-invariance for policy
     optimization"): the ratio is clipped around the current weights'
     recomputed log-probs, and each token's clipped term is weighted by
     w = pi_old / pi_behaviour, truncated at ppo.behaviour_weight_cap.
2. Per-token rewards: -beta * KL_t(pi || pi_ref) on every response token, plus
   the reward-model score at the score position.
3. GAE advantages and returns; advantages whitened over the batch.
4. `epochs` passes over the batch in `minibatches` shuffled minibatches: the
   clipped surrogate plus value_coef x the clipped value loss (plus
   ptx_coef x the LM loss on a pretraining batch, in the same backward pass),
   one optimizer step per minibatch. A non-finite loss or gradient skips that
   update. With a data-parallel engine (world size W), every rank holds the
   whole batch and computes on its share of each minibatch's rows, each token
   mean normalised by the minibatch's global token count, so the summed
   gradients and the reported statistics are those of one process
   (`reduction.py`).
5. The KL controller sees the batch's mean sequence KL.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from alignd import rlmath
from alignd.config import PPOConfig
from alignd.models.heads import response_positions
from alignd.runtime.logging import get_logger
from alignd.services.learner.reduction import DataParallel, token_share

_log = get_logger("alignd.learner.ppo")


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) prompt + response, right-padded
    attention_mask: torch.Tensor  # (B, L)
    positions: torch.Tensor  # (B, T) index of the logits predicting response token t
    response: torch.Tensor  # (B, T) response ids (pad positions hold pad_id)
    mask: torch.Tensor  # (B, T) 1.0 on real response tokens
    ref_logprobs: torch.Tensor  # (B, T) reference log-probs (0 on padding)
    rollout_logprobs: torch.Tensor  # (B, T) behaviour log-probs from the policy service
    scores: torch.Tensor  # (B,) reward-model scores
    versions: torch.Tensor  # (B,) policy version that sampled each row
    rollout_exact: bool = False  # rollout_logprobs are the policy's log_softmax(logits / T) (TrainStepRequest)
    behaviour: bool = False  # rollout_logprobs are the sampling policy's: rows of other versions are stale

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor) -> Batch:
        return Batch(
            *(
                v[idx] if isinstance(v, torch.Tensor) else v
                for v in (getattr(self, f) for f in self.__dataclass_fields__)
            )
        )


def collate(
    prompts: list[list[int]],
    responses: list[list[int]],
    ref_logprobs: list[list[float]],
    *,
    rollout_logprobs: list[list[float]],
    scores: list[float],
    pad_id: int,
    versions: list[int] | None = None,
    rollout_exact: bool = False,
) -> Batch:
    """versions: the policy version of each row, given when rollout_logprobs are the sampling policy's (rows of
    other versions than the learner's are then stale); None: every row is taken as current."""
    B = len(prompts)
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    T = max(len(r) for r in responses)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    positions = response_positions([(len(p), len(r)) for p, r in zip(prompts, responses)], T)
    response = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T))
    ref = torch.zeros((B, T))
    rollout = torch.zeros((B, T))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        P, R = len(p), len(r)
        input_ids[i, : P + R] = torch.tensor(p + r)
        attention[i, : P + R] = 1
        response[i, :R] = torch.tensor(r)
        mask[i, :R] = 1.0
        ref[i, :R] = torch.tensor(ref_logprobs[i])
        rollout[i, :R] = torch.tensor(rollout_logprobs[i])
    return Batch(
        input_ids,
        attention,
        positions,
        response,
        mask,
        ref,
        rollout,
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(versions if versions is not None else [0] * B, dtype=torch.long),
        rollout_exact,
        behaviour=versions is not None,
    )


@dataclass
class StepStats:
    """One PPO step's statistics: the fields of alignd.v1.TrainStats, one for one (learner.to_pb; a test compares)."""

    policy_loss: float = 0.0
    value_loss: float = 0.0
    approx_kl: float = 0.0
    clip_fraction: float = 0.0
    entropy: float = 0.0
    mean_score: float = 0.0
    kl_coef: float = 0.0
    grad_norm: float = 0.0
    tokens_per_second: float = 0.0
    reference_kl: float = 0.0
    ptx_loss: float = 0.0
    ratio_mean: float = 0.0
    value_clip_fraction: float = 0.0
    learning_rate: float = 0.0
    updates_applied: int = 0
    updates_skipped: int = 0
    stale_fraction: float = 0.0
    behaviour_weight_mean: float = 1.0
    behaviour_weight_max: float = 1.0
    behaviour_truncated_fraction: float = 0.0
    old_logprobs_from_rollout: bool = False


# The minibatch statistics averaged into StepStats, in the order of the reduced vector (the loss follows them).
_MINIBATCH_STATS = (
    "policy_loss",
    "value_loss",
    "approx_kl",
    "clip_fraction",
    "entropy",
    "ratio_mean",
    "value_clip_fraction",
    "ptx_loss",
)


@dataclass
class _Targets:
    """The batch's PPO targets under the old weights, (B, T) each; minibatches take their rows."""

    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    vmask: torch.Tensor  # value tokens (the response, plus the score position one past it with eos_plus_one)
    weights: torch.Tensor | None = None  # behaviour importance weights (off_policy: decoupled), else None


class KLController:
    """Fixed beta, or the adaptive controller of Ziegler et al. 2019."""

    def __init__(self, cfg: PPOConfig) -> None:
        if cfg.adaptive_kl_target is not None:
            self.impl = rlmath.AdaptiveKLController(cfg.kl_coef, cfg.adaptive_kl_target, cfg.adaptive_kl_horizon)
        else:
            self.impl = rlmath.FixedKLController(cfg.kl_coef)

    @property
    def value(self) -> float:
        return float(self.impl.value)

    def update(self, kl: float, n: int) -> None:
        self.impl.update(kl, n)

    def state_dict(self) -> dict:
        return self.impl.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.impl.load_state_dict(state)


class PPOTrainer:
    def __init__(self, module, engine, cfg: PPOConfig, *, seed: int, ptx_batches=None) -> None:
        self.module = module
        self.engine = engine
        self.cfg = cfg
        self.kl = KLController(cfg)
        self.generator = torch.Generator().manual_seed(seed)
        self.ptx_batches = ptx_batches  # iterator of (input_ids, attention_mask) or None

    @torch.no_grad()
    def _old_outputs(self, batch: Batch, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(old log-probs, old values, whether every old log-prob came from the rollouts). current: (B,) rows
        sampled by the learner's weights. A row's rollout log-probs serve when they are exact and the row is current
        (ppo.old_logprobs: auto) or stale (ppo.off_policy: behaviour); the others are recomputed (stale rows then get
        the decoupled weights: with truncated sampling the behaviour log-probs are not the learner's distribution,
        and a ratio against them would start far from 1)."""
        cfg = self.cfg
        from_rollout = torch.where(
            current,
            torch.tensor(cfg.old_logprobs == "auto" and batch.rollout_exact),
            torch.tensor(self._behaviour_ratio(batch)),
        )  # (B,)
        every = bool(from_rollout.all())
        if every and self.module.value_model is not None:
            values = self.module.values(batch.input_ids, batch.attention_mask, batch.positions)
            return batch.rollout_logprobs * batch.mask, values, True
        logprobs, _entropy, values = self.module(
            batch.input_ids, batch.attention_mask, batch.positions, response=batch.response, temperature=cfg.temperature
        )
        logprobs = torch.where(from_rollout[:, None], batch.rollout_logprobs, logprobs)
        return logprobs * batch.mask, values, every  # (B, T), (B, T) (gae masks values itself)

    def _behaviour_ratio(self, batch: Batch) -> bool:
        """Stale rows take the PPO ratio against the behaviour log-probs (off_policy: behaviour, exact rollouts)."""
        return self.cfg.off_policy == "behaviour" and batch.rollout_exact

    def _behaviour_weights(self, batch: Batch, old_logprobs: torch.Tensor, current: torch.Tensor, *, stats: StepStats):
        """(B, T) importance weights pi_old / pi_behaviour for rows sampled by other weights (1 elsewhere),
        truncated at behaviour_weight_cap, with off_policy: decoupled; None when every row is current or the
        ratio itself is taken against the behaviour policy."""
        stale = ~current  # (B,)
        stats.stale_fraction = float(stale.float().mean())
        if not bool(stale.any()) or self._behaviour_ratio(batch):
            return None
        m = batch.mask.bool() & stale[:, None]  # (B, T) tokens of stale rows
        log_w = torch.where(m, old_logprobs - batch.rollout_logprobs, torch.zeros_like(old_logprobs))
        w = torch.exp(log_w)  # (B, T)
        cap = self.cfg.behaviour_weight_cap
        truncated = (w > cap) & m if cap is not None else torch.zeros_like(m)
        if cap is not None:
            w = torch.clamp(w, max=cap)
        stats.behaviour_weight_mean = float(rlmath.masked_mean(w, m))
        stats.behaviour_weight_max = float(w[m].max()) if bool(m.any()) else 1.0
        stats.behaviour_truncated_fraction = float(rlmath.masked_mean(truncated.float(), m))
        return torch.where(m, w, torch.ones_like(w))

    def step(self, batch: Batch, version: int | None = None) -> StepStats:
        """One PPO iteration; `version`: the learner's policy version before the step (rows of another version are
        corrected for, ppo.off_policy; None, or a batch without behaviour log-probs: every row is current)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self.module.train()
        if version is not None and batch.behaviour:
            current = batch.versions == version  # (B,)
        else:
            current = torch.ones(batch.size, dtype=torch.bool)
        old_logprobs, old_values, from_rollout = self._old_outputs(batch, current)
        kl, kl_coef, targets = self._targets(batch, old_logprobs, old_values)
        stats = StepStats(
            mean_score=float(batch.scores.mean()),
            kl_coef=kl_coef,
            reference_kl=float(rlmath.masked_mean(old_logprobs - batch.ref_logprobs, batch.mask)),
            old_logprobs_from_rollout=from_rollout,
        )
        targets.weights = self._behaviour_weights(batch, old_logprobs, current, stats=stats)  # (B, T) or None
        self._epochs(batch, targets, stats)
        seq_kl = float((kl * batch.mask).sum(1).mean())
        self.kl.update(seq_kl, batch.size)
        stats.learning_rate = self.engine.lr()
        tokens = float(batch.attention_mask.sum()) * (1 + cfg.epochs)
        stats.tokens_per_second = tokens / max(1e-9, time.perf_counter() - t0)
        return stats

    def _targets(
        self, batch: Batch, old_logprobs: torch.Tensor, old_values: torch.Tensor
    ) -> tuple[torch.Tensor, float, _Targets]:
        """(per-token KL to the reference (B, T), the KL coefficient, the targets): per-token rewards (the KL
        penalty plus the score), GAE advantages (whitened over the batch) and returns under the old weights."""
        cfg = self.cfg
        mask = batch.mask
        kl = rlmath.kl_estimate(old_logprobs, batch.ref_logprobs, cfg.kl_estimator) * mask  # (B, T)
        kl_coef = self.kl.value
        rewards, _non_score = rlmath.per_token_rewards(
            batch.scores, kl, mask, kl_coef=kl_coef, score_position=cfg.score_position
        )
        # With the score one past the last token (TRL), that position carries a value too.
        vmask = rlmath.value_mask_for(mask, cfg.score_position)  # (B, T)
        advantages, returns = rlmath.gae(rewards, old_values, mask, gamma=cfg.gamma, lam=cfg.lam, value_mask=vmask)
        advantages = rlmath.masked_whiten(advantages, mask, unbiased=cfg.whiten_unbiased) * mask
        return kl, kl_coef, _Targets(old_logprobs, old_values, advantages, returns, vmask)

    def _epochs(self, batch: Batch, targets: _Targets, stats: StepStats) -> None:
        """`epochs` passes over the batch in shuffled minibatches, one update each; the minibatch statistics
        averaged into `stats`."""
        cfg = self.cfg
        sums: dict[str, float] = {}
        n_mb = 0
        B = batch.size
        mb_size = max(1, math.ceil(B / cfg.minibatches))
        dp = DataParallel.of(self.engine)  # every rank holds the whole batch and the same generator
        for _epoch in range(cfg.epochs):
            perm = torch.randperm(B, generator=self.generator)
            for start in range(0, B, mb_size):
                # This rank's rows of the minibatch; every token mean below is this
                # rank's share of the minibatch's mean (reduction.py explains why).
                idx, empty = dp.shard(perm[start : start + mb_size])
                loss, local = self._minibatch_loss(batch, targets, idx, empty=empty, dp=dp)
                n_mb += 1
                reduced = dp.all_reduce_sum(torch.stack([v.detach().float() for v in local]))  # (9,) minibatch values
                for k, v in zip(_MINIBATCH_STATS, reduced[:-1].tolist()):
                    sums[k] = sums.get(k, 0.0) + v
                self._update(loss, reduced[-1], stats, sums=sums)
        for k, v in sums.items():
            setattr(stats, k, v / max(1, n_mb))

    def _minibatch_loss(
        self, batch: Batch, targets: _Targets, idx: torch.Tensor, *, empty: bool, dp: DataParallel
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(this rank's share of the minibatch's loss, its shares of the minibatch statistics: _MINIBATCH_STATS,
        then the loss): the clipped surrogate plus value_coef x the clipped value loss (plus the ptx term)."""
        cfg = self.cfg
        mb = batch.select(idx)
        logprobs, entropy, values = self.module(
            mb.input_ids, mb.attention_mask, mb.positions, response=mb.response, temperature=cfg.temperature
        )
        share = token_share(mb.mask, dp, empty)  # () N_r / N of the policy tokens
        vshare = token_share(targets.vmask[idx], dp, empty)  # () of the value tokens
        pl, pstats = rlmath.policy_loss(
            logprobs,
            targets.old_logprobs[idx],
            targets.advantages[idx],
            mask=mb.mask,
            clip=cfg.clip,
            weights=targets.weights[idx] if targets.weights is not None else None,
        )
        vl, vclip = rlmath.value_loss(
            values, targets.old_values[idx], targets.returns[idx], mask=targets.vmask[idx], clip=cfg.value_clip
        )
        pl, vl = pl * share, vl * vshare
        loss = pl + cfg.value_coef * vl
        ptx = loss.new_zeros(())
        if cfg.ptx_coef > 0 and self.ptx_batches is not None:
            loss, ptx = self._add_ptx(loss, dp)
        local = (
            pl,
            vl,
            pstats["approx_kl"] * share,
            pstats["clip_fraction"] * share,
            rlmath.masked_mean(entropy, mb.mask) * share,
            pstats["ratio_mean"] * share,
            vclip * vshare,
            ptx,
            loss,
        )
        return loss, local

    def _add_ptx(self, loss: torch.Tensor, dp: DataParallel) -> tuple[torch.Tensor, torch.Tensor]:
        """(the PPO-ptx objective, this rank's share of the LM loss) on the next pretraining batch."""
        ids, attn = next(self.ptx_batches)  # the same batch on every rank
        rows, ptx_empty = dp.shard(torch.arange(ids.shape[0]))
        ids, attn = ids[rows], attn[rows]
        logits = self.module.lm_logits(ids, attn)
        ptx = rlmath.lm_loss(logits[:, :-1].float(), ids[:, 1:], attn[:, 1:].float())
        ptx = ptx * token_share(attn[:, 1:], dp, ptx_empty)
        return rlmath.ppo_ptx_objective(loss, ptx, self.cfg.ptx_coef), ptx

    def _update(self, loss: torch.Tensor, total: torch.Tensor, stats: StepStats, *, sums: dict[str, float]) -> None:
        """One optimizer step on the minibatch's loss (`total`: the loss of the whole minibatch, the same on every
        rank); skipped and counted when the loss or the gradient is not finite."""
        if not torch.isfinite(total):
            self.engine.zero_grad()
            stats.updates_skipped += 1
            _log.warning("update_skipped", reason="non_finite_loss", loss=float(total))
            return
        self.engine.backward(loss)
        norm, applied = self.engine.step()
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + (norm if math.isfinite(norm) else 0.0)
        if applied:
            stats.updates_applied += 1
        else:
            stats.updates_skipped += 1
            _log.warning("update_skipped", reason="non_finite_gradient", grad_norm=norm)

    def state_dict(self) -> dict:
        return {"kl": self.kl.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.kl.load_state_dict(state["kl"])
        self.generator.set_state(state["generator"])
