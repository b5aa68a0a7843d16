"""Request validation shared by the model-serving roles."""

from __future__ import annotations

from typing import Sequence

from alignd.models.handle import ModelHandle
from alignd.runtime.errors import InvalidArgument

# Upper bound on sequences in one request (prompts x samples, or items).
MAX_REQUEST_SEQUENCES = 4096


def check_batch(n: int, field: str) -> None:
    if n == 0:
        raise InvalidArgument(field, "empty batch: at least one item is required")
    if n > MAX_REQUEST_SEQUENCES:
        raise InvalidArgument(field, f"{n} sequences in one request; at most {MAX_REQUEST_SEQUENCES}")


def check_ids(ids: Sequence[int], vocab_size: int, field: str) -> list[int]:
    out = list(ids)
    for j, t in enumerate(out):
        if t < 0 or t >= vocab_size:
            raise InvalidArgument(f"{field}[{j}]", f"token id {t} outside the vocabulary [0, {vocab_size})")
    return out


def tokenize(handle: ModelHandle, text: str) -> list[int]:
    return list(handle.tokenizer(text, add_special_tokens=False)["input_ids"])


def check_length(n_tokens: int, handle: ModelHandle, field: str, what: str = "sequence") -> None:
    if n_tokens > handle.max_context:
        raise InvalidArgument(field, f"{what} of {n_tokens} tokens exceeds the context of {handle.max_context} tokens")
