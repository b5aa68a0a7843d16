"""report.json: the run's headline numbers for scripts and CI (`build_report_json`), and the acceptance verdict."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from alignd.evaluation.schema import Report
from alignd.evaluation.stats import (
    AlignmentTax,
    KLSummary,
    MeanCI,
    WinRate,
    _finite,
    alignment_tax,
    mean_with_ci,
    wilson_interval,
)

SCHEMA_VERSION = 1


# --- report.json ------------------------------------------------------------------------


def _jsonable(x: Any, where: str) -> Any:
    """Plain JSON types: dicts with str keys, lists, str, int, float (finite, else None), bool, None."""
    if x is None or isinstance(x, (bool, str, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "to_dict"):
        return _jsonable(x.to_dict(), where)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, not {k!r}")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(x)]
    try:
        return _jsonable(float(x), where)  # numbers from elsewhere (Decimal, numpy scalars if any)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: {type(x).__name__} is not JSON-serializable") from None


def _as_dict(x: Any) -> dict[str, Any]:
    if hasattr(x, "to_dict"):
        return dict(x.to_dict())
    if isinstance(x, Mapping):
        return dict(x)
    raise TypeError(f"expected a dataclass from alignd.evaluation or a mapping, not {type(x).__name__}")


def _win_rate_entry(judge: str, wr: WinRate | Mapping[str, Any]) -> dict[str, Any]:
    d = _as_dict(wr)
    missing = [k for k in ("wins", "losses", "ties", "n", "rate", "lower", "upper", "method") if k not in d]
    if missing:
        raise ValueError(f"win_rates[{judge!r}] lacks {missing}")
    d.setdefault("confidence", 0.95)
    d.setdefault("comparisons", d["n"])
    return {k: d[k] for k in WinRate.__dataclass_fields__}


def _rm_round(i: int, entry: float | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(entry, Mapping):
        if "accuracy" not in entry:
            raise ValueError(f"rm_accuracy_per_round[{i}] lacks 'accuracy'")
        acc = _finite(entry["accuracy"], f"rm_accuracy_per_round[{i}].accuracy")
        n = entry.get("n")
        rnd = entry.get("round", i)
        breakdown = entry.get("breakdown")
    else:
        acc, n, rnd, breakdown = _finite(entry, f"rm_accuracy_per_round[{i}]"), None, i, None
    if not 0.0 <= acc <= 1.0:
        raise ValueError(f"rm_accuracy_per_round[{i}]: accuracy must be in [0, 1], not {acc!r}")
    lower = upper = None
    if n is not None:
        n = int(n)
        lower, upper = wilson_interval(acc * n, n)
    return {
        "round": rnd,
        "accuracy": acc,
        "n": n,
        "lower": lower,
        "upper": upper,
        "breakdown": dict(breakdown) if breakdown is not None else None,
    }


def _labeler_agreement(x: Any) -> dict[str, Any] | None:
    if x is None:
        return None
    keys = ("agreement", "stderr", "temperature", "pairs")
    if isinstance(x, Mapping):
        if "agreement" not in x:
            raise ValueError("labeler_agreement lacks 'agreement'")
        return {k: x.get(k) for k in keys}
    if hasattr(x, "agreement"):  # alignd.labelers.Calibration
        pairs = getattr(x, "pairs", None)
        repeats = getattr(x, "repeats", None)
        return {
            "agreement": x.agreement,
            "stderr": getattr(x, "stderr", None),
            "temperature": getattr(x, "temperature", None),
            "pairs": pairs * repeats if pairs is not None and repeats is not None else pairs,
        }
    return {"agreement": _finite(x, "labeler_agreement"), "stderr": None, "temperature": None, "pairs": None}


def _reward_entry(name: str, x: Any) -> dict[str, Any] | None:
    if x is None:
        return None
    if isinstance(x, (MeanCI, Mapping)):
        d = _as_dict(x)
        if "mean" not in d:
            raise ValueError(f"reward[{name!r}] lacks 'mean'")
        return {k: d.get(k) for k in MeanCI.__dataclass_fields__}
    if isinstance(x, (list, tuple)):
        return mean_with_ci(x).to_dict()
    return {
        "mean": _finite(x, f"reward[{name!r}]"),
        "lower": None,
        "upper": None,
        "n": None,
        "std": None,
        "confidence": None,
    }


def _tax_entry(name: str, x: Any) -> dict[str, Any] | None:
    if x is None:
        return None
    if isinstance(x, (tuple, list)) and len(x) == 2:
        return alignment_tax(*x).to_dict()
    d = _as_dict(x)
    if "before" in d and "after" in d and "absolute" not in d:
        return alignment_tax(d["before"], d["after"]).to_dict()
    missing = [k for k in AlignmentTax.__dataclass_fields__ if k not in d]
    if missing:
        raise ValueError(f"alignment_tax[{name!r}] lacks {missing}")
    return {k: d[k] for k in AlignmentTax.__dataclass_fields__}


def _check_relative_path(title: str, path: Any) -> str:
    p = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(p, str) or not p:
        raise TypeError(f"figure {title!r}: the path must be a non-empty string")
    if os.path.isabs(p) or p.startswith(("/", "\\")) or "://" in p or p.split("/")[0].endswith(":"):
        raise ValueError(f"figure {title!r}: {p!r} must be a path relative to the report")
    return p.replace(os.sep, "/")


def acceptance(
    win_rates: Mapping[str, Mapping[str, Any]],
    *,
    primary_judge: str = "gold",
    min_rate: float = 0.6,
    min_lower: float = 0.5,
    secondary_min_rate: float = 0.5,
) -> dict[str, Any]:
    """The run's bar on the win rates (the `acceptance` block of report.json)."""
    primary = win_rates.get(primary_judge)
    primary_ok = bool(primary is not None and primary["rate"] >= min_rate and primary["lower"] > min_lower)
    secondary_ok = {j: bool(w["rate"] >= secondary_min_rate) for j, w in win_rates.items() if j != primary_judge}
    return {
        "primary_judge": primary_judge,
        "min_rate": min_rate,
        "min_lower": min_lower,
        "secondary_min_rate": secondary_min_rate,
        "primary_ok": primary_ok,
        "secondary_ok": secondary_ok,
        "passed": primary_ok and bool(secondary_ok) and all(secondary_ok.values()),
    }


