"""No request reaches a path outside the roots a role was configured with, names code, or deletes what alignd did not
make (docs/security.md).

Each role runs as a real subprocess with `paths.roots` set to one directory. A sentinel directory beside it holds
files a request might try to read, overwrite or delete; requests name it through `..`, an absolute path and a
symlink inside the root. Every one is refused INVALID_ARGUMENT naming the field, with the same message whether the
target exists or not, and the sentinel is byte-for-byte unchanged afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
import yaml

from alignd.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    learner_pb2,
    learner_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)

from conftest import assert_invalid, start_role, stop_role
from helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
TOKENS = {  # the coordinator's own tokens for this module: two run owners, a labeler, an admin
    "admin": {"token": "admin-token-0123456789abcdef", "scopes": ["admin"]},
    "alice": {"token": "alice-token-0123456789abcdef", "scopes": ["runs"]},
    "bob": {"token": "bob-token-0123456789abcdefgh", "scopes": ["runs"]},
    "carol": {"token": "carol-token-0123456789abcdef", "scopes": ["label"]},
}


def tree(path: Path) -> dict:
    """Every file under `path` with its bytes (what a request must not change)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def area(tmp_path_factory, tiny_models):
    """root/ (the roles' paths.roots, with the data they may use) and outside/ (a sentinel), plus escapes."""
    base = tmp_path_factory.mktemp("paths")
    root, outside = base / "root", base / "outside"
    (root / "data").mkdir(parents=True)
    outside.mkdir()
    (root / "data" / "demos.jsonl").write_text((ROOT / "configs" / "tiny_demos.jsonl").read_text())
    (root / "data" / "prompts.txt").write_text((ROOT / "configs" / "tiny_prompts.txt").read_text())
    (outside / "secret.txt").write_text("do not read me\n")
    (outside / "demos.jsonl").write_text((ROOT / "configs" / "tiny_demos.jsonl").read_text())
    (outside / "victim").mkdir()
    (outside / "victim" / "precious.bin").write_bytes(os.urandom(64))
    (root / "link-out").symlink_to(outside, target_is_directory=True)  # a symlink inside the root, pointing out
    (root / "foreign").mkdir()  # inside the root, but not made by alignd
    (root / "foreign" / "notes.txt").write_text("mine\n")
    return base, root, outside


def escapes(root: Path, outside: Path, name: str) -> dict[str, str]:
    return {
        "dot-dot": f"{root}/data/../../outside/{name}",
        "absolute": str(outside / name),
        "symlink": str(root / "link-out" / name),
    }


@pytest.fixture(scope="module")
def learner(area, tiny_models):
    base, root, _ = area
    cfg = {
        "model": {"path": str(tiny_models["lm"])},
        "value_head_on_policy": True,
        "torch_threads": 1,
        "checkpoint_every_steps": 0,
        "paths": {"roots": [str(root)]},
    }
    server = start_role("learner", cfg, base / "learner-run")
    yield server
    assert stop_role(server) == 0, server.log()[-2000:]


def test_learner_paths_stay_under_the_roots(learner, area):
    _, root, outside = area
    before = tree(outside)
    stub = learner_pb2_grpc.LearnerServiceStub(learner.channel)
    demos = str(root / "data" / "demos.jsonl")
    for how, target in escapes(root, outside, "victim").items():
        assert_invalid(
            lambda: stub.TrainSFT(
                learner_pb2.TrainSFTRequest(job_id=f"sft-{how}", demonstrations_path=demos, output_dir=target),
                timeout=60,
            ),
            "output_dir",
            "outside",
        )
    for how, target in escapes(root, outside, "demos.jsonl").items():
        assert_invalid(
            lambda: stub.TrainSFT(
                learner_pb2.TrainSFTRequest(
                    job_id=f"sft-in-{how}", demonstrations_path=target, output_dir=str(root / "out")
                ),
                timeout=60,
            ),
            "demonstrations_path",
            "outside",
        )
    for _how, target in escapes(root, outside, "secret.txt").items():
        err = assert_invalid(
            lambda: stub.EvaluateTextLoss(learner_pb2.EvaluateTextLossRequest(text_path=target), timeout=60),
            "text_path",
            "outside",
        )
        # The same answer for a file that does not exist: a caller cannot probe the filesystem outside the roots.
        missing = target.replace("secret.txt", "no-such-file.txt")
        err2 = assert_invalid(
            lambda: stub.EvaluateTextLoss(learner_pb2.EvaluateTextLossRequest(text_path=missing), timeout=60),
            "text_path",
        )
        assert err.details() == err2.details()
    for how, target in escapes(root, outside, "victim").items():
        assert_invalid(
            lambda: stub.ResetPolicy(learner_pb2.ResetPolicyRequest(policy_dir=target, version=5), timeout=60),
            "policy_dir",
            "outside",
        )
        assert_invalid(
            lambda: stub.TrainRewardModel(
                learner_pb2.TrainRewardModelRequest(
                    job_id=f"rm-{how}",
                    init_model_dir=str(root),
                    comparisons_path=str(root / "data" / "demos.jsonl"),
                    output_dir=target,
                ),
                timeout=60,
            ),
            "output_dir",
            "outside",
        )
    assert tree(outside) == before
    assert not (root / "out").exists()


