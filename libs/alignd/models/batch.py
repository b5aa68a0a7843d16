"""Padding helpers shared by the engines."""

from __future__ import annotations

import torch


def right_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), sequences left-aligned."""
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]
