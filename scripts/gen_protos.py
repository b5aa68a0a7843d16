"""Regenerate the committed Python stubs from protos/.

Run: python scripts/gen_protos.py [--out DIR]

Generates `_pb2.py`, `_pb2.pyi` and `_pb2_grpc.py` for every file under
protos/alignd/v1 with `-I protos`, so generated imports read
`from alignd.v1 import common_pb2` and resolve against libs/alignd/v1.
tests/test_protos.py regenerates into a temporary directory and fails on any
difference with the committed files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "libs"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "alignd" / "v1").glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Runs protoc into `out`; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc  # dev dependency (grpcio-tools)

    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    # protoc resolves relative proto paths against the include dirs.
    import os

    cwd = os.getcwd()
    os.chdir(PROTO_ROOT)
    try:
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    gen_dir = out / "alignd" / "v1"
    return sorted(p for p in gen_dir.iterdir() if p.name.endswith((".py", ".pyi")) and "_pb2" in p.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    files = generate(args.out)
    for f in files:
        print(f.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
