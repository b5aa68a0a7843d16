"""The learner role as a real subprocess: PPO steps on rollouts from the real
policy and reference services, validation, idempotency, weight push."""

from __future__ import annotations

import math
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from alignd.v1 import (
    common_pb2,
    learner_pb2,
    learner_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
)

from conftest import assert_invalid, start_role, stop_role

HELDOUT_TEXT = Path(__file__).resolve().parent.parent / "configs" / "tiny_heldout_text.txt"


@pytest.fixture(scope="module")
def older_replica():
    """A fake replica of an alignd before staging (OlderReplica), served for the whole module."""
    from concurrent import futures

    from alignd.runtime.client import MAX_MESSAGE_BYTES

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    )
    older = OlderReplica()
    model_pb2_grpc.add_ModelServiceServicer_to_server(older, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", older
    server.stop(None)


@pytest.fixture(scope="module")
def learner_server(tiny_models, tmp_path_factory, policy_server, older_replica):
    work = tmp_path_factory.mktemp("learner")
    cfg = {
        # The only replicas PushWeights may reach (each test names the one it pushes to).
        "policy_addresses": [policy_server.address, older_replica[0]],
        "paths": {"roots": [str(tmp_path_factory.getbasetemp()), str(HELDOUT_TEXT.parent)]},  # the test's files
        "model": {"path": str(tiny_models["lm"])},
        "value_model": {"path": str(tiny_models["reward"])},
        "torch_threads": 1,
        "ppo": {"minibatches": 1, "epochs": 1},
        "optimizer": {"lr": 1e-3, "warmup_steps": 0},
        "checkpoint_dir": str(work / "checkpoints"),
        "weight_sync": "stream",  # the stream is what these tests push through (auto: test_auto_weight_sync_...)
    }
    server = start_role("learner", cfg, work)
    server.checkpoints = work / "checkpoints"
    yield server
    assert stop_role(server) == 0, server.log()[-3000:]


@pytest.fixture(scope="module")
def stub(learner_server):
    return learner_pb2_grpc.LearnerServiceStub(learner_server.channel)


@pytest.fixture(scope="module")
def rollouts(policy_server, reference_server):
    """Real samples of the policy, with reference log-probs from the reference service."""
    gen = policy_pb2_grpc.PolicyServiceStub(policy_server.channel).Generate(
        policy_pb2.GenerateRequest(
            prompts=[
                policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=p)) for p in ([5, 6, 7], [9, 10], [11, 12, 13, 14])
            ],
            sampling=policy_pb2.SamplingParams(temperature=1.0, max_new_tokens=10, num_samples=2, seed=3),
        ),
        timeout=60,
    )
    ref = reference_pb2_grpc.ReferenceServiceStub(reference_server.channel).LogProbs(
        reference_pb2.LogProbsRequest(
            items=[
                reference_pb2.LogProbsItem(prompt_token_ids=s.prompt_token_ids, response_token_ids=s.token_ids)
                for s in gen.samples
            ]
        ),
        timeout=60,
    )
    return gen.samples, [list(r.logprobs) for r in ref.results]


def experiences(rollouts, scores=None):
    samples, refs = rollouts
    scores = scores or [float(i % 3) - 1.0 for i in range(len(samples))]
    return [
        learner_pb2.Experience(
            prompt_token_ids=s.prompt_token_ids,
            response_token_ids=s.token_ids,
            rollout_logprobs=s.logprobs,
            reference_logprobs=r,
            score=sc,
            policy_version=s.weight_version,
            finish_reason=s.finish_reason,
        )
        for s, r, sc in zip(samples, refs, scores)
    ]


def learner_version(server) -> int:
    return (
        model_pb2_grpc.ModelServiceStub(server.channel)
        .GetInfo(model_pb2.GetInfoRequest(), timeout=10)
        .info.weight_version
    )


def test_first_step_policy_equals_reference(stub, rollouts, learner_server):
    resp = stub.TrainStep(learner_pb2.TrainStepRequest(step=1, experiences=experiences(rollouts)), timeout=120)
    assert resp.step == 1 and resp.policy_version == 1 and not resp.replayed and not resp.skipped
    s = resp.stats
    assert abs(s.reference_kl) < 1e-6, s.reference_kl  # learner's recomputed log-probs == reference service's
    assert abs(s.ratio_mean - 1.0) < 1e-6, s.ratio_mean  # one minibatch: the ratio before the update is 1
    assert s.approx_kl < 1e-6 and s.clip_fraction == 0.0
    assert s.updates_applied == 1 and math.isfinite(s.policy_loss) and math.isfinite(s.value_loss)
    assert s.kl_coef == pytest.approx(0.02) and s.grad_norm > 0
    assert learner_version(learner_server) == 1
    assert (learner_server.checkpoints / "latest").exists()


