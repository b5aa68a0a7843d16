"""The learner's PPO step with samples of other weights (async rollouts) and with old log-probs taken from the
rollouts (ppo.old_logprobs: auto): the in-process Learner on tiny real models, checked against the recomputing
path and hand-computed importance weights."""

from __future__ import annotations

import math

import pytest
import torch

from alignd.config import LearnerConfig
from alignd.services.learner.learner import Learner
from alignd.services.learner.ppo import collate


def make_learner(tiny_models, tmp_path, **ppo) -> Learner:
    cfg = LearnerConfig.model_validate(
        {
            "model": {"path": str(tiny_models["lm"])},
            "value_model": {"path": str(tiny_models["reward"])},
            "ppo": {"minibatches": 2, "epochs": 2, **ppo},
            "optimizer": {"lr": 1e-3, "warmup_steps": 0},
            "checkpoint_every_steps": 0,
            "ema_decay": None,
            "seed": 0,
        }
    )
    return Learner(cfg, tmp_path)


def batch_of(learner: Learner, versions: list[int], exact: bool, shift: list[float] | None = None):
    """Six rows of random prompts and responses; rollout log-probs = the learner's own (minus `shift[b]` per row)."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (3, 5, 2, 4, 6, 3)]
    responses = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (7, 4, 8, 8, 5, 6)]
    zeros = [[0.0] * len(r) for r in responses]
    scores = [float(i % 3) - 1.0 for i in range(6)]
    probe = collate(prompts, responses, zeros, rollout_logprobs=zeros, scores=scores, pad_id=0)
    with torch.no_grad():
        lp, _, _ = learner.module(
            probe.input_ids, probe.attention_mask, probe.positions, response=probe.response, temperature=1.0
        )
    shift = shift or [0.0] * 6
    rollout = [[float(lp[b, t]) - shift[b] for t in range(len(r))] for b, r in enumerate(responses)]
    ref = [[float(lp[b, t]) - 0.1 for t in range(len(r))] for b, r in enumerate(responses)]
    return collate(
        prompts,
        responses,
        ref,
        rollout_logprobs=rollout,
        scores=scores,
        pad_id=0,
        versions=versions,
        rollout_exact=exact,
    )


def test_old_logprobs_from_rollouts_give_the_recomputed_step(tiny_models, tmp_path):
    """The same step, once with the old log-probs taken from exact rollouts, once recomputed: same update."""
    a = make_learner(tiny_models, tmp_path / "a")
    b = make_learner(tiny_models, tmp_path / "b", old_logprobs="recompute")
    sa = a.trainer.step(batch_of(a, [0] * 6, exact=True), version=0)
    sb = b.trainer.step(batch_of(b, [0] * 6, exact=True), version=0)
    assert sa.old_logprobs_from_rollout and not sb.old_logprobs_from_rollout
    for field in ("policy_loss", "value_loss", "approx_kl", "clip_fraction", "reference_kl", "grad_norm", "ratio_mean"):
        assert getattr(sa, field) == pytest.approx(getattr(sb, field), rel=1e-5, abs=1e-7), field
    for pa, pb in zip(a.module.parameters(), b.module.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    # Not exact (truncated sampling, another temperature or dtype), or a row of other weights with
    # off_policy: decoupled: recomputed.
    c = make_learner(tiny_models, tmp_path / "c")
    assert not c.trainer.step(batch_of(c, [0] * 6, exact=False), version=0).old_logprobs_from_rollout
    d = make_learner(tiny_models, tmp_path / "d", off_policy="decoupled")
    assert not d.trainer.step(batch_of(d, [0] * 5 + [7], exact=True), version=0).old_logprobs_from_rollout


def test_stale_rows_take_the_behaviour_logprobs_as_old(tiny_models, tmp_path):
    """off_policy: behaviour (default): rows of other weights keep the rollouts' log-probs as the old ones (the
    ratio is pi / pi_behaviour), with no recomputing forward: the update equals that of the same batch marked current
    and exact, whatever the shift between behaviour and current log-probs. Rollouts that are not exact (truncated
    sampling) fall back to the decoupled correction."""
    shift = [0.3, -0.2, 0.1, 0.0, 0.25, -0.1]
    a = make_learner(tiny_models, tmp_path / "a")
    sa = a.trainer.step(batch_of(a, [3] * 6, exact=True, shift=shift), version=4)
    b = make_learner(tiny_models, tmp_path / "b")
    sb = b.trainer.step(batch_of(b, [4] * 6, exact=True, shift=shift), version=4)
    assert sa.old_logprobs_from_rollout and sb.old_logprobs_from_rollout
    assert sa.stale_fraction == 1.0 and sb.stale_fraction == 0.0
    assert sa.behaviour_weight_mean == 1.0 and sa.behaviour_truncated_fraction == 0.0  # decoupled only
    assert sa.policy_loss == sb.policy_loss and sa.ratio_mean == sb.ratio_mean
    # The first minibatch's ratio is pi / pi_behaviour = exp(shift) on average, not 1.
    assert sa.ratio_mean != pytest.approx(1.0, abs=1e-3)
    for pa, pb in zip(a.module.parameters(), b.module.parameters()):
        assert torch.equal(pa, pb)
    # Not exact: every row recomputed, the stale ones weighted pi_current / pi_behaviour = exp(shift).
    c = make_learner(tiny_models, tmp_path / "c")
    sc = c.trainer.step(batch_of(c, [3, 3, 3, 4, 4, 4], exact=False, shift=shift), version=4)
    assert not sc.old_logprobs_from_rollout and sc.stale_fraction == 0.5
    assert sc.behaviour_weight_mean == pytest.approx(
        sum(math.exp(x) * n for x, n in zip(shift[:3], (7, 4, 8))) / 19, rel=1e-5
    )


def test_stale_rows_are_weighted_by_current_over_behaviour(tiny_models, tmp_path):
    """off_policy: decoupled: rows of version 3 trained at version 4 get weight pi_current / pi_behaviour = exp(shift)
    on each of their tokens, truncated at behaviour_weight_cap; rows of the current version keep weight 1."""
    shift = [math.log(1.5)] * 3 + [0.0] * 3  # the first three rows' behaviour prob is 1/1.5 of the current one
    learner = make_learner(tiny_models, tmp_path / "w", off_policy="decoupled")
    s = learner.trainer.step(batch_of(learner, [3, 3, 3, 4, 4, 4], exact=True, shift=shift), version=4)
    assert not s.old_logprobs_from_rollout  # stale rows: recomputed
    assert s.stale_fraction == pytest.approx(0.5)
    assert s.behaviour_weight_mean == pytest.approx(1.5, rel=1e-5)
    assert s.behaviour_weight_max == pytest.approx(1.5, rel=1e-5)
    assert s.behaviour_truncated_fraction == 0.0

    capped = make_learner(tiny_models, tmp_path / "c", off_policy="decoupled", behaviour_weight_cap=1.2)
    s = capped.trainer.step(batch_of(capped, [3, 3, 3, 4, 4, 4], exact=True, shift=shift), version=4)
    assert s.behaviour_weight_mean == pytest.approx(1.2) and s.behaviour_weight_max == pytest.approx(1.2)
    assert s.behaviour_truncated_fraction == 1.0

    # The weights change the update: the same batch marked current (weight 1) trains differently.
    plain = make_learner(tiny_models, tmp_path / "p", off_policy="decoupled")
    s1 = plain.trainer.step(batch_of(plain, [4] * 6, exact=False, shift=shift), version=4)
    assert s1.stale_fraction == 0.0 and s1.behaviour_weight_mean == 1.0
    assert any(
        not torch.equal(p, q) for p, q in zip(plain.module.policy.parameters(), learner.module.policy.parameters())
    )


@pytest.mark.parametrize(
    "temperature,top_k,dtypes,engines,exact",
    [
        (1.0, 0, {"float32"}, {("transformers", "cpu")}, True),
        (1.0, 0, {"float32"}, {("transformers", "cuda:0")}, True),
        (1.0, 0, {"float32"}, {("vllm", "cpu")}, True),  # measured within the tolerance (docs/vllm.md)
        (1.0, 0, {"float32"}, {("vllm", "cuda")}, False),  # other kernels, not measured: recompute
        (1.0, 0, {"float32"}, {("transformers", "cpu"), ("vllm", "cuda")}, False),  # one such replica is enough
        (1.0, 0, {"float32", "bfloat16"}, {("transformers", "cpu")}, False),
        (0.7, 0, {"float32"}, {("transformers", "cpu")}, True),
        (1.0, 50, {"float32"}, {("transformers", "cpu")}, False),
        (0.0, 0, {"float32"}, {("transformers", "cpu")}, False),
    ],
)
def test_when_the_rollouts_log_probs_are_the_learners_own(temperature, top_k, dtypes, engines, exact):
    """ppo.old_logprobs: auto takes the rollouts' log-probs only where they are the learner's own within the
    tolerance: untruncated sampling, float32 everywhere, no policy replica on vLLM on a GPU."""
    from alignd.config.runs import SamplingConfig
    from alignd.services.coordinator.loop import rollouts_exact

    sampling = SamplingConfig(temperature=temperature, top_k=top_k, max_new_tokens=4)
    assert rollouts_exact(sampling, dtypes, engines) is exact
