"""Request validation shared by the model-serving roles."""

from __future__ import annotations

import math
from collections.abc import Sequence

from alignd.chat import ChatError
from alignd.models.handle import ModelHandle
from alignd.runtime.errors import InvalidArgument

# Upper bound on sequences in one request (prompts x samples, or items).
MAX_REQUEST_SEQUENCES = 4096
# Upper bound on the UTF-8 bytes of one text, checked before it is tokenised (tokenising costs time and memory in
# proportion to the text; no context of today's models holds 256 KiB of text).
MAX_TEXT_BYTES = 256 * 1024
# Sampling and log-prob temperatures: 0 (greedy / the default) or within these bounds. Logits divided by a smaller
# one overflow float32 (a temperature of 1e-45 made every row of a batch NaN); a larger one is indistinguishable from
# uniform sampling.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3


def check_temperature(t: float, field: str, zero: str) -> float:
    """`t` when it is 0 (meaning `zero`) or a finite number in [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    if t == 0:
        return 0.0
    if not (math.isfinite(t) and MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
        raise InvalidArgument(field, f"must be 0 ({zero}) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {t}")
    return float(t)


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


def tokenize(handle: ModelHandle, text: str, field: str = "text") -> list[int]:
    """Token ids of `text`; InvalidArgument naming `field` for a text over MAX_TEXT_BYTES (checked first)."""
    n = len(text.encode("utf-8", "surrogatepass"))
    if n > MAX_TEXT_BYTES:
        raise InvalidArgument(field, f"{n} bytes of text; at most {MAX_TEXT_BYTES} (checked before tokenising)")
    return list(handle.tokenizer(text, add_special_tokens=False)["input_ids"])


def check_length(n_tokens: int, handle: ModelHandle, field: str, *, what: str = "sequence") -> None:
    if n_tokens > handle.max_context:
        raise InvalidArgument(field, f"{what} of {n_tokens} tokens exceeds the context of {handle.max_context} tokens")


# Upper bound on the messages of one conversation (a request's conversations are also bounded by MAX_TEXT_BYTES).
MAX_MESSAGES = 1024


def conversation(conv, field: str) -> list[dict[str, str]]:
    """A Conversation message as the chat format's dicts: InvalidArgument naming `field` for an empty one, too many
    messages, or more than MAX_TEXT_BYTES of content (checked before anything is rendered)."""
    msgs = list(conv.messages)
    if not msgs:
        raise InvalidArgument(field, "empty conversation: at least one message is required")
    if len(msgs) > MAX_MESSAGES:
        raise InvalidArgument(field, f"{len(msgs)} messages; at most {MAX_MESSAGES}")
    size = sum(len(m.content.encode("utf-8", "surrogatepass")) + len(m.role) for m in msgs)
    if size > MAX_TEXT_BYTES:
        raise InvalidArgument(field, f"{size} bytes of text; at most {MAX_TEXT_BYTES} (checked before rendering)")
    return [{"role": m.role, "content": m.content} for m in msgs]


def conversation_ids(handle: ModelHandle, conv, field: str) -> list[int]:
    """The prompt ids of a Conversation rendered with the handle's chat format (alignd.chat)."""
    try:
        return handle.chat.prompt_ids(conversation(conv, field))
    except ChatError as err:
        raise InvalidArgument(field, str(err)) from None


def chat_pair_ids(handle: ModelHandle, prompt, response: str, *, field: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a conversation and the assistant's reply, rendered with the handle's chat
    format: the reply with the template's end of turn, cut after the model's EOS (alignd.chat)."""
    msgs = conversation(prompt, f"{field}.prompt")
    if not response:
        raise InvalidArgument(f"{field}.response", "empty response")
    n = len(response.encode("utf-8", "surrogatepass"))
    if n > MAX_TEXT_BYTES:
        raise InvalidArgument(f"{field}.response", f"{n} bytes of text; at most {MAX_TEXT_BYTES}")
    stops = () if handle.eos_token_id is None else (int(handle.eos_token_id),)
    try:
        return handle.chat.prompt_ids(msgs), handle.chat.response_ids(msgs, response, stop_ids=stops)
    except ChatError as err:
        raise InvalidArgument(field, str(err)) from None