def test_bad_train_steps_leave_state_unchanged(stub, rollouts, learner_server):
    exps = experiences(rollouts)
    v0 = learner_version(learner_server)
    bad = learner_pb2.Experience()
    bad.CopyFrom(exps[1])
    del bad.reference_logprobs[-1]
    assert_invalid(
        lambda: stub.TrainStep(learner_pb2.TrainStepRequest(step=2, experiences=[exps[0], bad]), timeout=30),
        "experiences[1].reference_logprobs",
        "parallel",
    )
    bad.CopyFrom(exps[0])
    bad.score = float("nan")
    assert_invalid(
        lambda: stub.TrainStep(learner_pb2.TrainStepRequest(step=2, experiences=[bad]), timeout=30),
        "experiences[0].score",
        "not finite",
    )
    bad.CopyFrom(exps[0])
    bad.rollout_logprobs[0] = float("-inf")
    assert_invalid(
        lambda: stub.TrainStep(learner_pb2.TrainStepRequest(step=2, experiences=[bad]), timeout=30),
        "experiences[0].rollout_logprobs[0]",
    )
    assert_invalid(
        lambda: stub.TrainStep(learner_pb2.TrainStepRequest(step=2), timeout=30), "experiences", "empty batch"
    )
    bad.CopyFrom(exps[0])
    bad.response_token_ids[0] = 10**6
    assert_invalid(
        lambda: stub.TrainStep(learner_pb2.TrainStepRequest(step=2, experiences=[bad]), timeout=30),
        "experiences[0].response_token_ids[0]",
    )
    assert learner_version(learner_server) == v0
    ok = stub.TrainStep(learner_pb2.TrainStepRequest(step=v0 + 1, experiences=exps), timeout=120)
    assert ok.step == v0 + 1 and not ok.replayed


def test_repeated_step_is_replayed_not_retrained(stub, rollouts, learner_server):
    v = learner_version(learner_server)
    first = stub.TrainStep(learner_pb2.TrainStepRequest(step=v + 1, experiences=experiences(rollouts)), timeout=120)
    again = stub.TrainStep(learner_pb2.TrainStepRequest(step=v + 1, experiences=experiences(rollouts)), timeout=120)
    assert again.replayed and not first.replayed
    assert again.stats == first.stats and again.policy_version == first.policy_version == v + 1
    assert learner_version(learner_server) == v + 1
    with pytest.raises(grpc.RpcError) as err:
        stub.TrainStep(learner_pb2.TrainStepRequest(step=v + 5, experiences=experiences(rollouts)), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "out of order" in err.value.details()
    metrics = urllib.request.urlopen(learner_server.metrics_url, timeout=10).read().decode()
    assert "alignd_learner_step_replays_total 1.0" in metrics


def test_non_finite_loss_skips_the_update(stub, rollouts, learner_server):
    v = learner_version(learner_server)
    huge = [3e38] * len(rollouts[0])  # finite float32 scores whose squared value error overflows
    resp = stub.TrainStep(
        learner_pb2.TrainStepRequest(step=v + 1, experiences=experiences(rollouts, huge)), timeout=120
    )
    assert resp.skipped and resp.stats.updates_skipped == 1 and resp.stats.updates_applied == 0
    metrics = urllib.request.urlopen(learner_server.metrics_url, timeout=10).read().decode()
    assert "alignd_learner_skipped_updates_total 1.0" in metrics
    assert '"event": "update_skipped"' in learner_server.log()
    # The learner still trains normally afterwards.
    ok = stub.TrainStep(learner_pb2.TrainStepRequest(step=v + 2, experiences=experiences(rollouts)), timeout=120)
    assert ok.stats.updates_applied == 1


def test_push_weights_syncs_policy(stub, learner_server, policy_server):
    v = learner_version(learner_server)
    resp = stub.PushWeights(learner_pb2.PushWeightsRequest(addresses=[policy_server.address]), timeout=120)
    assert resp.version == v and resp.bytes_per_replica > 0
    info = model_pb2_grpc.ModelServiceStub(policy_server.channel).GetInfo(model_pb2.GetInfoRequest(), timeout=10).info
    assert info.weight_version == v
    # The policy now serves the learner's weights: greedy decoding equals the checkpointed policy's.
    ckpt = stub.SaveCheckpoint(learner_pb2.SaveCheckpointRequest(tag="test"), timeout=120)
    trained = AutoModelForCausalLM.from_pretrained(f"{ckpt.path}/policy").eval()
    prompt = [5, 6, 7, 8]
    expected = trained.generate(
        torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=2
    )[0, 4:].tolist()
    got = (
        policy_pb2_grpc.PolicyServiceStub(policy_server.channel)
        .Generate(
            policy_pb2.GenerateRequest(
                prompts=[policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=prompt))],
                sampling=policy_pb2.SamplingParams(temperature=0, max_new_tokens=8),
            ),
            timeout=60,
        )
        .samples[0]
    )
    assert list(got.token_ids) == expected and got.weight_version == v
    # A second push is a no-op: the replica is already at this version.
    again = stub.PushWeights(learner_pb2.PushWeightsRequest(addresses=[policy_server.address]), timeout=60)
    assert again.bytes_per_replica == 0


