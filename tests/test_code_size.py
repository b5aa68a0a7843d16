"""The size limits of docs/architecture.md ("Module map"): no file of libs/ or services/ over 500 lines, no function
over 80, so that a concept keeps to a module a reader can hold (issue 19). Generated stubs (libs/alignd/v1) are not
counted. The limits are checked on a deliberately oversized scratch tree too, so a checker that found nothing could
not pass."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def sources(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in sorted(d.rglob("*.py")) if "v1" not in p.relative_to(d).parts[:2]]


def long_files(paths: list[Path]) -> list[str]:
    out = []
    for p in paths:
        n = len(p.read_text().splitlines())
        if n > MAX_FILE_LINES:
            out.append(f"{p}: {n} lines")
    return out


def long_functions(paths: list[Path]) -> list[str]:
    out = []
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{p}:{node.lineno} {node.name}: {n} lines")
    return out


def test_no_file_or_function_of_libs_and_services_is_over_its_limit():
    paths = sources(ROOT / "libs", ROOT / "services")
    assert len(paths) > 100  # the tree was found
    assert long_files(paths) == []
    assert long_functions(paths) == []


def test_the_limits_catch_a_long_file_and_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))  # def line + 80 = 81 lines
    (tmp_path / "long_fn.py").write_text(f"def f():\n{body}\n")
    (tmp_path / "ok_fn.py").write_text("def g():\n" + "\n".join(body.splitlines()[:-1]) + "\n")
    (tmp_path / "long_file.py").write_text("\n".join(f"y{i} = {i}" for i in range(MAX_FILE_LINES + 1)) + "\n")
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "gen_pb2.py").write_text("\n".join(f"z{i} = {i}" for i in range(MAX_FILE_LINES + 1)) + "\n")
    paths = sources(tmp_path)
    assert [p.name for p in paths] == ["long_file.py", "long_fn.py", "ok_fn.py"]  # generated stubs are skipped
    assert long_files(paths) == [f"{tmp_path / 'long_file.py'}: {MAX_FILE_LINES + 1} lines"]
    assert long_functions(paths) == [f"{tmp_path / 'long_fn.py'}:1 f: {MAX_FUNCTION_LINES + 1} lines"]
