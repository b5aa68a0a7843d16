"""The learner's trainable module: the policy and its value function.

`PolicyValue` wraps a causal LM (the policy) and either a separate value
model (a one-label `*ForSequenceClassification`, initialised from the reward
model as in InstructGPT) or a linear value head on the policy's last hidden
state. One forward returns, for every response token t of every sequence:

  logprobs[b, t] = log pi(response[b, t] | prefix)      (B, T)
  entropy[b, t]  = H(pi(. | prefix))                      (B, T)
  values[b, t]   = V(prefix before response token t)     (B, T)

where the prefix of response token t of row b ends at sequence index
positions[b, t] = prompt_len[b] - 1 + t (the logits there predict the token).
The policy's LM head runs at those positions only (alignd.models.heads).
"""

from __future__ import annotations

import torch
from torch import nn

from alignd import rlmath
from alignd.models.heads import PositionLogits, gather_positions


def disable_dropout(module: nn.Module) -> None:
    """PPO ratios and the KL to the reference assume deterministic forwards."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


class PolicyValue(nn.Module):
    def __init__(self, policy: nn.Module, value_model: nn.Module | None) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self._position_logits = PositionLogits(policy)  # a plain attribute: it holds the policy's own modules
        if value_model is None:
            hidden = policy.config.hidden_size if hasattr(policy.config, "hidden_size") else policy.config.n_embd
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        else:
            self.value_head = None

    def policy_parameters(self):
        return list(self.policy.parameters())

    def value_parameters(self):
        if self.value_model is not None:
            return list(self.value_model.parameters())
        return list(self.value_head.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L) prompt + response, right-padded
        attention_mask: torch.Tensor,  # (B, L)
        positions: torch.Tensor,  # (B, T) index of the logits that predict response token t
        *,
        response: torch.Tensor,  # (B, T) response token ids (padding: any valid id)
        temperature: float = 1.0,
        with_values: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        need_hidden = with_values and self.value_model is None
        logits, hidden = self._position_logits(input_ids, attention_mask, positions, hidden=need_hidden)
        logits = logits.float() / temperature  # (B, T, V)
        logprobs = rlmath.logprobs_from_logits(logits, response)  # (B, T)
        entropy = rlmath.entropy_from_logits(logits)  # (B, T)
        values = None
        if with_values:
            if self.value_model is None:
                values = self.value_head(hidden).squeeze(-1).float()  # (B, T)
            else:
                values = self.values(input_ids, attention_mask, positions)  # (B, T)
        return logprobs, entropy, values

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Values (B, T) of the separate value model alone (the policy is not run)."""
        h = self.value_model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = gather_positions(h.last_hidden_state, positions)  # (B, T, H)
        return self.value_model.score(hidden).squeeze(-1).float()

    def lm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Policy logits (B, L, V) for the PPO-ptx pretraining loss."""
        return self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
