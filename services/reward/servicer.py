"""alignd.v1.RewardService: a thin adapter of `Score` over RewardAPI (services/reward/api.py)."""

from __future__ import annotations

import time

from alignd.runtime.auth import CLIENT
from alignd.runtime.errors import InvalidArgument
from alignd.services.reward.api import RewardAPI, status_name
from alignd.v1 import reward_pb2, reward_pb2_grpc


def parse_items(api: RewardAPI, request: reward_pb2.ScoreRequest, handle) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of the request's items, within the limits and the context."""
    api.check_count(len(request.items), "items")
    seqs = []
    for i, item in enumerate(request.items):
        kind = item.WhichOneof("input")
        field = f"items[{i}]"
        if kind == "text":
            seqs.append(
                api.text_pair(
                    handle,
                    item.text.prompt,
                    item.text.response,
                    field=field,
                    prompt_field=f"{field}.text.prompt",
                    response_field=f"{field}.text.response",
                )
            )
        elif kind == "tokens":
            seqs.append(
                api.token_pair(
                    handle, item.tokens.prompt_token_ids, item.tokens.response_token_ids, field=f"{field}.tokens"
                )
            )
        elif kind == "chat":
            seqs.append(api.chat_pair(handle, item.chat.prompt, item.chat.response, field=f"{field}.chat"))
        else:
            raise InvalidArgument(field, "no input: set text, tokens or chat")
    return seqs


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, api: RewardAPI) -> None:
        self.api = api

    def Score(self, request, context):
        started = time.perf_counter()
        client = CLIENT.get()
        try:
            state = self.api.loaded.get()
            seqs = parse_items(self.api, request, state.handle)
            scores, version = self.api.score(state, seqs, context.time_remaining())
        except BaseException as exc:
            self.api.observe("grpc", client, started, code=status_name(exc))
            raise
        self.api.observe("grpc", client, started, code="OK", items=len(seqs))
        return reward_pb2.ScoreResponse(scores=scores, weight_version=version)
