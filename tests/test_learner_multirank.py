"""The learner under torchrun: rank 0 serves gRPC, rank 1 follows it (services/learner/ranks.py).

`python -m torch.distributed.run --nproc_per_node 2 --master_port FREE -m
alignd.cli serve learner --config ...` with DeepSpeed ZeRO-2 over gloo and
the tiny models of tests/ds_worker.py, driven over real gRPC:

- (a) PPO steps on fixed batches give the statistics and final weights of a
  single-process learner (the torch engine, in this process) given the same
  requests, within the tolerances of test_deepspeed_engine.py (1e-4 on
  losses and weights, 1e-4 relative on the grad norm): fp32 on both sides,
  the only difference is the order of the reductions (each rank's share of a
  minibatch summed by gloo vs one backward over the minibatch), a few ulps
  per step that Adam carries over 4 steps.
- (c) a bad TrainStep is INVALID_ARGUMENT and never reaches rank 1: the next
  good step trains on both ranks (the ranks agree after every command, and
  the weights still equal the reference's).
- (b) SaveCheckpoint writes one engine shard per rank (distinct ZeRO
  partitions); after kill -9 of the whole job (torchrun and both ranks) a new
  launch resumes at the same step with the same weights and optimizer state
  (the next step still equals the reference's); ResetPolicy runs on both
  ranks (after it, step 1 equals the reference's step 1 again), and SIGTERM
  to torchrun stops both ranks cleanly.
- A follower that dies while rank 0 is idle (two torchrun agents, one
  process each, as two learner pods run) fails rank 0 at its next heartbeat:
  the job exits instead of hanging.

Readiness is the endpoint file plus the health Watch (as conftest.start_role);
nothing sleeps to synchronise. torchrun is started through a two-line shim
that arms PR_SET_PDEATHSIG, so a killed pytest takes the job down with it.
About 75 s on 2 busy cores, most of it three launches (imports,
rendezvous, DeepSpeed init: about 18 s each).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ds_worker
import grpc
import psutil
import pytest
import torch
import yaml

from alignd.config import ConfigError, LearnerConfig
from alignd.runtime.client import wait_for_serving
from alignd.services.learner import checkpoint, ranks
from alignd.v1 import learner_pb2, learner_pb2_grpc, model_pb2, model_pb2_grpc

from conftest import assert_invalid, secure_channel, with_test_auth
from helpers import free_port

LOSS_TOL = 1e-4
WEIGHT_TOL = 1e-4
COMPARED = ("policy_loss", "value_loss", "approx_kl", "clip_fraction", "entropy", "ratio_mean", "value_clip_fraction")
STARTUP_TIMEOUT_S = 180.0
# torchrun with PR_SET_PDEATHSIG armed (inherited across exec): it goes, and stops its ranks, when pytest goes.
SHIM = (
    "import ctypes, os, signal, sys; ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM); "
    "os.execv(sys.executable, [sys.executable, '-m', 'torch.distributed.run', *sys.argv[1:]])"
)


def learner_cfg(models: Path, ckpt: Path, engine: str, timeout_s: float = 60.0) -> dict:
    """ds_worker's learner (7 rows in 2 minibatches: uneven shares on 2 ranks) as a served config."""
    return {
        "model": {"path": str(models / "policy")},
        "value_model": {"path": str(models / "value")},
        "ppo": {"minibatches": 2, "epochs": 1, "max_grad_norm": 0.5, "score_position": "eos_plus_one", "kl_coef": 0.05},
        "optimizer": {"lr": 3e-3, "value_lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.01},
        "engine": {"kind": engine, "zero_stage": 2, "collective_timeout_seconds": timeout_s},
        "seed": 7,
        "torch_threads": 1,
        "checkpoint_dir": str(ckpt),
        "paths": {"roots": [str(models)]},  # ResetPolicy reads the initial weights again
    }


def experiences(step: int, vocab: int = 300) -> list[learner_pb2.Experience]:
    """The fixed batch of `step` (ds_worker.make_batch's draws) as TrainStep experiences."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(7):
        p = int(torch.randint(2, 7, (), generator=g))
        r = int(torch.randint(1, 10, (), generator=g))
        out.append(
            learner_pb2.Experience(
                prompt_token_ids=torch.randint(3, vocab, (p,), generator=g).tolist(),
                response_token_ids=torch.randint(3, vocab, (r,), generator=g).tolist(),
                reference_logprobs=(-torch.rand(r, generator=g) * 6 - 1).tolist(),
                rollout_logprobs=(-torch.rand(r, generator=g) * 6 - 1).tolist(),
                score=float(torch.randn((), generator=g)),
            )
        )
    return out


def request(step: int) -> learner_pb2.TrainStepRequest:
    return learner_pb2.TrainStepRequest(step=step, experiences=experiences(step))


@dataclass
class Job:
    """One torchrun agent and its ranks."""

    proc: subprocess.Popen
    log_path: Path
    endpoint: Path | None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ranks(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill9(self) -> None:
        """The pod dies: SIGKILL to every rank and to torchrun."""
        for p in self.ranks():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.kill()
        self.proc.wait()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(f"torchrun still running after {timeout:.0f} s:\n{self.log()[-4000:]}") from None


def alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def launch(cfg: dict, work: Path, name: str, port: int, nproc: int = 2, nnodes: int = 1, node_rank: int = 0) -> Job:
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(with_test_auth("learner", cfg)[0]))
    endpoint = work / f"{name}.endpoint.json"
    endpoint.unlink(missing_ok=True)
    log_path = work / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k != "ALIGND_PARENT_PID"}  # its parent is torchrun, not us
    from alignd.models.tiny import default_cache_dir

    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TORCH_EXTENSIONS_DIR=str(default_cache_dir() / "torch_extensions"),
    )
    cmd = [
        sys.executable,
        "-c",
        SHIM,
        "--nnodes",
        str(nnodes),
        "--node-rank",
        str(node_rank),
        "--nproc_per_node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "alignd.cli",
        "serve",
        "learner",
        "--config",
        str(cfg_path),
        "--run-dir",
        str(work / name),
        "--endpoint-file",
        str(endpoint),
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return Job(proc, log_path, endpoint)


def connect(job: Job) -> grpc.Channel:
    """Waits for rank 0's endpoint file, then for SERVING (the followers are loaded by then: rank 0's load ends
    with a collective over every rank)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not job.endpoint.exists():
        try:
            job.proc.wait(timeout=0.05)
            raise AssertionError(f"torchrun exited with {job.proc.returncode}:\n{job.log()[-6000:]}")
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() > deadline:
            job.kill9()
            raise AssertionError(f"rank 0 did not bind in time:\n{job.log()[-6000:]}")
    channel = secure_channel(json.loads(job.endpoint.read_text())["address"])
    try:
        wait_for_serving(channel, timeout=STARTUP_TIMEOUT_S)
    except BaseException:
        job.kill9()
        print(job.log()[-6000:], file=sys.stderr)
        raise
    return channel


