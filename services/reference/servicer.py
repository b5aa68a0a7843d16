"""alignd.v1.ReferenceService: validates, batches, answers per-token log-probs."""

from __future__ import annotations

import math

from alignd.models.handle import ModelHandle
from alignd.models.inputs import check_batch, check_ids, check_length, check_temperature
from alignd.runtime.errors import InvalidArgument
from alignd.runtime.metrics import BatchMetrics
from alignd.services.reference.engine import Item
from alignd.v1 import reference_pb2, reference_pb2_grpc


def parse_items(request: reference_pb2.LogProbsRequest, handle: ModelHandle) -> list[Item]:
    temperature = check_temperature(request.temperature, "temperature", "1") or 1.0
    check_batch(len(request.items), "items")
    items = []
    for i, it in enumerate(request.items):
        prompt = check_ids(it.prompt_token_ids, handle.vocab_size, f"items[{i}].prompt_token_ids")
        response = check_ids(it.response_token_ids, handle.vocab_size, f"items[{i}].response_token_ids")
        if not prompt:
            raise InvalidArgument(
                f"items[{i}].prompt_token_ids", "empty prompt: the first response token needs a context"
            )
        if not response:
            raise InvalidArgument(f"items[{i}].response_token_ids", "empty response")
        check_length(len(prompt) + len(response), handle, f"items[{i}]", what="prompt + response")
        items.append(Item(prompt, response, temperature))
    return items


class ReferenceServicer(reference_pb2_grpc.ReferenceServiceServicer):
    def __init__(self, loaded, metrics: BatchMetrics) -> None:
        self.loaded = loaded  # Loaded[ReferenceState]
        self.metrics = metrics

    def LogProbs(self, request, context):
        state = self.loaded.get()
        items = parse_items(request, state.handle)
        (results, version), pending, _info = state.batcher.run(items, len(items), context.time_remaining())
        for i, lp in enumerate(results):
            if not all(math.isfinite(x) for x in lp):  # never a NaN or an infinity with OK
                raise FloatingPointError(f"the reference model produced a non-finite log-prob for items[{i}]")
        self.metrics.queue_seconds.observe(pending.queue_seconds)
        self.metrics.tokens.labels("scored").inc(sum(len(it.prompt_ids) + len(it.response_ids) for it in items))
        return reference_pb2.LogProbsResponse(
            results=[reference_pb2.TokenLogProbs(logprobs=lp) for lp in results], weight_version=version
        )
