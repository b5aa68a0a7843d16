"""The generated configuration reference and the shipped configs stay true."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignd.config import StackConfig, load_config, reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_is_current():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == reference_markdown(), "docs/configuration.md is stale: run python scripts/gen_config_docs.py"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(StackConfig, path)
    assert cfg.policy.model.path and not cfg.policy.model.path.startswith("~")
