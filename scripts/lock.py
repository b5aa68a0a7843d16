"""Regenerate the images' lock files from pyproject.toml: every Python package either image installs, pinned, with
the SHA-256 of each of its PyPI files (pip install --require-hashes).

Run: python scripts/lock.py            (needs uv, in the dev extra, and PyPI)
     python scripts/lock.py --check    (exit 1 when a lock no longer matches pyproject.toml; no network)

  deploy/locks/coordinator.txt   the base install + report, judges, tracking (plots, the preset's judges, MLflow/W&B)
  deploy/locks/gpu.txt           the base install + models, deepspeed, report, judges, vllm, except torch and the CUDA
                                 packages torch brings: the image takes torch==<pyproject's pin> from PyTorch's cu128
                                 index (PyPI's torch 2.13 is the CUDA 13 build), which this machine cannot reach.

Both resolve for CPython 3.11 on x86_64 manylinux_2_28, what the images run. tests/test_locks.py runs the check.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "deploy" / "locks"
IMAGES = {
    "coordinator": ["report", "judges", "tracking"],
    "gpu": ["models", "deepspeed", "report", "judges", "vllm"],
}
# Left out of the GPU lock: torch and what only its CUDA build needs (installed with it from PyTorch's index).
TORCH_OWN = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
PYTHON, PLATFORM = "3.11", "x86_64-manylinux_2_28"
REQ = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_pins(extras: list[str]) -> dict[str, str]:
    """name -> version of every `name==version` the base install and `extras` name (self-references expanded)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    pins: dict[str, str] = {}
    todo, seen = list(project["dependencies"]), set()
    todo += [r for e in extras for r in optional[e]]
    while todo:
        req = todo.pop()
        m = REQ.match(req)
        if req.startswith("alignd["):
            for extra in req[len("alignd[") : req.index("]")].split(","):
                if extra not in seen:
                    seen.add(extra)
                    todo += optional[extra.strip()]
        elif m:
            pins[canonical(m.group(1))] = m.group(3)
    return pins


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 digests) of a lock file."""
    out: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = REQ.match(line)
        if m:
            current = canonical(m.group(1))
            out[current] = (m.group(3), [])
        for digest in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            out[current][1].append(digest)
    return out


def problems(image: str) -> list[str]:
    """What is wrong with deploy/locks/<image>.txt against pyproject.toml (empty: it matches)."""
    path = LOCKS / f"{image}.txt"
    if not path.exists():
        return [f"{path} is missing: python scripts/lock.py"]
    lock = read_lock(path)
    out = []
    for name, version in sorted(pyproject_pins(IMAGES[image]).items()):
        if image == "gpu" and TORCH_OWN.match(name):
            if name in lock:
                out.append(f"{image}: {name} is locked, but the image installs it from PyTorch's index")
            continue
        if name not in lock:
            out.append(f"{image}: {name}=={version} (pyproject.toml) is not in the lock")
        elif lock[name][0] != version:
            out.append(f"{image}: pyproject.toml pins {name}=={version}, the lock {lock[name][0]}")
    out += [f"{image}: {name} has no sha256 hash" for name, (_, digests) in lock.items() if not digests]
    return out


def generate(image: str, uv: str) -> None:
    extras = [a for e in IMAGES[image] for a in ("--extra", e)]
    skip = []
    if image == "gpu":
        first = subprocess.run(
            [uv, "pip", "compile", "pyproject.toml", *extras, "--python-version", PYTHON, "--python-platform",
             PLATFORM, "--no-header", "--no-annotate", "--index-url", "https://pypi.org/simple", "-q"],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        names = [REQ.match(line).group(1) for line in first.splitlines() if REQ.match(line)]
        skip = [a for n in names if TORCH_OWN.match(canonical(n)) for a in ("--no-emit-package", n)]
    LOCKS.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [uv, "pip", "compile", "pyproject.toml", *extras, *skip, "--generate-hashes", "--python-version", PYTHON,
         "--python-platform", PLATFORM, "--index-url", "https://pypi.org/simple", "--custom-compile-command",
         "python scripts/lock.py", "-q", "-o", str(LOCKS / f"{image}.txt")],
        cwd=ROOT, check=True,
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check the locks against pyproject.toml")
    ap.add_argument("--uv", default=str(Path(sys.executable).parent / "uv"), help="the uv binary")
    args = ap.parse_args()
    if not args.check:
        for image in IMAGES:
            generate(image, args.uv)
    found = [p for image in IMAGES for p in problems(image)]
    for p in found:
        print(p, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
