"""Batched sampling with a KV cache, one sampling configuration per row.

Pure torch + transformers; no gRPC. Rows (one prompt, one sample) are
left-padded to a common length, prefilled in one forward pass, then decoded
one token per step for every unfinished row. Each row has its own
temperature/top-k/top-p/stop set and its own torch.Generator, so a row's
sample depends only on its seed and its logits, not on its batch neighbours.

Log-probs returned (see LogprobMode in protos/alignd/v1/policy.proto):
  raw:     log_softmax(logits)[token]                       (temperature 1)
  sampled: log of the renormalised truncated distribution actually sampled
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alignd.models.handle import ModelHandle


@dataclass(frozen=True)
class Sampling:
    temperature: float  # 0 = greedy
    top_p: float  # in (0, 1]
    top_k: int  # 0 = off
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    logprobs_sampled: bool  # False: raw model log-probs


@dataclass
class Row:
    prompt_ids: list[int]
    sampling: Sampling
    seed: int  # seeds this row's generator


@dataclass
class RowResult:
    token_ids: list[int]
    logprobs: list[float]
    stopped: bool  # True: ended on a stop token; False: hit max_new_tokens


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Masks (to -inf) tokens outside top-k and the top-p nucleus. logits: (V,)"""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
        drop = before >= top_p  # the first token always survives (before == 0)
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample_token(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> tuple[int, float]:
    """One token from `logits` (V,); returns (token, log-prob under the sampled distribution)."""
    if s.temperature == 0.0:
        return int(torch.argmax(logits)), 0.0
    x = _truncate(logits / s.temperature, s.top_k, s.top_p)
    logp = torch.log_softmax(x, dim=-1)
    # Inverse-CDF sampling with one uniform draw: torch.multinomial draws an exponential per vocabulary entry
    # (17% of a SmolLM2 generation on CPU, bench/NOTES.md). right=True never picks a zero-probability token.
    cdf = torch.cumsum(logp.exp().double(), dim=-1)  # (V,)
    total = float(cdf[-1])
    if not (math.isfinite(total) and total > 0):
        raise FloatingPointError("the model produced non-finite logits")
    u = float(torch.rand((), generator=gen, dtype=torch.float64)) * total
    tok = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True)), logp.shape[-1] - 1)
    # u within rounding of the total: back to the last token with probability mass.
    while tok > 0 and (float(cdf[tok]) == float(cdf[tok - 1]) or not math.isfinite(float(logp[tok]))):
        tok -= 1
    return tok, float(logp[tok])


class PolicyEngine:
    def __init__(self, handle: ModelHandle, max_batch_size: int) -> None:
        self.handle = handle
        self.max_batch_size = max_batch_size

    def generate(self, rows: list[Row]) -> tuple[list[RowResult], int]:
        """Generates every row (in chunks of max_batch_size); returns results and the weight version."""
        with self.handle.lock:
            version = self.handle.version
            out: list[RowResult] = []
            for i in range(0, len(rows), self.max_batch_size):
                out.extend(self._generate_chunk(rows[i : i + self.max_batch_size]))
            return out, version

    @torch.inference_mode()
    def _generate_chunk(self, rows: list[Row]) -> list[RowResult]:
        model = self.handle.model
        device = self.handle.device
        pad = self.handle.pad_token_id
        B = len(rows)
        P = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((B, P), pad, dtype=torch.long)
        attention = torch.zeros((B, P), dtype=torch.long)
        for i, r in enumerate(rows):
            L = len(r.prompt_ids)
            input_ids[i, P - L :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attention[i, P - L :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        gens = [torch.Generator(device="cpu").manual_seed(r.seed) for r in rows]
        results = [RowResult([], [], False) for _ in rows]
        finished = [False] * B
        max_new = max(r.sampling.max_new_tokens for r in rows)

        past = None
        cur_ids = input_ids
        cur_pos = positions
        for _step in range(max_new):
            out = model(
                input_ids=cur_ids,
                attention_mask=attention,
                position_ids=cur_pos,
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = out.past_key_values  # the KV cache (transformers 5.19, the version vLLM accepts; docs/install.md)
            logits = out.logits[:, -1, :].float().cpu()  # (B, V)
            raw_logp = torch.log_softmax(logits, dim=-1)  # (B, V)
            next_ids = torch.full((B,), pad, dtype=torch.long)
            for i, r in enumerate(rows):
                if finished[i]:
                    continue
                tok, lp_sampled = sample_token(logits[i], r.sampling, gens[i])
                res = results[i]
                res.token_ids.append(tok)
                res.logprobs.append(lp_sampled if r.sampling.logprobs_sampled else float(raw_logp[i, tok]))
                next_ids[i] = tok
                if tok in r.sampling.stop_token_ids:
                    res.stopped = True
                    finished[i] = True
                elif len(res.token_ids) >= r.sampling.max_new_tokens:
                    finished[i] = True
            if all(finished):
                break
            cur_ids = next_ids[:, None].to(device)  # (B, 1)
            attention = torch.cat([attention, torch.ones((B, 1), dtype=attention.dtype, device=device)], dim=1)
            cur_pos = cur_pos[:, -1:] + 1  # (B, 1)
        for res in results:
            for lp in res.logprobs:
                if math.isnan(lp):
                    raise FloatingPointError("the model produced NaN log-probs")
        return results