def test_rollout_logprobs_serve_as_old_logprobs_when_exact_and_current(
    stub, learner_server, policy_server, reference_server
):
    """The policy service's SAMPLED log-probs of the learner's current weights are the learner's own: taken as the old
    log-probs, the first minibatch's ratio is 1. Another temperature or a sample of older weights: recomputed."""
    v = learner_version(learner_server)
    stub.PushWeights(learner_pb2.PushWeightsRequest(addresses=[policy_server.address]), timeout=120)
    gen = policy_pb2_grpc.PolicyServiceStub(policy_server.channel).Generate(
        policy_pb2.GenerateRequest(
            prompts=[
                policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=p)) for p in ([5, 6, 7], [9, 10], [11, 12, 13, 14])
            ],
            sampling=policy_pb2.SamplingParams(
                temperature=1.0, max_new_tokens=10, num_samples=2, seed=5, logprob_mode=policy_pb2.LOGPROB_MODE_SAMPLED
            ),
        ),
        timeout=60,
    )
    assert {s.weight_version for s in gen.samples} == {v}
    ref = reference_pb2_grpc.ReferenceServiceStub(reference_server.channel).LogProbs(
        reference_pb2.LogProbsRequest(
            items=[
                reference_pb2.LogProbsItem(prompt_token_ids=s.prompt_token_ids, response_token_ids=s.token_ids)
                for s in gen.samples
            ]
        ),
        timeout=60,
    )
    exps = experiences((gen.samples, [list(r.logprobs) for r in ref.results]))
    resp = stub.TrainStep(
        learner_pb2.TrainStepRequest(
            step=v + 1, experiences=exps, rollout_logprobs_exact=True, rollout_temperature=1.0
        ),
        timeout=120,
    )
    assert resp.stats.old_logprobs_from_rollout and resp.stats.stale_fraction == 0.0
    assert abs(resp.stats.ratio_mean - 1.0) < 1e-5, resp.stats.ratio_mean  # one minibatch, one epoch
    # Other weights now (v + 1): the same samples are stale; their ratio is taken against the behaviour log-probs
    # (ppo.off_policy: behaviour), so the first minibatch's ratio is pi_{v+1} / pi_v, no longer 1.
    resp = stub.TrainStep(
        learner_pb2.TrainStepRequest(
            step=v + 2, experiences=exps, rollout_logprobs_exact=True, rollout_temperature=1.0
        ),
        timeout=120,
    )
    assert resp.stats.old_logprobs_from_rollout and resp.stats.stale_fraction == 1.0
    assert abs(resp.stats.ratio_mean - 1.0) > 1e-5
    for e in exps:
        e.policy_version = v + 2
    resp = stub.TrainStep(
        learner_pb2.TrainStepRequest(
            step=v + 3, experiences=exps, rollout_logprobs_exact=True, rollout_temperature=0.7
        ),
        timeout=120,
    )
    assert not resp.stats.old_logprobs_from_rollout and resp.stats.stale_fraction == 0.0
    assert_invalid(
        lambda: stub.TrainStep(
            learner_pb2.TrainStepRequest(step=v + 4, experiences=exps, rollout_temperature=-1), timeout=30
        ),
        "rollout_temperature",
        ">= 0",
    )
    exps[1].policy_version = 1 << 62
    assert_invalid(
        lambda: stub.TrainStep(learner_pb2.TrainStepRequest(step=v + 4, experiences=exps), timeout=30),
        "experiences[1].policy_version",
        "out of range",
    )


