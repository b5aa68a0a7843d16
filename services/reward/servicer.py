"""alignd.v1.RewardService: validates, batches, answers one score per item."""

from __future__ import annotations

import math

from alignd.models.handle import ModelHandle
from alignd.models.inputs import check_batch, check_ids, check_length, tokenize
from alignd.runtime.errors import InvalidArgument
from alignd.runtime.metrics import BatchMetrics
from alignd.v1 import reward_pb2, reward_pb2_grpc


def parse_items(request: reward_pb2.ScoreRequest, handle: ModelHandle) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of the request's items."""
    check_batch(len(request.items), "items")
    seqs = []
    for i, item in enumerate(request.items):
        kind = item.WhichOneof("input")
        if kind == "text":
            if not item.text.response:
                raise InvalidArgument(f"items[{i}].text.response", "empty response")
            prompt = tokenize(handle, item.text.prompt) if item.text.prompt else []
            response = tokenize(handle, item.text.response)
            if not response:
                raise InvalidArgument(f"items[{i}].text.response", "response has no tokens")
        elif kind == "tokens":
            prompt = check_ids(item.tokens.prompt_token_ids, handle.vocab_size, f"items[{i}].tokens.prompt_token_ids")
            response = check_ids(item.tokens.response_token_ids, handle.vocab_size, f"items[{i}].tokens.response_token_ids")
            if not response:
                raise InvalidArgument(f"items[{i}].tokens.response_token_ids", "empty response")
        else:
            raise InvalidArgument(f"items[{i}]", "no input: set text or tokens")
        check_length(len(prompt) + len(response), handle, f"items[{i}]", "prompt + response")
        seqs.append((prompt, response))
    return seqs


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, loaded, metrics: BatchMetrics) -> None:
        self.loaded = loaded  # Loaded[RewardState]
        self.metrics = metrics

    def Score(self, request, context):
        state = self.loaded.get()
        seqs = parse_items(request, state.handle)
        (scores, version), pending, _info = state.batcher.run(seqs, len(seqs), context.time_remaining())
        self.metrics.queue_seconds.observe(pending.queue_seconds)
        self.metrics.tokens.labels("scored").inc(sum(len(p) + len(r) for p, r in seqs))
        if not all(math.isfinite(s) for s in scores):
            raise FloatingPointError("the reward model produced a non-finite score")
        return reward_pb2.ScoreResponse(scores=scores, weight_version=version)