def events(job: Job, event: str) -> list[dict]:
    out = []
    for line in job.log().splitlines():
        if line.startswith("{") and f'"event": "{event}"' in line:
            out.append(json.loads(line))
    return out


def assert_same_step(got: learner_pb2.TrainStepResponse, ref: learner_pb2.TrainStepResponse) -> float:
    """Same statistics within the tolerances; returns the largest loss difference."""
    assert got.step == ref.step and got.policy_version == ref.policy_version and not got.replayed
    for k in COMPARED:
        assert abs(getattr(got.stats, k) - getattr(ref.stats, k)) <= LOSS_TOL, (
            got.step,
            k,
            getattr(got.stats, k),
            getattr(ref.stats, k),
        )
    assert got.stats.grad_norm == pytest.approx(ref.stats.grad_norm, rel=1e-4), got.step
    assert got.stats.learning_rate == pytest.approx(ref.stats.learning_rate, rel=1e-6), got.step
    assert (
        (got.stats.updates_applied, got.stats.updates_skipped)
        == (ref.stats.updates_applied, ref.stats.updates_skipped)
        == (2, 0)
    )
    return max(abs(got.stats.policy_loss - ref.stats.policy_loss), abs(got.stats.value_loss - ref.stats.value_loss))


def assert_same_weights(got: dict, ref: dict) -> float:
    """Same tensors within WEIGHT_TOL; returns the largest difference."""
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name].float(), ref[name].float(), atol=WEIGHT_TOL, rtol=0, msg=name)
    return max(float((got[k].float() - ref[k].float()).abs().max()) for k in ref)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return ds_worker.build_models(tmp_path_factory.mktemp("mr_models"))


