"""The policy role as a real subprocess, called through the generated stubs."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from alignd.models.weights import encode_stream, push_weights
from alignd.v1 import common_pb2, model_pb2, model_pb2_grpc, policy_pb2, policy_pb2_grpc

from conftest import assert_invalid, start_role, stop_role

TEXTS = ["The quick brown fox", "Paris is", "Write a short story about a robot who learns to paint"]
ENGINES = ["transformers", "vllm"]


@pytest.fixture(scope="module", params=ENGINES)
def policy_server(request, tiny_models, tmp_path_factory):
    """`alignd serve policy` on each engine (policy.engine); every test that uses the server runs on both. One
    server per engine for the module: vLLM takes tens of seconds to start."""
    cfg = {
        "model": {"path": str(tiny_models["lm"])},
        "engine": request.param,
        "torch_threads": 1,
        # The tiny models' directory is a root: tests load their other weights from there (LoadWeights).
        "paths": {"roots": [str(Path(tiny_models["lm"]).parent)]},
        "batching": {"max_batch_size": 32, "max_wait_ms": 20},
        "vllm": {"kv_cache_gib": 1},
    }
    server = start_role("policy", cfg, tmp_path_factory.mktemp(f"policy-{request.param}"))
    server.engine = request.param
    yield server
    rc = stop_role(server)
    assert rc == 0, f"policy did not shut down cleanly (exit {rc}):\n{server.log()[-3000:]}"


@pytest.fixture(scope="module")
def stub(policy_server):
    return policy_pb2_grpc.PolicyServiceStub(policy_server.channel)


@pytest.fixture(scope="module")
def model_stub(policy_server):
    return model_pb2_grpc.ModelServiceStub(policy_server.channel)


@pytest.fixture(scope="module")
def lm(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["lm"]).eval()


@pytest.fixture(scope="module")
def lm_other(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["lm_other"]).eval()


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def generate(stub, prompts, **sampling):
    req = policy_pb2.GenerateRequest(
        prompts=[policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=p)) for p in prompts],
        sampling=policy_pb2.SamplingParams(**sampling),
    )
    return stub.Generate(req, timeout=60)


def hf_greedy(model, tok, prompt, max_new):
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return out[0, len(prompt) :].tolist()


def current_version(model_stub) -> int:
    return model_stub.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info.weight_version


def test_logprobs_equal_in_process_log_softmax(stub, lm, tok):
    prompts = [ids_of(tok, t) for t in TEXTS]
    resp = generate(stub, prompts, temperature=1.0, max_new_tokens=12, num_samples=2, seed=5)
    assert len(resp.samples) == 6
    worst = 0.0
    with torch.no_grad():
        for s in resp.samples:
            assert list(s.prompt_token_ids) == prompts[s.prompt_index]
            assert len(s.logprobs) == len(s.token_ids) > 0
            full = torch.tensor([list(s.prompt_token_ids) + list(s.token_ids)])
            logp = torch.log_softmax(lm(full).logits[0].float(), -1)
            P = len(s.prompt_token_ids)
            expected = logp[P - 1 : P - 1 + len(s.token_ids)].gather(-1, torch.tensor(list(s.token_ids))[:, None])[:, 0]
            worst = max(worst, (expected - torch.tensor(list(s.logprobs))).abs().max().item())
    assert worst < 1e-4, worst


def test_greedy_equals_model_generate(stub, lm, tok):
    prompts = [ids_of(tok, t) for t in TEXTS]  # different lengths: exercises left padding
    resp = generate(stub, prompts, temperature=0.0, max_new_tokens=20)
    for s in resp.samples:
        expected = hf_greedy(lm, tok, prompts[s.prompt_index], 20)
        assert list(s.token_ids) == expected
        if expected[-1] == tok.eos_token_id:
            assert s.finish_reason == common_pb2.FINISH_REASON_STOP
        else:
            assert s.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert len(s.token_ids) == 20


def test_same_seed_same_samples_regardless_of_batch(stub, tok):
    p = ids_of(tok, TEXTS[0])
    a = generate(stub, [p], temperature=1.0, max_new_tokens=16, num_samples=3, seed=42)
    b = generate(stub, [p], temperature=1.0, max_new_tokens=16, num_samples=3, seed=42)
    # Same prompt at index 0 batched with another prompt: same samples.
    c = generate(stub, [p, ids_of(tok, TEXTS[2])], temperature=1.0, max_new_tokens=16, num_samples=3, seed=42)
    d = generate(stub, [p], temperature=1.0, max_new_tokens=16, num_samples=3, seed=43)
    seqs = lambda r: [list(s.token_ids) for s in r.samples if s.prompt_index == 0]  # noqa: E731
    assert seqs(a) == seqs(b) == seqs(c)
    assert seqs(a) != seqs(d)
    assert len(set(map(tuple, seqs(a)))) > 1  # the 3 samples of one prompt differ from each other


def test_a_set_sampled_in_parts_equals_one_request(stub, tok):
    """first_prompt_index: the parts of a set, each seeded where it starts, sample what one request of the whole
    set samples (the coordinator sends its labeling and evaluation samples in parts to show their progress)."""
    prompts = [ids_of(tok, t) for t in TEXTS[:3]]
    kw = dict(temperature=1.0, max_new_tokens=12, num_samples=2, seed=7)
    whole = generate(stub, prompts, **kw)
    first = generate(stub, prompts[:2], **kw)
    rest = generate(stub, prompts[2:], first_prompt_index=2, **kw)
    by_prompt = lambda r, off=0: sorted(  # noqa: E731
        (off + s.prompt_index, s.sample_index, tuple(s.token_ids)) for s in r.samples
    )
    assert by_prompt(whole) == sorted(by_prompt(first) + by_prompt(rest, 2))
    # Without the offset, the third prompt would draw the first prompt's generators: other samples.
    unseeded = generate(stub, prompts[2:], **kw)
    assert [t for _, _, t in by_prompt(unseeded)] != [t for _, _, t in by_prompt(rest)]


def test_top_k_one_is_greedy_and_sampled_logprob_zero(stub, tok, lm):
    p = ids_of(tok, TEXTS[1])
    resp = generate(
        stub, [p], temperature=0.7, top_k=1, max_new_tokens=8, seed=1, logprob_mode=policy_pb2.LOGPROB_MODE_SAMPLED
    )
    s = resp.samples[0]
    assert list(s.token_ids) == hf_greedy(lm, tok, p, 8)
    assert all(abs(x) < 1e-6 for x in s.logprobs)


def test_text_prompt_and_return_text(stub, tok):
    resp = stub.Generate(
        policy_pb2.GenerateRequest(
            prompts=[policy_pb2.Prompt(text=TEXTS[0])],
            sampling=policy_pb2.SamplingParams(temperature=0.0, max_new_tokens=6),
            return_text=True,
        ),
        timeout=60,
    )
    s = resp.samples[0]
    assert list(s.prompt_token_ids) == ids_of(tok, TEXTS[0])
    assert s.text == tok.decode(list(s.token_ids), skip_special_tokens=True)


def test_stop_token_ids_end_the_sample(stub, tok, lm):
    p = ids_of(tok, TEXTS[0])
    greedy = hf_greedy(lm, tok, p, 10)
    stop = greedy[3]
    first = greedy.index(stop)
    resp = generate(stub, [p], temperature=0.0, max_new_tokens=10, stop_token_ids=[stop])
    s = resp.samples[0]
    assert list(s.token_ids) == greedy[: first + 1]
    assert s.finish_reason == common_pb2.FINISH_REASON_STOP


def test_bad_requests_answer_invalid_argument_and_service_keeps_serving(stub, tok, policy_server):
    p = ids_of(tok, TEXTS[0])
    assert_invalid(lambda: generate(stub, [], max_new_tokens=4), "prompts", "empty batch")
    assert_invalid(lambda: generate(stub, [p], max_new_tokens=0), "sampling.max_new_tokens")
    assert_invalid(lambda: generate(stub, [p], max_new_tokens=256), "sampling.max_new_tokens", "context")
    assert_invalid(lambda: generate(stub, [[5] * 250], max_new_tokens=8), "prompts[0]", "exceeds the context of 256")
    assert_invalid(lambda: generate(stub, [p, [1, 2, 99999]], max_new_tokens=4), "prompts[1].token_ids.ids[2]", "99999")
    assert_invalid(lambda: generate(stub, [p, [-3]], max_new_tokens=4), "prompts[1].token_ids.ids[0]")
    assert_invalid(lambda: generate(stub, [[]], max_new_tokens=4), "prompts[0]", "empty prompt")
    assert_invalid(lambda: generate(stub, [p], max_new_tokens=4, temperature=-1), "sampling.temperature")
    assert_invalid(lambda: generate(stub, [p], max_new_tokens=4, top_p=1.5), "sampling.top_p")
    assert_invalid(lambda: generate(stub, [p], max_new_tokens=4, stop_token_ids=[100000]), "sampling.stop_token_ids[0]")
    assert_invalid(
        lambda: stub.Generate(
            policy_pb2.GenerateRequest(
                prompts=[policy_pb2.Prompt()], sampling=policy_pb2.SamplingParams(max_new_tokens=2)
            ),
            timeout=10,
        ),
        "prompts[0]",
        "no input",
    )
    ok = generate(stub, [p], temperature=0.0, max_new_tokens=3)
    assert len(ok.samples) == 1
    assert policy_server.proc.poll() is None


def test_update_weights_switches_model_and_version(stub, model_stub, policy_server, lm, lm_other, tok):
    prompts = [ids_of(tok, t) for t in TEXTS]
    v0 = current_version(model_stub)
    before = [list(s.token_ids) for s in generate(stub, prompts, temperature=0.0, max_new_tokens=12).samples]
    resp = push_weights(policy_server.channel, lm_other.state_dict(), v0 + 1)
    assert resp.version == v0 + 1 and resp.received_bytes > 0
    assert current_version(model_stub) == v0 + 1
    after = generate(stub, prompts, temperature=0.0, max_new_tokens=12)
    assert all(s.weight_version == v0 + 1 for s in after.samples)
    for s in after.samples:
        assert list(s.token_ids) == hf_greedy(lm_other, tok, prompts[s.prompt_index], 12)
    assert [list(s.token_ids) for s in after.samples] != before
    # A stale version is refused.
    with pytest.raises(grpc.RpcError) as err:
        push_weights(policy_server.channel, lm.state_dict(), v0 + 1)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Restore the original weights for the other tests.
    push_weights(policy_server.channel, lm.state_dict(), v0 + 2)
    restored = generate(stub, prompts, temperature=0.0, max_new_tokens=12)
    assert [list(s.token_ids) for s in restored.samples] == before


def _corrupt(messages, how):
    msgs = list(messages)
    if how == "truncated":
        return msgs[:-1]  # no trailer
    if how == "missing_chunk":
        return [m for i, m in enumerate(msgs) if i != 3]
    if how == "checksum":
        m = msgs[2]
        data = bytearray(m.chunk.data)
        data[0] ^= 0xFF
        m.chunk.data = bytes(data)
        return msgs
    if how == "unknown_tensor":
        msgs[1].chunk.name = "no.such.weight"
        return msgs
    if how == "ragged_shape":
        msgs[1].chunk.shape[0] += 1
        return msgs
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how,needle",
    [
        ("truncated", "trailer"),
        ("missing_chunk", "chunk.offset_bytes"),
        ("checksum", "checksum"),
        ("unknown_tensor", "no.such.weight"),
        ("ragged_shape", "shape"),
    ],
)
def test_bad_weight_stream_keeps_old_weights(how, needle, stub, model_stub, lm_other, tok):
    prompts = [ids_of(tok, TEXTS[0])]
    v0 = current_version(model_stub)
    before = list(generate(stub, prompts, temperature=0.0, max_new_tokens=10).samples[0].token_ids)
    msgs = _corrupt(encode_stream(lm_other.state_dict(), v0 + 1, chunk_bytes=4096), how)
    err = assert_invalid(lambda: model_stub.UpdateWeights(iter(msgs), timeout=60), needle)
    assert err is not None
    assert current_version(model_stub) == v0
    after = generate(stub, prompts, temperature=0.0, max_new_tokens=10).samples[0]
    assert list(after.token_ids) == before and after.weight_version == v0


def test_get_info(model_stub, tok, tiny_models):
    from alignd.models.handle import tokenizer_hash

    info = model_stub.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info
    assert info.role == "policy"
    assert info.architecture == "GPT2LMHeadModel"
    assert info.vocab_size == len(tok)
    assert info.max_context_tokens == 256
    assert info.tokenizer_hash == tokenizer_hash(tok)
    assert info.eos_token_id == tok.eos_token_id


def test_model_memory_metric_counts_parameters_and_buffers(policy_server, lm):
    import urllib.request

    text = urllib.request.urlopen(policy_server.metrics_url, timeout=10).read().decode()
    want = sum(t.numel() * t.element_size() for t in [*lm.parameters(), *lm.buffers()])
    line = next(x for x in text.splitlines() if x.startswith('alignd_policy_model_memory_bytes{device="cpu"}'))
    assert float(line.split()[-1]) == want
    assert "alignd_policy_gpu_memory_allocated_bytes{" not in text  # CPU: no GPU gauge samples


def test_metrics_and_request_id(stub, tok, policy_server):
    import urllib.request

    call = stub.Generate.with_call(
        policy_pb2.GenerateRequest(
            prompts=[policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ids_of(tok, TEXTS[1])))],
            sampling=policy_pb2.SamplingParams(temperature=0.0, max_new_tokens=2),
        ),
        timeout=30,
        metadata=(("x-request-id", "req-abc-123"),),
    )
    assert ("x-request-id", "req-abc-123") in call[1].trailing_metadata()
    assert_invalid(lambda: generate(stub, [], max_new_tokens=1), "prompts")
    text = urllib.request.urlopen(policy_server.metrics_url, timeout=10).read().decode()
    assert (
        'grpc_server_handled_total{grpc_code="OK",grpc_method="Generate",grpc_service="alignd.v1.PolicyService",grpc_type="unary"}'
        in text
    )
    assert 'grpc_code="INVALID_ARGUMENT",grpc_method="Generate"' in text
    assert "alignd_policy_tokens_total" in text and "alignd_policy_batch_size_sequences_bucket" in text


def test_sample_token_draws_the_truncated_distribution():
    """The engine's sampler against the distribution it claims: frequencies over 8,000 draws within 4.5 standard
    errors of softmax(logits / T) renormalised over the top-k, never a token outside it, and the log-prob returned
    is that of the token under the same distribution."""
    from alignd.services.policy.engine import Sampling, sample_token

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2], dtype=torch.float32)
    s = Sampling(
        temperature=0.7, top_p=1.0, top_k=5, max_new_tokens=1, stop_token_ids=frozenset(), logprobs_sampled=True
    )
    keep = torch.topk(logits, 5).indices
    probs = torch.zeros(8, dtype=torch.float64)
    probs[keep] = torch.softmax(logits[keep].double() / 0.7, -1)
    gen = torch.Generator().manual_seed(0)
    n = 8_000
    counts = torch.zeros(8, dtype=torch.float64)
    for _ in range(n):
        tok, lp = sample_token(logits, s, gen)
        counts[tok] += 1
        assert lp == pytest.approx(math.log(probs[tok]), abs=1e-5)
    assert counts[probs == 0].sum() == 0
    se = torch.sqrt(probs * (1 - probs) / n)
    assert bool((torch.abs(counts / n - probs) <= 4.5 * se + 1e-12).all()), (counts / n, probs)


def test_load_weights_stage_and_commit_swap_in_place(stub, model_stub, policy_server, lm, lm_other, tok, tiny_models):
    """LoadWeights from a directory, and a staged stream applied by CommitWeights: greedy output becomes the other
    model's (the vLLM engine's prefix cache holds the same prompts' KV from before: it must not be reused), the
    version moves, and the first weights come back the same ways."""
    prompts = [ids_of(tok, t) for t in TEXTS]
    v0 = current_version(model_stub)
    greedy = lambda: [list(s.token_ids) for s in generate(stub, prompts, temperature=0.0, max_new_tokens=12).samples]  # noqa: E731
    before = greedy()
    other = [hf_greedy(lm_other, tok, p, 12) for p in prompts]
    resp = model_stub.LoadWeights(model_pb2.LoadWeightsRequest(path=str(tiny_models["lm_other"]), version=v0 + 1))
    assert resp.version == v0 + 1 and resp.num_tensors > 0
    assert greedy() == other
    staged = push_weights(policy_server.channel, lm.state_dict(), v0 + 2, stage_only=True)
    assert staged.staged and current_version(model_stub) == v0 + 1
    assert greedy() == other  # staged weights do not serve
    model_stub.CommitWeights(model_pb2.CommitWeightsRequest(version=v0 + 2), timeout=60)
    assert current_version(model_stub) == v0 + 2
    assert greedy() == before


def test_logprob_mode_the_engine_does_not_compute(stub, tok, policy_server):
    """The transformers engine computes either kind of log-prob per request; vLLM one per engine (sampled by
    default). A raw request is served where both kinds are equal (temperature 1, no truncation) and otherwise
    answers FAILED_PRECONDITION naming the field and the setting."""
    p = ids_of(tok, TEXTS[0])
    raw = dict(max_new_tokens=4, seed=3, logprob_mode=policy_pb2.LOGPROB_MODE_RAW)
    assert len(generate(stub, [p], temperature=1.0, **raw).samples[0].logprobs) == 4
    if policy_server.engine == "transformers":
        assert len(generate(stub, [p], temperature=0.7, **raw).samples[0].logprobs) == 4
        return
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, [p], temperature=0.7, **raw)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "sampling.logprob_mode" in err.value.details() and "policy.vllm.logprobs_mode" in err.value.details()


def test_sampled_logprobs_are_the_truncated_distributions(stub, lm, tok):
    """LOGPROB_MODE_SAMPLED at temperature 0.8 with top-k 20: each token's log-prob under softmax(logits / T) over
    the top 20, renormalised, recomputed in process."""
    p = ids_of(tok, TEXTS[2])
    resp = generate(
        stub, [p], temperature=0.8, top_k=20, max_new_tokens=10, seed=9, logprob_mode=policy_pb2.LOGPROB_MODE_SAMPLED
    )
    s = resp.samples[0]
    with torch.no_grad():
        logits = lm(torch.tensor([p + list(s.token_ids)])).logits[0, len(p) - 1 : -1].float() / 0.8
    kth = torch.topk(logits, 20, dim=-1).values[:, -1:]
    logp = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
    expected = logp.gather(-1, torch.tensor(list(s.token_ids))[:, None])[:, 0]
    assert torch.allclose(expected, torch.tensor(list(s.logprobs)), atol=1e-4), (expected, list(s.logprobs))


def test_one_call_may_carry_more_samples_than_max_queue(stub, tok):
    """batching.max_queue bounds calls waiting (or, on vLLM, in flight), not the samples of one call: 300 samples of
    one prompt in one call, above the default 256, are served (the pipeline samples 384 held-out completions so)."""
    resp = generate(stub, [ids_of(tok, TEXTS[1])], temperature=1.0, max_new_tokens=2, num_samples=300, seed=4)
    assert len(resp.samples) == 300 and {s.sample_index for s in resp.samples} == set(range(300))
