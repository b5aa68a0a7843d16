"""The images' lock files (deploy/locks, made by scripts/lock.py) match pyproject.toml: every pin of the base
install and of the image's extras at the same version, every package with its SHA-256 hashes, and the GPU lock
without torch and its CUDA packages (the image installs those from PyTorch's cu128 index)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _lock_script():
    spec = importlib.util.spec_from_file_location("lock_script", ROOT / "scripts" / "lock.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("image", ["coordinator", "gpu"])
def test_lock_matches_pyproject(image):
    lock = _lock_script()
    assert lock.problems(image) == [], "run: python scripts/lock.py"
    entries = lock.read_lock(lock.LOCKS / f"{image}.txt")
    pins = lock.pyproject_pins(lock.IMAGES[image])
    assert {"grpcio", "pydantic", "matplotlib", "vadersentiment"} <= set(entries)  # base + report + judges
    assert all(len(d) >= 1 and all(re.fullmatch(r"[0-9a-f]{64}", x) for x in d) for _, d in entries.values())
    if image == "gpu":
        assert "transformers" in entries and "deepspeed" in entries
        assert not [n for n in entries if lock.TORCH_OWN.match(n)]
        assert pins["torch"] == "2.13.0"  # what Dockerfile.gpu installs from the cu128 index
        assert f"torch=={pins['torch']}" in (ROOT / "deploy" / "Dockerfile.gpu").read_text()
    else:
        assert "mlflow-skinny" in entries and "torch" not in entries


def test_check_catches_a_drifted_pin(tmp_path, monkeypatch):
    """The check is not vacuous: a lock whose version differs from pyproject's, or a package without hashes,
    is reported."""
    lock = _lock_script()
    text = (lock.LOCKS / "coordinator.txt").read_text()
    version = lock.pyproject_pins([])["grpcio"]
    drifted = text.replace(f"grpcio=={version} \\", "grpcio==0.0.1 \\", 1)
    hashes = r"(\s+--hash=sha256:[0-9a-f]{64} \\\n)+\s+--hash=sha256:[0-9a-f]{64}"
    drifted = re.sub(r"(pyyaml==[^\s]+) \\\n" + hashes, r"\1", drifted)
    assert drifted != text
    (tmp_path / "coordinator.txt").write_text(drifted)
    monkeypatch.setattr(lock, "LOCKS", tmp_path)
    found = lock.problems("coordinator")
    assert any("grpcio==" in p and "0.0.1" in p for p in found), found
    assert any("pyyaml has no sha256 hash" in p for p in found), found
