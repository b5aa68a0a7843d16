"""The size limits of docs/architecture.md ("Module map"): no file of libs/ or services/ over 500 lines, no function
over 80, so that a concept keeps to a module a reader can hold (issue 19). Generated stubs (libs/alignd/v1) are not
counted. The limits are checked on a deliberately oversized scratch tree too, so a checker that found nothing could
not pass. Likewise the keyword-only rule (issue 19): a function takes at most three positional parameters (self and
cls not counted), the others keyword-only, except where an outside protocol fixes the signature (POSITIONAL_ALLOWED)."""

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


# -- keyword-only parameters (issue 19) ------------------------------------------------------------------------------

MAX_POSITIONAL = 3  # not counting self/cls; any further parameter is keyword-only (after a bare `*`)

# Functions whose positional parameters an outside protocol fixes, "path:Class.function" -> why.
POSITIONAL_ALLOWED = {
    "libs/alignd/runtime/http.py:GuardedH11Protocol.__init__": (
        "overrides uvicorn's H11Protocol.__init__(config, server_state, app_state, _loop=None) and passes the four "
        "on to it: uvicorn creates the protocol, so the override keeps the signature of the class it replaces"
    ),
}


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def many_positional(paths: list[Path], root: Path, allowed: dict[str, str]) -> list[str]:
    """Each function with more than MAX_POSITIONAL positional parameters (self and cls not counted) that `allowed`
    does not name, as "path:Qualified.name(params)"."""
    out = []
    for p in paths:
        rel = p.relative_to(root).as_posix()
        for name, node in _functions(ast.parse(p.read_text(), filename=str(p))):
            args = node.args
            positional = [a.arg for a in args.posonlyargs + args.args if a.arg not in ("self", "cls")]
            if len(positional) > MAX_POSITIONAL and f"{rel}:{name}" not in allowed:
                out.append(f"{rel}:{name}({', '.join(positional)})")
    return out


def test_no_function_of_libs_and_services_takes_more_than_three_positional_parameters():
    paths = sources(ROOT / "libs", ROOT / "services")
    assert len(paths) > 100  # the tree was found
    assert many_positional(paths, ROOT, POSITIONAL_ALLOWED) == []
    # Each exception is still there and still over the limit (a stale entry would hide a new function of its name).
    over = many_positional(paths, ROOT, {})
    assert [k for k in POSITIONAL_ALLOWED if not any(v.startswith(f"{k}(") for v in over)] == []


def test_the_positional_limit_catches_a_fourth_positional_parameter(tmp_path):
    (tmp_path / "mod.py").write_text(
        "def four(a, b, c, d):\n    pass\n\n\n"
        "def three_then_keywords(a, b, c, *, d, e=1):\n    pass\n\n\n"
        "def only_positional(a, b, /, c, d=0):\n    pass\n\n\n"
        "class K:\n"
        "    def method(self, a, b, c):\n        pass\n\n"
        "    @classmethod\n    def make(cls, a, b, c):\n        pass\n\n"
        "    def wide(self, a, b, c, d=None):\n        def inner(w, x, y, z):\n            pass\n\n"
        "    def allowed(self, a, b, c, d):\n        pass\n"
    )
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "gen_pb2.py").write_text("def stub(a, b, c, d, e):\n    pass\n")
    paths = sources(tmp_path)
    assert [p.name for p in paths] == ["mod.py"]  # generated stubs are skipped
    assert many_positional(paths, tmp_path, {"mod.py:K.allowed": "a protocol fixes it"}) == [
        "mod.py:four(a, b, c, d)",
        "mod.py:only_positional(a, b, c, d)",
        "mod.py:K.wide(a, b, c, d)",
        "mod.py:K.wide.inner(w, x, y, z)",
    ]
    assert many_positional(paths, tmp_path, {})[-1] == "mod.py:K.allowed(a, b, c, d)"
