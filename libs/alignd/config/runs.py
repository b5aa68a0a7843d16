"""What a run does: a PPO run (prompts, steps, sampling) and the pipeline (SFT, labeling, RM rounds, PPO,
evaluation)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alignd.config.base import Strict, expand_path
from alignd.config.training import RMTrainConfig, SFTConfig


class SamplingConfig(Strict):
    """Rollout sampling (InstructGPT: temperature 1, no truncation)."""

    temperature: float = Field(1.0, ge=0, description="Softmax temperature; must equal the learner's ppo.temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k truncation; 0 = off.")
    max_new_tokens: int = Field(32, ge=1, description="Response length limit, in tokens.")
    stop_token_ids: list[int] = Field([], description="Extra stop tokens (EOS always stops unless ignore_eos).")
    ignore_eos: bool = Field(False, description="Keep sampling past EOS.")


class PromptsConfig(Strict):
    """Where prompts come from: a JSONL file with a text field, or a plain text file (one prompt per line)."""

    path: str = Field(
        description='JSONL ({"prompt": ...} per line) or .txt (one prompt per line); "~" and $VARS expanded; '
        "preset:FILE and cache:FILE name a file shipped with alignd or prepared into $ALIGND_CACHE (docs/pipeline.md)."
    )
    field: str = Field(
        "prompt", description="JSONL field holding the prompt: text, or a conversation (TRL's conversational format)."
    )
    system: str | None = Field(
        None,
        description="System message put before each prompt given as text: the policy renders [system, user] with "
        "its chat template (docs/chat.md); plain text without one.",
    )

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_path(v)


TRACKING_BACKENDS = ("tensorboard", "mlflow", "wandb")


class TrackingConfig(Strict):
    """Experiment tracking of a run (docs/operations.md "Tracking"): every step's metrics, each stage's results,
    the run's configuration and the report's figures. Written by the coordinator; where MLflow and W&B send
    them is the coordinator's configuration (coordinator.tracking), never a run request's."""

    backends: list[Literal[TRACKING_BACKENDS]] = Field(
        ["tensorboard"],
        description="tensorboard (event files in RUN_DIR/tensorboard), mlflow, wandb; [] = none.",
    )
    experiment: str = Field(
        "alignd",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$",
        description="MLflow experiment / W&B project name.",
    )

    @model_validator(mode="before")
    @classmethod
    def _list(cls, v):
        # `tracking: [tensorboard, mlflow]` is short for `tracking: {backends: [...]}`.
        return {"backends": v} if isinstance(v, list) else v

    @field_validator("backends")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class PPORunConfig(Strict):
    """A PPO run, as sent to CoordinatorService.StartRun (config_yaml)."""

    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="Experiment tracking: a list of backends (tensorboard, mlflow, wandb) or {backends, experiment}.",
    )

    steps: int = Field(20, ge=1, description="PPO iterations.")
    prompts_per_step: int = Field(
        16, ge=1, description="Prompts sampled per iteration (the paper: 512 episodes per batch)."
    )
    samples_per_prompt: int = Field(1, ge=1, description="Responses sampled per prompt.")
    prompts: PromptsConfig = Field(description="The prompt set (sampled without replacement, reshuffled each epoch).")
    sampling: SamplingConfig = Field(SamplingConfig(), description="Rollout sampling.")
    seed: int = Field(0, description="Seed of prompt order and sampling.")
    async_rollouts: bool = Field(
        False,
        description=(
            "Off (default, the paper): each step samples with the weights of the step before. On: the rollouts of "
            "the next steps are generated, scored and given reference log-probs while the learner trains, with "
            "weights at most max_staleness versions old; the learner corrects for the older policy "
            "(ppo.off_policy). Faster where roles have their own hardware; the staleness used is recorded "
            "per step."
        ),
    )
    max_staleness: int = Field(
        1,
        ge=1,
        le=8,
        description="Async rollouts: how many policy versions a step's samples may lag the weights trained on them.",
    )
    stage_weights: bool = Field(
        True,
        description=(
            "Async rollouts: when the learner's new weights are ready while the policy still generates the next "
            "step's samples, send them to the replicas' staging buffers at once (received and checked, not served); "
            "after the generation the push only applies them. Each replica holds one more copy of the policy in "
            "host memory from the staging to the end of that generation (until its next weight update, if the run "
            "stops in between); off: the whole transfer waits for the generation. Turned off for the rest of a run "
            "when the learner or a replica cannot stage (an older alignd)."
        ),
    )
    rollout_micro_batches: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Split each step's prompts into this many micro-batches, generated one after another; each one is "
            "scored and given reference log-probs as soon as it is generated, while the next one generates. "
            "Hides scoring behind generation where the roles have their own accelerators, at the cost of "
            "smaller generation batches; 1 (default): the whole step in one batch."
        ),
    )

    @model_validator(mode="after")
    def _micro_batches_fit(self) -> PPORunConfig:
        if self.rollout_micro_batches > self.prompts_per_step:
            raise ValueError(
                f"rollout_micro_batches ({self.rollout_micro_batches}) exceeds prompts_per_step "
                f"({self.prompts_per_step})"
            )
        return self


class JudgeConfig(Strict):
    """A text judge of a run: a function of (prompt, completion) -> score, by name."""

    name: str = Field(
        description='A built-in judge of alignd.judges (e.g. "char_fraction") or one registered in the coordinator\'s '
        "configuration (coordinator.judges); a run names judges, never code."
    )
    args: dict[str, Any] = Field({}, description="Keyword arguments passed to the judge.")


class LabelingConfig(Strict):
    """How comparisons are collected for reward-model training."""

    prompts_per_round: int = Field(32, ge=2, description="Prompts sampled per labeling round.")
    k: int = Field(4, ge=2, le=9, description="Completions per prompt to rank (the paper: 4..9).")
    target_agreement: float = Field(
        0.73, gt=0.5, lt=1, description="Pairwise agreement of two simulated labelers (the paper's labelers: ~73%)."
    )
    labelers: Literal["simulated", "external"] = Field(
        "simulated",
        description=(
            "Who ranks: two simulated labelers (the gold scorer plus Bradley-Terry noise, calibrated to "
            "target_agreement; both rank every task and both rankings train the RM, as every labeler's do in the "
            "paper), or external labelers through the coordinator's LeaseComparisonTasks and SubmitRanking RPCs "
            "(the round waits until every task has labels_per_task rankings)."
        ),
    )
    labels_per_task: int = Field(
        1, ge=1, le=16, description="External labelers: rankings needed per task (2 or more measures their agreement)."
    )


class RMRetrainConfig(Strict):
    """RM retraining rounds during PPO (the paper's "repeat steps 2 and 3")."""

    every_steps: int = Field(
        0, ge=0, description="A labeling round on fresh samples of the current policy every N PPO steps; 0 = never."
    )
    prompts_per_round: int | None = Field(
        None, ge=2, description="Prompts per retraining round; default: labeling.prompts_per_round."
    )


class EvaluationConfig(Strict):
    """Held-out evaluation of the final policy against the SFT policy."""

    prompts: PromptsConfig = Field(description="Held-out prompts.")
    max_prompts: int = Field(64, ge=1, description="At most this many held-out prompts.")
    samples_per_prompt: int = Field(1, ge=1, description="Responses per prompt and policy.")
    sampling: SamplingConfig = Field(SamplingConfig(), description="Sampling of the evaluation responses.")
    heldout_text: str | None = Field(
        None,
        description="Plain text (one document per line, read by the learner) for the alignment tax: the policy's LM "
        "loss "
        "on it after PPO minus before (with or without PPO-ptx, as the learner is configured). None: not measured.",
    )
    heldout_max_tokens: int = Field(128, ge=2, description="Tokens per block of the held-out text.")


class PipelineConfig(Strict):
    """The whole InstructGPT pipeline, as sent to CoordinatorService.StartRun (`kind: pipeline`)."""

    kind: Literal["pipeline"] = Field("pipeline", description="Marks a pipeline run (PPO-only runs have no kind).")
    demonstrations: str = Field(
        description='JSONL of {"prompt", "completion"} for SFT (read by the learner); preset:FILE and cache:FILE as '
        "in prompts.path."
    )
    sft: SFTConfig = Field(SFTConfig(), description="Supervised fine-tuning.")
    gold: JudgeConfig = Field(description="The gold scorer: simulated labelers rank by it; the main evaluation judge.")
    second_judge: JudgeConfig = Field(description="An independent judge for the evaluation.")
    labeling: LabelingConfig = Field(LabelingConfig(), description="Comparison collection.")
    rm: RMTrainConfig = Field(RMTrainConfig(), description="Reward-model training.")
    rm_retrain: RMRetrainConfig = Field(
        RMRetrainConfig(),
        description="Retraining rounds: the RM is trained again from the SFT model on the comparisons of all rounds, "
        "then "
        "loaded into the reward service with a new version.",
    )
    rm_job: Literal["learner", "launcher"] = Field(
        "learner",
        description='Where reward models train: "learner" (its TrainRewardModel RPC, between PPO steps) or "launcher" '
        "(`alignd job train-rm` through the coordinator's launcher: a local process, or a Kubernetes Job with "
        "launcher.kind: kubernetes).",
    )
    value_from_rm: bool = Field(
        True,
        description="Initialise the learner's value model from the reward model (the paper); false with a value head "
        "on the policy.",
    )
    ppo: PPORunConfig = Field(description="The PPO stage (prompts, steps, sampling).")
    evaluation: EvaluationConfig = Field(description="Held-out evaluation.")
    seed: int = Field(
        0,
        description="The run's seed: prompt selection, labelers and evaluation sampling, and the seed of sft, rm and "
        "ppo "
        "(and, in `alignd run`, of the learner) where those are not set themselves. One number changes every stage's "
        "randomness (bench/presets.py runs a preset over seeds this way).",
    )
    skip_bad_lines: bool = Field(
        False,
        description="Drop malformed lines of the data files (demonstrations, prompts) instead of refusing to start; "
        "each is "
        "counted and reported (file:line) in state.json and report.json. Also sets sft/rm.skip_bad_lines.",
    )

    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="Experiment tracking of the whole pipeline (sets ppo.tracking): a list of backends "
        "(tensorboard, mlflow, wandb) or {backends, experiment}.",
    )
    system_prompt: str | None = Field(
        None,
        description="System message of every prompt given as text, in every stage (SFT, labeling, RM, PPO, "
        "evaluation), where ppo.prompts.system, evaluation.prompts.system, sft.system_prompt and rm.system_prompt "
        "are not set themselves (docs/chat.md).",
    )

    @model_validator(mode="after")
    def _stage_seeds(self) -> PipelineConfig:
        for stage in (self.sft, self.rm, self.ppo):
            if "seed" not in stage.model_fields_set:
                stage.seed = self.seed
        if "tracking" in self.model_fields_set and "tracking" not in self.ppo.model_fields_set:
            self.ppo.tracking = self.tracking
        if self.system_prompt:
            for prompts in (self.ppo.prompts, self.evaluation.prompts):
                if "system" not in prompts.model_fields_set:
                    prompts.system = self.system_prompt
            for job in (self.sft, self.rm):
                if "system_prompt" not in job.model_fields_set:
                    job.system_prompt = self.system_prompt
        return self

    @field_validator("demonstrations")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_path(v)