def reference_steps(models: Path, work: Path, steps: int):
    """A single-process learner (torch engine, this process) given the same requests: (responses, final weights)."""
    from alignd.services.learner.learner import Learner
    from alignd.services.learner.servicer import parse_batch

    learner = Learner(LearnerConfig.model_validate(learner_cfg(models, work / "ref-ckpt", "torch")), work)
    h = learner.handle
    out = [
        learner.train_step(s, parse_batch(request(s), h.vocab_size, h.max_context, pad_id=h.pad_token_id))
        for s in range(1, steps + 1)
    ]
    return out, {k: v.detach().clone() for k, v in learner.module.state_dict().items()}


@pytest.mark.slow
def test_two_ranks_train_like_one_resume_after_kill9_and_stop_on_sigterm(models, tmp_path):
    cfg = learner_cfg(models, tmp_path / "ckpt", "deepspeed")
    job = launch(cfg, tmp_path, "first", free_port())
    try:
        ref, ref_weights = reference_steps(models, tmp_path, 4)  # while the ranks start
        channel = connect(job)
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        # (a) the same steps as one process
        worst = max(assert_same_step(stub.TrainStep(request(s), timeout=120), ref[s - 1]) for s in (1, 2))
        # Rank 0 alone binds the gRPC and metrics ports; rank 1 follows (its lines precede rank 0's answers).
        assert [e["rank"] for e in events(job, "server_started")] == [0]
        assert [e["rank"] for e in events(job, "follower_ready")] == [1]
        # (c) a bad request is refused on rank 0; nothing reaches rank 1
        bad = request(3)
        del bad.experiences[4].reference_logprobs[-1]
        assert_invalid(lambda: stub.TrainStep(bad, timeout=30), "experiences[4].reference_logprobs", "parallel")
        assert_invalid(lambda: stub.SaveCheckpoint(learner_pb2.SaveCheckpointRequest(tag="../x"), timeout=30), "tag")
        worst = max(worst, assert_same_step(stub.TrainStep(request(3), timeout=120), ref[2]))  # both ranks train it
        follower = [e for e in events(job, "command_applied") if e["rank"] == 1]
        assert [e["step"] for e in follower if e["command"] == "TrainStep"] == [1, 2, 3]
        assert not events(job, "command_failed") and not events(job, "ranks_diverged")

        # (b) one shard per rank
        saved = stub.SaveCheckpoint(learner_pb2.SaveCheckpointRequest(tag="before-kill"), timeout=120)
        path = Path(saved.path)
        assert saved.step == 3 and sorted(p.name for p in path.glob("engine-rank*.pt")) == [
            "engine-rank00000.pt",
            "engine-rank00001.pt",
        ]
        assert json.loads((tmp_path / "ckpt" / "latest").read_text()) == {
            "checkpoint": path.name,
            "step": 3,
            "world_size": 2,
        }
        shards = [torch.load(path / checkpoint.shard_name(r), weights_only=False) for r in (0, 1)]
        assert [s["rank"] for s in shards] == [0, 1] and all(s["engine"]["world_size"] == 2 for s in shards)
        parts = [s["engine"]["optimizer"]["single_partition_of_fp32_groups"] for s in shards]  # ZeRO: each its own half
        assert len(parts[0]) == len(parts[1]) and any(not torch.equal(a, b) for a, b in zip(*parts))
        before = torch.load(path / "module.pt", weights_only=False)
        channel.close()
        job.kill9()
    except BaseException:
        job.kill9()
        print(job.log()[-6000:], file=sys.stderr)
        raise

    job = launch(cfg, tmp_path, "restarted", free_port())
    try:
        channel = connect(job)
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        info = model_pb2_grpc.ModelServiceStub(channel).GetInfo(model_pb2.GetInfoRequest(), timeout=10).info
        assert info.weight_version == 3
        restored = events(job, "checkpoint_restored")
        assert sorted(e["rank"] for e in restored) == [0, 1] and {e["step"] for e in restored} == {3}
        again = stub.SaveCheckpoint(learner_pb2.SaveCheckpointRequest(tag="after-restart"), timeout=120)
        resumed = torch.load(Path(again.path) / "module.pt", weights_only=False)
        assert again.step == 3 and all(torch.equal(resumed[k], before[k]) for k in before)  # the same weights
        assert stub.TrainStep(request(3), timeout=60).replayed  # stored results survive too
        step4 = stub.TrainStep(request(4), timeout=120)  # both ranks' optimizer shards restored
        worst = max(worst, assert_same_step(step4, ref[3]))
        final = stub.SaveCheckpoint(learner_pb2.SaveCheckpointRequest(tag="final"), timeout=120)
        weight_diff = assert_same_weights(torch.load(Path(final.path) / "module.pt", weights_only=False), ref_weights)
        print(
            f"2 ranks (ZeRO-2) vs 1 process (torch): max loss difference {worst:.1e}, max weight difference "
            f"{weight_diff:.1e}"
        )

        # ResetPolicy to the initial weights: every rank rebuilds its engine; step 1 again equals the reference's.
        reset = stub.ResetPolicy(
            learner_pb2.ResetPolicyRequest(
                policy_dir=str(models / "policy"), value_model_dir=str(models / "value"), version=10
            ),
            timeout=120,
        )
        assert reset.version == 10 and not reset.replayed
        assert_invalid(
            lambda: stub.ResetPolicy(
                learner_pb2.ResetPolicyRequest(policy_dir=str(models / "missing"), version=20), timeout=30
            ),
            "missing",
            "not a directory",
        )
        again1 = stub.TrainStep(request(1), timeout=120)
        assert again1.policy_version == 11
        again1.policy_version = ref[0].policy_version
        assert_same_step(again1, ref[0])
        follower = [e["command"] for e in events(job, "command_applied") if e["rank"] == 1]
        assert follower[-3:] == ["SaveCheckpoint", "ResetPolicy", "TrainStep"]
        channel.close()

        # SIGTERM to torchrun: rank 0 drains, broadcasts Shutdown, both ranks leave.
        rank_procs = job.ranks()
        assert len([p for p in rank_procs if "alignd.cli" in " ".join(p.cmdline())]) == 2
        job.proc.send_signal(signal.SIGTERM)
        job.wait(60)
        assert not [p for p in rank_procs if alive(p)]
        assert [e["rank"] for e in events(job, "ranks_stopped")] == [0]
        assert [e["step"] for e in events(job, "follower_stopped")] == [1]
        assert not events(job, "rank_group_failed") and not events(job, "command_failed")
    except BaseException:
        job.kill9()
        print(job.log()[-6000:], file=sys.stderr)
        raise


