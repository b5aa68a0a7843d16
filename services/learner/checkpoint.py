"""Atomic checkpoints of the learner.

A checkpoint is a directory `step-00000012/` holding
  module.pt    every parameter of the policy and value model (torch.save)
  trainer.pt   optimizer + scheduler, KL controller, shuffling generator,
               RNG states, EMA weights, step, version, recent step results
  policy/      the policy as a save_pretrained directory (for export and for
               ModelService.LoadWeights on other roles)
It is written under a temporary name, every file fsync'ed, then renamed into
place; `latest` (a small JSON file, replaced atomically) names the newest
complete checkpoint. A crash at any point leaves the previous checkpoint
intact and `latest` pointing at it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from alignd.runtime.role import write_json_atomic

LATEST = "latest"


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def step_dir_name(step: int, tag: str = "") -> str:
    return f"step-{step:08d}" + (f"-{tag}" if tag else "")


def save(root: Path, step: int, module_state: dict, trainer_state: dict, policy, tokenizer, tag: str = "", keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step, tag)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(module_state, tmp / "module.pt")
    torch.save(trainer_state, tmp / "trainer.pt")
    policy.save_pretrained(tmp / "policy")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "policy")
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(root / LATEST, {"checkpoint": final.name, "step": step})
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


def load(path: Path) -> tuple[dict, dict]:
    module_state = torch.load(path / "module.pt", map_location="cpu", weights_only=False)
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    return module_state, trainer_state


def remove_others(root: Path, keep: str) -> None:
    """Deletes every checkpoint but `keep` (called once `latest` points at it)."""
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and d.name != keep:
            shutil.rmtree(d, ignore_errors=True)
