"""The reward role as a real subprocess: Score equals an in-process forward."""

from __future__ import annotations

import grpc
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from alignd.models.weights import push_weights
from alignd.v1 import model_pb2, model_pb2_grpc, reward_pb2, reward_pb2_grpc

from conftest import assert_invalid

PAIRS = [
    ("What is the capital of France?", " Paris is the capital of France."),
    ("Write a short story", " The robot learns to paint."),
    ("Hi", " Thank you!"),
]


@pytest.fixture(scope="module")
def stub(reward_server):
    return reward_pb2_grpc.RewardServiceStub(reward_server.channel)


TOKENIZER_OF = "reward"  # the conftest `tok` fixture loads the reward model's tokenizer


def load_rm(path):
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()


def in_process_scores(model, seqs):
    # Hugging Face's own pooling (last non-pad token), one unpadded sequence at a time.
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0, 0].item() for s in seqs]


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def score_tokens(stub, seqs):
    items = [
        reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=p, response_token_ids=r)) for p, r in seqs
    ]
    return stub.Score(reward_pb2.ScoreRequest(items=items), timeout=60)


def test_text_scores_equal_in_process_forward(stub, tok, tiny_models):
    rm = load_rm(tiny_models["reward"])
    resp = stub.Score(
        reward_pb2.ScoreRequest(
            items=[reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt=p, response=r)) for p, r in PAIRS]
        ),
        timeout=60,
    )
    expected = in_process_scores(rm, [ids(tok, p) + ids(tok, r) for p, r in PAIRS])
    assert len(resp.scores) == len(PAIRS)
    assert max(abs(a - b) for a, b in zip(resp.scores, expected)) < 1e-5
    assert len({round(x, 4) for x in resp.scores}) == len(PAIRS)  # scores discriminate


def test_token_scores_equal_in_process_forward(stub, tok, tiny_models):
    rm = load_rm(tiny_models["reward"])
    seqs = [(ids(tok, p), ids(tok, r)) for p, r in PAIRS] + [([], [5, 6, 7])]
    resp = score_tokens(stub, seqs)
    expected = in_process_scores(rm, [p + r for p, r in seqs])
    assert max(abs(a - b) for a, b in zip(resp.scores, expected)) < 1e-5


def test_bad_requests(stub, reward_server):
    assert_invalid(lambda: stub.Score(reward_pb2.ScoreRequest(), timeout=10), "items", "empty batch")
    assert_invalid(lambda: score_tokens(stub, [([1, 2], [])]), "items[0].tokens.response_token_ids", "empty response")
    assert_invalid(
        lambda: score_tokens(stub, [([1], [2]), ([1, 70000], [3])]), "items[1].tokens.prompt_token_ids[1]", "70000"
    )
    assert_invalid(lambda: score_tokens(stub, [([5] * 300, [3])]), "items[0]", "exceeds the context")
    assert_invalid(
        lambda: stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem()]), timeout=10), "items[0]", "no input"
    )
    assert_invalid(
        lambda: stub.Score(
            reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt="x"))]), timeout=10
        ),
        "items[0].text.response",
    )
    assert len(score_tokens(stub, [([1], [2])]).scores) == 1
    assert reward_server.proc.poll() is None


def test_update_weights_switches_reward_model(stub, reward_server, tok, tiny_models):
    model_stub = model_pb2_grpc.ModelServiceStub(reward_server.channel)
    v0 = model_stub.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info.weight_version
    seqs = [(ids(tok, p), ids(tok, r)) for p, r in PAIRS]
    other = load_rm(tiny_models["reward_other"])
    resp = push_weights(reward_server.channel, other.state_dict(), v0 + 1)
    assert resp.version == v0 + 1
    scored = score_tokens(stub, seqs)
    assert scored.weight_version == v0 + 1
    expected = in_process_scores(other, [p + r for p, r in seqs])
    assert max(abs(a - b) for a, b in zip(scored.scores, expected)) < 1e-5
    info = model_stub.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info
    assert info.weight_version == v0 + 1 and info.architecture == "GPT2ForSequenceClassification"
    # LoadWeights from a save_pretrained directory (the shared-filesystem path) restores the original.
    model_stub.LoadWeights(model_pb2.LoadWeightsRequest(path=str(tiny_models["reward"]), version=v0 + 2), timeout=60)
    original = in_process_scores(load_rm(tiny_models["reward"]), [p + r for p, r in seqs])
    assert max(abs(a - b) for a, b in zip(score_tokens(stub, seqs).scores, original)) < 1e-5
    with pytest.raises(grpc.RpcError) as err:
        model_stub.LoadWeights(model_pb2.LoadWeightsRequest(path="/nonexistent", version=v0 + 3), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "path" in err.value.details()
