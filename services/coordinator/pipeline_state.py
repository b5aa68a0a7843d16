"""What a pipeline run has done and made, typed and versioned: the `pipeline` object of its state.json.

A stage is marked done only after its effects are durable (services/coordinator/pipeline.py), so a coordinator
restarted from this state skips the stages done and re-enters the unfinished one. Runs recorded before this schema
kept the same facts in an untyped `artifacts` dict; `PipelineState.from_artifacts` reads them (RunRecord.load
migrates a state.json on its first load, and the next save writes the new layout).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 2  # version 1: the `artifacts` dict of runs before this module


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TextLoss(_Model):
    """The learner's policy's LM loss on the held-out text (the alignment tax's two ends)."""

    loss: float
    tokens: int
    policy_version: int


class RMRound(_Model):
    """One labeling round and the reward model trained on every round's comparisons so far."""

    round: int
    step: int  # the PPO step the round came after (0: before PPO)
    accuracy: float  # held-out accuracy against the labels
    n: int  # held-out comparisons
    train_accuracy: float | None = None
    comparisons: int  # comparisons the RM trained and validated on (every round so far)
    reward_version: int  # the weight version the reward role serves this RM as
    labeler_agreement: float | None = None
    breakdown: dict[str, Any] | None = None  # alignd.rm_breakdown: where the RM errs (simulated labelers only)


class PipelineState(_Model):
    schema_version: Literal[2] = SCHEMA_VERSION
    done: list[str] = Field(default_factory=list)  # stages whose effects are durable, in order
    wall_seconds: dict[str, float] = Field(default_factory=dict)  # per stage, summed over restarts
    data: dict[str, dict[str, Any]] = Field(default_factory=dict)  # alignd.data's report of each data file
    sft_dir: str = ""
    sft_version: int = 0  # the weight version the policy and reference roles serve the SFT policy as
    sft_best_val_loss: float | None = None
    text_loss: dict[str, TextLoss] = Field(default_factory=dict)  # "sft", "final"
    labeler_temperatures: dict[int, float] = Field(default_factory=dict)  # per round: the simulated labelers'
    labeler_agreement: dict[str, Any] | None = None  # round 0's, for the report
    rm_versions: dict[int, int] = Field(default_factory=dict)  # per round, fixed before the reward role loads it
    rm_dir: str = ""  # the RM the reward role must serve ("" before round 0: the one in its configuration)
    rm_version: int = 0
    rm_rounds: list[RMRound] = Field(default_factory=list)

    def round_done(self, r: int) -> bool:
        return any(x.round == r for x in self.rm_rounds)

    @classmethod
    def from_artifacts(cls, art: dict[str, Any]) -> PipelineState:
        """The state of a run recorded with schema version 1 (state.json's `artifacts` dict)."""
        temps = {0: art["labeler_temperature"]} if "labeler_temperature" in art else {}
        for key, value in art.items():
            if key.startswith("labeler_temperature_"):
                temps[int(key.removeprefix("labeler_temperature_"))] = value
        rounds = art.get("rm_rounds", [])
        return cls(
            done=art.get("done", []),
            wall_seconds=art.get("wall_seconds", {}),
            data=art.get("data", {}),
            sft_dir=art.get("sft_dir", ""),
            sft_version=art.get("sft_version", 0),
            sft_best_val_loss=art.get("sft_best_val_loss"),
            text_loss=art.get("text_loss", {}),
            labeler_temperatures=temps,
            labeler_agreement=art.get("labeler_agreement") or None,
            rm_versions={int(k): v for k, v in art.get("rm_versions", {}).items()},
            rm_dir=art.get("rm_dir", ""),
            # (runs recorded before rm_version existed: the last round's)
            rm_version=art.get("rm_version") or (rounds[-1]["reward_version"] if rounds else 0),
            rm_rounds=rounds,
        )
