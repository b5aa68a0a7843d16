"""The generated configuration reference and the shipped configs stay true."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from alignd.config import PipelineJobConfig, PPOJobConfig, StackConfig, load_config, reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_is_current():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == reference_markdown(), "docs/configuration.md is stale: run python scripts/gen_config_docs.py"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    data = yaml.safe_load(path.read_text())
    model = PipelineJobConfig if "pipeline" in data else PPOJobConfig if "run" in data else StackConfig
    cfg = load_config(model, path)
    stack = cfg if model is StackConfig else cfg.stack
    assert stack.policy.model.path and not stack.policy.model.path.startswith("~")