@pytest.mark.slow
def test_a_dead_follower_fails_rank0_instead_of_hanging(models, tmp_path):
    """Two agents of one process each (two learner pods): node 1 is killed while rank 0 is idle."""
    port = free_port()
    cfg = learner_cfg(models, tmp_path / "ckpt", "deepspeed", timeout_s=20.0)  # heartbeats every 5 s
    lead = launch(cfg, tmp_path, "node0", port, nproc=1, nnodes=2, node_rank=0)
    other = launch(cfg, tmp_path, "node1", port, nproc=1, nnodes=2, node_rank=1)
    try:
        channel = connect(lead)
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        # The other pod's first process serves health alone (its probes), SERVING once it follows rank 0.
        follower = json.loads(other.endpoint.read_text())
        assert follower["rank"] == 1
        with secure_channel(follower["address"]) as fch:
            wait_for_serving(fch, timeout=STARTUP_TIMEOUT_S)
            with pytest.raises(grpc.RpcError) as info:
                learner_pb2_grpc.LearnerServiceStub(fch).TrainStep(request(1), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert stub.TrainStep(request(1), timeout=120).stats.updates_applied == 2
        channel.close()
        other.kill9()
        t0 = time.monotonic()
        rc = lead.wait(60)
        waited = time.monotonic() - t0
        assert rc != 0
        failed = events(lead, "rank_group_failed")
        assert failed and failed[0]["rank"] == 0 and failed[0]["exit_code"] == 1, lead.log()[-3000:]
        print(f"rank 0 failed {waited:.1f} s after its follower died")
    except BaseException:
        for j in (lead, other):
            j.kill9()
        print(lead.log()[-6000:], file=sys.stderr)
        raise


# ---------------------------------------------------------------------------
# Without processes
# ---------------------------------------------------------------------------


def test_launch_reads_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ranks.Launch.from_env() == ranks.Launch(3, 8, 1) and ranks.Launch.from_env().follower
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(ConfigError, match="RANK 8"):
        ranks.Launch.from_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k)
    assert ranks.Launch.from_env() == ranks.Launch(0, 1, 0)


