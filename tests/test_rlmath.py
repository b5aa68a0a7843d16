"""Oracle tests for alignd.rlmath: TRL's PPO trainer, naive loops, hand values.

TRL (trl==1.12.0) is the oracle for rewards, GAE, whitening and the PPO
losses. Its math sits inline in `PPOTrainer.train()`, so `trl_ppo_reference`
below re-states those lines (cited by line number); TRL's helper functions
(`masked_mean`, `masked_var`, `masked_whiten`, `selective_log_softmax`,
`entropy_from_logits`) are imported from trl, not restated.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from alignd import rlmath as rl

# ---------------------------------------------------------------------------
# TRL oracle
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl() -> SimpleNamespace:
    """TRL's helpers, imported (not restated). trl==1.12.0 is a dev dependency: no skip."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl.experimental.ppo.ppo_trainer as ppo
    import trl.trainer.utils as utils

    return SimpleNamespace(
        masked_mean=ppo.masked_mean,
        masked_var=ppo.masked_var,
        masked_whiten=ppo.masked_whiten,
        INVALID_LOGPROB=ppo.INVALID_LOGPROB,
        selective_log_softmax=utils.selective_log_softmax,
        entropy_from_logits=utils.entropy_from_logits,
    )


def trl_ppo_reference(
    trl: SimpleNamespace,
    *,
    logprobs: torch.Tensor,  # (B, T) rollout log-probs
    ref_logprobs: torch.Tensor,  # (B, T)
    values: torch.Tensor,  # (B, T)
    scores: torch.Tensor,  # (B,)
    sequence_lengths: torch.Tensor,  # (B,) TRL's: index of the last real token
    new_logprobs: torch.Tensor,  # (B, T) log-probs under the updated policy
    vpred: torch.Tensor,  # (B, T) values under the updated value model
    kl_estimator: str,
    kl_coef: float,
    whiten_rewards: bool,
    gamma: float,
    lam: float,
    cliprange: float,
    cliprange_value: float,
) -> dict[str, torch.Tensor]:
    """TRL 1.12.0's PPO math, re-stated from
    trl/experimental/ppo/ppo_trainer.py, `PPOTrainer.train()`:
    - lines 763-798: padding masks, per-token rewards (`actual_end`), reward
      whitening, the GAE loop, returns, advantage whitening;
    - lines 824-846: one micro-batch's policy and value losses;
    - lines 852-857, 868: pg_clipfrac, approxkl, ratio mean.
    `args.*` become arguments; the micro-batch is the whole batch
    (micro_batch_inds = all rows). Only the variable plumbing differs.
    """
    masked_mean, masked_whiten = trl.masked_mean, trl.masked_whiten
    INVALID_LOGPROB = trl.INVALID_LOGPROB
    B, T = logprobs.shape
    # lines 763-770
    response_idxs = torch.arange(T, device=logprobs.device).repeat(B, 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)
    # lines 772-779
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr  # Else statement is k3
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    # lines 782-784
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    # lines 787-798
    lastgaelam = 0
    advantages_reversed = []
    gen_length = T
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    raw_advantages = advantages  # (not in TRL: kept for the test)
    advantages = masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    # lines 824-846 (mb_* = the whole batch)
    mb_advantage, mb_logprobs, mb_return, mb_values = advantages, logprobs, returns, values
    new_logprobs = torch.masked_fill(new_logprobs, padding_mask, INVALID_LOGPROB)
    vpred = torch.masked_fill(vpred, padding_mask_p1, 0)
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask_p1)
    vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = masked_mean(pg_loss_max, ~padding_mask)
    # lines 852-857, 868
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    approxkl = 0.5 * (logprobs_diff**2).mean()
    ratio_mean = ratio.mean()
    return {
        "kl": kl,
        "non_score_reward": non_score_reward,
        "rewards": rewards,
        "raw_advantages": raw_advantages,
        "advantages": advantages,
        "returns": returns,
        "pg_loss": pg_loss,
        "vf_loss": vf_loss,
        "pg_clipfrac": pg_clipfrac,
        "vf_clipfrac": vf_clipfrac,
        "approxkl": approxkl,
        "ratio_mean": ratio_mean,
    }


