"""Atomic checkpoints of the learner, one shard per rank.

A checkpoint is a directory `step-00000012/` holding
  module.pt               every parameter of the policy and value model (torch.save)
  trainer.pt              what every rank shares: KL controller, shuffling
                          generator, EMA weights, step, version, recent step
                          results, and the world size that wrote it
  engine-rank00000.pt     one per rank: that rank's engine state (for ZeRO
  engine-rank00001.pt ... stage >= 1 its optimizer partition) and RNG states
  policy/                 the policy as a save_pretrained directory (for export
                          and for ModelService.LoadWeights on other roles)
Rank 0 writes module.pt, trainer.pt and policy/ (stages 0-2 keep the full
weights on every rank); every rank writes its own engine shard, so the
directory must be on a filesystem every rank sees (the shared volume). It is
written under a temporary name, every file fsync'ed, then renamed into place
by rank 0 once every shard is there; `latest` (a small JSON file, replaced
atomically) names the newest complete checkpoint and its world size. A crash
at any point leaves the previous checkpoint intact and `latest` pointing at
it. A checkpoint restores only into a learner of the same world size (the
ZeRO partitions depend on it): anything else is a `CheckpointMismatch`.
Checkpoints written before the shards existed (the engine state inside
trainer.pt) restore into one process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Protocol

import torch

from alignd.atomic import fsync_dir, fsync_path, fsync_tree, write_json_atomic

LATEST = "latest"


class Ranks(Protocol):
    """This process's rank among `world_size` and a barrier over all of them (ranks.py)."""

    rank: int
    world_size: int

    def barrier(self) -> None: ...


class _OneRank:
    rank = 0
    world_size = 1

    def barrier(self) -> None:
        pass


ONE_RANK = _OneRank()  # a single process


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, I/O error); the previous checkpoint and `latest` are untouched."""


class CheckpointMismatch(ValueError):
    """A checkpoint that this learner cannot restore (another world size, a missing shard)."""


def shard_name(rank: int) -> str:
    return f"engine-rank{rank:05d}.pt"


def step_dir_name(step: int, tag: str = "") -> str:
    return f"step-{step:08d}" + (f"-{tag}" if tag else "")


def save(
    root: Path,
    step: int,
    *,
    module_state: dict | None,
    trainer_state: dict | None,
    rank_state: dict,
    policy=None,
    tokenizer=None,
    tag: str = "",
    keep: int = 2,
    ranks: Ranks = ONE_RANK,
) -> Path:
    """Every rank calls this at the same point; rank 0 also passes the module, trainer state and policy.

    A failure while writing (disk full, an I/O error) removes the partial directory and raises
    CheckpointWriteError: `latest` still names the previous checkpoint, which is left as it was."""
    final = root / step_dir_name(step, tag)
    tmp = root / f".tmp-{final.name}"
    try:
        return _save(
            final=final,
            tmp=tmp,
            step=step,
            module_state=module_state,
            trainer_state=trainer_state,
            rank_state=rank_state,
            policy=policy,
            tokenizer=tokenizer,
            keep=keep,
            ranks=ranks,
        )
    except CheckpointMismatch:
        raise
    except Exception as err:  # torch.save reports a full disk as RuntimeError, save_pretrained as OSError
        if ranks.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"writing checkpoint {final.name} failed: {err}") from err


def _save(
    *,
    final: Path,
    tmp: Path,
    step: int,
    module_state,
    trainer_state,
    rank_state,
    policy,
    tokenizer,
    keep: int,
    ranks: Ranks,
) -> Path:
    root = final.parent
    if ranks.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    ranks.barrier()  # the temporary directory exists
    shard = tmp / shard_name(ranks.rank)
    torch.save(rank_state, shard)
    fsync_path(shard)
    if ranks.rank == 0:
        torch.save(module_state, tmp / "module.pt")
        torch.save({**trainer_state, "world_size": ranks.world_size}, tmp / "trainer.pt")
        policy.save_pretrained(tmp / "policy")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "policy")
    ranks.barrier()  # every shard written
    if ranks.rank == 0:
        missing = [r for r in range(ranks.world_size) if not (tmp / shard_name(r)).exists()]
        if missing:
            raise CheckpointMismatch(
                f"{tmp}: the engine shards of ranks {missing} are not visible from rank 0; checkpoint_dir must be on a "
                "filesystem that every learner rank mounts at the same path"
            )
        fsync_tree(tmp)
        pointer = {"step": step, "world_size": ranks.world_size}
        if final.exists():  # the same name again (a SaveCheckpoint, a second reset): `latest` never names a gap
            staged = root / f"{final.name}.new"
            if staged.exists():
                shutil.rmtree(staged)
            os.replace(tmp, staged)
            fsync_dir(root)
            write_json_atomic(root / LATEST, {"checkpoint": staged.name, **pointer})
            shutil.rmtree(final)
            tmp = staged
        os.replace(tmp, final)
        fsync_dir(root)
        write_json_atomic(root / LATEST, {"checkpoint": final.name, **pointer})
        _prune(root, keep, final.name)
    return final


def _prune(root: Path, keep: int, newest: str) -> None:
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in dirs[: max(0, len(dirs) - keep)]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.exists():
        return None
    name = json.loads(pointer.read_text())["checkpoint"]
    path = root / name
    return path if path.is_dir() else None


def load(path: Path, rank: int = 0, world_size: int = 1) -> tuple[dict, dict, dict]:
    """(module state, shared trainer state, this rank's engine + RNG state); the world size must match."""
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    if "engine" in trainer_state and "world_size" not in trainer_state:  # written by one process, before shards
        rank_state = {"engine": trainer_state.pop("engine"), "rng": trainer_state.pop("rng")}
        saved_world = 1
    else:
        saved_world = int(trainer_state["world_size"])
        rank_state = None
    if saved_world != world_size:
        raise CheckpointMismatch(
            f"checkpoint {path} was written by a learner of world size {saved_world}, this one has {world_size}: "
            f"restart with {saved_world} processes (learner.replicas x GPUs per pod), or start from fresh weights "
            "with an empty checkpoint_dir"
        )
    if rank_state is None:
        shard = path / shard_name(rank)
        if not shard.exists():
            raise CheckpointMismatch(f"checkpoint {path} has no engine shard for rank {rank} ({shard.name})")
        rank_state = torch.load(shard, map_location="cpu", weights_only=False)
    module_state = torch.load(path / "module.pt", map_location="cpu", weights_only=False)
    return module_state, trainer_state, rank_state


def remove_others(root: Path, keep: str) -> None:
    """Deletes every checkpoint but `keep` (called once `latest` points at it)."""
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and d.name != keep:
            shutil.rmtree(d, ignore_errors=True)
