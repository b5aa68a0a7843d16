"""Logits at chosen positions only.

A causal LM's forward applies its LM head (hidden -> vocabulary) at every
position of the sequence, but log-probs of a response need it only where the
response's tokens are predicted. For SmolLM2-135M the head (576 x 49,152) and
the (B, L, V) tensors after it are a large share of a training forward and
backward. `PositionLogits` runs the decoder, gathers the hidden states at the
positions asked for, and applies the head there alone.

That equals the model's own logits only for models whose logits are exactly
`lm_head(last_hidden_state)`; some scale or soft-cap them after the head
(Gemma 2's final_logit_softcapping, Cohere's logit_scale, Granite's
logits_scaling). A model whose configuration sets one of those, or whose split
differs from its full forward on a short input (same shapes, so the same
arithmetic: the check is tight), or that has no separate decoder and head,
gets the full forward, gathered afterwards: the same numbers, at the full cost.
"""

from __future__ import annotations

import torch
from torch import nn

from alignd.runtime.logging import get_logger

_log = get_logger("alignd.models.heads")


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x: (B, L, ...) gathered at positions (B, T) -> (B, T, ...)."""
    idx = positions
    for _ in range(x.dim() - 2):
        idx = idx.unsqueeze(-1)
    idx = idx.expand(*positions.shape, *x.shape[2:])
    return x.gather(1, idx)


# Configuration keys of transformers models that transform the logits after the LM head, and their no-op values.
POST_HEAD_KEYS = {
    "final_logit_softcapping": (None, 0, 0.0),
    "logit_scale": (None, 1, 1.0),
    "logits_scaling": (None, 1, 1.0),
}


def _post_head(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    for key, noop in POST_HEAD_KEYS.items():
        if getattr(cfg, key, None) not in noop:
            return key
    return None


def response_positions(lengths: list[tuple[int, int]], T: int, device=None) -> torch.Tensor:
    """(B, T) positions[b, t] = P_b - 1 + t for rows of (prompt length P_b, response length R_b), right-padded
    sequences: the logits there predict response token t; a row's padding reuses its last position."""
    return torch.stack([torch.clamp(torch.arange(T) + P - 1, max=P + R - 2) for P, R in lengths]).to(device)


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, "base_model", None)  # transformers: the decoder under base_model_prefix, else the model
    if head is None or decoder is None or decoder is model:
        return None
    return decoder, head


class PositionLogits:
    """model's logits at positions (B, T), and optionally its last hidden states there (B, T, H)."""

    def __init__(self, model: nn.Module, name: str = "policy") -> None:
        self.model = model
        self.split = _decoder_and_head(model)
        reason = _post_head(model)
        if self.split is not None and (reason or not self._split_matches()):
            _log.info(
                "position_logits_full_forward",
                model=name,
                architecture=type(model).__name__,
                reason=f"config.{reason}" if reason else "logits are not lm_head(last_hidden_state)",
            )
            self.split = None

    @torch.no_grad()
    def _split_matches(self) -> bool:
        decoder, head = self.split
        was_training = self.model.training
        self.model.eval()
        try:
            vocab = head.weight.shape[0]
            ids = torch.tensor([[1 % vocab, 7 % vocab, 3 % vocab, 11 % vocab, 5 % vocab]], device=head.weight.device)
            mask = torch.ones_like(ids)
            full = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            split = head(decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state).float()
        except Exception as exc:  # noqa: BLE001 - any model that cannot be split this way gets the full forward
            _log.info("position_logits_split_failed", error=f"{type(exc).__name__}: {exc}")
            return False
        finally:
            self.model.train(was_training)
        if full.shape != split.shape:
            return False
        # The same matmuls on the same shapes: equal up to the last bits (kernels may still pick another order).
        tol = 1e-6 * max(1.0, float(full.abs().max()))
        return bool((full - split).abs().max() <= tol)

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, *, hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.split is not None:
            decoder, head = self.split
            h = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            h = gather_positions(h, positions)  # (B, T, H)
            return head(h), (h if hidden else None)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=hidden
        )
        logits = gather_positions(out.logits, positions)
        return logits, (gather_positions(out.hidden_states[-1], positions) if hidden else None)