def alignd_with_trl_conventions(
    *,
    logprobs,
    ref_logprobs,
    values,
    scores,
    mask,
    new_logprobs,
    vpred,
    kl_estimator,
    kl_coef,
    whiten_rewards,
    gamma,
    lam,
    cliprange,
    cliprange_value,
) -> dict[str, torch.Tensor]:
    """The same computation through alignd.rlmath, configured as TRL:
    score one past the last token, value mask one position longer,
    unbiased whitening."""
    zero = torch.zeros((), dtype=values.dtype)
    value_mask = rl.value_mask_for(mask, "eos_plus_one")  # (B, T)
    kl = rl.kl_estimate(logprobs, ref_logprobs, kl_estimator)  # (B, T)
    rewards, non_score = rl.per_token_rewards(scores, kl, mask, kl_coef=kl_coef, score_position="eos_plus_one")
    if whiten_rewards:
        whitened = rl.masked_whiten(rewards, value_mask, shift_mean=False, unbiased=True)
        rewards = torch.where(value_mask, whitened, zero)
    raw_adv, returns = rl.gae(rewards, values, mask, gamma=gamma, lam=lam, value_mask=value_mask)
    adv = torch.where(mask, rl.masked_whiten(raw_adv, mask, unbiased=True), zero)
    pg_loss, pg_stats = rl.policy_loss(new_logprobs, logprobs, adv, mask=mask, clip=cliprange)
    vf_loss, vf_clipfrac = rl.value_loss(vpred, values, returns, mask=value_mask, clip=cliprange_value)
    return {
        "kl": torch.where(mask, kl, zero),
        "non_score_reward": non_score,
        "rewards": rewards,
        "raw_advantages": raw_adv,
        "advantages": adv,
        "returns": returns,
        "pg_loss": pg_loss,
        "vf_loss": vf_loss,
        "pg_clipfrac": pg_stats["clip_fraction"],
        "vf_clipfrac": vf_clipfrac,
        "approx_kl_k2": pg_stats["approx_kl_k2"],
        "ratio_mean": pg_stats["ratio_mean"],
    }


def random_rollout(seed: int, dtype: torch.dtype, B: int = 7, T: int = 10, full: bool = False):
    """Random PPO inputs, right padded with varying lengths: one full-length
    row, one whose score lands on the last column (length T-1), one empty
    row (TRL: immediate EOS), the rest random. Padded positions hold garbage
    (-inf log-probs, huge values) that both sides must ignore."""
    g = torch.Generator().manual_seed(seed)
    if full:
        seq = torch.full((B,), T - 1)
    else:
        seq = torch.randint(0, T, (B,), generator=g)  # TRL's sequence_lengths
        seq[0], seq[1], seq[2] = T - 1, T - 2, -1
    lengths = seq + 1  # (B,)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    logprobs = -3 * torch.rand(B, T, generator=g, dtype=dtype)
    ref_logprobs = logprobs + 0.3 * randn(B, T)
    new_logprobs = logprobs + 0.25 * randn(B, T)  # ratios well outside [0.8, 1.2] too
    values = randn(B, T)
    vpred = values + 0.3 * randn(B, T)
    scores = 2 * randn(B)
    value_mask = torch.arange(T).unsqueeze(0) <= lengths.unsqueeze(1)  # TRL's ~padding_mask_p1
    for t in (logprobs, ref_logprobs, new_logprobs):
        t.masked_fill_(~mask, -math.inf)
    values.masked_fill_(~value_mask, 1e6)
    vpred.masked_fill_(~value_mask, -1e6)
    return (
        dict(
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            scores=scores,
            new_logprobs=new_logprobs,
            vpred=vpred,
        ),
        seq,
        mask,
    )


def _compare_with_trl(trl, seed, dtype, atol, estimator, whiten_rewards, full=False, gamma=1.0, lam=0.95):
    inputs, seq, mask = random_rollout(seed, dtype, full=full)
    hp = dict(
        kl_estimator=estimator,
        kl_coef=0.05,
        whiten_rewards=whiten_rewards,
        gamma=gamma,
        lam=lam,
        cliprange=0.2,
        cliprange_value=0.2,
    )
    ref = trl_ppo_reference(trl, sequence_lengths=seq, **inputs, **hp)
    got = alignd_with_trl_conventions(mask=mask, **inputs, **hp)
    for key in (
        "kl",
        "non_score_reward",
        "rewards",
        "raw_advantages",
        "advantages",
        "returns",
        "pg_loss",
        "vf_loss",
        "pg_clipfrac",
        "vf_clipfrac",
    ):
        torch.testing.assert_close(got[key], ref[key].to(dtype), atol=atol, rtol=0, msg=key)
    # The inputs exercise both clips (not a vacuous comparison).
    assert 0 < float(ref["pg_clipfrac"]) < 1 and 0 < float(ref["vf_clipfrac"]) < 1
    # TRL averages approxkl and the ratio over all B*T positions; at padding its
    # log-ratio is 0 (both sides INVALID_LOGPROB) and its ratio 1. alignd averages
    # over real tokens; the two are related by the token count.
    n, numel = int(mask.sum()), mask.numel()
    torch.testing.assert_close(got["approx_kl_k2"] * n / numel, ref["approxkl"], atol=atol, rtol=0)
    torch.testing.assert_close((got["ratio_mean"] * n + (numel - n)) / numel, ref["ratio_mean"], atol=atol, rtol=0)
    return got, ref


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_ppo_math_matches_trl_float64(trl, seed, estimator, whiten_rewards):
    _compare_with_trl(trl, seed, torch.float64, 1e-6, estimator, whiten_rewards)


