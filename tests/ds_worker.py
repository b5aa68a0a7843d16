"""Runs a few PPO steps of the learner's trainer with one engine; used by test_deepspeed_engine.py.

The same fixed batches and the same models for every engine and world size:

    python tests/ds_worker.py --models DIR --out stats.json --engine torch
    torchrun --nproc_per_node 2 --master_port PORT tests/ds_worker.py \
        --models DIR --out stats.json --engine deepspeed --zero-stage 2

DIR holds `policy/` and `value/` (tiny models saved with save_pretrained,
see `build_models`). Rank 0 writes the per-step statistics as JSON to --out
and the module's final weights next to it (`<out>.weights.pt`); with
--check-resume, also those of a second run whose states go through a
checkpoint round trip after step 1 (`resumed_stats`, `<out>.resumed.weights.pt`).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
from pathlib import Path

import torch

STEPS = 3


def build_models(root: Path) -> Path:
    """Tiny GPT-2 policy and value model (a one-label sequence classifier), saved under `root`."""
    from transformers import AutoModelForSequenceClassification

    from alignd.models.tiny import build_tiny_model

    small = dict(hidden=32, layers=2, heads=2, context=64, vocab_size=300)
    build_tiny_model(root / "policy", seed=0, **small)
    value_dir = build_tiny_model(root / "value", kind="reward", seed=1, **small)
    # A value head of the scale of the scores, so that the losses are O(1) and an
    # absolute tolerance on them means something.
    value = AutoModelForSequenceClassification.from_pretrained(str(value_dir), num_labels=1)
    with torch.no_grad():
        value.score.weight.mul_(0.05)
    value.save_pretrained(value_dir)
    return root


def learner_config(models: Path, engine: str, zero_stage: int):
    from alignd.config import LearnerConfig

    return LearnerConfig.model_validate(
        {
            "model": {"path": str(models / "policy")},
            "value_model": {"path": str(models / "value")},
            # 7 rows in 2 minibatches of 4 and 3 rows: with 2 ranks, shares of 2+2 and 2+1 rows
            # of different response lengths (the global token count matters).
            "ppo": {
                "minibatches": 2,
                "epochs": 1,
                "max_grad_norm": 0.5,
                "score_position": "eos_plus_one",
                "kl_coef": 0.05,
            },
            "optimizer": {"lr": 3e-3, "value_lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.01},
            "engine": {"kind": engine, "zero_stage": zero_stage},
            "seed": 7,
        }
    )


def make_batch(step: int, vocab: int, pad_id: int):
    """A fixed batch for `step`: 7 rows, prompts of 2-6 and responses of 1-9 tokens."""
    from alignd.services.learner.ppo import collate

    g = torch.Generator().manual_seed(1000 + step)
    prompts, responses, refs, rollouts, scores = [], [], [], [], []
    for _ in range(7):
        p = int(torch.randint(2, 7, (), generator=g))
        r = int(torch.randint(1, 10, (), generator=g))
        prompts.append(torch.randint(3, vocab, (p,), generator=g).tolist())
        responses.append(torch.randint(3, vocab, (r,), generator=g).tolist())
        refs.append((-torch.rand(r, generator=g) * 6 - 1).tolist())
        rollouts.append((-torch.rand(r, generator=g) * 6 - 1).tolist())
        scores.append(float(torch.randn((), generator=g)))
    return collate(prompts, responses, refs, rollout_logprobs=rollouts, scores=scores, pad_id=pad_id)


def build(models: Path, engine_kind: str, zero_stage: int):
    """The learner's module, engine and trainer (as `Learner.__init__` builds them)."""
    from alignd.models.handle import load_causal_lm, load_scalar_head_model
    from alignd.services.learner.learner import build_engine
    from alignd.services.learner.model import PolicyValue, disable_dropout
    from alignd.services.learner.ppo import PPOTrainer

    cfg = learner_config(models, engine_kind, zero_stage)
    torch.manual_seed(cfg.seed)
    policy = load_causal_lm(cfg.model)
    value_model = load_scalar_head_model(cfg.value_model, allow_new_head=False)
    module = PolicyValue(policy, value_model)
    disable_dropout(module)
    engine = build_engine(cfg, module)
    return module, engine, PPOTrainer(module, engine, cfg.ppo, seed=cfg.seed)


def run(
    models: Path, engine_kind: str, zero_stage: int = 2, resume_after: int | None = None
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """STEPS trainer steps; returns (stats per step, final module weights).

    resume_after=k: after step k the module, engine and trainer states go
    through torch.save/torch.load (as a learner checkpoint) into freshly built
    ones, which run the remaining steps.
    """
    from alignd.models.handle import load_tokenizer

    module, engine, trainer = build(models, engine_kind, zero_stage)
    tokenizer = load_tokenizer(learner_config(models, engine_kind, zero_stage).model)
    vocab = module.policy.get_input_embeddings().num_embeddings
    stats = []
    for step in range(1, STEPS + 1):
        s = trainer.step(make_batch(step, vocab, tokenizer.pad_token_id))
        stats.append(dataclasses.asdict(s))
        if step == resume_after:
            buf = io.BytesIO()
            torch.save(
                {"module": module.state_dict(), "engine": engine.state_dict(), "trainer": trainer.state_dict()}, buf
            )
            buf.seek(0)
            state = torch.load(buf, weights_only=False)
            module, engine, trainer = build(models, engine_kind, zero_stage)
            module.load_state_dict(state["module"])  # the module first: ZeRO refreshes its fp32 copy from it
            engine.load_state_dict(state["engine"])
            trainer.load_state_dict(state["trainer"])
    weights = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return stats, weights


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engine", choices=("torch", "deepspeed"), default="deepspeed")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--check-resume", action="store_true", help="also run with a checkpoint round trip after step 1")
    ap.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = ap.parse_args()
    torch.set_num_threads(1)
    stats, weights = run(args.models, args.engine, args.zero_stage)
    resumed = run(args.models, args.engine, args.zero_stage, resume_after=1) if args.check_resume else None
    if int(os.environ.get("RANK", "0")) == 0:
        out = {"world_size": int(os.environ.get("WORLD_SIZE", "1")), "stats": stats}
        torch.save(weights, str(args.out) + ".weights.pt")
        if resumed is not None:
            out["resumed_stats"] = resumed[0]
            torch.save(resumed[1], str(args.out) + ".resumed.weights.pt")
        args.out.write_text(json.dumps(out, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
