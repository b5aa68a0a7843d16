"""Training hyper-parameters: PPO, the optimizer, SFT and reward-model jobs, the training engine. The paper's
numbers come from alignd.paper.PAPER_DEFAULTS (InstructGPT appendix C)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignd.config.base import Strict
from alignd.paper import PAPER_DEFAULTS as PAPER


class PPOConfig(Strict):
    """PPO hyper-parameters. Defaults are InstructGPT's (Ouyang et al. 2022, appendix C.4)."""

    kl_coef: float = Field(
        PAPER.kl_coef,
        ge=0,
        description="beta: per-token KL penalty coefficient (fixed unless adaptive_kl_target is set).",
    )
    adaptive_kl_target: float | None = Field(
        None,
        gt=0,
        description="Target KL per sequence for the adaptive controller of Ziegler et al. 2019; null = fixed kl_coef.",
    )
    adaptive_kl_horizon: int = Field(
        PAPER.adaptive_kl_horizon, ge=1, description="Horizon (in samples) of the adaptive KL controller."
    )
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = Field(
        PAPER.kl_estimator, description="Per-token KL estimator in the reward penalty."
    )
    score_position: Literal["last", "eos_plus_one"] = Field(
        PAPER.score_position,
        description="Where the RM score is added: the last response token, or one past it when it fits (TRL).",
    )
    clip: float = Field(PAPER.clip, gt=0, description="PPO ratio clip epsilon.")
    value_clip: float = Field(
        PAPER.value_clip, gt=0, description="Clip range of the value prediction around the old value."
    )
    value_coef: float = Field(0.1, ge=0, description="Weight of the value loss in the total loss.")
    gamma: float = Field(PAPER.gamma, ge=0, le=1, description="GAE discount.")
    lam: float = Field(PAPER.lam, ge=0, le=1, description="GAE lambda.")
    whiten_unbiased: bool = Field(
        PAPER.whiten_unbiased, description="Whitening of advantages uses the unbiased variance (TRL) or the biased one."
    )
    epochs: int = Field(PAPER.ppo_epochs, ge=1, description="PPO epochs over each rollout batch.")
    minibatches: int = Field(
        PAPER.batch_size // PAPER.minibatch_size,
        ge=1,
        description="Minibatches per epoch (the paper: batch 512 in 8 minibatches of 64).",
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    temperature: float = Field(
        PAPER.temperature, gt=0, description="Sampling temperature of the rollouts; logits are divided by it."
    )
    ptx_coef: float = Field(
        0.0, ge=0, description="gamma_ptx of PPO-ptx (the paper: 27.8); 0 disables the pretraining loss."
    )
    ptx_data: str | None = Field(
        None, description="Text file (one document per line) for the PPO-ptx pretraining loss."
    )
    ptx_batch_size: int = Field(4, ge=1, description="Pretraining sequences per minibatch when PPO-ptx is on.")
    ptx_max_tokens: int = Field(128, ge=2, description="Tokens per pretraining sequence.")
    old_logprobs: Literal["auto", "recompute"] = Field(
        "auto",
        description=(
            "The PPO old log-probs. auto: taken from the rollouts when the coordinator marks them exact (sampled "
            "without top-k/top-p truncation at this temperature, policy and learner in float32) and every "
            "sample comes from the learner's current weights, as TRL does; this saves one policy forward per step "
            "when the value model is separate. Otherwise, and always with recompute: one no-grad forward of the "
            "current weights."
        ),
    )
    off_policy: Literal["behaviour", "decoupled"] = Field(
        "behaviour",
        description=(
            "Samples of older weights than the learner's (async rollouts, run.async_rollouts). behaviour: the PPO "
            "ratio is pi / pi_behaviour, with the log-probs of the policy that sampled (the rollouts'), so the "
            "ratio is the importance weight and the clip bounds the step from the sampling policy; no extra forward. "
            "decoupled (Hilton et al. 2022): the ratio is clipped around the current weights' recomputed log-probs, "
            "and each token's clipped term is weighted by pi_current / pi_behaviour, truncated at "
            "behaviour_weight_cap; one more forward per step. behaviour needs exact rollouts (untruncated sampling "
            "at this temperature, fp32); otherwise stale samples are corrected as with decoupled."
        ),
    )
    behaviour_weight_cap: float | None = Field(
        2.0, gt=0, description="off_policy: decoupled: truncation of the importance weights; null: not truncated."
    )


class OptimizerConfig(Strict):
    """Adam for policy and value model (InstructGPT: betas 0.9, 0.95; constant LR after warm-up)."""

    lr: float = Field(1e-5, gt=0, description="Peak learning rate of the policy.")
    value_lr: float | None = Field(None, gt=0, description="Peak learning rate of the value model; default: lr.")
    betas: tuple[float, float] = Field(PAPER.adam_betas, description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW).")
    warmup_steps: int = Field(
        PAPER.lr_warmup_steps,
        ge=0,
        description="Linear warm-up from warmup_start_factor x lr to lr, in optimizer steps.",
    )
    warmup_start_factor: float = Field(
        PAPER.lr_warmup_start_ratio, gt=0, le=1, description="LR at step 0 as a fraction of peak (the paper: a tenth)."
    )
    fused: bool | None = Field(
        None,
        description=(
            "torch's fused AdamW kernel (one pass over each parameter; about 5x faster on CPU than the per-tensor "
            "loop for a 135M model). null: fused where torch has it for the device, as TRL's default optimizer."
        ),
    )


class SupervisedJobConfig(Strict):
    """What the SFT and reward-model jobs share: sequence length, warm-up, the validation split, the seed, bad lines."""

    max_tokens: int = Field(
        512, ge=4, description="Prompt + completion tokens per sequence (prompt cut from the left)."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the cosine decay.")
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="Held-out share (split by prompt) when no validation file is given."
    )
    seed: int = Field(0, description="Shuffling and split seed.")
    skip_bad_lines: bool = Field(
        False,
        description="Drop malformed data lines (counted and reported with file:line) instead of refusing the job.",
    )
    chat_template: Literal["auto", "none"] = Field(
        "auto",
        description="How prompts and completions become tokens (docs/chat.md): auto renders them with the model's "
        "chat template, as the roles serving it do (plain text if it has none); none: plain text.",
    )
    system_prompt: str | None = Field(
        None, description="System message put before every prompt given as text when a chat template applies."
    )


class SFTConfig(SupervisedJobConfig):
    """Supervised fine-tuning (InstructGPT appendix C.1: cosine LR to 10%, residual dropout 0.2)."""

    epochs: int = Field(2, ge=1, description="Passes over the demonstrations (the paper: 16).")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Demonstrations per optimizer step.")
    residual_dropout: float = Field(
        0.2, ge=0, lt=1, description="Dropout during SFT (models without dropout modules ignore it)."
    )
    select: Literal["val_loss", "last"] = Field("val_loss", description="Which epoch's weights are kept.")


class RMTrainConfig(SupervisedJobConfig):
    """Reward-model training (InstructGPT appendix C.2: one epoch, cosine LR to 10%)."""

    epochs: int = Field(PAPER.rm_epochs, ge=1, description="Passes over the comparisons (the paper: 1; more overfits).")
    lr: float = Field(9e-6, gt=0, description="Peak learning rate (the paper's 6B RM: 9e-6).")
    batch_size: int = Field(8, ge=1, description="Prompts per step, each with all C(K,2) pairs of its ranking.")
    max_k: int = Field(PAPER.rm_max_k, ge=2, description="Largest K accepted per ranking.")
    pooling: Literal["last", "mean"] = Field(
        "last",
        description="What the scalar head reads: the last token of prompt + response (Hugging Face's sequence "
        "classifiers, TRL), or the mean over the response tokens (a preference spread over the words of a response, "
        "such as sentiment). Recorded in the RM's config.json; the reward role scores the same way.",
    )
    layers: int | None = Field(
        None,
        ge=1,
        description="Keep only the first N transformer blocks of the initial model: an RM smaller (and faster to "
        "train and serve) than the policy. null keeps them all.",
    )
    train: Literal["full", "head"] = Field(
        "full",
        description="full: fine-tune the whole model (the paper); head: freeze the backbone and fit the linear head "
        "alone by L-BFGS on features computed once (epochs, lr, batch_size and warmup_steps then unused), "
        "regularised by head_l2: for a few hundred noisy comparisons, where fine-tuning overfits.",
    )
    head_l2: float = Field(
        0.3, ge=0, description="train: head: L2 penalty on the head's weights over standardised features."
    )
    score_scale: Literal["none", "unit_std"] = Field(
        "none",
        description="none: scores as trained (the paper: only a bias, so that demonstrations average 0); unit_std: "
        "the head is also divided by the standard deviation of the RM's scores over its training completions (the "
        "policy's samples in a pipeline), as Ziegler et al. 2019 normalise the reward, so that ppo.kl_coef weighs "
        "the KL against a reward of the same spread whatever scale a fit lands on.",
    )


class EngineConfig(Strict):
    """How the learner runs its optimizer: plain torch (CPU default) or DeepSpeed ZeRO."""

    kind: Literal["torch", "deepspeed"] = Field("torch", description="Training engine.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage (deepspeed engine only).")
    bf16: bool = Field(False, description="bf16 mixed precision (deepspeed engine on GPUs).")
    collective_timeout_seconds: float = Field(
        1800.0,
        ge=5,
        description="torch.distributed timeout of every collective, in seconds (deepspeed engine). Under torchrun a "
        "rank "
        "that dies or hangs makes the others' next collective fail after at most this long, which ends the whole job "
        "(Kubernetes restarts it from the latest checkpoint); ranks > 0 wait at most this long for rank 0's next "
        "command (rank 0 sends a heartbeat every min(10 s, a quarter of it) when idle). Keep it above the longest "
        "checkpoint write.",
    )
