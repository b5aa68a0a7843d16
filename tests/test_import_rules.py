"""The import rules of docs/architecture.md ("Module map"), enforced on the source tree so the structure holds:

1. a role never imports another role (roles talk through alignd.v1 only);
2. the shared library (libs/alignd) never imports a role;
3. the coordinator never imports torch (or what needs it), directly or through the shared modules it imports;
4. alignd.rlmath (the pure math) imports neither grpc nor a role, and alignd.runtime no torch.

Imports are read from the source (ast), including those inside functions: an import that only runs on one code
path is still a dependency. The rules are checked on a deliberately broken tree too, so a checker that found
nothing could not pass.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("policy", "reward", "reference", "learner", "coordinator")
HEAVY = ("torch", "transformers", "deepspeed", "safetensors", "numpy", "tokenizers")

# Shared modules that import a role: none (the job wire format is alignd.jobs, the learner's `alignd job` command
# is registered by the learner through an entry point). An exception would be listed here as (module, imported).
KNOWN_LIBS_TO_ROLE: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. alignd.services.policy.engine
    target: str  # the imported module (for `from a import b`: a.b when a.b is a module of the tree, else a)
    top_level: bool  # at module level (runs on import), not inside a function or class body
    line: int


def module_files(libs: Path, services: Path) -> dict[str, Path]:
    """Module name -> file, with pyproject.toml's package layout (libs/alignd = alignd, services = alignd.services)."""
    out: dict[str, Path] = {}
    for base, prefix in ((libs / "alignd", "alignd"), (services, "alignd.services")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def imports(modules: dict[str, Path]) -> list[Import]:
    found: list[Import] = []
    for module, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        top = {id(n) for n in tree.body}
        for parent in ast.walk(tree):  # module-level statements, including inside if/try at module level
            if isinstance(parent, (ast.If, ast.Try)) and id(parent) in top:
                top |= {id(n) for n in ast.walk(parent)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against the importing package
                    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for name in dict.fromkeys(names):
                found.append(Import(module, name, id(node) in top, node.lineno))
    return found


def role_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["alignd", "services"] else None


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(libs: Path, services: Path) -> list[str]:
    modules = module_files(libs, services)
    edges = imports(modules)
    out: list[str] = []
    for e in edges:
        src, dst = role_of(e.module), role_of(e.target)
        where = f"{e.module}:{e.line} imports {e.target}"
        if src and dst and src != dst:
            out.append(f"role imports another role: {where}")
        if src is None and under(e.module, "alignd") and dst and (e.module, e.target) not in KNOWN_LIBS_TO_ROLE:
            out.append(f"shared library imports a role: {where}")
        if under(e.module, "alignd.rlmath") and (e.target.split(".")[0] == "grpc" or dst):
            out.append(f"rlmath imports grpc or a role: {where}")
        if under(e.module, "alignd.runtime") and e.target.split(".")[0] in HEAVY:
            out.append(f"runtime imports {e.target.split('.')[0]}: {where}")
    # The coordinator: no heavy import in its own modules, nor at module level in any alignd module they reach
    # at module level (what `python -m alignd.services.coordinator.app` loads).
    by_module: dict[str, list[Import]] = {}
    for e in edges:
        by_module.setdefault(e.module, []).append(e)
    seen: set[str] = set()
    todo = [(m, m) for m in modules if under(m, "alignd.services.coordinator")]
    while todo:
        module, via = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        own = under(module, "alignd.services.coordinator")
        for e in by_module.get(module, []):
            if not (own or e.top_level):
                continue
            if e.target.split(".")[0] in HEAVY:
                chain = "" if module == via else f" (reached from {via})"
                out.append(f"coordinator imports {e.target.split('.')[0]}: {e.module}:{e.line}{chain}")
            for m in modules:  # the imported module and the packages above it run on import
                if under(e.target, m) and m != module:
                    todo.append((m, via))
    return sorted(set(out))


def test_the_tree_follows_the_import_rules():
    assert violations(ROOT / "libs", ROOT / "services") == []


def test_known_exceptions_still_exist():
    """An exception that is gone must leave KNOWN_LIBS_TO_ROLE too, so the list only shrinks."""
    edges = {(e.module, e.target) for e in imports(module_files(ROOT / "libs", ROOT / "services"))}
    assert KNOWN_LIBS_TO_ROLE <= edges, f"remove from KNOWN_LIBS_TO_ROLE: {sorted(KNOWN_LIBS_TO_ROLE - edges)}"


def _tree(tmp_path: Path, files: dict[str, str]) -> tuple[Path, Path]:
    libs, services = tmp_path / "libs", tmp_path / "services"
    base = {
        "libs/alignd/__init__.py": "",
        "libs/alignd/rlmath.py": "import math\n",
        "libs/alignd/runtime/__init__.py": "",
        "libs/alignd/runtime/server.py": "import grpc\n",
        "libs/alignd/heavy.py": "import torch\n",
        "libs/alignd/light.py": "import json\n",
        "services/__init__.py": "",
        **{f"services/{r}/__init__.py": "" for r in ROLES},
        **{f"services/{r}/app.py": "from alignd import light\n" for r in ROLES},
    }
    for rel, text in {**base, **files}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return libs, services


def test_each_rule_fails_when_broken_on_purpose(tmp_path):
    assert violations(*_tree(tmp_path / "clean", {})) == []
    cases = {
        "role imports another role": {"services/policy/engine.py": "def f():\n    from ..learner import ppo\n"},
        "shared library imports a role": {"libs/alignd/light.py": "from alignd.services.reward import app\n"},
        "rlmath imports grpc or a role": {"libs/alignd/rlmath.py": "import grpc\n"},
        "runtime imports torch": {"libs/alignd/runtime/server.py": "import torch.nn\n"},
        "coordinator imports torch": {"services/coordinator/app.py": "from alignd import heavy\n"},
    }
    for rule, files in cases.items():
        found = violations(*_tree(tmp_path / rule.replace(" ", "_"), files))
        assert len(found) == 1 and found[0].startswith(rule), (rule, found)
    # A lazy import of torch in a shared module the coordinator uses is allowed (it never runs there) ...
    lazy = {
        "libs/alignd/light.py": "def f():\n    import torch\n",
        "services/coordinator/app.py": "from alignd import light\n",
    }
    assert violations(*_tree(tmp_path / "lazy", lazy)) == []
    # ... but not one at module level two modules away.
    chain = {"libs/alignd/light.py": "from alignd import heavy\n"}
    found = violations(*_tree(tmp_path / "chain", chain))
    assert found and all(
        "coordinator imports torch: alignd.heavy:1 (reached from alignd.services.coordinator" in v for v in found
    )
