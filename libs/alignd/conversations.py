"""Prompts on the wire: a prompt (text or a conversation, alignd.data.records.Prompt) as the alignd.v1 messages that
carry it to the roles, which render it with their own chat templates (alignd.chat, docs/chat.md).

No torch: the coordinator and the reward client build requests with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from alignd.chat import prompt_text, user_prompt
from alignd.v1 import common_pb2, policy_pb2, reward_pb2

PromptLike = str | Sequence[Mapping[str, str]]
__all__ = ["as_messages", "chat_score_item", "conversation", "policy_prompt", "prompt_text"]


def as_messages(prompt: PromptLike, system: str | None = None) -> list[dict[str, str]]:
    """The prompt as a conversation: text becomes the user's message after `system` (if any); a conversation is
    kept as it is."""
    if isinstance(prompt, str):
        return user_prompt(prompt, system)
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def conversation(messages: Sequence[Mapping[str, str]]) -> common_pb2.Conversation:
    return common_pb2.Conversation(
        messages=[common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    )


def policy_prompt(prompt: PromptLike, system: str | None = None) -> policy_pb2.Prompt:
    """A GenerateRequest prompt: always a conversation, which a policy without a chat template renders as the plain
    text it always saw (a lone user message is its text)."""
    return policy_pb2.Prompt(messages=conversation(as_messages(prompt, system)))


def chat_score_item(prompt: PromptLike, response: str, system: str | None = None) -> reward_pb2.ScoreItem:
    """A ScoreItem the reward role renders with its own chat template: the conversation, then the reply."""
    return reward_pb2.ScoreItem(
        chat=reward_pb2.ChatPair(prompt=conversation(as_messages(prompt, system)), response=response)
    )
