"""InstructGPT's hyper-parameters (Ouyang et al. 2022, appendix C), the single source of the paper's numbers.

Standard library only: the configuration models (alignd.config, imported by the torch-free coordinator) and the
math (alignd.rlmath) both read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperDefaults:
    """InstructGPT's PPO / RM hyperparameters ([InstructGPT] appendix C.3-C.4),
    plus the few values the paper leaves unstated, marked as such.

    alignd.config takes its defaults from here (tests/test_rlmath.py checks
    each against the configuration models); every value is also a
    configuration option (DESIGN.md, "Defaults from the paper").
    """

    kl_coef: float = 0.02  # beta, per-token KL reward coefficient, fixed (C.4)
    kl_estimator: str = "k1"  # eq. 2 penalises log(pi/pi_SFT) of the sample: k1
    score_position: str = "last"  # RM score on the last response token (the paper's
    #   reward is one scalar per response; "last" is OpenRLHF's reading, TRL uses
    #   "eos_plus_one")
    clip: float = 0.2  # PPO ratio clip epsilon (C.4)
    value_clip: float = 0.2  # not stated in the paper; lm-human-preferences
    #   (Ziegler et al.'s code, which InstructGPT built on) and TRL use 0.2
    gamma: float = 1.0  # GAE discount (C.4)
    lam: float = 0.95  # GAE lambda (C.4)
    whiten_unbiased: bool = True  # not stated; TRL/lm-human-preferences use n/(n-1)
    adam_betas: tuple[float, float] = (0.9, 0.95)  # Adam beta1, beta2 (C.1-C.4)
    ema_decay: float = 0.992  # EMA of the policy weights, used for evaluation (C.4)
    ptx_coef: float = 27.8  # gamma of PPO-ptx, eq. 2 (C.4)
    temperature: float = 1.0  # rollout sampling temperature (C.4)
    batch_size: int = 512  # rollouts per PPO iteration, in episodes (C.4)
    minibatch_size: int = 64  # 8 minibatches per batch (C.4)
    ppo_epochs: int = 1  # PPO epochs per batch (C.4)
    lr_warmup_steps: int = 10  # policy LR constant after a warmup of 10 iterations
    lr_warmup_start_ratio: float = 0.1  #   starting from a tenth of the peak (C.4)
    rm_epochs: int = 1  # the RM overfits after one epoch (section 3.5, C.2)
    rm_min_k: int = 4  # K completions ranked per prompt, 4..9 (section 3.5)
    rm_max_k: int = 9
    adaptive_kl_target: float = 6.0  # [Ziegler] target KL in nats, if the adaptive
    adaptive_kl_horizon: int = 10_000  #   controller is chosen; horizon in episodes


PAPER_DEFAULTS = PaperDefaults()
