"""The DeepSpeed engine against the plain torch engine, and the data-parallel loss reduction.

- ZeRO stage 2 in 2 processes over gloo (`torchrun`, tests/ds_worker.py) runs
  3 learner PPO steps on fixed batches; the same steps run here in one
  process with `TorchEngine`. Losses and statistics must match within 1e-4,
  the weights after 3 steps within 1e-4. The 2-process run also restores its
  engine from a checkpoint round trip after step 1 and must match too.
- `reduction.token_share` (OpenRLHF's test_loss_aggregation idea): the
  shares of a minibatch split over ranks add up to the whole minibatch's
  loss and gradient, whatever the split.

DeepSpeed's JIT-built shm op is skipped by the engine (ENV.md), so nothing
is compiled; TORCH_EXTENSIONS_DIR still points at a fixed cache in case an
op ever is. The two-process run takes about 15 s on 2 cores (up to about
30 s on a busy machine), so it is not marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ds_worker
import pytest
import torch

from alignd import rlmath
from alignd.services.learner.reduction import DataParallel, token_share

WORKER = Path(__file__).with_name("ds_worker.py")
LOSS_TOL = 1e-4
WEIGHT_TOL = 1e-4
COMPARED = ("policy_loss", "value_loss", "approx_kl", "clip_fraction", "entropy", "ratio_mean", "value_clip_fraction")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return ds_worker.build_models(tmp_path_factory.mktemp("ds_models"))


@pytest.fixture(scope="module")
def torch_run(models):
    return ds_worker.run(models, "torch")


@pytest.fixture(scope="module")
def zero2_run(models, tmp_path_factory):
    """3 steps with DeepSpeed ZeRO-2, 2 processes over gloo (plus a run restored after step 1)."""
    from alignd.models.tiny import default_cache_dir

    out = tmp_path_factory.mktemp("ds_out") / "stats.json"
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(default_cache_dir() / "torch_extensions"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        "--models",
        str(models),
        "--out",
        str(out),
        "--engine",
        "deepspeed",
        "--zero-stage",
        "2",
        "--check-resume",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (
        f"torchrun exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    return (
        (result["stats"], torch.load(str(out) + ".weights.pt")),
        (result["resumed_stats"], torch.load(str(out) + ".resumed.weights.pt")),
    )


def assert_same_run(expected, got) -> float:
    """Same per-step statistics and final weights; returns the largest loss difference."""
    (e_stats, e_weights), (g_stats, g_weights) = expected, got
    assert len(g_stats) == len(e_stats) == ds_worker.STEPS
    worst = 0.0
    for step, (e, g) in enumerate(zip(e_stats, g_stats), start=1):
        for k in COMPARED:
            assert abs(e[k] - g[k]) <= LOSS_TOL, (step, k, e[k], g[k])
        worst = max(worst, abs(e["policy_loss"] - g["policy_loss"]), abs(e["value_loss"] - g["value_loss"]))
        # DeepSpeed averages gradients over ranks: a missing x world size would halve the norm.
        assert g["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-4), step
        assert g["learning_rate"] == pytest.approx(e["learning_rate"], rel=1e-6), step
        assert (g["updates_applied"], g["updates_skipped"]) == (e["updates_applied"], e["updates_skipped"]) == (2, 0)
    assert e_weights.keys() == g_weights.keys()
    for name in e_weights:
        torch.testing.assert_close(g_weights[name], e_weights[name], atol=WEIGHT_TOL, rtol=0, msg=name)
    return worst


def test_zero2_in_two_processes_matches_torch_engine(torch_run, zero2_run):
    worst = assert_same_run(torch_run, zero2_run[0])
    print(f"max loss difference, DeepSpeed ZeRO-2 x2 vs torch: {worst:.2e}")


def test_zero2_restored_from_checkpoint_matches(torch_run, zero2_run):
    assert_same_run(torch_run, zero2_run[1])


# ---------------------------------------------------------------------------
# The reduction, without processes
# ---------------------------------------------------------------------------


def _ppo_inputs(seed: int = 0, B: int = 5, T: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, 7, 3, 5, 2])[:B]
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()  # (B, T) right padded, uneven
    logits = torch.randn(B, T, generator=g, requires_grad=True)  # (B, T) stands in for log-probs and values
    old = torch.randn(B, T, generator=g) * 0.1
    adv = torch.randn(B, T, generator=g)
    returns = torch.randn(B, T, generator=g)
    return logits, old, adv, returns, mask


def _losses(logits, old, adv, returns, mask, rows):
    pl, _ = rlmath.policy_loss(logits[rows] * 0.1 + old[rows], old[rows], adv[rows], mask=mask[rows], clip=0.2)
    vl, _ = rlmath.value_loss(logits[rows], old[rows], returns[rows], mask=mask[rows], clip=0.2)
    return pl, vl


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_token_shares_add_up_to_the_whole_minibatch(world_size, monkeypatch):
    """sum over ranks of share_r x (rank's token mean) = the minibatch's token mean, value and gradient."""
    logits, old, adv, returns, mask = _ppo_inputs()
    rows = torch.tensor([3, 0, 4, 1, 2])  # a shuffled minibatch
    pl, vl = _losses(logits, old, adv, returns, mask, rows)
    (g_whole,) = torch.autograd.grad(pl + 0.1 * vl, logits)

    n_total = float(mask.sum())  # what the all-reduce of the counts returns
    monkeypatch.setattr(DataParallel, "all_reduce_sum", lambda self, x: torch.full_like(x, n_total))
    total = torch.zeros(())
    grad = torch.zeros_like(logits)
    covered: list[int] = []
    for rank in range(world_size):
        dp = DataParallel(rank, world_size)
        local, empty = dp.shard(rows)
        if not empty:
            covered += local.tolist()
        share = token_share(mask[local], dp, empty)
        rpl, rvl = _losses(logits, old, adv, returns, mask, local)
        loss_r = rpl * share + 0.1 * rvl * share
        (g_r,) = torch.autograd.grad(loss_r, logits)
        total, grad = total + loss_r.detach(), grad + g_r
    assert sorted(covered) == sorted(rows.tolist())  # every row on exactly one rank
    torch.testing.assert_close(total, (pl + 0.1 * vl).detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, g_whole, atol=1e-6, rtol=1e-6)


def test_mean_of_rank_means_is_not_the_minibatch_mean():
    """Why the global count matters: with uneven token counts, averaging the ranks' own means is wrong."""
    logits, old, adv, returns, mask = _ppo_inputs()
    rows = torch.tensor([0, 1, 2])  # ranks hold rows 0, 1 (1 + 7 tokens) and row 2 (3 tokens)
    whole, _ = _losses(logits, old, adv, returns, mask, rows)
    halves = [_losses(logits, old, adv, returns, mask, r)[0] for r in rows.tensor_split(2)]
    assert not torch.allclose(sum(halves) / 2, whole, atol=1e-4)


def test_one_rank_share_is_exactly_one():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    share = token_share(mask, DataParallel())
    assert share.item() == 1.0
    idx = torch.tensor([2, 0, 1])
    local, empty = DataParallel().shard(idx)
    assert local is idx and not empty
