"""The reference role as a real subprocess: LogProbs equals an in-process computation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignd.v1 import reference_pb2, reference_pb2_grpc

from conftest import assert_invalid

ITEMS = [([5, 9, 33, 2], [17, 4, 250]), ([7], [8, 9, 10, 11, 12, 13]), (list(range(3, 40)), [41])]


@pytest.fixture(scope="module")
def stub(reference_server):
    return reference_pb2_grpc.ReferenceServiceStub(reference_server.channel)


def call(stub, items, temperature=0.0):
    req = reference_pb2.LogProbsRequest(
        items=[reference_pb2.LogProbsItem(prompt_token_ids=p, response_token_ids=r) for p, r in items],
        temperature=temperature,
    )
    return stub.LogProbs(req, timeout=60)


def naive_logprobs(model, prompt, response, temperature=1.0):
    # Token by token, one forward per response token: independent of the engine's slicing.
    out = []
    with torch.no_grad():
        for t, tok in enumerate(response):
            ctx = torch.tensor([prompt + response[:t]])
            logits = model(ctx).logits[0, -1] / temperature
            out.append(torch.log_softmax(logits, -1)[tok].item())
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_in_process(stub, tiny_models, temperature):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["lm"]).eval()
    resp = call(stub, ITEMS, temperature)
    assert len(resp.results) == len(ITEMS)
    worst = 0.0
    for (p, r), res in zip(ITEMS, resp.results):
        expected = naive_logprobs(model, p, r, temperature or 1.0)
        assert len(res.logprobs) == len(r)
        worst = max(worst, max(abs(a - b) for a, b in zip(res.logprobs, expected)))
    assert worst < 1e-5, worst


def test_bad_requests(stub, reference_server):
    assert_invalid(lambda: call(stub, []), "items", "empty batch")
    assert_invalid(lambda: call(stub, [([], [1])]), "items[0].prompt_token_ids", "empty prompt")
    assert_invalid(lambda: call(stub, [([1], [])]), "items[0].response_token_ids", "empty response")
    assert_invalid(lambda: call(stub, [([1], [2]), ([1], [2, 512])]), "items[1].response_token_ids[1]", "512")
    assert_invalid(lambda: call(stub, [([1] * 250, [2] * 10)]), "items[0]", "exceeds the context of 256")
    assert_invalid(lambda: call(stub, [([1], [2])], temperature=-0.5), "temperature")
    assert len(call(stub, [([1], [2])]).results) == 1
    assert reference_server.proc.poll() is None
