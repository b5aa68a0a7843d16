"""`alignd demo`: the local stack, one real call to every role, a summary.

Until the PPO pipeline lands this is the main job: it starts the embedded
default stack (tiny models built once into the cache), generates from the
policy, scores the samples with the reward model, gets their reference
log-probs, pushes new weights to the policy with UpdateWeights, and writes
`demo.json` in the run directory.
"""

from __future__ import annotations

import time
from pathlib import Path

from alignd.atomic import write_json_atomic
from alignd.config import StackConfig, load_config
from alignd.local_stack import ChildDied, LocalStack, default_stack_config, report_death
from alignd.runtime.client import make_channel
from alignd.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    reference_pb2,
    reference_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

PROMPTS = ["Write a short story about a robot", "Explain the moon to a child", "What is the capital of France?"]
TIMEOUT_S = 120.0


def run_demo(run_dir: Path, config: str | None = None, overrides: list[str] | None = None) -> int:
    cfg = load_config(StackConfig, config, overrides) if config else default_stack_config(overrides)
    t0 = time.perf_counter()
    try:
        stack = LocalStack(cfg, run_dir).__enter__()
    except ChildDied as err:
        report_death(err)
        return 1
    try:
        started = time.perf_counter() - t0
        svc = stack.describe()["services"]
        print(f"stack up in {started:.1f}s: {run_dir / 'stack.json'}")
        summary = _exercise(svc, stack.operator_credentials())
        summary["stack_start_seconds"] = started
        write_json_atomic(run_dir / "demo.json", summary)
        print(f"wrote {run_dir / 'demo.json'}")
    finally:
        stack.stop()
    return 0


def mean_logratios(reference, samples) -> list[float]:
    """Per sample, the mean over its tokens of log pi(token) - log pi_ref(token): a k1 KL estimate."""
    ref = reference.LogProbs(
        reference_pb2.LogProbsRequest(
            items=[
                reference_pb2.LogProbsItem(prompt_token_ids=s.prompt_token_ids, response_token_ids=s.token_ids)
                for s in samples
            ]
        ),
        timeout=TIMEOUT_S,
    )
    return [sum(a - b for a, b in zip(s.logprobs, r.logprobs)) / len(s.logprobs) for s, r in zip(samples, ref.results)]


def infos_path(channel) -> str:
    info = model_pb2_grpc.ModelServiceStub(channel).GetInfo(model_pb2.GetInfoRequest(), timeout=TIMEOUT_S).info
    return info.model_path


def _generate_and_score(policy, reward) -> tuple:
    """Two samples per prompt from the policy (with text), scored by the reward model; prints both results."""
    gen = policy.Generate(
        policy_pb2.GenerateRequest(
            prompts=[policy_pb2.Prompt(text=p) for p in PROMPTS],
            sampling=policy_pb2.SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, num_samples=2, seed=7),
            return_text=True,
        ),
        timeout=TIMEOUT_S,
    )
    print(
        f"policy     Generate: {len(gen.samples)} samples, batch {gen.batch_size}, {gen.generate_seconds * 1000:.0f} ms"
    )
    scored = reward.Score(
        reward_pb2.ScoreRequest(
            items=[
                reward_pb2.ScoreItem(
                    tokens=reward_pb2.TokenPair(prompt_token_ids=s.prompt_token_ids, response_token_ids=s.token_ids)
                )
                for s in gen.samples
            ]
        ),
        timeout=TIMEOUT_S,
    )
    print(f"reward     Score:    {', '.join(f'{x:+.3f}' for x in scored.scores)}")
    return gen, scored


def _model_infos(ch: dict) -> dict:
    """Each model role's GetInfo (architecture, weight version, parameters), printed one line per role."""
    infos = {}
    for role in ("policy", "reward", "reference", "learner"):
        info = model_pb2_grpc.ModelServiceStub(ch[role]).GetInfo(model_pb2.GetInfoRequest(), timeout=TIMEOUT_S).info
        infos[role] = {
            "architecture": info.architecture,
            "weight_version": info.weight_version,
            "parameters": info.num_parameters,
        }
        print(
            f"{role:10s} GetInfo:  {info.architecture}, {info.num_parameters:,} parameters, version "
            f"{info.weight_version}"
        )
    return infos


def _push_perturbed_weights(policy_channel):
    """Weight sync: stream perturbed policy weights (as the learner will after a PPO step) as version 1."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignd.models.weights import push_weights

    model = AutoModelForCausalLM.from_pretrained(infos_path(policy_channel))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pushed = push_weights(policy_channel, model.state_dict(), version=1)
    print(
        f"policy     UpdateWeights: version {pushed.version}, {pushed.received_bytes / 1e6:.2f} MB "
        f"in {pushed.duration_seconds * 1000:.0f} ms"
    )
    return pushed


def _logratios_after_update(policy, reference) -> list[float]:
    """Sample again after the push: the policy now differs from the reference (log-ratio > 0)."""
    gen2 = policy.Generate(
        policy_pb2.GenerateRequest(
            prompts=[policy_pb2.Prompt(text=p) for p in PROMPTS],
            sampling=policy_pb2.SamplingParams(temperature=1.0, max_new_tokens=16, num_samples=2, seed=7),
        ),
        timeout=TIMEOUT_S,
    )
    kl2 = mean_logratios(reference, gen2.samples)
    print(
        f"policy     Generate at version {gen2.samples[0].weight_version}: mean per-token log-ratio "
        f"policy/reference {sum(kl2) / len(kl2):+.3f} (a KL estimate; > 0 once the policy moved)"
    )
    return kl2


def _print_coordinator(coordinator_channel) -> None:
    """The coordinator's GetCoordinatorInfo: which policy replicas and learner it drives."""
    coord = coordinator_pb2_grpc.CoordinatorServiceStub(coordinator_channel).GetCoordinatorInfo(
        coordinator_pb2.GetCoordinatorInfoRequest(), timeout=TIMEOUT_S
    )
    print(
        f"coordinator GetCoordinatorInfo: drives policy {list(coord.policy_addresses)}, learner {coord.learner_address}"
    )


def _exercise(svc: dict, credentials) -> dict:
    """One call to every role, in order, printing each result; the summary that goes into demo.json."""
    ch = {role: make_channel(s["address"], credentials=credentials) for role, s in svc.items()}
    policy = policy_pb2_grpc.PolicyServiceStub(ch["policy"])
    gen, scored = _generate_and_score(policy, reward_pb2_grpc.RewardServiceStub(ch["reward"]))
    reference = reference_pb2_grpc.ReferenceServiceStub(ch["reference"])
    # The reference model starts as the policy: KL(policy || reference) per token is ~0.
    kl = mean_logratios(reference, gen.samples)
    print(f"reference  LogProbs: mean per-token log-ratio policy/reference {sum(kl) / len(kl):+.2e}")
    infos = _model_infos(ch)
    pushed = _push_perturbed_weights(ch["policy"])
    kl2 = _logratios_after_update(policy, reference)
    _print_coordinator(ch["coordinator"])
    for c in ch.values():
        c.close()
    return {
        "samples": [
            {"prompt": PROMPTS[s.prompt_index], "response": s.text, "tokens": len(s.token_ids), "score": sc}
            for s, sc in zip(gen.samples, scored.scores)
        ],
        "mean_logratio_policy_reference": sum(kl) / len(kl),
        "mean_logratio_after_update": sum(kl2) / len(kl2),
        "weight_update": {
            "version": pushed.version,
            "bytes": pushed.received_bytes,
            "seconds": pushed.duration_seconds,
        },
        "models": infos,
    }
