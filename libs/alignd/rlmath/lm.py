"""Logits to language-model quantities: the log-probs of the sampled tokens, the entropy per position, and
the next-token (LM) loss of PPO-ptx's pretraining term.

The references ([InstructGPT], [PPO], [GAE], [Ziegler], [KL-approx]) and the tensor
conventions are in the package docstring (`alignd.rlmath`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignd.rlmath.masks import masked_mean


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per position, without a (B, T, V) log-softmax.

    The log-likelihood of the sampled tokens that PPO ([PPO]) and the KL
    penalty ([InstructGPT] eq. 2) use. In float32/64: gathered logit minus
    logsumexp, one batch row at a time to bound peak memory; in 16-bit
    dtypes (where that subtraction loses precision): a row-wise log_softmax
    and gather. Same as TRL's `selective_log_softmax`.

    logits: (B, T, V) (logits[b, t] predicts tokens[b, t]); tokens: (B, T)
    long. Returns (B, T).
    """
    index = tokens.unsqueeze(-1)  # (B, T, 1)
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index).squeeze(-1)  # (B, T)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # (B, T)
        return selected - lse  # (B, T)
    rows = [
        F.log_softmax(row, dim=-1).gather(dim=-1, index=row_index).squeeze(-1)  # (T,)
        for row, row_index in zip(logits, index, strict=True)
    ]
    return torch.stack(rows)  # (B, T)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """Entropy H = -sum_v p_v log p_v (nats) of each position's distribution.

    A policy statistic of PPO training ([PPO] section 5 adds it as an
    optional bonus; InstructGPT does not). Computed over chunks of flattened
    positions to bound peak memory, as TRL's `entropy_from_logits`.

    logits: (B, T, V) (any leading shape). Returns (B, T).
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
    chunks = []
    for chunk in flat.split(chunk_size, dim=0):  # (<=chunk_size, V)
        logp = F.log_softmax(chunk, dim=-1)  # (c, V)
        chunks.append(-(logp.exp() * logp).sum(-1))  # (c,)
    return torch.cat(chunks).reshape(logits.shape[:-1])  # (B, T)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy, a masked mean over tokens: -mean log pi(x_t | x_<t).

    The pretraining term of PPO-ptx ([InstructGPT] eq. 2, as a loss).
    Aligned like `logprobs_from_logits`: logits[:, t] predicts labels[:, t],
    so the caller shifts (for a model run on `ids`: `lm_loss(logits[:, :-1],
    ids[:, 1:], mask[:, 1:])`).

    logits: (B, T, V); labels: (B, T) long; mask: (B, T) labels that count.
    Returns ().
    """
    logp = logprobs_from_logits(logits, labels)  # (B, T)
    return -masked_mean(logp, mask)  # ()