def test_a_job_never_replaces_a_directory_alignd_did_not_make(learner, area):
    _, root, _ = area
    stub = learner_pb2_grpc.LearnerServiceStub(learner.channel)

    def train_sft(job_id: str, output_dir: Path, timeout: float):
        """One epoch of SFT on the area's demonstrations, published to output_dir."""
        request = learner_pb2.TrainSFTRequest(
            job_id=job_id,
            demonstrations_path=str(root / "data" / "demos.jsonl"),
            output_dir=str(output_dir),
            config_yaml="epochs: 1",
        )
        return stub.TrainSFT(request, timeout=timeout)

    before = tree(root / "foreign")
    assert_invalid(lambda: train_sft("sft-foreign", root / "foreign", 120), "output_dir", "not made by an alignd job")
    assert tree(root / "foreign") == before
    # A directory alignd made is the job's to replace: a first job publishes, a second job (another id) replaces it.
    out = root / "sft-out"
    first = train_sft("sft-1", out, 300)
    assert (
        Path(first.model_dir) == out.resolve() and (out / "config.json").exists() and (out / ".alignd-owned").exists()
    )
    second = train_sft("sft-2", out, 300)
    assert not second.replayed and (out / "config.json").exists()
    assert not list(root.glob(".tmp-*"))  # no working directory left behind


@pytest.fixture(scope="module")
def policy(area, tiny_models):
    base, root, _ = area
    cfg = {"model": {"path": str(tiny_models["lm"])}, "torch_threads": 1, "paths": {"roots": [str(root)]}}
    server = start_role("policy", cfg, base / "policy-run")
    yield server
    assert stop_role(server) == 0


def test_load_weights_reads_under_the_roots_only(policy, area, tiny_models):
    import shutil

    _, root, outside = area
    shutil.copytree(tiny_models["lm_other"], outside / "weights")
    stub = model_pb2_grpc.ModelServiceStub(policy.channel)
    v = stub.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info.weight_version
    for _how, target in escapes(root, outside, "weights").items():
        assert_invalid(
            lambda: stub.LoadWeights(model_pb2.LoadWeightsRequest(path=target, version=v + 1), timeout=60),
            "path",
            "outside",
        )
    assert stub.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info.weight_version == v
    shutil.copytree(tiny_models["lm_other"], root / "weights")  # the same weights under the root: loaded
    stub.LoadWeights(model_pb2.LoadWeightsRequest(path=str(root / "weights"), version=v + 1), timeout=60)
    assert stub.GetInfo(model_pb2.GetInfoRequest(), timeout=10).info.weight_version == v + 1


@pytest.fixture(scope="module")
def coordinator(area, tmp_path_factory):
    base, root, _ = area
    tokens = base / "coordinator-tokens.yaml"
    tokens.write_text(yaml.safe_dump(TOKENS))
    cfg = {
        "paths": {"roots": [str(root)]},
        "server": {"auth": {"tokens_file": str(tokens)}},
        "policy_addresses": ["127.0.0.1:1"],
        "reward_addresses": ["127.0.0.1:1"],
        "reference_addresses": ["127.0.0.1:1"],
        "learner_address": "127.0.0.1:1",
        "recovery_timeout_seconds": 1,
        "judges": {"vowels_too": {"function": "alignd.judges:char_fraction", "args": {"chars": "aeiou"}}},
    }
    server = start_role("coordinator", cfg, base / "coordinator-run")
    yield server
    assert stop_role(server) == 0


def as_(name: str) -> tuple:
    return (("authorization", f"Bearer {TOKENS[name]['token']}"),)


