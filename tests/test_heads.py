"""alignd.models.heads.PositionLogits: the LM head at the response positions only gives the model's own logits
there (checked against the full forward, gathered), the same gradients, and models whose logits are not
lm_head(last_hidden_state) fall back to the full forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignd.models.heads import PositionLogits, gather_positions
from alignd.services.learner.model import PolicyValue


def batch(vocab: int, seed: int = 0):
    """Right-padded prompt + response rows of different lengths, and positions[b, t] = P_b - 1 + t."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (6, 2), (1, 7), (4, 4)]  # (prompt, response)
    L, T = max(p + r for p, r in shapes), max(r for _, r in shapes)
    ids = torch.zeros((len(shapes), L), dtype=torch.long)
    mask = torch.zeros_like(ids)
    positions = torch.zeros((len(shapes), T), dtype=torch.long)
    response = torch.zeros((len(shapes), T), dtype=torch.long)
    for i, (p, r) in enumerate(shapes):
        ids[i, : p + r] = torch.randint(3, vocab, (p + r,), generator=g)
        mask[i, : p + r] = 1
        positions[i] = torch.clamp(torch.arange(T) + p - 1, max=p + r - 2)
        response[i, :r] = ids[i, p : p + r]
    return ids, mask, positions, response


@pytest.mark.parametrize("arch", ["lm", "llama"])
def test_split_head_equals_the_full_forward(tiny_models, arch):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    pl = PositionLogits(model)
    assert pl.split is not None  # gpt2 and llama: logits are lm_head(last_hidden_state)
    ids, mask, positions, _ = batch(model.config.vocab_size)
    with torch.no_grad():
        logits, hidden = pl(ids, mask, positions, hidden=True)
        full = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    assert logits.shape == (4, 7, model.config.vocab_size)
    torch.testing.assert_close(logits, gather_positions(full.logits, positions), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, gather_positions(full.hidden_states[-1], positions), rtol=1e-5, atol=1e-5)


def test_policy_value_gradients_equal_with_and_without_the_split(tiny_models):
    torch.manual_seed(0)
    a = PolicyValue(AutoModelForCausalLM.from_pretrained(tiny_models["lm"]), None)
    b = PolicyValue(AutoModelForCausalLM.from_pretrained(tiny_models["lm"]), None)
    b._position_logits.split = None  # the full forward, gathered
    ids, mask, positions, response = batch(a.policy.config.vocab_size, seed=1)
    outs, grads = [], []
    for m in (a, b):
        with torch.no_grad():  # the same value head in both (the bias is zero-initialised)
            m.value_head.weight.normal_(generator=torch.Generator().manual_seed(3))
        logprobs, entropy, values = m(ids, mask, positions, response=response, temperature=0.7)
        (logprobs.sum() + 0.1 * entropy.sum() + values.pow(2).sum()).backward()
        outs.append((logprobs.detach(), entropy.detach(), values.detach()))
        grads.append([p.grad.clone() for p in m.parameters()])
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(*grads):  # the same sums in another order: float32 rounding, relative to the gradient's scale
        torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-4 * float(ga.abs().max()))


def test_models_with_post_processed_logits_get_the_full_forward():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=2.0,
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():  # logits large enough for the soft cap to bend them
        model.lm_head.weight.mul_(50.0)
    pl = PositionLogits(model)
    assert pl.split is None
    ids, mask, positions, _ = batch(64)
    with torch.no_grad():
        logits, _ = pl(ids, mask, positions)
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(logits, gather_positions(full, positions))
    assert float(logits.abs().max()) <= 2.0 + 1e-4  # capped


def test_a_post_head_transform_in_the_config_gets_the_full_forward(tiny_models):
    """Even where the numeric check could not tell (a soft cap far above these logits), the configuration says."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["lm"]).eval()
    assert PositionLogits(model).split is not None
    model.config.final_logit_softcapping = 1e6  # (gpt2 ignores it: only the configuration is looked at)
    assert PositionLogits(model).split is None