def test_world_size_above_one_needs_deepspeed_stage_0_to_2_and_one_gpu_per_rank(models, tmp_path):
    two = ranks.Launch(0, 2, 0)

    def cfg(**engine):
        raw = learner_cfg(models, tmp_path, "deepspeed")
        raw["engine"].update(engine)
        return LearnerConfig.model_validate(raw)

    ranks.check_config(cfg(), two)
    ranks.check_config(cfg(kind="torch"), ranks.Launch())  # one process: anything goes
    with pytest.raises(ConfigError, match="engine.kind: 'torch'.*needs engine.kind: deepspeed"):
        ranks.check_config(cfg(kind="torch"), two)
    with pytest.raises(ConfigError, match="engine.zero_stage: 3"):
        ranks.check_config(cfg(zero_stage=3), two)
    on_gpu0 = cfg()
    on_gpu0.model.device = "cuda:0"
    with pytest.raises(ConfigError, match="model.device: 'cuda:0'"):
        ranks.check_config(on_gpu0, two)


class _RankZeroOfTwo:
    """checkpoint.save's view of rank 0 of 2; rank 1 writes its shard at the first barrier, as it would then."""

    rank, world_size = 0, 2

    def __init__(self, root: Path, peer_writes: bool = True) -> None:
        self.root, self.peer_writes, self.barriers = root, peer_writes, 0

    def barrier(self) -> None:
        self.barriers += 1
        if self.barriers == 1 and self.peer_writes:
            (tmp,) = self.root.glob(".tmp-*")
            torch.save({"rank": 1, "engine": {"x": 1}, "rng": {}}, tmp / checkpoint.shard_name(1))


def test_checkpoint_restores_only_into_its_world_size(tmp_path):
    """Shards per rank; another world size, or a missing shard, is a clear error."""
    from transformers import GPT2Config, GPT2LMHeadModel

    policy = GPT2LMHeadModel(
        GPT2Config(n_embd=8, n_layer=1, n_head=1, vocab_size=16, n_positions=8, bos_token_id=0, eos_token_id=0)
    )
    root = tmp_path / "ckpt"
    path = checkpoint.save(
        root,
        5,
        module_state={"w": torch.ones(1)},
        trainer_state={"step": 5},
        rank_state={"rank": 0, "engine": {"x": 0}, "rng": {}},
        policy=policy,
        ranks=_RankZeroOfTwo(root),
    )
    assert json.loads((root / "latest").read_text()) == {"checkpoint": path.name, "step": 5, "world_size": 2}
    _module, shared, mine = checkpoint.load(path, 1, 2)
    assert mine["engine"] == {"x": 1} and shared["world_size"] == 2 and shared["step"] == 5
    assert checkpoint.load(path, 0, 2)[2]["engine"] == {"x": 0}
    with pytest.raises(checkpoint.CheckpointMismatch, match="world size 2, this one has 1: restart with 2 processes"):
        checkpoint.load(path, 0, 1)
    (path / checkpoint.shard_name(1)).unlink()
    with pytest.raises(checkpoint.CheckpointMismatch, match="no engine shard for rank 1"):
        checkpoint.load(path, 1, 2)

    # Rank 0 refuses to publish a checkpoint whose shards it cannot see (checkpoint_dir not shared).
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"ranks \[1\] are not visible from rank 0"):
        checkpoint.save(
            root,
            6,
            module_state={"w": torch.ones(1)},
            trainer_state={"step": 6},
            rank_state={"rank": 0, "engine": {}, "rng": {}},
            policy=policy,
            ranks=_RankZeroOfTwo(root, peer_writes=False),
        )
    assert json.loads((root / "latest").read_text())["checkpoint"] == path.name  # still the complete one


def test_single_process_checkpoint_of_the_old_layout_still_restores(tmp_path):
    """Before the shards, trainer.pt held the engine state and the RNGs (one process)."""
    path = tmp_path / "step-00000002"
    path.mkdir()
    torch.save({"w": torch.zeros(1)}, path / "module.pt")
    torch.save({"engine": {"e": 1}, "rng": {"r": 2}, "step": 2}, path / "trainer.pt")
    _module, shared, mine = checkpoint.load(path)
    assert mine == {"engine": {"e": 1}, "rng": {"r": 2}} and shared == {"step": 2}
    with pytest.raises(checkpoint.CheckpointMismatch, match="world size 1, this one has 2"):
        checkpoint.load(path, 0, 2)