@pytest.mark.parametrize("seed", range(2))
def test_ppo_math_matches_trl_float32(trl, seed):
    _compare_with_trl(trl, seed, torch.float32, 1e-4, "k3", False)


def test_ppo_math_matches_trl_other_gamma_lambda(trl):
    _compare_with_trl(trl, 11, torch.float64, 1e-6, "k1", False, gamma=0.9, lam=1.0)


def test_approx_kl_and_ratio_equal_trl_when_no_padding(trl):
    got, ref = _compare_with_trl(trl, 5, torch.float64, 1e-6, "k1", False, full=True)
    torch.testing.assert_close(got["approx_kl_k2"], ref["approxkl"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["ratio_mean"], ref["ratio_mean"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_stats_match_trl(trl, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 8, generator=g, dtype=dtype) * 3 + 1
    mask = torch.rand(5, 8, generator=g) < 0.6
    atol = 1e-6 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(rl.masked_mean(x, mask), trl.masked_mean(x, mask), atol=atol, rtol=0)
    torch.testing.assert_close(rl.masked_mean(x, mask, dim=1), trl.masked_mean(x, mask, axis=1), atol=atol, rtol=0)
    torch.testing.assert_close(rl.masked_var(x, mask), trl.masked_var(x, mask), atol=atol, rtol=0)
    torch.testing.assert_close(
        rl.masked_var(x, mask, unbiased=False), trl.masked_var(x, mask, unbiased=False), atol=atol, rtol=0
    )
    for shift in (True, False):
        torch.testing.assert_close(
            rl.masked_whiten(x, mask, shift_mean=shift),
            trl.masked_whiten(x, mask, shift_mean=shift),
            atol=atol,
            rtol=0,
        )
    # Biased and unbiased against torch.var of the selected entries.
    sel = x[mask]
    torch.testing.assert_close(rl.masked_var(x, mask, unbiased=True), sel.var(unbiased=True))
    torch.testing.assert_close(rl.masked_var(x, mask, unbiased=False), sel.var(unbiased=False))
    w = rl.masked_whiten(x, mask, unbiased=False, eps=0.0)[mask]
    torch.testing.assert_close(w.mean(), torch.zeros((), dtype=dtype), atol=atol, rtol=0)
    torch.testing.assert_close(w.var(unbiased=False), torch.ones((), dtype=dtype), atol=atol, rtol=0)


def test_masked_stats_ignore_nonfinite_padding_and_reject_tiny_masks():
    x = torch.tensor([[1.0, 3.0, math.inf], [math.nan, 5.0, -math.inf]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.float32)  # float masks work too
    assert float(rl.masked_mean(x, mask)) == 3.0
    assert float(rl.masked_var(x, mask, unbiased=False)) == pytest.approx(8 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        rl.masked_var(x, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="at least 1"):
        rl.masked_var(x, torch.zeros(2, 3), unbiased=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logprobs_and_entropy_match_trl(trl, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 11, generator=g) * 4).to(dtype)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    atol = 1e-6 if dtype != torch.bfloat16 else 0.0
    torch.testing.assert_close(
        rl.logprobs_from_logits(logits, tokens), trl.selective_log_softmax(logits, tokens), atol=atol, rtol=0
    )
    torch.testing.assert_close(
        rl.entropy_from_logits(logits, chunk_size=4), trl.entropy_from_logits(logits), atol=atol, rtol=0
    )
    if dtype == torch.float64:  # and against the naive formulas
        logp = logits.log_softmax(-1)
        naive_lp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(rl.logprobs_from_logits(logits, tokens), naive_lp)
        torch.testing.assert_close(rl.entropy_from_logits(logits), -(logp.exp() * logp).sum(-1))


# ---------------------------------------------------------------------------
# Rewards and GAE
# ---------------------------------------------------------------------------


def naive_gae(rewards, values, value_mask, gamma, lam):
    """A_t = sum_l (gamma lam)^l delta_{t+l}, one row and one t at a time."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(value_mask[b].sum())
        v = [float(values[b, t]) for t in range(n)] + [0.0]  # V = 0 after the last
        delta = [float(rewards[b, t]) + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            adv[b, t] = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
    returns = adv + torch.where(value_mask, values, torch.zeros((), dtype=values.dtype))
    return adv, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (1.0, 1.0), (0.99, 0.0)])
@pytest.mark.parametrize("seed", range(3))
def test_gae_equals_naive_double_loop(gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    rewards = torch.where(mask, torch.randn(B, T, generator=g, dtype=torch.float64), 0.0)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)  # garbage beyond the mask
    adv, ret = rl.gae(rewards, values, mask, gamma=gamma, lam=lam)
    exp_adv, exp_ret = naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, exp_adv, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, exp_ret, atol=1e-12, rtol=0)
    assert not adv[~mask].any() and not ret[~mask].any()


def test_gae_rejects_reward_outside_value_mask():
    mask = torch.tensor([[True, True, False]])
    kl = torch.zeros(1, 3)
    rewards, _ = rl.per_token_rewards(torch.tensor([1.0]), kl, mask, kl_coef=0.1, score_position="eos_plus_one")
    with pytest.raises(ValueError, match="outside value_mask"):
        rl.gae(rewards, torch.zeros(1, 3), mask, gamma=1.0, lam=0.95)
    vm = rl.value_mask_for(mask, "eos_plus_one")
    adv, _ = rl.gae(rewards, torch.zeros(1, 3), mask, gamma=1.0, lam=1.0, value_mask=vm)
    assert adv.tolist() == [[1.0, 1.0, 1.0]]


def test_per_token_rewards_score_positions():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 3, dtype=torch.float64)
    scores = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    rewards, nsr = rl.per_token_rewards(scores, kl, mask, kl_coef=0.5, score_position="last")
    expected_nsr = torch.tensor(
        [[-0.05, -0.1, -0.15, -0.2], [-0.05, -0.1, 0.0, 0.0], [-0.05, 0.0, 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(nsr, expected_nsr)
    expected = expected_nsr.clone()
    expected[0, 3] += 10
    expected[1, 1] += 20
    expected[2, 0] += 30
    torch.testing.assert_close(rewards, expected)
    rewards, _ = rl.per_token_rewards(scores, kl, mask, kl_coef=0.5, score_position="eos_plus_one")
    expected = expected_nsr.clone()
    expected[0, 3] += 10  # full row: the last token (TRL's actual_end)
    expected[1, 2] += 20  # one past the last real token
    expected[2, 1] += 30
    torch.testing.assert_close(rewards, expected)
    assert rl.value_mask_for(mask, "eos_plus_one").tolist() == [
        [True] * 4,
        [True, True, True, False],
        [True, True, False, False],
    ]
    assert torch.equal(rl.value_mask_for(mask, "last"), mask)


def test_per_token_rewards_rejects_bad_inputs():
    kl = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="at least one response token"):
        rl.per_token_rewards(
            torch.ones(2), kl, torch.tensor([[1, 0, 0], [0, 0, 0]]), kl_coef=0.1, score_position="last"
        )
    with pytest.raises(ValueError, match="right padded"):
        rl.per_token_rewards(
            torch.ones(2), kl, torch.tensor([[1, 0, 1], [1, 0, 0]]), kl_coef=0.1, score_position="last"
        )
    with pytest.raises(ValueError, match="score_position"):
        rl.per_token_rewards(torch.ones(2), kl, torch.ones(2, 3), kl_coef=0.1, score_position="first")
    # An empty row is fine under TRL's convention: the score goes to t = 0.
    rewards, _ = rl.per_token_rewards(
        torch.tensor([1.0, 2.0]), kl, torch.tensor([[1, 0, 0], [0, 0, 0]]), kl_coef=0.1, score_position="eos_plus_one"
    )
    assert rewards.tolist() == [[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]


# ---------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------


def test_kl_primer_example():
    kl = float(rl.exact_kl([0.8, 0.2], [0.6, 0.4]))
    assert round(kl, 4) == 0.0915
    assert kl == pytest.approx(0.8 * math.log(0.8 / 0.6) + 0.2 * math.log(0.2 / 0.4), abs=1e-15)
    # The KL penalty with beta = 0.5. The primer's 0.0457 is 0.5 * 0.0915 (the
    # rounded KL) = 0.04575, shown to 4 decimals; the exact value is
    # 0.5 * 0.091516... = 0.045758, which rounds to 0.0458.
    assert round(0.5 * round(kl, 4), 4) == 0.0457
    assert 0.5 * kl == pytest.approx(0.045758, abs=1e-6)
    assert round(0.5 * kl, 4) == 0.0458


def test_exact_kl_properties():
    assert float(rl.exact_kl([0.3, 0.7], [0.3, 0.7])) == 0.0
    assert float(rl.exact_kl([1.0, 0.0], [0.5, 0.5])) == pytest.approx(math.log(2))  # 0 log 0 = 0
    assert math.isinf(float(rl.exact_kl([0.5, 0.5], [1.0, 0.0])))
    with pytest.raises(ValueError, match="probability vector"):
        rl.exact_kl([0.5, 0.6], [0.5, 0.5])
    with pytest.raises(ValueError, match="probability vector"):
        rl.exact_kl([0.5, 0.5], [1.5, -0.5])


@pytest.mark.parametrize(
    "p,q",
    [
        ([0.8, 0.2], [0.6, 0.4]),
        ([0.05, 0.15, 0.3, 0.1, 0.25, 0.15], [0.2, 0.1, 0.2, 0.2, 0.1, 0.2]),
    ],
)
def test_kl_estimators_converge(p, q):
    """Sample x ~ p; the estimators of KL(p || q) from those samples."""
    p_t, q_t = torch.tensor(p, dtype=torch.float64), torch.tensor(q, dtype=torch.float64)
    n = 200_000
    x = torch.multinomial(p_t, n, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq = p_t.log()[x], q_t.log()[x]  # (n,)
    exact = float(rl.exact_kl(p_t, q_t))
    log_ratio = p_t.log() - q_t.log()  # (C,)
    expectations = {  # E_p of each estimator, exactly
        "k1": exact,
        "k3": exact,  # unbiased
        "k2": float((p_t * 0.5 * log_ratio**2).sum()),
        "abs": float((p_t * log_ratio.abs()).sum()),
    }
    for estimator, expected in expectations.items():
        samples = rl.kl_estimate(logp, logq, estimator)  # (n,)
        se = float(samples.std()) / math.sqrt(n)
        assert abs(float(samples.mean()) - expected) < 5 * se, estimator
        if estimator != "k1":
            assert bool((samples >= 0).all()), estimator
    # k3 has lower variance than k1 here (the point of k3).
    assert rl.kl_estimate(logp, logq, "k3").std() < rl.kl_estimate(logp, logq, "k1").std()
    with pytest.raises(ValueError, match="estimator"):
        rl.kl_estimate(logp, logq, "k4")


# ---------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------


def test_policy_loss_at_ratio_one():
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_()
    adv = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.arange(6).unsqueeze(0) < torch.tensor([[6], [3], [1], [5]])
    loss, stats = rl.policy_loss(lp, lp.detach(), adv, mask=mask, clip=0.2)
    torch.testing.assert_close(loss, -rl.masked_mean(adv, mask))
    assert float(stats["clip_fraction"]) == 0.0
    assert float(stats["approx_kl"]) == 0.0 and float(stats["approx_kl_k2"]) == 0.0
    assert float(stats["ratio_mean"]) == 1.0
    # At ratio 1 the gradient is the policy gradient: -A / (number of tokens).
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, torch.where(mask, -adv / mask.sum(), 0.0))


def test_policy_loss_clipping_by_hand():
    lp_old = torch.zeros(1, 4, dtype=torch.float64)
    ratio = torch.tensor([[1.5, 0.5, 1.1, 1.5]], dtype=torch.float64)
    adv = torch.tensor([[2.0, -1.0, 3.0, -1.0]], dtype=torch.float64)
    loss, stats = rl.policy_loss(ratio.log(), lp_old, adv, mask=torch.ones(1, 4), clip=0.2)
    # token 0: A>0, ratio above 1+eps -> -1.2*2; token 1: A<0, ratio below 1-eps -> 0.8;
    # token 2: inside -> -1.1*3; token 3: A<0, ratio above -> unclipped 1.5
    assert float(loss) == pytest.approx((-2.4 + 0.8 - 3.3 + 1.5) / 4)
    assert float(stats["clip_fraction"]) == 0.5
    k3 = [(1 / r - 1) + math.log(r) for r in (1.5, 0.5, 1.1, 1.5)]  # (1/r - 1) - log(1/r)
    assert float(stats["approx_kl"]) == pytest.approx(sum(k3) / 4)


def test_policy_loss_gradient_is_finite_with_inf_padding():
    lp = torch.tensor([[-1.0, -math.inf]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.2, -math.inf]], dtype=torch.float64)
    loss, _ = rl.policy_loss(lp, old, torch.ones(1, 2, dtype=torch.float64), mask=torch.tensor([[1, 0]]), clip=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and lp.grad[0, 1] == 0


def test_policy_loss_behaviour_weights_by_naive_loop():
    """Decoupled PPO: each token's clipped term times its (detached) importance weight, by a naive loop."""
    g = torch.Generator().manual_seed(3)
    lp = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_()
    old = lp.detach() + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    w = (torch.rand(3, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    mask = torch.arange(5).unsqueeze(0) < torch.tensor([[5], [2], [4]])
    loss, stats = rl.policy_loss(lp, old, adv, mask=mask, clip=0.2, weights=w)
    total, n = 0.0, 0
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                r = math.exp(float(lp[b, t] - old[b, t]))
                a = float(adv[b, t])
                total += float(w[b, t]) * max(-a * r, -a * min(max(r, 0.8), 1.2))
                n += 1
    assert float(loss) == pytest.approx(total / n, rel=1e-12)
    # The weights are constants of the gradient (detached inside), and weights of 1 are the plain loss.
    loss.backward()
    assert w.grad is None and lp.grad is not None
    plain, _ = rl.policy_loss(lp, old, adv, mask=mask, clip=0.2)
    ones, stats1 = rl.policy_loss(lp, old, adv, mask=mask, clip=0.2, weights=torch.ones_like(w))
    assert float(plain) == float(ones) and float(stats1["ratio_mean"]) == float(stats["ratio_mean"])


def test_value_loss_by_hand():
    v = torch.tensor([[1.0, 0.0, 2.0, 9.0]], dtype=torch.float64)
    old = torch.tensor([[0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    ret = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, cf = rl.value_loss(v, old, ret, mask=mask, clip=0.2)
    # token 0: max(1, 0.7^2) = 1; token 1: 1; token 2: clipped 0.2 -> max(4, 0.04) = 4
    assert float(loss) == pytest.approx(0.5 * (1 + 1 + 4) / 3)
    assert float(cf) == 0.0
    v2 = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    loss2, cf2 = rl.value_loss(v2, old, ret, mask=mask, clip=0.2)
    # token 0: v=0 clipped to 0.3 -> max(0, 0.09) -> clipped branch wins
    assert float(loss2) == pytest.approx(0.5 * (0.09 + 1 + 0) / 3)
    assert float(cf2) == pytest.approx(1 / 3)
    loss3, cf3 = rl.value_loss(v, old, ret, mask=mask, clip=None)
    assert float(loss3) == pytest.approx(0.5 * (1 + 1 + 4) / 3) and float(cf3) == 0.0


# ---------------------------------------------------------------------------
# PPO-ptx
# ---------------------------------------------------------------------------


def test_ppo_ptx_gradient_is_sum_of_gradients():
    torch.manual_seed(0)
    V, D = 7, 5
    model = torch.nn.Sequential(torch.nn.Embedding(V, D), torch.nn.Tanh(), torch.nn.Linear(D, V)).double()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (3, 6), generator=g)
    mask = torch.arange(6).unsqueeze(0) < torch.tensor([[6], [4], [2]])
    old = torch.randn(3, 6, generator=g, dtype=torch.float64) - 2
    adv = torch.randn(3, 6, generator=g, dtype=torch.float64)
    ptx_tokens = torch.randint(0, V, (2, 8), generator=g)
    ptx_mask = torch.ones(2, 8, dtype=torch.bool)
    ptx_mask[1, 6:] = False
    gamma_ptx = rl.PAPER_DEFAULTS.ptx_coef

    def losses():
        lp = rl.logprobs_from_logits(model(tokens), tokens)
        ppo, _ = rl.policy_loss(lp, old, adv, mask=mask, clip=0.2)
        return ppo, rl.lm_loss(model(ptx_tokens)[:, :-1], ptx_tokens[:, 1:], ptx_mask[:, 1:])

    ppo, ptx = losses()
    g_ppo = torch.autograd.grad(ppo, params)
    g_ptx = torch.autograd.grad(ptx, params)
    ppo, ptx = losses()
    g_total = torch.autograd.grad(rl.ppo_ptx_objective(ppo, ptx, gamma_ptx), params)
    for gt, gp, gx in zip(g_total, g_ppo, g_ptx, strict=True):
        torch.testing.assert_close(gt, gp + gamma_ptx * gx, atol=1e-10, rtol=0)


def test_lm_loss_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    target = labels[:, 1:].masked_fill(~mask[:, 1:], -100)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 9), target.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(rl.lm_loss(logits[:, :-1], labels[:, 1:], mask[:, 1:]), expected)


# ---------------------------------------------------------------------------
# KL controllers, EMA, defaults
# ---------------------------------------------------------------------------


def test_adaptive_kl_controller_by_hand():
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    # KL 9: error 0.5 clipped to 0.2; mult 1 + 0.2 * 512 / 10000
    assert ctl.update(9.0, 512) == pytest.approx(0.1 * 1.01024, abs=1e-15)
    # KL 6.6: error 0.1; mult 1 + 0.1 * 256 / 10000
    assert ctl.update(torch.tensor(6.6, dtype=torch.float64), 256) == pytest.approx(0.1 * 1.01024 * 1.00256, abs=1e-15)
    state = ctl.state_dict()
    # KL 0: error -1 clipped to -0.2; mult 1 - 0.2 * 1000 / 10000
    assert ctl.update(0.0, 1000) == pytest.approx(0.1 * 1.01024 * 1.00256 * 0.98, abs=1e-15)
    restored = rl.AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.update(0.0, 1000) == ctl.value
    with pytest.raises(ValueError, match="keys"):
        restored.load_state_dict({"value": 0.1})
    with pytest.raises(ValueError):
        rl.AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_fixed_kl_controller():
    ctl = rl.FixedKLController(0.02)
    assert ctl.update(100.0, 512) == 0.02 and ctl.value == 0.02
    other = rl.FixedKLController(0.5)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.02
    with pytest.raises(ValueError, match="keys"):
        other.load_state_dict({"value": 1.0, "target": 2.0})


def test_ema_update_by_hand():
    ema = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    params = [torch.tensor([3.0, -2.0]), torch.tensor([[1.0]], dtype=torch.bfloat16)]
    rl.ema_update(ema, params, decay=0.9)
    torch.testing.assert_close(ema[0], torch.tensor([1.2, 1.6]))
    torch.testing.assert_close(ema[1], torch.tensor([[0.1]]))
    rl.ema_update(ema, params)  # the paper's 0.992
    torch.testing.assert_close(ema[0], torch.tensor([1.2 * 0.992 + 3 * 0.008, 1.6 * 0.992 - 2 * 0.008]))
    p = torch.nn.Parameter(torch.ones(2))
    e = torch.zeros(2)
    rl.ema_update([e], [p], decay=0.5)  # works on Parameters without autograd complaints
    assert e.tolist() == [0.5, 0.5] and e.grad_fn is None
    with pytest.raises(ValueError):
        rl.ema_update([e], [p, p])
    with pytest.raises(ValueError, match="decay"):
        rl.ema_update([e], [p], decay=1.5)


def test_paper_defaults():
    d = rl.PAPER_DEFAULTS
    # The paper's numbers (InstructGPT appendix C), once here ...
    assert (d.kl_coef, d.clip, d.gamma, d.lam, d.ema_decay, d.ptx_coef, d.adam_betas, d.rm_epochs) == (
        0.02,
        0.2,
        1.0,
        0.95,
        0.992,
        27.8,
        (0.9, 0.95),
        1,
    )
    assert d.kl_estimator in rl.KL_ESTIMATORS and d.score_position in rl.SCORE_POSITIONS
    with pytest.raises(AttributeError):
        d.kl_coef = 0.1  # frozen
    # ... and the configuration's defaults are them (alignd.config reads alignd.paper, not its own copies).
    from alignd.config import LearnerConfig, OptimizerConfig, PPOConfig, RMTrainConfig

    ppo, opt, rm = PPOConfig(), OptimizerConfig(), RMTrainConfig()
    assert (ppo.kl_coef, ppo.kl_estimator, ppo.score_position, ppo.clip, ppo.value_clip, ppo.gamma, ppo.lam) == (
        d.kl_coef,
        d.kl_estimator,
        d.score_position,
        d.clip,
        d.value_clip,
        d.gamma,
        d.lam,
    )
    assert (ppo.whiten_unbiased, ppo.epochs, ppo.minibatches, ppo.temperature, ppo.adaptive_kl_horizon) == (
        d.whiten_unbiased,
        d.ppo_epochs,
        d.batch_size // d.minibatch_size,
        d.temperature,
        d.adaptive_kl_horizon,
    )
    assert (opt.betas, opt.warmup_steps, opt.warmup_start_factor) == (
        d.adam_betas,
        d.lr_warmup_steps,
        d.lr_warmup_start_ratio,
    )
    assert (rm.epochs, rm.max_k) == (d.rm_epochs, d.rm_max_k)
    assert LearnerConfig.model_fields["ema_decay"].default == d.ema_decay
    assert rl.PaperDefaults is __import__("alignd.paper").paper.PaperDefaults  # one class, re-exported by rlmath


# ---------------------------------------------------------------------------
# Reward model loss
# ---------------------------------------------------------------------------


def naive_rm_loss(rewards: list[float], ranking: list[int]) -> float:
    k = len(ranking)
    total = 0.0
    for i in range(k):
        for j in range(i + 1, k):
            diff = rewards[ranking[i]] - rewards[ranking[j]]
            total += -math.log(1 / (1 + math.exp(-diff)))
    return total / math.comb(k, 2)


def test_rm_loss_equals_naive_loop_k4_to_k9():
    g = torch.Generator().manual_seed(0)
    rewards_list, rankings, expected = [], [], []
    for k in range(4, 10):
        r = torch.randn(k, generator=g, dtype=torch.float64) * 2
        ranking = torch.randperm(k, generator=g).tolist()
        assert len(rl.ranking_pairs(ranking)) == math.comb(k, 2)
        want = naive_rm_loss(r.tolist(), ranking)
        assert float(rl.rm_ranking_loss(r, ranking)) == pytest.approx(want, abs=1e-12)
        rewards_list.append(r)
        rankings.append(ranking)
        expected.append(want)
    assert float(rl.rm_loss(rewards_list, rankings)) == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    # Explicit pairs give the same loss; a (B, K) tensor works when K is fixed.
    pairs = rl.ranking_pairs(rankings[0])
    assert float(rl.rm_ranking_loss(rewards_list[0], pairs)) == pytest.approx(expected[0], abs=1e-12)
    batch = torch.stack([torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3)])
    perms = [torch.randperm(5, generator=g).tolist() for _ in range(3)]
    want = sum(naive_rm_loss(batch[i].tolist(), perms[i]) for i in range(3)) / 3
    assert float(rl.rm_loss(batch, perms)) == pytest.approx(want, abs=1e-12)


def test_rm_loss_k2_and_stability():
    r = torch.tensor([0.3, 1.7], dtype=torch.float64)
    want = -F.logsigmoid(r[1] - r[0])
    torch.testing.assert_close(rl.rm_ranking_loss(r, [1, 0]), want)
    torch.testing.assert_close(rl.rm_ranking_loss(r, [(1, 0)]), want)
    assert rl.ranking_pairs([1, 0]) == [(1, 0)]
    # A wrong ranking with a huge margin: finite (log(sigmoid) would be inf).
    assert float(rl.rm_ranking_loss(torch.tensor([0.0, 1000.0]), [0, 1])) == pytest.approx(1000.0)
    r = torch.tensor([0.0, 1.0], requires_grad=True)
    rl.rm_loss([r], [[0, 1]]).backward()
    assert r.grad[0] < 0 < r.grad[1]  # pushes the winner up, the loser down


@pytest.mark.parametrize(
    "ranking,match",
    [
        ([0, 0, 1], "permutation"),
        ([0, 2, 3], "permutation"),
        ([1], "at least 2"),
        ([], "at least 2"),
        ([0.5, 1], "ints"),
    ],
)
def test_ranking_pairs_rejects_invalid(ranking, match):
    with pytest.raises(ValueError, match=match):
        rl.ranking_pairs(ranking)


def test_rm_losses_reject_invalid():
    r = torch.zeros(3)
    with pytest.raises(ValueError, match="K=3"):
        rl.rm_ranking_loss(r, [0, 1])
    with pytest.raises(ValueError, match="permutation"):
        rl.rm_ranking_loss(r, [0, 1, 1])
    with pytest.raises(ValueError, match="two different indices"):
        rl.rm_ranking_loss(r, [(0, 0)])
    with pytest.raises(ValueError, match="two different indices"):
        rl.rm_ranking_loss(r, [(0, 3)])
    with pytest.raises(ValueError, match="one ranking per prompt"):
        rl.rm_loss([r, r], [[0, 1, 2]])
    with pytest.raises(ValueError, match="at least 2"):
        rl.rm_loss([torch.zeros(1)], [[0]])


# ---------------------------------------------------------------------------
# Imports
# ---------------------------------------------------------------------------


def test_rlmath_imports_no_service_code():
    code = (
        "import sys, alignd.rlmath\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'transformers')"
        " or m.startswith(('alignd.services', 'alignd.runtime', 'alignd.v1')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
