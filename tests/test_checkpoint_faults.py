"""Disk faults while the learner writes a checkpoint (issue 7): the previous checkpoint stays the latest and
loadable, the failed step is answered UNAVAILABLE, and the retried step completes once the disk works again.
The learner is the real one on a tiny model loaded from its directory; the fault is an error injected into the
checkpoint writer part-way through a write (torch reports a full disk as this RuntimeError)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from alignd.config import LearnerConfig
from alignd.runtime.errors import Unavailable
from alignd.services.learner import checkpoint
from alignd.services.learner.learner import Learner
from alignd.services.learner.servicer import parse_batch
from alignd.v1 import learner_pb2


def _request(step: int) -> learner_pb2.TrainStepRequest:
    rng = random.Random(step)
    exps = []
    for _ in range(4):
        p, r = rng.randint(2, 6), rng.randint(1, 6)
        exps.append(
            learner_pb2.Experience(
                prompt_token_ids=[rng.randint(3, 90) for _ in range(p)],
                response_token_ids=[rng.randint(3, 90) for _ in range(r)],
                rollout_logprobs=[-2.0] * r,
                reference_logprobs=[-2.0] * r,
                score=rng.uniform(-1, 1),
            )
        )
    return learner_pb2.TrainStepRequest(step=step, experiences=exps)


def _learner(tiny_models, root: Path, keep: int) -> Learner:
    cfg = LearnerConfig.model_validate(
        {
            "model": {"path": str(tiny_models["lm"])},
            "value_head_on_policy": True,
            "torch_threads": 1,
            "ppo": {"minibatches": 1},
            "checkpoint_dir": str(root),
            "checkpoint_keep": keep,
        }
    )
    return Learner(cfg, root.parent)


def _step(learner: Learner, step: int) -> learner_pb2.TrainStepResponse:
    h = learner.handle
    return learner.train_step(step, parse_batch(_request(step), h.vocab_size, h.max_context, pad_id=h.pad_token_id))


def _dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_failed_checkpoint_write_keeps_the_previous_one_and_the_retried_step_completes(
    tiny_models, tmp_path, monkeypatch
):
    root = tmp_path / "ckpt"
    learner = _learner(tiny_models, root, keep=2)
    first = _step(learner, 1)
    assert checkpoint.latest(root).name == "step-00000001"

    real_save = torch.save
    failures = []

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("module.pt"):  # after the rank shard was written: a partial checkpoint is on disk
            Path(f).write_bytes(b"\0" * 1024)
            failures.append(str(f))
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1024 vs 4096")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(Unavailable, match="step 2 is applied but its checkpoint could not be written"):
        _step(learner, 2)
    assert failures
    # The previous checkpoint is still the latest, complete and loadable; the partial one is gone.
    assert checkpoint.latest(root).name == "step-00000001"
    assert _dirs(root) == ["step-00000001"]
    module_state, trainer_state, _ = checkpoint.load(checkpoint.latest(root))
    assert trainer_state["step"] == 1 and module_state
    # A learner that restarts now resumes from step 1 (the coordinator would replay step 2).
    restarted = _learner(tiny_models, root, keep=2)
    assert restarted.step == 1 and restarted.restored_from.name == "step-00000001"
    del restarted

    # The disk works again: the coordinator's retry of step 2 gets the stored result, written to disk first.
    monkeypatch.setattr(torch, "save", real_save)
    again = _step(learner, 2)
    assert again.replayed and again.step == 2 and again.policy_version == first.policy_version + 1
    assert checkpoint.latest(root).name == "step-00000002"
    third = _step(learner, 3)
    assert not third.replayed and third.step == 3
    # checkpoint_keep: 2 -> the oldest is removed, only once the newer ones are complete.
    assert _dirs(root) == ["step-00000002", "step-00000003"]
    assert _learner(tiny_models, root, keep=2).step == 3

    # A reset whose checkpoint fails is answered UNAVAILABLE; its retry writes the reset checkpoint (and only then
    # removes the previous PPO run's), so a crash in between restores the pre-reset state, never a mix.
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(Unavailable):
        learner.reset(str(tiny_models["lm"]), "", version=100)
    assert checkpoint.latest(root).name == "step-00000003" and _dirs(root) == ["step-00000002", "step-00000003"]
    monkeypatch.setattr(torch, "save", real_save)
    assert learner.reset(str(tiny_models["lm"]), "", version=100) is False  # already reset in memory: replayed
    assert checkpoint.latest(root).name == "step-00000000-reset" and _dirs(root) == ["step-00000000-reset"]
    restarted = _learner(tiny_models, root, keep=2)
    assert (restarted.step, restarted.version) == (0, 100)


def test_rewriting_a_checkpoint_of_the_same_name_never_leaves_latest_dangling(tmp_path, monkeypatch):
    """A second checkpoint under the same name (a second reset, a SaveCheckpoint at the same step) replaces the
    first without a moment where `latest` names a missing directory: the new one is staged, `latest` points at
    it, then it takes the name."""
    seen = []
    real_write = checkpoint.write_json_atomic

    def spy(path, obj):
        real_write(path, obj)
        if path.name == checkpoint.LATEST:
            seen.append((obj["checkpoint"], (path.parent / obj["checkpoint"]).is_dir()))

    monkeypatch.setattr(checkpoint, "write_json_atomic", spy)

    class Policy:
        def save_pretrained(self, d):
            Path(d).mkdir(parents=True, exist_ok=True)
            (Path(d) / "config.json").write_text("{}")

    for a, v in ((torch.zeros(1), 1), (torch.ones(1), 2)):  # twice under one name: step 0, tag reset
        checkpoint.save(
            tmp_path,
            0,
            module_state={"a": a},
            trainer_state={"v": v},
            rank_state={"r": 0},
            policy=Policy(),
            tag="reset",
        )
    assert all(exists for _, exists in seen), seen
    assert [name for name, _ in seen] == ["step-00000000-reset", "step-00000000-reset.new", "step-00000000-reset"]
    _, trainer_state, _ = checkpoint.load(checkpoint.latest(tmp_path))
    assert trainer_state["v"] == 2 and _dirs(tmp_path) == ["step-00000000-reset"]


def test_checkpoint_write_error_names_the_checkpoint(tmp_path, monkeypatch):
    def broken(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(checkpoint.CheckpointWriteError, match="step-00000007.*No space left on device"):
        checkpoint.save(tmp_path, 7, module_state={}, trainer_state={}, rank_state={}, policy=None)
    assert checkpoint.latest(tmp_path) is None and list(tmp_path.iterdir()) == []
