"""Chat templates: how a model turns a conversation into token ids (`model.chat_template: auto | none | PATH`).

Every role renders with its own model's tokenizer, the way Hugging Face and TRL do:

- a prompt is `apply_chat_template(messages, add_generation_prompt=True)` as text, tokenised with
  add_special_tokens=False (the template writes BOS itself where the model wants one);
- a response is what rendering the conversation with the reply as the last assistant turn adds after that
  prompt (for SmolLM2: the reply, then `<|im_end|>`), tokenised on its own, as the policy generates it after the
  prompt's tokens, and cut after its first end-of-turn token (the trailing newline some templates add after it
  is never generated);
- without a template (`none`, or `auto` on a model that has none) a conversation must be plain: the contents of its
  messages joined by a blank line, with the BOS the tokenizer puts in front of a text where it puts one; a
  single-message prompt is its text, so models without a template see what they always saw.

A template comes from the tokenizer (`auto`), or from a Jinja file (`PATH`, under the role's path roots). This
module imports neither torch nor grpc; it works on any `transformers` tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")
AUTO, NONE = "auto", "none"
PLAIN_SEPARATOR = "\n\n"


class ChatError(ValueError):
    """A conversation the format cannot render; the message names the problem (the caller adds the field)."""


Message = Mapping[str, str]


def check_messages(messages: Sequence[Message], *, prompt: bool) -> list[dict[str, str]]:
    """The conversation as plain dicts; ChatError for an empty one, an unknown role or a non-string content, or
    (for a prompt, which the model answers next) one that ends with an assistant turn."""
    if not messages:
        raise ChatError("empty conversation: at least one message is required")
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    if prompt and out[-1]["role"] == "assistant":
        raise ChatError("a prompt must not end with an assistant message (the model writes that turn)")
    return out


def _tokenizer_template(tokenizer) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):  # named templates: the default one
        t = t.get("default")
    return t or None


@dataclass(frozen=True)
class ChatFormat:
    """A tokenizer with its resolved template (None: plain). Build with `ChatFormat.resolve`."""

    tokenizer: object
    template: str | None
    source: str  # "model", "none", "file:PATH" or "model (none)": what the report and GetInfo say
    bos_prefix: tuple[int, ...] = ()
    system: str | None = None  # the system message put before a prompt given as text (with_system)

    @classmethod
    def resolve(cls, tokenizer, setting: str = AUTO) -> ChatFormat:
        """`setting`: auto (the tokenizer's template, plain if it has none), none (plain), or a Jinja file's path
        (already expanded by the configuration). ChatError if the file cannot be read."""
        if setting == NONE:
            template, source = None, NONE
        elif setting == AUTO:
            template = _tokenizer_template(tokenizer)
            source = "model" if template else "model (none)"
        else:
            try:
                template = Path(setting).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise ChatError(f"model.chat_template: cannot read the template file {setting}: {err}") from None
            source = f"file:{setting}"
        bos = ()
        if template is None:
            with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
            without = list(tokenizer("a", add_special_tokens=False)["input_ids"])
            if len(with_special) > len(without) and with_special[-len(without) :] == without:
                bos = tuple(with_special[: len(with_special) - len(without)])
        return cls(tokenizer, template, source, bos)

    def with_system(self, system: str | None) -> ChatFormat:
        """This format, with `system` as the system message of prompts given as text."""
        return replace(self, system=system or None)

    def messages(self, prompt: str | Sequence[Message]) -> list[dict[str, str]]:
        """A prompt as a conversation: text becomes the user's message (after the system message, if any)."""
        if isinstance(prompt, str):
            return user_prompt(prompt, self.system)
        return check_messages(prompt, prompt=True)

    def __getattr__(self, name: str):
        # Reads the format does not define go to its tokenizer (pad_token_id, eos_token_id, decode...), so a
        # ChatFormat stands in for the tokenizer in the training code.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    @property
    def templated(self) -> bool:
        return self.template is not None

    @property
    def digest(self) -> str:
        """sha256 of the template (12 hex digits), "" when plain: two roles with the same digest render alike."""
        return hashlib.sha256(self.template.encode()).hexdigest()[:12] if self.template else ""

    def _render(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:  # noqa: BLE001 - jinja raises its own errors (raise_exception in templates)
            raise ChatError(f"the chat template cannot render this conversation: {err}") from None

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_text(self, prompt: str | Sequence[Message]) -> str:
        msgs = self.messages(prompt)
        if self.template is None:
            return PLAIN_SEPARATOR.join(m["content"] for m in msgs)
        return self._render(msgs, generation_prompt=True)

    def prompt_ids(self, prompt: str | Sequence[Message]) -> list[int]:
        """The token ids the model answers: the rendered prompt with the generation prompt."""
        ids = self._ids(self.prompt_text(prompt))
        return [*self.bos_prefix, *ids] if self.template is None else ids

    def response_text(self, prompt: str | Sequence[Message], response: str) -> str:
        """What follows the prompt when the model replies `response` (with the template's end of turn)."""
        if self.template is None:
            return response
        msgs = self.messages(prompt)
        prompt = self._render(msgs, generation_prompt=True)
        full = self._render([*msgs, {"role": "assistant", "content": response}], generation_prompt=False)
        if not full.startswith(prompt):
            raise ChatError(
                "the chat template renders the conversation with a reply differently from the prompt alone "
                "(it is not prefix-consistent), so a reply cannot be split from its prompt"
            )
        return full[len(prompt) :]

    def response_ids(
        self, prompt: str | Sequence[Message], response: str, *, stop_ids: Sequence[int] = ()
    ) -> list[int]:
        """The reply's token ids as the policy would have generated them: with a template, up to and including
        the first token of `stop_ids` (the model's end-of-turn / EOS ids)."""
        ids = self._ids(self.response_text(prompt, response))
        if self.template is not None and stop_ids:
            stops = set(stop_ids)
            for k, t in enumerate(ids):
                if t in stops:
                    return ids[: k + 1]
        return ids


def user_prompt(text: str, system: str | None = None) -> list[dict[str, str]]:
    """A one-turn conversation: the user's `text`, after an optional system message."""
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": text}]


def prompt_text(prompt: str | Sequence[Message]) -> str:
    """The text a judge or a person reads as the prompt: the text itself, or a conversation's last user message."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]
