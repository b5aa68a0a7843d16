"""alignd.v1.PolicyService: validates requests, batches them, converts results."""

from __future__ import annotations

import math
import secrets

import numpy as np

from alignd.models.handle import ModelHandle
from alignd.models.inputs import check_batch, check_ids, check_length, check_temperature, conversation_ids, tokenize
from alignd.runtime.errors import InvalidArgument
from alignd.runtime.metrics import BatchMetrics
from alignd.services.policy.engine import Row, Sampling
from alignd.services.policy.vllm_engine import check_logprob_mode
from alignd.v1 import common_pb2, policy_pb2, policy_pb2_grpc


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Independent 63-bit seed for sample j of prompt i (NumPy SeedSequence)."""
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1, np.uint64)[0] >> 1)


def parse_sampling(sp: policy_pb2.SamplingParams, handle: ModelHandle) -> tuple[Sampling, int]:
    """Validates SamplingParams; returns (Sampling, num_samples)."""
    temperature = check_temperature(sp.temperature, "sampling.temperature", "greedy")
    if not math.isfinite(sp.top_p) or not 0 <= sp.top_p <= 1:
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1] (0 = off), got {sp.top_p}")
    if sp.top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be >= 0 (0 = off), got {sp.top_k}")
    if sp.max_new_tokens < 1:
        raise InvalidArgument("sampling.max_new_tokens", f"must be >= 1, got {sp.max_new_tokens}")
    if sp.max_new_tokens >= handle.max_context:
        raise InvalidArgument(
            "sampling.max_new_tokens",
            f"{sp.max_new_tokens} leaves no room for a prompt in the context of {handle.max_context} tokens",
        )
    if sp.num_samples < 0:
        raise InvalidArgument("sampling.num_samples", f"must be >= 1 (0 = 1), got {sp.num_samples}")
    stops = set(check_ids(sp.stop_token_ids, handle.vocab_size, "sampling.stop_token_ids"))
    if not sp.ignore_eos and handle.eos_token_id is not None:
        stops.add(int(handle.eos_token_id))
    if sp.logprob_mode not in (
        policy_pb2.LOGPROB_MODE_UNSPECIFIED,
        policy_pb2.LOGPROB_MODE_RAW,
        policy_pb2.LOGPROB_MODE_SAMPLED,
    ):
        raise InvalidArgument("sampling.logprob_mode", f"unknown mode {sp.logprob_mode}")
    sampling = Sampling(
        temperature=temperature,
        top_p=float(sp.top_p) if sp.top_p > 0 else 1.0,
        top_k=int(sp.top_k),
        max_new_tokens=int(sp.max_new_tokens),
        stop_token_ids=frozenset(stops),
        logprobs_sampled=sp.logprob_mode == policy_pb2.LOGPROB_MODE_SAMPLED,
    )
    return sampling, max(1, sp.num_samples)


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """Thin: parse + validate, submit to the batcher, convert the results."""

    def __init__(self, loaded, metrics: BatchMetrics):
        self.loaded = loaded  # Loaded[PolicyState]; UNAVAILABLE until the model is loaded
        self.metrics = metrics

    @staticmethod
    def parse(request: policy_pb2.GenerateRequest, handle: ModelHandle) -> tuple[list[list[int]], list[Row], int]:
        sampling, n = parse_sampling(request.sampling, handle)
        check_batch(len(request.prompts) * n, "prompts")
        seed = request.sampling.seed if request.sampling.HasField("seed") else secrets.randbits(63)
        prompts: list[list[int]] = []
        for i, p in enumerate(request.prompts):
            kind = p.WhichOneof("input")
            if kind == "text":
                ids = tokenize(handle, p.text, f"prompts[{i}].text")
            elif kind == "token_ids":
                ids = check_ids(p.token_ids.ids, handle.vocab_size, f"prompts[{i}].token_ids.ids")
            elif kind == "messages":
                ids = conversation_ids(handle, p.messages, f"prompts[{i}].messages")
            else:
                raise InvalidArgument(f"prompts[{i}]", "no input: set text, token_ids or messages")
            if not ids:
                raise InvalidArgument(f"prompts[{i}]", "empty prompt")
            check_length(
                len(ids) + sampling.max_new_tokens,
                handle,
                f"prompts[{i}]",
                what=f"prompt of {len(ids)} tokens + max_new_tokens {sampling.max_new_tokens} =",
            )
            prompts.append(ids)
        first = request.sampling.first_prompt_index  # a part of a larger set: its prompts' seeds continue the set's
        rows = [Row(ids, sampling, row_seed(seed, first + i, j)) for i, ids in enumerate(prompts) for j in range(n)]
        return prompts, rows, n

    def Generate(self, request, context):
        state = self.loaded.get()
        prompts, rows, n = self.parse(request, state.handle)
        if getattr(state.handle, "gate", None) is not None:  # the vLLM engine: one kind of log-probs per engine
            check_logprob_mode(rows[0].sampling, state.handle.engine.mode)
        out = state.generate(rows, context.time_remaining(), context.add_callback)
        results, version = out.results, out.version
        self.metrics.queue_seconds.observe(out.queue_seconds)
        samples = []
        for k, res in enumerate(results):
            i, j = divmod(k, n)
            samples.append(
                policy_pb2.Sample(
                    prompt_index=i,
                    sample_index=j,
                    prompt_token_ids=prompts[i],
                    token_ids=res.token_ids,
                    logprobs=res.logprobs,
                    finish_reason=common_pb2.FINISH_REASON_STOP if res.stopped else common_pb2.FINISH_REASON_LENGTH,
                    weight_version=version,
                    text=state.handle.tokenizer.decode(res.token_ids, skip_special_tokens=True)
                    if request.return_text
                    else "",
                )
            )
        self.metrics.tokens.labels("prompt").inc(sum(len(r.prompt_ids) for r in rows))
        self.metrics.tokens.labels("generated").inc(sum(len(r.token_ids) for r in results))
        return policy_pb2.GenerateResponse(
            samples=samples,
            queue_seconds=out.queue_seconds,
            generate_seconds=out.generate_seconds,
            batch_size=out.batch_size,
        )
