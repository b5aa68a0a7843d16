"""SFT and reward-model training (services/learner/supervised.py) on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignd.config import ModelConfig, RewardConfig
from alignd.models.handle import ModelHandle, load_scalar_head_model
from alignd.models.scoring import SCORE_BIAS_KEY
from alignd.services.learner import supervised as sv
from alignd.services.reward.engine import RewardEngine


@pytest.fixture
def lm(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["lm"])


def test_cosine_schedule_decays_to_a_tenth():
    assert sv.cosine_to_floor(0, 100) == pytest.approx(1.0)
    assert sv.cosine_to_floor(50, 100) == pytest.approx(0.55)
    assert sv.cosine_to_floor(100, 100) == pytest.approx(0.1)
    assert sv.cosine_to_floor(0, 100, warmup=4) == pytest.approx(0.25)


def test_encode_demo_masks_the_prompt_and_ends_with_eos(tok):
    ids, labels = sv.encode_demo(tok, "What is the capital of France?", " Paris.", max_tokens=64)
    p = tok("What is the capital of France?", add_special_tokens=False)["input_ids"]
    c = tok(" Paris.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == p + c and labels == [sv.IGNORE] * len(p) + c
    ids, labels = sv.encode_demo(tok, "word " * 100, " Paris.", max_tokens=16)
    assert len(ids) == 16 and labels[-len(c) :] == c  # the prompt is cut from the left


def test_sft_loss_counts_completion_tokens_only(lm, tok):
    batch = [
        sv.encode_demo(tok, "Hello there", " friend", max_tokens=32),
        sv.encode_demo(tok, "Hi", " you all", max_tokens=32),
    ]
    loss, n = sv.sft_loss(lm, batch, tok.pad_token_id)
    # Naive: one unpadded forward per demo, sum -log p over completion tokens.
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in batch:
            logp = torch.log_softmax(lm(torch.tensor([ids])).logits[0], -1)
            for t in range(1, len(ids)):
                if labels[t] != sv.IGNORE:
                    total -= float(logp[t - 1, labels[t]])
                    count += 1
    assert n == count and loss.item() == pytest.approx(total / count, abs=1e-5)


def test_sft_learns_demonstrations_and_selects_by_validation_loss(lm, tok):
    demos = [
        ("Q: capital of France? A:", " Paris"),
        ("Q: two plus two? A:", " four"),
        ("Q: colour of the sky? A:", " blue"),
    ]
    before = sv.sft_eval_loss(
        lm, [sv.encode_demo(tok, p, c, max_tokens=64) for p, c in demos], 4, pad_id=tok.pad_token_id
    )
    res = sv.train_sft(lm, tok, demos * 4, val=demos, epochs=12, lr=3e-3, batch_size=4, max_tokens=64, seed=0)
    assert len(res.history) == 12
    best = min(res.history, key=lambda r: r["val_loss"])
    assert res.best_epoch == best["epoch"] and res.best_metric == pytest.approx(best["val_loss"])
    after = sv.sft_eval_loss(
        lm, [sv.encode_demo(tok, p, c, max_tokens=64) for p, c in demos], 4, pad_id=tok.pad_token_id
    )
    assert after == pytest.approx(best["val_loss"], rel=1e-5)  # the selected weights are the ones loaded
    assert after < before / 3
    for p, c in demos:  # greedy decoding reproduces the demonstrations
        ids = tok(p, add_special_tokens=False)["input_ids"]
        out = lm.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, len(ids) :]).startswith(c)
    assert all(m.p == 0.0 for m in lm.modules() if isinstance(m, torch.nn.Dropout))  # dropout off after SFT


def _comparisons(n: int, seed: int):
    """Rankings whose best completions mention 'good' more: a learnable preference."""
    import random

    rng = random.Random(seed)
    words = ["good", "fine", "bad", "poor", "nice", "awful"]
    out = []
    for i in range(n):
        k = rng.randint(2, 5)
        comps = [" ".join(rng.choice(words) for _ in range(4)) + f" {j}" for j in range(k)]
        goodness = [
            c.count("good") + c.count("nice") - c.count("bad") - c.count("awful") + 0.01 * j
            for j, c in enumerate(comps)
        ]
        ranking = sorted(range(k), key=lambda j: -goodness[j])
        out.append((f"Say something {i}:", comps, ranking))
    return out


def test_rm_training_learns_rankings_and_sets_demo_bias(tiny_models, tok, tmp_path):
    rm = load_scalar_head_model(ModelConfig(path=str(tiny_models["reward"])), allow_new_head=False)
    train, val = _comparisons(80, 0), _comparisons(30, 1)
    demos = [("Say something:", " good nice good"), ("Say something:", " fine good")]
    res = sv.train_rm(
        rm, tok, train, val=val, lr=2e-3, batch_size=8, max_tokens=32, epochs=3, seed=0, demonstrations=demos
    )
    assert res.extra["val_accuracy"] > 0.8 > res.extra["val_accuracy_before"] - 0.2
    assert res.extra["val_accuracy"] > res.extra["val_accuracy_before"] + 0.2
    # The bias makes demonstrations score 0 on average, also as served after save/load.
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    cfg = RewardConfig(model={"path": str(tmp_path / "rm")})
    served = load_scalar_head_model(cfg.model, allow_new_head=False)
    assert getattr(served.config, SCORE_BIAS_KEY) == pytest.approx(res.extra["score_bias"])
    engine = RewardEngine(ModelHandle("reward", cfg.model, served, tokenizer=tok), 16)
    pairs = [
        (tok(p, add_special_tokens=False)["input_ids"], tok(c, add_special_tokens=False)["input_ids"]) for p, c in demos
    ]
    scores, _ = engine.score(pairs)
    assert abs(sum(scores) / len(scores)) < 1e-4
    assert math.isfinite(res.extra["train_accuracy"])
