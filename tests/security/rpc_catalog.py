"""The RPCs of every role, from the alignd.v1 descriptors (shared by the security tests)."""

from __future__ import annotations

from pathlib import Path

import yaml
from google.protobuf import descriptor_pool

from alignd.v1 import common_pb2, coordinator_pb2, learner_pb2, model_pb2, policy_pb2, reference_pb2, reward_pb2

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [5, 6, 7, 8]
SERVICES = {
    "policy": ["alignd.v1.PolicyService", "alignd.v1.ModelService"],
    "reward": ["alignd.v1.RewardService", "alignd.v1.ModelService"],
    "reference": ["alignd.v1.ReferenceService", "alignd.v1.ModelService"],
    "learner": ["alignd.v1.LearnerService", "alignd.v1.ModelService"],
    "coordinator": ["alignd.v1.CoordinatorService"],
}


def all_methods() -> list[str]:
    """Every method of every alignd.v1 service, as "/package.Service/Method"."""
    pool = descriptor_pool.Default()
    out = []
    for name in ("common", "model", "policy", "reward", "reference", "learner", "coordinator"):
        fd = pool.FindFileByName(f"alignd/v1/{name}.proto")
        for svc in fd.services_by_name.values():
            out.extend(f"/{svc.full_name}/{m.name}" for m in svc.methods)
    return out


def base_requests(root: Path, tiny_models, *, stream_state: bool = False) -> dict[str, object]:
    """A valid request per method, one that changes state (or reads data) when it is served: with stream_state,
    UpdateWeights is a whole stream of other weights (a callable giving the messages); else its header alone."""
    from alignd.models.weights import encode_stream

    if stream_state:
        from transformers import AutoModelForCausalLM

        other = AutoModelForCausalLM.from_pretrained(tiny_models["lm_other"])
        state = {k: v.detach().clone() for k, v in other.state_dict().items()}
        update = lambda: encode_stream(state, 99)  # noqa: E731
    else:
        update = model_pb2.UpdateWeightsRequest(
            header=model_pb2.WeightsHeader(version=99, num_tensors=1, total_bytes=4)
        )
    ppo_run = yaml.safe_dump(
        {"steps": 1, "prompts_per_step": 2, "prompts": {"path": str(ROOT / "configs" / "tiny_prompts.txt")}}
    )
    return {
        "Generate": policy_pb2.GenerateRequest(
            prompts=[policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=PROMPT))],
            sampling=policy_pb2.SamplingParams(max_new_tokens=2),
        ),
        "Score": reward_pb2.ScoreRequest(
            items=[reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=PROMPT, response_token_ids=[9]))]
        ),
        "LogProbs": reference_pb2.LogProbsRequest(
            items=[reference_pb2.LogProbsItem(prompt_token_ids=PROMPT, response_token_ids=[9])]
        ),
        "GetInfo": model_pb2.GetInfoRequest(),
        "UpdateWeights": update,
        "LoadWeights": model_pb2.LoadWeightsRequest(path=str(tiny_models["lm_other"]), version=99),
        "CommitWeights": model_pb2.CommitWeightsRequest(version=99),
        "JoinWeightGroup": model_pb2.JoinWeightGroupRequest(
            group="intruder",
            store_address="127.0.0.1:1",
            world_size=2,
            rank_offset=1,
            backend="gloo",
            timeout_seconds=1,
        ),
        "ReceiveWeights": model_pb2.ReceiveWeightsRequest(group="intruder", version=99, sha256="0" * 64),
        "LeaveWeightGroup": model_pb2.LeaveWeightGroupRequest(group="intruder"),
        "TrainStep": learner_pb2.TrainStepRequest(step=1),
        "SaveCheckpoint": learner_pb2.SaveCheckpointRequest(tag="intruder"),
        "PushWeights": learner_pb2.PushWeightsRequest(),
        "ResetPolicy": learner_pb2.ResetPolicyRequest(policy_dir=str(tiny_models["lm_other"]), version=99),
        "TrainSFT": learner_pb2.TrainSFTRequest(
            job_id="intruder",
            demonstrations_path=str(ROOT / "configs" / "tiny_demos.jsonl"),
            output_dir=str(root / "learner" / "intruder-sft"),
        ),
        "TrainRewardModel": learner_pb2.TrainRewardModelRequest(
            job_id="intruder", output_dir=str(root / "learner" / "rm")
        ),
        "EvaluateTextLoss": learner_pb2.EvaluateTextLossRequest(
            text_path=str(ROOT / "configs" / "tiny_heldout_text.txt")
        ),
        "GetJobProgress": learner_pb2.GetJobProgressRequest(job_id="intruder"),
        "GetCoordinatorInfo": coordinator_pb2.GetCoordinatorInfoRequest(),
        "StartRun": coordinator_pb2.StartRunRequest(run_id="intruder", config_yaml=ppo_run),
        "GetRun": coordinator_pb2.GetRunRequest(run_id="intruder"),
        "StopRun": coordinator_pb2.StopRunRequest(run_id="intruder"),
        "ListRuns": coordinator_pb2.ListRunsRequest(),
        "GetRunFiles": coordinator_pb2.GetRunFilesRequest(run_id="intruder"),
        "LeaseComparisonTasks": coordinator_pb2.LeaseComparisonTasksRequest(run_id="intruder", labeler="x"),
        "SubmitRanking": coordinator_pb2.SubmitRankingRequest(
            run_id="intruder", task_id="t", labeler="x", ranking=[0, 1]
        ),
        "ReleaseComparisonTask": coordinator_pb2.ReleaseComparisonTaskRequest(
            run_id="intruder", task_id="t", labeler="x"
        ),
    }
