"""docs/configuration.md, generated from the models (scripts/gen_config_docs.py; tests/test_config_docs.py)."""

from __future__ import annotations

import typing

from pydantic import BaseModel

from alignd.config.base import Strict
from alignd.config.runs import PPORunConfig
from alignd.config.stack import ROLE_CONFIGS, PipelineJobConfig, PPOJobConfig, StackConfig
from alignd.config.training import RMTrainConfig, SFTConfig


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from the models."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `libs/alignd/config/` by `python scripts/gen_config_docs.py`; "
        "tests/test_config_docs.py fails when it is stale.",
        "",
        "Each role reads one YAML file (`alignd serve ROLE --config FILE`); the local stack reads one file "
        "with a section per role (`alignd up --config FILE`, see `configs/local.yaml`). Any key can be "
        "overridden with `--set dotted.key=value` (the value is parsed as YAML). Unknown keys are errors.",
        "",
    ]
    seen: set[type] = set()

    def type_name(ann) -> str:
        text = getattr(ann, "__name__", None) if isinstance(ann, type) else None
        return (text or str(ann).replace("typing.", "")).replace("|", "\\|")

    def section(title: str, model: type[BaseModel], prefix: str) -> None:
        out.append(f"## {title}")
        out.append("")
        if model.__doc__ and model is not Strict:
            out.append(model.__doc__.strip().splitlines()[0])
            out.append("")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        nested = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            models_in = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
            if models_in:  # an optional section (`X | None`)
                sub = models_in[0]
                out.append(f"| `{prefix}{name}` | section or null | `None` | {field.description or ''} |")
                nested.append((name, sub))
                continue
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                default = "" if field.is_required() else "(section)"
                out.append(f"| `{prefix}{name}` | section | {default} | {field.description or ''} |")
                nested.append((name, ann))
                continue
            default = "required" if field.is_required() else f"`{field.default!r}`"
            out.append(f"| `{prefix}{name}` | `{type_name(ann)}` | {default} | {field.description or ''} |")
        out.append("")
        for name, sub in nested:
            if sub in seen:
                continue
            seen.add(sub)
            section(f"`{name}`: {sub.__name__}", sub, f"{name}.")

    for role, model in ROLE_CONFIGS.items():
        section(f"Role `{role}` ({model.__name__})", model, "")
    seen.update(ROLE_CONFIGS.values())  # the stack's role sections are the role configs above
    section("Local stack (StackConfig)", StackConfig, "")
    seen.add(StackConfig)
    section("PPO job (PPOJobConfig): `alignd ppo --config FILE`", PPOJobConfig, "")
    seen.update({PPORunConfig, SFTConfig, RMTrainConfig})
    section("Pipeline job (PipelineJobConfig): `alignd run --config FILE`", PipelineJobConfig, "")
    seen.difference_update({SFTConfig, RMTrainConfig})
    section("SFT job (SFTConfig): LearnerService.TrainSFT `config_yaml`", SFTConfig, "")
    section("Reward-model job (RMTrainConfig): LearnerService.TrainRewardModel `config_yaml`", RMTrainConfig, "")
    return "\n".join(out).rstrip() + "\n"