def pipeline_yaml(root: Path, **over) -> str:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny_pipeline.yaml").read_text())["pipeline"]
    cfg["demonstrations"] = str(root / "data" / "demos.jsonl")
    cfg["ppo"]["prompts"]["path"] = str(root / "data" / "prompts.txt")
    cfg["evaluation"]["prompts"]["path"] = str(root / "data" / "prompts.txt")
    cfg["evaluation"]["heldout_text"] = None
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return yaml.safe_dump(cfg)


def test_runs_name_judges_not_code_and_stay_under_the_roots(coordinator, area):
    _, root, outside = area
    before = tree(outside)
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(coordinator.channel)

    def start(config_yaml: str, run_dir: str = "", run_id: str = "r"):
        return stub.StartRun(
            coordinator_pb2.StartRunRequest(run_id=run_id, config_yaml=config_yaml, run_dir=run_dir),
            metadata=as_("alice"),
            timeout=60,
        )

    for name in ("os:system", "alignd.judges:char_fraction", "subprocess:run", "no_such_judge"):
        err = assert_invalid(
            lambda: start(pipeline_yaml(root, **{"gold.name": name})),
            "config_yaml",
            "gold.name",
            "unknown judge",
            "coordinator.judges",
        )
        assert "vowels_too" in err.details()  # the registered names are listed
    for _how, target in escapes(root, outside, "victim").items():
        assert_invalid(lambda: start(pipeline_yaml(root), run_dir=target), "run_dir", "outside")
    for _how, target in escapes(root, outside, "demos.jsonl").items():
        assert_invalid(
            lambda: start(pipeline_yaml(root, demonstrations=target)), "config_yaml", "demonstrations", "outside"
        )
    assert_invalid(lambda: start(pipeline_yaml(root), run_dir=str(root / "foreign")), "run_dir", "not made by alignd")
    assert tree(outside) == before
    runs = stub.ListRuns(coordinator_pb2.ListRunsRequest(), metadata=as_("alice"), timeout=30)
    assert list(runs.runs) == []


def test_only_the_owner_or_an_admin_stops_a_run_and_labelers_label_as_themselves(coordinator, area):
    _, root, _ = area
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(coordinator.channel)
    ppo = yaml.safe_dump({"steps": 1, "prompts_per_step": 2, "prompts": {"path": str(root / "data" / "prompts.txt")}})
    # A registered judge works by its name; the run itself (roles unreachable here) is not what this checks.
    run = stub.StartRun(
        coordinator_pb2.StartRunRequest(run_id="owned", config_yaml=ppo), metadata=as_("alice"), timeout=60
    ).run
    assert run.run_id == "owned"
    with pytest.raises(grpc.RpcError) as err:
        stub.StopRun(coordinator_pb2.StopRunRequest(run_id="owned"), metadata=as_("bob"), timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'alice'" in err.value.details()
    stub.StopRun(coordinator_pb2.StopRunRequest(run_id="owned"), metadata=as_("alice"), timeout=30)
    stub.StopRun(coordinator_pb2.StopRunRequest(run_id="owned"), metadata=as_("admin"), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitRanking(
            coordinator_pb2.SubmitRankingRequest(run_id="owned", task_id="t", labeler="alice", ranking=[0, 1]),
            metadata=as_("carol"),
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and err.value.details().startswith("labeler:")
    with pytest.raises(grpc.RpcError) as err:  # as herself: on to the run's state (no round open)
        stub.SubmitRanking(
            coordinator_pb2.SubmitRankingRequest(run_id="owned", task_id="t", labeler="carol", ranking=[0, 1]),
            metadata=as_("carol"),
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_registered_judge_is_accepted_by_name(coordinator, area):
    _, root, _ = area
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(coordinator.channel)
    ended = (coordinator_pb2.RUN_STATE_FAILED, coordinator_pb2.RUN_STATE_STOPPED, coordinator_pb2.RUN_STATE_SUCCEEDED)
    wait_until(
        "earlier runs to end",
        lambda: all(
            r.state in ended
            for r in stub.ListRuns(coordinator_pb2.ListRunsRequest(), metadata=as_("admin"), timeout=30).runs
        ),
        timeout=60,
    )
    run = stub.StartRun(
        coordinator_pb2.StartRunRequest(
            run_id="judged",
            config_yaml=pipeline_yaml(root, **{"gold.name": "vowels_too", "gold.args": {}}),
            run_dir=str(root / "runs" / "judged"),
        ),
        metadata=as_("admin"),
        timeout=60,
    ).run
    assert run.run_id == "judged" and (root / "runs" / "judged" / ".alignd-owned").exists()
    stub.StopRun(coordinator_pb2.StopRunRequest(run_id="judged"), metadata=as_("admin"), timeout=30)