REPORT_KEYS = (
    "schema_version",
    "meta",
    "win_rates",
    "acceptance",
    "rm_accuracy_per_round",
    "labeler_agreement",
    "kl_to_reference",
    "reward",
    "alignment_tax",
    "wall_seconds_per_stage",
    "figures",
)


def _kl_entry(kl_to_reference: KLSummary | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The KLSummary's fields (None where missing), or None without a KL."""
    if kl_to_reference is None:
        return None
    d = _as_dict(kl_to_reference)
    return {k: d.get(k) for k in KLSummary.__dataclass_fields__}


def _known_keys(name: str, value: Mapping[str, Any] | None, expected: tuple[str, ...]) -> dict[str, Any]:
    """A copy of `value` ({} for None); ValueError when it has a key other than `expected`."""
    d = dict(value or {})
    unknown = set(d) - set(expected)
    if unknown:
        raise ValueError(f"{name}: unknown keys {sorted(unknown)} (expected {', '.join(map(repr, expected))})")
    return d


def _stage_seconds(wall_seconds_per_stage: Mapping[str, float] | None) -> dict[str, float]:
    """stage -> seconds, each finite and >= 0 (ValueError naming the stage otherwise)."""
    stages = {}
    for stage, secs in (wall_seconds_per_stage or {}).items():
        s = _finite(secs, f"wall_seconds_per_stage[{stage!r}]")
        if s < 0:
            raise ValueError(f"wall_seconds_per_stage[{stage!r}] must be >= 0, not {secs!r}")
        stages[str(stage)] = s
    return stages


def build_report_json(
    *,
    win_rates: Mapping[str, WinRate | Mapping[str, Any]],
    rm_accuracy_per_round: Sequence[float | Mapping[str, Any]] = (),
    labeler_agreement: Any = None,
    kl_to_reference: KLSummary | Mapping[str, Any] | None = None,
    reward: Mapping[str, Any] | None = None,
    alignment_tax: Mapping[str, Any] | None = None,
    wall_seconds_per_stage: Mapping[str, float] | None = None,
    figures: Mapping[str, str] | None = None,
    meta: Mapping[str, Any] | None = None,
    primary_judge: str = "gold",
    min_rate: float = 0.6,
    min_lower: float = 0.5,
    secondary_min_rate: float = 0.5,
) -> dict[str, Any]:
    """Assemble report.json (schema version 1; see the module docstring).

    win_rates: judge -> WinRate (or its dict), the final policy against the SFT policy.
    rm_accuracy_per_round: per RM round, the held-out accuracy as a number, or a dict
        {"accuracy", "n" (held-out comparisons: adds a Wilson interval), "round"}.
    labeler_agreement: a number, an `alignd.labelers.Calibration`, or a dict with "agreement".
    kl_to_reference: a KLSummary (or its dict).
    reward: {"sft": ..., "final": ...}, each a MeanCI, a list of rewards, a number or None.
    alignment_tax: {"without_ptx": ..., "with_ptx": ...}, each an AlignmentTax, a
        (loss_before, loss_after) pair, a dict with before/after, or None.
    wall_seconds_per_stage: stage -> seconds (sft, rm, ppo, evaluate, ...).
    figures: title -> image path relative to the report.
    meta: free-form JSON-able run description.
    """
    if not isinstance(win_rates, Mapping):
        raise TypeError("win_rates must be a mapping judge -> WinRate")
    wr = {str(j): _win_rate_entry(str(j), w) for j, w in win_rates.items()}
    rounds = [_rm_round(i, e) for i, e in enumerate(rm_accuracy_per_round)]
    kl = _kl_entry(kl_to_reference)
    reward = _known_keys("reward", reward, ("sft", "final"))
    taxes = _known_keys("alignment_tax", alignment_tax, ("without_ptx", "with_ptx"))
    stages = _stage_seconds(wall_seconds_per_stage)
    report = {
        "schema_version": SCHEMA_VERSION,
        "meta": dict(meta or {}),
        "win_rates": wr,
        "acceptance": acceptance(
            wr,
            primary_judge=primary_judge,
            min_rate=min_rate,
            min_lower=min_lower,
            secondary_min_rate=secondary_min_rate,
        ),
        "rm_accuracy_per_round": rounds,
        "labeler_agreement": _labeler_agreement(labeler_agreement),
        "kl_to_reference": kl,
        "reward": {
            "sft": _reward_entry("sft", reward.get("sft")),
            "final": _reward_entry("final", reward.get("final")),
        },
        "alignment_tax": {
            "without_ptx": _tax_entry("without_ptx", taxes.get("without_ptx")),
            "with_ptx": _tax_entry("with_ptx", taxes.get("with_ptx")),
        },
        "wall_seconds_per_stage": stages,
        "figures": {str(t): _check_relative_path(str(t), p) for t, p in (figures or {}).items()},
    }
    out = _jsonable(report, "report")
    json.dumps(out, allow_nan=False)  # strict JSON, or fail here rather than in the reader
    Report.model_validate(out)  # the schema (alignd.evaluation.schema): a drifted field fails here, not in a reader
    return out
