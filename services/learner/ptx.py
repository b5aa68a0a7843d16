"""Pretraining batches for PPO-ptx (InstructGPT eq. 2, the gamma * E_pretrain[log pi] term).

Documents from a text file (one per line) are tokenized, joined with EOS and
packed into blocks of `max_tokens`; blocks are served in a seeded shuffled
order, reshuffled each pass, `batch_size` at a time, without padding.
`text_nll` scores the same blocks (the held-out LM loss of the alignment tax).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from alignd import rlmath


def pack_blocks(tokenizer, path: str, max_tokens: int, *, label: str = "ptx_data") -> torch.Tensor:
    """(N, max_tokens) blocks of the documents' tokens; ValueError (starting with `label`) when unusable."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{label} {p}: cannot read: {err}") from None
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for line in text.splitlines():
        if line.strip():
            stream.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
            if eos is not None:
                stream.append(eos)
    n = len(stream) // max_tokens
    if n == 0:
        raise ValueError(f"{label} {p}: {len(stream)} tokens, fewer than one block of {max_tokens}")
    return torch.tensor(stream[: n * max_tokens], dtype=torch.long).view(n, max_tokens)


def ptx_batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (input_ids, attention_mask) batches, the same sequence on every rank."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(blocks.shape[0], generator=g)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            ids = blocks[order[i : i + batch_size]]
            yield ids, torch.ones_like(ids)


@torch.no_grad()
def text_nll(model, blocks: torch.Tensor, batch_size: int) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens predicted) of a causal LM on (N, L) blocks.

    Each block predicts its tokens 1..L-1 from the ones before (no context
    across blocks). The caller picks the model's mode (eval: no dropout).
    """
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i : i + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        logp = rlmath.logprobs_from_logits(logits[:, :-1].float(), ids[:, 1:])  # (B, L-1)
        total += -logp.double().sum().cpu()
    return float(total), blocks.shape[0] * (blocks.shape[1] - 1)