def _greedy(policy_server, prompt=(5, 6, 7, 8)) -> tuple[list[int], int]:
    got = (
        policy_pb2_grpc.PolicyServiceStub(policy_server.channel)
        .Generate(
            policy_pb2.GenerateRequest(
                prompts=[policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(prompt)))],
                sampling=policy_pb2.SamplingParams(temperature=0, max_new_tokens=8),
            ),
            timeout=60,
        )
        .samples[0]
    )
    return list(got.token_ids), got.weight_version


def test_staged_push_serves_the_old_weights_until_committed(stub, learner_server, policy_server, rollouts, tiny_models):
    """PushWeights(stage_only): the replica receives and checks the new weights but keeps serving its own; the next
    PushWeights only commits them (nothing sent again), after which the replica serves exactly the learner's."""
    from alignd.models.weights import push_weights

    replica = model_pb2_grpc.ModelServiceStub(policy_server.channel)
    stub.PushWeights(learner_pb2.PushWeightsRequest(addresses=[policy_server.address]), timeout=120)
    v = learner_version(learner_server)
    before = _greedy(policy_server)
    assert before[1] == v
    stub.TrainStep(learner_pb2.TrainStepRequest(step=v + 1, experiences=experiences(rollouts)), timeout=120)

    staged = stub.PushWeights(
        learner_pb2.PushWeightsRequest(addresses=[policy_server.address], stage_only=True), timeout=120
    )
    assert staged.staged and staged.version == v + 1 and staged.bytes_per_replica > 0 and staged.committed_replicas == 0
    info = replica.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info
    assert (info.weight_version, info.staged_weight_version) == (v, v + 1)
    assert _greedy(policy_server) == before  # still the old weights
    again = stub.PushWeights(
        learner_pb2.PushWeightsRequest(addresses=[policy_server.address], stage_only=True), timeout=60
    )
    assert again.bytes_per_replica == 0  # already staged

    # The replica's own checks: a commit of weights it does not hold, a stage of a version not above the served one.
    with pytest.raises(grpc.RpcError) as err:
        replica.CommitWeights(model_pb2.CommitWeightsRequest(version=v + 5), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "version" in err.value.details()
    assert f"version {v + 1} is" in err.value.details()
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["lm"])
    with pytest.raises(grpc.RpcError) as err:
        push_weights(policy_server.channel, lm.state_dict(), v, stage_only=True, timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = replica.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info
    assert info.staged_weight_version == v + 1  # a rejected update leaves the staged weights alone

    commit = stub.PushWeights(learner_pb2.PushWeightsRequest(addresses=[policy_server.address]), timeout=120)
    assert (
        commit.version == v + 1
        and commit.committed_replicas == 1
        and commit.bytes_per_replica == 0
        and not commit.staged
    )
    info = replica.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info
    assert (info.weight_version, info.staged_weight_version) == (v + 1, 0)
    ckpt = stub.SaveCheckpoint(learner_pb2.SaveCheckpointRequest(tag="staged"), timeout=120)
    trained = AutoModelForCausalLM.from_pretrained(f"{ckpt.path}/policy").eval()
    expected = trained.generate(
        torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=2
    )[0, 4:].tolist()
    assert _greedy(policy_server) == (expected, v + 1)
    assert 'alignd_policy_weight_updates_total{result="staged"} 1.0' in policy_server.metrics()


class OlderReplica(model_pb2_grpc.ModelServiceServicer):
    """A policy replica of an alignd before staging, behind the real ModelService interface (to test the learner,
    its caller): it ignores stage_only and applies what it receives."""

    def __init__(self) -> None:
        self.version = 0

    def GetInfo(self, request, context):
        return model_pb2.GetInfoResponse(info=common_pb2.ModelInfo(role="policy", weight_version=self.version))

    def UpdateWeights(self, request_iterator, context):
        received = 0
        for msg in request_iterator:
            if msg.WhichOneof("part") == "header":
                version = msg.header.version
            elif msg.WhichOneof("part") == "chunk":
                received += len(msg.chunk.data)
        self.version = version
        return model_pb2.UpdateWeightsResponse(version=version, received_bytes=received)  # no `staged`


def test_a_staged_push_to_a_replica_that_cannot_stage_fails(stub, learner_server, older_replica):
    """The learner must not report weights as staged that a replica already serves (that would change which
    weights generate an async run's next samples): it answers FAILED_PRECONDITION, and the coordinator stops
    staging for the run."""
    address, older = older_replica
    with pytest.raises(grpc.RpcError) as err:
        stub.PushWeights(learner_pb2.PushWeightsRequest(addresses=[address], stage_only=True), timeout=120)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "instead of staging it" in err.value.details()
    assert older.version == learner_version(learner_server)  # it did apply them: hence the refusal


def test_push_weights_reaches_configured_replicas_only(stub, policy_server):
    """PushWeights sends nowhere but the learner's policy_addresses: another address is refused, naming it."""
    v = model_pb2_grpc.ModelServiceStub(policy_server.channel).GetInfo(model_pb2.GetInfoRequest(), timeout=10).info
    with pytest.raises(grpc.RpcError) as err:
        stub.PushWeights(
            learner_pb2.PushWeightsRequest(addresses=[policy_server.address, "10.9.8.7:50051"]), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("addresses[1]: not one of the policy replicas")
    after = model_pb2_grpc.ModelServiceStub(policy_server.channel).GetInfo(model_pb2.GetInfoRequest(), timeout=10).info
    assert after.weight_version == v.weight_version


def test_a_replica_ahead_of_the_learner_is_resynced_not_skipped(stub, learner_server, policy_server, tiny_models):
    """A replica that reports a version the learner never published (here: another caller loaded other weights
    at a higher version) gets the learner's weights at the learner's version on the next push."""
    v = learner_version(learner_server)
    stub.PushWeights(learner_pb2.PushWeightsRequest(addresses=[policy_server.address]), timeout=120)
    model = model_pb2_grpc.ModelServiceStub(policy_server.channel)
    model.LoadWeights(model_pb2.LoadWeightsRequest(path=str(tiny_models["lm_other"]), version=v + 50), timeout=60)
    # A version far above the served one is refused outright: versions advance one publication at a time.
    with pytest.raises(grpc.RpcError) as err:
        model.LoadWeights(
            model_pb2.LoadWeightsRequest(path=str(tiny_models["lm_other"]), version=(1 << 64) - 1), timeout=60
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "largest weight version" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        model.LoadWeights(
            model_pb2.LoadWeightsRequest(path=str(tiny_models["lm_other"]), version=v + 50 + (1 << 21)), timeout=60
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "more than 1048576 above" in err.value.details()
    assert model.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info.weight_version == v + 50
    resp = stub.PushWeights(learner_pb2.PushWeightsRequest(addresses=[policy_server.address]), timeout=120)
    assert resp.version == v and resp.bytes_per_replica > 0
    assert model.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info.weight_version == v
    assert "replica_version_unknown" in learner_server.log()


def naive_text_loss(model_dir, tokenizer_dir, text_path, max_tokens, max_blocks) -> tuple[float, int]:
    """Mean NLL per predicted token, one forward per predicted token on its prefix (the blocks rebuilt here)."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    stream = []
    for line in Path(text_path).read_text().splitlines():
        if line.strip():
            stream += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = [stream[i : i + max_tokens] for i in range(0, len(stream) - max_tokens + 1, max_tokens)][:max_blocks]
    nll, n = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            for t in range(1, max_tokens):
                logits = model(torch.tensor([block[:t]])).logits[0, -1].double()
                nll -= float(torch.log_softmax(logits, -1)[block[t]])
                n += 1
    return nll / n, n


def test_evaluate_text_loss_matches_naive_reference_and_tracks_training(stub, learner_server, tiny_models, rollouts):
    req = learner_pb2.EvaluateTextLossRequest(text_path=str(HELDOUT_TEXT), max_tokens=32, max_blocks=3)
    v = learner_version(learner_server)
    before = stub.EvaluateTextLoss(req, timeout=120)
    assert before.policy_version == v and before.tokens == 3 * 31
    # The learner's current policy, as a save_pretrained directory (nothing trains in between).
    ckpt = stub.SaveCheckpoint(learner_pb2.SaveCheckpointRequest(tag="text-loss"), timeout=120)
    expected, n = naive_text_loss(f"{ckpt.path}/policy", tiny_models["lm"], HELDOUT_TEXT, 32, 3)
    assert n == before.tokens
    assert abs(before.loss - expected) < 1e-4, (before.loss, expected)
    assert 3.0 < before.loss < 10.0  # a random LM over 512 tokens: about log(512) ~ 6.2
    # Defaults: blocks of 128, every block; evaluating changes nothing.
    everything = stub.EvaluateTextLoss(learner_pb2.EvaluateTextLossRequest(text_path=str(HELDOUT_TEXT)), timeout=120)
    assert everything.tokens > 0 and everything.tokens % 127 == 0 and everything.policy_version == v
    assert stub.EvaluateTextLoss(req, timeout=120).loss == before.loss
    # The RPC evaluates the current policy: a PPO step moves it.
    step = stub.TrainStep(learner_pb2.TrainStepRequest(step=v + 1, experiences=experiences(rollouts)), timeout=120)
    assert step.stats.updates_applied == 1
    after = stub.EvaluateTextLoss(req, timeout=120)
    assert after.policy_version == v + 1 and after.tokens == before.tokens
    assert abs(after.loss - before.loss) > 1e-6, (after.loss, before.loss)
    assert '"event": "text_loss_evaluated"' in learner_server.log()


def test_evaluate_text_loss_rejects_bad_requests(stub, tmp_path):
    missing = tmp_path / "missing.txt"
    assert_invalid(
        lambda: stub.EvaluateTextLoss(learner_pb2.EvaluateTextLossRequest(text_path=str(missing)), timeout=30),
        "text_path",
        "missing.txt",
        "cannot read",
    )
    short = tmp_path / "short.txt"
    short.write_text("Too short.\n")
    assert_invalid(
        lambda: stub.EvaluateTextLoss(learner_pb2.EvaluateTextLossRequest(text_path=str(short)), timeout=30),
        "text_path",
        "fewer than one block",
    )
    assert_invalid(
        lambda: stub.EvaluateTextLoss(learner_pb2.EvaluateTextLossRequest(), timeout=30), "text_path", "empty"
    )
    assert_invalid(
        lambda: stub.EvaluateTextLoss(
            learner_pb2.EvaluateTextLossRequest(text_path=str(HELDOUT_TEXT), max_tokens=1), timeout=30
        ),
        "max_tokens",
    )
    assert_invalid(
        lambda: stub.EvaluateTextLoss(
            learner_pb2.EvaluateTextLossRequest(text_path=str(HELDOUT_TEXT), max_tokens=10**6), timeout=30
        ),
        "max_tokens",
    )


@pytest.fixture(scope="module")
def ptx_learner(tiny_models, tmp_path_factory, fresh_policy):
    """A learner with PPO-ptx on and weight sync through a shared directory."""
    work = tmp_path_factory.mktemp("learner_ptx")
    text = work / "pretrain.txt"
    text.write_text("\n".join(f"The quick brown fox jumps over the lazy dog number {i}." for i in range(200)))
    cfg = {
        "policy_addresses": [fresh_policy.address],
        "model": {"path": str(tiny_models["lm"])},
        "value_head_on_policy": True,
        "torch_threads": 1,
        "ppo": {"minibatches": 1, "ptx_coef": 27.8, "ptx_data": str(text), "ptx_batch_size": 2, "ptx_max_tokens": 32},
        "checkpoint_every_steps": 0,
        "weight_sync": "filesystem",
        "weight_sync_dir": str(work / "shared"),
        "checkpoint_dir": str(work / "checkpoints"),
    }
    server = start_role("learner", cfg, work)
    server.shared = work / "shared"
    yield server
    assert stop_role(server) == 0, server.log()[-3000:]


@pytest.fixture(scope="module")
def fresh_policy(tiny_models, tmp_path_factory):
    # It loads what the learners of this module publish in their own directories: the test's temp root is a root.
    cfg = {
        "model": {"path": str(tiny_models["lm"])},
        "torch_threads": 1,
        "paths": {"roots": [str(tmp_path_factory.getbasetemp())]},
    }
    server = start_role("policy", cfg, tmp_path_factory.mktemp("policy2"))
    yield server
    assert stop_role(server) == 0


def test_ppo_ptx_and_filesystem_weight_sync(ptx_learner, rollouts, fresh_policy):
    policy_server = fresh_policy
    stub = learner_pb2_grpc.LearnerServiceStub(ptx_learner.channel)
    resp = stub.TrainStep(learner_pb2.TrainStepRequest(step=1, experiences=experiences(rollouts)), timeout=120)
    # A random tiny LM on English text: the LM loss is about log(vocab) = log(512) ~ 6.2.
    assert 3.0 < resp.stats.ptx_loss < 10.0 and resp.stats.updates_applied == 1
    assert not (ptx_learner.shared / "policy-v00000001").exists()  # published on push, not on train
    policy_info = model_pb2_grpc.ModelServiceStub(policy_server.channel)
    before = policy_info.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info.weight_version
    push = stub.PushWeights(learner_pb2.PushWeightsRequest(addresses=[policy_server.address]), timeout=120)
    assert push.version == 1 and push.bytes_per_replica == 0  # nothing streamed: loaded from the directory
    assert (ptx_learner.shared / "policy-v00000001" / "config.json").exists()
    assert before == 0
    after = policy_info.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info.weight_version
    assert after == 1
    assert '"event": "weights_loaded"' in fresh_policy.log()


def test_auto_weight_sync_goes_through_shared_memory_on_loopback(tiny_models, tmp_path, fresh_policy):
    """weight_sync auto (the default) with a replica on loopback: the policy is published once in a directory of the
    learner's own under /dev/shm and loaded from there (nothing streamed); the directory goes with the learner."""
    cfg = {
        "model": {"path": str(tiny_models["lm"])},
        "value_head_on_policy": True,
        "torch_threads": 1,
        "checkpoint_every_steps": 0,
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "policy_addresses": [fresh_policy.address],
        "paths": {"roots": [str(Path(tiny_models["lm"]).parent)]},
    }
    server = start_role("learner", cfg, tmp_path)
    try:
        stub = learner_pb2_grpc.LearnerServiceStub(server.channel)
        stub.ResetPolicy(learner_pb2.ResetPolicyRequest(policy_dir=str(tiny_models["lm"]), version=7), timeout=120)
        push = stub.PushWeights(learner_pb2.PushWeightsRequest(addresses=[fresh_policy.address]), timeout=120)
        assert push.version == 7 and push.bytes_per_replica == 0
        published = list(Path("/dev/shm").glob(f"alignd-weights-{server.proc.pid}-*/policy-v00000007"))
        assert len(published) == 1 and (published[0] / "config.json").exists()
        info = (
            model_pb2_grpc.ModelServiceStub(fresh_policy.channel).GetInfo(model_pb2.GetInfoRequest(), timeout=10).info
        )
        assert info.weight_version == 7
    finally:
        assert stop_role(server) == 0, server.log()[-3000:]
    assert not published[0].parent.exists()


def _write_jsonl(path, rows):
    import json as _json

    path.write_text("".join(_json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_train_sft_job_learns_demonstrations_and_replays(stub, tiny_models, tmp_path):
    demos = [
        {"prompt": "Q: capital of France? A:", "completion": " Paris"},
        {"prompt": "Q: two plus two? A:", "completion": " four"},
        {"prompt": "Q: colour of the sky? A:", "completion": " blue"},
    ]
    req = learner_pb2.TrainSFTRequest(
        job_id="sft-1",
        init_model_dir=str(tiny_models["lm"]),
        demonstrations_path=_write_jsonl(tmp_path / "d.jsonl", demos * 4),
        validation_path=_write_jsonl(tmp_path / "v.jsonl", demos),
        config_yaml="epochs: 10\nlr: 3.0e-3\nbatch_size: 4\nmax_tokens: 64\n",
        output_dir=str(tmp_path / "sft"),
    )
    # While it trains, GetJobProgress says how far it is (what the coordinator shows); once over, NOT_FOUND.
    future = stub.TrainSFT.future(req, timeout=600)
    seen = []
    while not future.done():
        try:
            seen.append(stub.GetJobProgress(learner_pb2.GetJobProgressRequest(job_id="sft-1"), timeout=10))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND, err  # before the job started, or after it ended
    resp = future.result()
    training = [p for p in seen if p.phase == "training"]
    assert training, [str(p) for p in seen]
    for p in training:  # 12 demonstrations in batches of 4: 3 steps an epoch, 10 epochs
        assert (p.job_id, p.epochs, p.total_steps) == ("sft-1", 10, 30) and 1 <= p.step <= 30
        assert p.epoch == -(-p.step // 3)
    assert [p.step for p in training] == sorted(p.step for p in training)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetJobProgress(learner_pb2.GetJobProgressRequest(job_id="sft-1"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "job_id" in err.value.details()
    assert not resp.replayed and len(resp.history) == 10 and resp.train_examples == 12 and resp.validation_examples == 3
    assert resp.best_val_loss == pytest.approx(min(h.val_loss for h in resp.history))
    assert resp.history[-1].train_loss < resp.history[0].train_loss / 2
    model = AutoModelForCausalLM.from_pretrained(resp.model_dir).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resp.model_dir)
    for d in demos:
        ids = tok(d["prompt"], add_special_tokens=False)["input_ids"]
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, len(ids) :]).startswith(d["completion"])
    again = stub.TrainSFT(req, timeout=60)
    assert again.replayed and list(again.history) == list(resp.history)


def test_train_jobs_reject_malformed_data_with_file_and_line(stub, tiny_models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    assert_invalid(
        lambda: stub.TrainSFT(
            learner_pb2.TrainSFTRequest(job_id="bad", demonstrations_path=str(bad), output_dir=str(tmp_path / "o")),
            timeout=60,
        ),
        "demonstrations_path",
        f"{bad}:2",
    )
    rk = tmp_path / "rank.jsonl"
    rk.write_text('{"prompt": "p", "completions": ["x", "y", "z"], "ranking": [0, 0, 1]}\n')
    assert_invalid(
        lambda: stub.TrainRewardModel(
            learner_pb2.TrainRewardModelRequest(
                job_id="bad",
                init_model_dir=str(tiny_models["lm"]),
                comparisons_path=str(rk),
                output_dir=str(tmp_path / "o"),
            ),
            timeout=60,
        ),
        "comparisons_path",
        f"{rk}:1",
        "permutation",
    )
    assert_invalid(
        lambda: stub.TrainSFT(
            learner_pb2.TrainSFTRequest(
                job_id="x", demonstrations_path=str(tmp_path / "missing.jsonl"), output_dir=str(tmp_path / "o")
            ),
            timeout=60,
        ),
        "demonstrations_path",
        "missing.jsonl",
    )


def test_train_reward_model_job_learns_rankings(stub, tiny_models, tmp_path):
    import random

    rng = random.Random(0)
    words = ["good", "fine", "bad", "poor", "nice", "awful"]

    def comps(n, seed):
        rng.seed(seed)
        out = []
        for i in range(n):
            k = rng.randint(2, 5)
            cs = [" ".join(rng.choice(words) for _ in range(4)) + f" {j}" for j in range(k)]
            g = [
                c.count("good") + c.count("nice") - c.count("bad") - c.count("awful") + 0.01 * j
                for j, c in enumerate(cs)
            ]
            out.append(
                {"prompt": f"Say something {i}:", "completions": cs, "ranking": sorted(range(k), key=lambda j: -g[j])}
            )
        return out

    req = learner_pb2.TrainRewardModelRequest(
        job_id="rm-1",
        init_model_dir=str(tiny_models["lm"]),  # a causal LM: its backbone gets a new scalar head
        comparisons_path=_write_jsonl(tmp_path / "c.jsonl", comps(80, 0)),
        validation_path=_write_jsonl(tmp_path / "cv.jsonl", comps(30, 1)),
        demonstrations_path=_write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say:", "completion": " good nice"}]),
        config_yaml="epochs: 3\nlr: 2.0e-3\nmax_tokens: 32\n",
        output_dir=str(tmp_path / "rm"),
    )
    resp = stub.TrainRewardModel(req, timeout=600)
    assert resp.val_accuracy > 0.8 and resp.val_accuracy > resp.val_accuracy_before + 0.2
    assert resp.train_comparisons == 80 and resp.validation_comparisons == 30 and len(resp.history) == 3
    from alignd.config import ModelConfig
    from alignd.models.handle import load_scalar_head_model

    rm = load_scalar_head_model(
        ModelConfig(path=resp.model_dir), allow_new_head=False
    )  # the head was trained and saved
    assert rm.config.alignd_score_bias == pytest.approx(resp.score_bias)
    assert stub.TrainRewardModel(req, timeout=60).replayed


def test_reset_policy_starts_ppo_afresh_from_given_weights(stub, learner_server, tiny_models, rollouts):
    v = learner_version(learner_server)
    req = learner_pb2.ResetPolicyRequest(
        policy_dir=str(tiny_models["lm_other"]), value_model_dir=str(tiny_models["reward_other"]), version=v + 10
    )
    resp = stub.ResetPolicy(req, timeout=120)
    assert resp.version == v + 10 and not resp.replayed
    assert stub.ResetPolicy(req, timeout=60).replayed  # idempotent before any step
    assert learner_version(learner_server) == v + 10
    ckpt = stub.SaveCheckpoint(learner_pb2.SaveCheckpointRequest(tag="after-reset"), timeout=120)
    assert ckpt.step == 0
    saved = AutoModelForCausalLM.from_pretrained(f"{ckpt.path}/policy").state_dict()
    other = AutoModelForCausalLM.from_pretrained(tiny_models["lm_other"]).state_dict()
    assert all(torch.equal(saved[k], other[k]) for k in other)
    step = stub.TrainStep(learner_pb2.TrainStepRequest(step=1, experiences=experiences(rollouts)), timeout=120)
    assert step.policy_version == v + 11 and not step.replayed
    with pytest.raises(grpc.RpcError) as err:  # a stale version after steps
        stub.ResetPolicy(req, timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
