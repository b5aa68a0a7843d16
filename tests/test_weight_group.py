"""learner.weight_sync: collective on gloo (what a GPU cluster does on NCCL): the learner's publisher broadcasts the
policy to the vLLM workers of two policy replicas through a torch.distributed group, and sends it by stream to a
replica whose engine cannot join one; a replica that dies mid-broadcast makes the push fall back, not hang."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignd.config import LearnerConfig
from alignd.runtime.errors import FailedPrecondition, Unavailable
from alignd.services.learner.publisher import WeightPublisher
from alignd.v1 import common_pb2, model_pb2, model_pb2_grpc, policy_pb2, policy_pb2_grpc

from conftest import start_roles, stop_role

PROMPTS = [[5, 17, 42, 9], [3, 8, 120]]


class Source:
    """The learner's policy as the publisher reads it (services/learner/learner.py gives it the same three)."""

    def __init__(self, model) -> None:
        self.lock = threading.Lock()
        self.version = 0
        self.model = model

    def policy_module(self):
        return self.model


@pytest.fixture(scope="module")
def replicas(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    base = {"model": {"path": str(tiny_models["lm"])}, "torch_threads": 1, "vllm": {"kv_cache_gib": 0.5}}
    servers = start_roles(
        [
            ("policy", {**base, "engine": "vllm"}, root / "a"),
            ("policy", {**base, "engine": "vllm"}, root / "b"),
            ("policy", {**base, "engine": "transformers"}, root / "c"),
        ]
    )
    yield servers
    for s in servers:
        if s.proc.poll() is None:
            stop_role(s)


def info(server) -> common_pb2.ModelInfo:
    return model_pb2_grpc.ModelServiceStub(server.channel).GetInfo(model_pb2.GetInfoRequest(), timeout=10).info


def greedy(server) -> list[list[int]]:
    req = policy_pb2.GenerateRequest(
        prompts=[policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=p)) for p in PROMPTS],
        sampling=policy_pb2.SamplingParams(temperature=0.0, max_new_tokens=10),
    )
    return [
        list(s.token_ids) for s in policy_pb2_grpc.PolicyServiceStub(server.channel).Generate(req, timeout=60).samples
    ]


def hf_greedy(model) -> list[list[int]]:
    out = []
    for p in PROMPTS:
        ids = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0)
        out.append(ids[0, len(p) :].tolist())
    return out


def learner_cfg(addresses: list[str], timeout: float = 30.0) -> LearnerConfig:
    from conftest import tokens_file

    return LearnerConfig(
        model={"path": "unused"},
        policy_addresses=addresses,
        weight_sync="collective",
        weight_group_timeout_s=timeout,
        client={"tokens_file": str(tokens_file()), "token_name": "learner"},
    )


def test_broadcast_to_the_vllm_replicas_and_the_stream_to_the_other(replicas, tiny_models, tmp_path):
    a, b, c = replicas
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["lm"]).eval()
    other = AutoModelForCausalLM.from_pretrained(tiny_models["lm_other"]).eval()
    assert [info(s).weight_group_ranks for s in replicas] == [1, 1, 0]
    src = Source(other)
    src.version = 1 + max(info(s).weight_version for s in replicas)
    pub = WeightPublisher(learner_cfg([s.address for s in replicas]), src, tmp_path)
    try:
        resp = pub.push([s.address for s in replicas])
        assert resp.version == src.version
        assert [info(s).weight_version for s in replicas] == [src.version] * 3
        want = hf_greedy(other)
        assert [greedy(s) for s in replicas] == [want] * 3
        # a and b received the broadcast (each checked the SHA-256 of the bytes against the learner's: the same
        # bytes on both); c, whose engine joins no group, the stream.
        for s in (a, b):
            assert s.log().count('"event": "weight_group_joined"') == 1 and '"event": "weights_received"' in s.log()
        assert '"event": "weights_received"' not in c.log() and '"event": "weights_updated"' in c.log()

        # The next version goes over the same group.
        src.model, src.version = lm, src.version + 1
        pub.push([s.address for s in replicas])
        assert [info(s).weight_version for s in replicas] == [src.version] * 3
        assert [greedy(s) for s in replicas] == [hf_greedy(lm)] * 3
        assert [s.log().count('"event": "weight_group_joined"') for s in (a, b)] == [1, 1]
    finally:
        pub.close()


def test_a_broadcast_whose_bytes_do_not_match_its_digest_is_refused(replicas, tiny_models):
    """Checked like the stream: a replica applies nothing whose SHA-256 differs from the learner's, and says so."""
    from alignd.services.learner.collective import WeightGroup, WeightGroupFailed

    a = replicas[0]
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["lm"]).eval()
    before, version = greedy(a), info(a).weight_version
    group = WeightGroup(learner_cfg([a.address]))
    group.ensure({a.address: 1})
    try:
        state = {k: v + 1.0 if v.is_floating_point() else v for k, v in lm.state_dict().items()}
        group.digest = lambda tensors: "0" * 64  # what the learner claims differs from what it sends
        with pytest.raises(WeightGroupFailed) as err:
            group.broadcast(state, version + 1, stage_only=False)
        assert "sha256" in str(err.value)
    finally:
        group.dissolve()
    assert info(a).weight_version == version and greedy(a) == before


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the vLLM engine core and its workers under a policy role), from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def test_a_replica_dying_mid_broadcast_fails_over_to_the_stream(replicas, tiny_models, tmp_path):
    """b's vLLM engine dies (its role process still answers GetInfo, so the learner counts it in the group): the
    broadcast fails within the group's timeout instead of hanging, the group is dissolved, the live replica gets the
    version by stream, and the push names the dead one."""
    a, b, _ = replicas
    other = AutoModelForCausalLM.from_pretrained(tiny_models["lm_other"]).eval()
    src = Source(other)
    src.version = 1 + max(info(s).weight_version for s in (a, b))
    pub = WeightPublisher(learner_cfg([a.address, b.address], timeout=15.0), src, tmp_path)
    try:
        pub.push([a.address, b.address])  # the group forms with both
        src.version += 1
        for pid in descendants(b.proc.pid):
            os.kill(pid, signal.SIGKILL)
        streamed = a.log().count('"event": "weights_updated"')
        t0 = time.monotonic()
        with pytest.raises((Unavailable, FailedPrecondition)) as err:
            pub.push([a.address, b.address])
        elapsed = time.monotonic() - t0
        assert b.address in err.value.message
        assert elapsed < 4 * 15.0 + 60, elapsed
        assert pub._group.name is None  # dissolved: the next push forms a new one
        assert info(a).weight_version == src.version
        assert a.log().count('"event": "weights_updated"') == streamed + 1  # by stream
    finally:
        pub.close()
