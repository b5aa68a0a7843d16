"""Pretraining batches for PPO-ptx (InstructGPT eq. 2, the gamma * E_pretrain[log pi] term).

Documents from a text file (one per line) are tokenized, joined with EOS and
packed into blocks of `max_tokens`; blocks are served in a seeded shuffled
order, reshuffled each pass, `batch_size` at a time, without padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch


def pack_blocks(tokenizer, path: str, max_tokens: int) -> torch.Tensor:
    """(N, max_tokens) blocks of the documents' tokens."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"ptx_data {p}: cannot read: {err}") from None
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for line in text.splitlines():
        if line.strip():
            stream.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
            if eos is not None:
                stream.append(eos)
    n = len(stream) // max_tokens
    if n == 0:
        raise ValueError(f"ptx_data {p}: {len(stream)} tokens, fewer than one block of {max_tokens}")
    return torch.tensor(stream[: n * max_tokens], dtype=torch.long).view(n, max_tokens)


def ptx_batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (input_ids, attention_mask) batches, the same sequence on every rank."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(blocks.shape[0], generator=g)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            ids = blocks[order[i : i + batch_size]]
            yield ids, torch.ones_like(ids)
