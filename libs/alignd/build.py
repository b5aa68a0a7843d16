"""Which alignd build is running: its version and the commit it was built from (alignd_build_info on every role).

The commit is $ALIGND_COMMIT (the images set it: `docker build --build-arg ALIGND_COMMIT=...`), else the git HEAD
of the checkout alignd runs from (an editable install), else "unknown".
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from alignd import __version__

UNKNOWN = "unknown"


@functools.lru_cache(maxsize=1)
def commit() -> str:
    env = os.environ.get("ALIGND_COMMIT", "").strip()
    if env:
        return env
    root = Path(__file__).resolve().parents[2]  # libs/alignd/build.py -> the checkout
    if not (root / ".git").exists():
        return UNKNOWN
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else UNKNOWN


def info() -> dict[str, str]:
    return {"version": __version__, "commit": commit()}
