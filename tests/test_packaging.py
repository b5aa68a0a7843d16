"""The wheel carries the presets: `alignd run --preset NAME` and `preset:` paths work from an installed alignd, not
only from a checkout (alignd.datapaths)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_every_preset_and_the_files_its_preset_paths_name(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("alignd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    from alignd.cli import PRESETS

    for job in PRESETS.values():
        assert f"alignd/presets/{job}" in names, job
        text = (ROOT / "configs" / job).read_text()
        yaml.safe_load(text)
        for ref in re.findall(r"preset:([a-z0-9_][\w./-]*\.\w+)", text):
            assert f"alignd/presets/{ref}" in names, (job, ref)
    assert "alignd/presets/tiny_pipeline.yaml" in names and "alignd/presets/tiny_demos.jsonl" in names
    assert not [n for n in names if n.startswith("alignd/presets/") and n.endswith((".pyc", ".log"))]
