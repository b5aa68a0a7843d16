"""The schema of report.json (version 1), as pydantic models: `build_report_json` validates what it writes against
`Report`, and readers (bench/presets.py, CI scripts) can parse a report with `Report.model_validate_json`.

Unknown keys are refused at every level except `meta` (a free-form description of the run) and an RM round's
`breakdown` (alignd.rm_breakdown's table), so a field added to the report without the schema fails its tests.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WinRateEntry(_Strict):
    """One judge's win rate of the final policy against SFT on the held-out prompts."""

    wins: float  # per-prompt fractions summed over prompts (whole numbers with one sample each)
    losses: float
    ties: float
    n: int  # prompts
    rate: float  # (wins + ties / 2) / n
    lower: float
    upper: float
    method: Literal["wilson", "bootstrap"]
    confidence: float
    comparisons: int  # response pairs compared


class Acceptance(_Strict):
    """The run's bar: the primary judge's rate and interval, every other judge's rate."""

    primary_judge: str
    min_rate: float
    min_lower: float
    secondary_min_rate: float
    primary_ok: bool
    secondary_ok: dict[str, bool]
    passed: bool


class RMRound(_Strict):
    round: int
    accuracy: float  # held-out accuracy against the labels
    n: int | None  # held-out comparisons
    lower: float | None  # Wilson interval, with n
    upper: float | None
    breakdown: dict[str, Any] | None  # alignd.rm_breakdown: where the RM errs


class LabelerAgreement(_Strict):
    agreement: float | None
    stderr: float | None
    temperature: float | None
    pairs: int | None


class KLToReference(_Strict):
    per_token: float | None
    per_sequence: float | None
    sequences: int | None
    tokens: int | None


class MeanWithCI(_Strict):
    mean: float | None
    lower: float | None
    upper: float | None
    n: int | None
    std: float | None
    confidence: float | None


class Rewards(_Strict):
    sft: MeanWithCI | None
    final: MeanWithCI | None


class Tax(_Strict):
    before: float | None
    after: float | None
    absolute: float | None
    relative: float | None


class AlignmentTaxes(_Strict):
    without_ptx: Tax | None
    with_ptx: Tax | None


class Report(_Strict):
    """report.json."""

    schema_version: Literal[1]
    meta: dict[str, Any]
    win_rates: dict[str, WinRateEntry]
    acceptance: Acceptance
    rm_accuracy_per_round: list[RMRound]
    labeler_agreement: LabelerAgreement | None
    kl_to_reference: KLToReference | None
    reward: Rewards
    alignment_tax: AlignmentTaxes
    wall_seconds_per_stage: dict[str, float]
    figures: dict[str, str]  # title -> image path relative to the report
