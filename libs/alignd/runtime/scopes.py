"""Which credential scope each RPC needs: the one table the auth interceptor enforces (docs/security.md).

A token carries a set of scopes (its entry in the tokens file); a call is
allowed when the token has the scope of the method, or `admin`, which
grants every scope. `ANY` methods need an authenticated caller of any
scope (what a replica serves, reflection); `PUBLIC` methods need no
credential at all (the gRPC health checks Kubernetes probes send). A method
missing from the table needs `admin`: an RPC added to a proto without an
entry here is closed, not open (tests/security checks that every method of
every alignd.v1 service has an entry).

The scopes, by what they let a caller do:

  score     RewardService.Score, the reward role's HTTP /get_reward
  generate  PolicyService.Generate
  logprobs  ReferenceService.LogProbs
  label     lease, submit and release comparison tasks (human labelers)
  runs      start, watch, list and stop runs on the coordinator, and fetch their reports
  train     learner steps and jobs (TrainStep, TrainSFT, TrainRewardModel, ...)
  weights   change what a replica serves (UpdateWeights, LoadWeights, CommitWeights, PushWeights)
  metrics   scrape /metrics where the role requires a credential for it
  admin     everything, and paths in GetInfo
"""

from __future__ import annotations

SCORE, GENERATE, LOGPROBS, LABEL, RUNS, TRAIN, WEIGHTS, METRICS, ADMIN = (
    "score",
    "generate",
    "logprobs",
    "label",
    "runs",
    "train",
    "weights",
    "metrics",
    "admin",
)
SCOPES = (SCORE, GENERATE, LOGPROBS, LABEL, RUNS, TRAIN, WEIGHTS, METRICS, ADMIN)
ANY = "any"  # any authenticated caller
PUBLIC = "public"  # no credential

HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
REFLECTION_METHODS = (
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
)

METHOD_SCOPES: dict[str, str] = {
    **dict.fromkeys(HEALTH_METHODS, PUBLIC),
    **dict.fromkeys(REFLECTION_METHODS, ANY),
    "/alignd.v1.RewardService/Score": SCORE,
    "/alignd.v1.PolicyService/Generate": GENERATE,
    "/alignd.v1.ReferenceService/LogProbs": LOGPROBS,
    "/alignd.v1.ModelService/GetInfo": ANY,
    "/alignd.v1.ModelService/UpdateWeights": WEIGHTS,
    "/alignd.v1.ModelService/LoadWeights": WEIGHTS,
    "/alignd.v1.ModelService/CommitWeights": WEIGHTS,
    "/alignd.v1.ModelService/JoinWeightGroup": WEIGHTS,
    "/alignd.v1.ModelService/ReceiveWeights": WEIGHTS,
    "/alignd.v1.ModelService/LeaveWeightGroup": WEIGHTS,
    "/alignd.v1.LearnerService/TrainStep": TRAIN,
    "/alignd.v1.LearnerService/SaveCheckpoint": TRAIN,
    "/alignd.v1.LearnerService/ResetPolicy": TRAIN,
    "/alignd.v1.LearnerService/TrainSFT": TRAIN,
    "/alignd.v1.LearnerService/TrainRewardModel": TRAIN,
    "/alignd.v1.LearnerService/EvaluateTextLoss": TRAIN,
    "/alignd.v1.LearnerService/GetJobProgress": TRAIN,
    "/alignd.v1.LearnerService/PushWeights": WEIGHTS,
    "/alignd.v1.CoordinatorService/GetCoordinatorInfo": ANY,
    "/alignd.v1.CoordinatorService/StartRun": RUNS,
    "/alignd.v1.CoordinatorService/GetRun": RUNS,
    "/alignd.v1.CoordinatorService/StopRun": RUNS,
    "/alignd.v1.CoordinatorService/ListRuns": RUNS,
    "/alignd.v1.CoordinatorService/GetRunFiles": RUNS,
    "/alignd.v1.CoordinatorService/LeaseComparisonTasks": LABEL,
    "/alignd.v1.CoordinatorService/SubmitRanking": LABEL,
    "/alignd.v1.CoordinatorService/ReleaseComparisonTask": LABEL,
}

# What alignd's own callers need, and what the local stack's generated tokens carry (alignd.runtime.tokens).
ROLE_CLIENT_SCOPES: dict[str, tuple[str, ...]] = {
    # Drives the run: rollouts, scores, reference log-probs, learner steps and jobs, weight pushes and loads.
    "coordinator": (GENERATE, SCORE, LOGPROBS, TRAIN, WEIGHTS),
    # Pushes new policy weights to the policy replicas.
    "learner": (WEIGHTS,),
}


def scope_of(method: str) -> str:
    """The scope `method` (a full gRPC method name, "/pkg.Service/Method") needs; admin when it is not listed."""
    return METHOD_SCOPES.get(method, ADMIN)


def check_scopes(scopes, where: str) -> frozenset[str]:
    """The scopes as a frozenset; ValueError naming `where` for one that does not exist."""
    out = set()
    for s in scopes:
        if s not in SCOPES:
            raise ValueError(f"{where}: unknown scope {s!r} (scopes: {', '.join(SCOPES)})")
        out.add(s)
    return frozenset(out)
