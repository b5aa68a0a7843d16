"""run.rollout_micro_batches: a step's prompts are generated in micro-batches, and each one is scored and given
reference log-probs while the next one generates (issue 8). Real policy, reward and reference servers; the
coordinator's RunLoop makes the rollout. Client interceptors on its channels (grpc.intercept_channel) hold each
later Generate call until the previous micro-batch's Score and LogProbs calls have been made: with scoring after
generation, they would wait in vain."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from alignd.config import ConfigError, CoordinatorConfig, PPORunConfig
from alignd.services.coordinator.app import CoordinatorMetrics
from alignd.services.coordinator.clients import RoleClients
from alignd.services.coordinator.loop import RunLoop
from alignd.services.coordinator.runs import RunRecord
from alignd.v1 import reference_pb2, reference_pb2_grpc, reward_pb2, reward_pb2_grpc

from conftest import credentials

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 60.0  # how long a held Generate waits for the previous micro-batch's scoring to start


class Watch(grpc.UnaryUnaryClientInterceptor):
    """Records the calls made through the channels it wraps; holds Generate calls after the first until the
    previous micro-batch's Score and LogProbs calls have started."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = {"Generate": 0, "Score": 0, "LogProbs": 0}
        self.cond = threading.Condition(self.lock)
        self.overlapped: list[bool] = []
        self.seeds: list[int] = []

    def intercept_unary_unary(self, continuation, details, request):
        method = details.method.rsplit("/", 1)[-1]
        with self.cond:
            if method == "Generate":
                k = self.started["Generate"]
                self.seeds.append(request.sampling.seed)
                if k > 0:  # micro-batch k: micro-batch k-1 must be in scoring already
                    self.overlapped.append(
                        self.cond.wait_for(
                            lambda: self.started["Score"] >= k and self.started["LogProbs"] >= k, timeout=WAIT_S
                        )
                    )
            if method in self.started:
                self.started[method] += 1
                self.cond.notify_all()
        return continuation(details, request)


def make_loop(tmp_path: Path, policy, reward, reference, micro_batches: int) -> tuple[RunLoop, Watch]:
    cfg = CoordinatorConfig(
        policy_addresses=[policy.address],
        reward_addresses=[reward.address],
        reference_addresses=[reference.address],
        learner_address="127.0.0.1:1",  # a rollout never calls the learner
        rpc_timeout_seconds=120,
        client=credentials("coordinator"),
    )
    run_cfg = PPORunConfig(
        prompts_per_step=7,
        prompts={"path": str(ROOT / "configs" / "tiny_prompts.txt")},
        seed=5,
        sampling={"max_new_tokens": 6, "ignore_eos": True},
        rollout_micro_batches=micro_batches,
    )
    run_dir = tmp_path / f"run-{micro_batches}"
    run_dir.mkdir()
    rec = RunRecord(run_id=f"overlap-{micro_batches}", run_dir=str(run_dir), config_yaml="", total_steps=1)
    roles = RoleClients(cfg)
    watch = Watch()
    roles.policy = [grpc.intercept_channel(ch, watch) for ch in roles.policy]
    roles.reward = [grpc.intercept_channel(ch, watch) for ch in roles.reward]
    roles.reference = [grpc.intercept_channel(ch, watch) for ch in roles.reference]
    return RunLoop(rec, run_cfg, roles, metrics=CoordinatorMetrics(CollectorRegistry())), watch


def test_micro_batches_are_scored_while_the_next_one_generates(
    tmp_path, policy_server, reward_server, reference_server
):
    loop, watch = make_loop(tmp_path, policy_server, reward_server, reference_server, micro_batches=3)
    ro = loop.rollouts.make(loop.rollouts.take_prompts(1), same_tokenizer=True, min_version=0)
    assert watch.started == {"Generate": 3, "Score": 3, "LogProbs": 3}
    assert watch.overlapped == [True, True]
    assert len(set(watch.seeds)) == 3  # each micro-batch samples with a seed of its own
    assert ro.generated.is_set()

    # The pieces are put back together in prompt order, each score and log-prob with its own sample: the same
    # as scoring all samples in one call (real reward and reference models; batch composition changes padding,
    # hence the tolerance).
    assert [p for p, _ in ro.samples] == [loop.rollouts.prompts[i] for i in ro.prompt_idx]
    assert len(ro.scores) == len(ro.ref) == len(ro.samples) == 7
    whole = reward_pb2_grpc.RewardServiceStub(reward_server.channel).Score(
        reward_pb2.ScoreRequest(
            items=[
                reward_pb2.ScoreItem(
                    tokens=reward_pb2.TokenPair(prompt_token_ids=s.prompt_token_ids, response_token_ids=s.token_ids)
                )
                for _, s in ro.samples
            ]
        ),
        timeout=60,
    )
    assert ro.scores == pytest.approx(list(whole.scores), abs=1e-5)
    ref = reference_pb2_grpc.ReferenceServiceStub(reference_server.channel).LogProbs(
        reference_pb2.LogProbsRequest(
            items=[
                reference_pb2.LogProbsItem(prompt_token_ids=s.prompt_token_ids, response_token_ids=s.token_ids)
                for _, s in ro.samples
            ],
            temperature=1.0,
        ),
        timeout=60,
    )
    for got, want, (_, s) in zip(ro.ref, ref.results, ro.samples):
        assert len(got) == len(s.token_ids) == 6
        assert got == pytest.approx(list(want.logprobs), abs=1e-5)
    assert {"generate", "score", "reference", "rollout"} <= set(ro.timings)
    assert ro.timings["rollout"] >= ro.timings["generate"]


def test_one_micro_batch_is_one_generate_call(tmp_path, policy_server, reward_server, reference_server):
    loop, watch = make_loop(tmp_path, policy_server, reward_server, reference_server, micro_batches=1)
    ro = loop.rollouts.make(loop.rollouts.take_prompts(1), same_tokenizer=True, min_version=0)
    assert watch.started == {"Generate": 1, "Score": 1, "LogProbs": 1} and watch.overlapped == []
    assert len(ro.samples) == len(ro.scores) == 7


def test_more_micro_batches_than_prompts_is_refused():
    with pytest.raises((ConfigError, ValueError), match="rollout_micro_batches"):
        PPORunConfig(prompts_per_step=2, prompts={"path": "p.txt"}, rollout_micro_batches=3)
