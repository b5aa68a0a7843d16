"""The data paths of a run configuration (prompts, demonstrations, held-out text) and their two prefixes.

  preset:NAME   a file shipped with alignd (the presets' data: the package alignd.presets, configs/ in a checkout)
  cache:NAME    a file prepared into $ALIGND_CACHE (the real-model preset's data: `python -m alignd.assets`)

Both are resolved where the file is read: `alignd run` resolves them on its own machine, the coordinator resolves
those of a StartRun request against its own installation and cache, so `alignd runs start --preset tiny` works
against a cluster whose paths the client cannot know. A relative path is relative to the job file (resolved by
the CLI that reads it); an absolute one is the coordinator's. Imports neither torch nor grpc.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from alignd.config import ConfigError, PipelineConfig

PRESET_PREFIX = "preset:"
CACHE_PREFIX = "cache:"


def presets_dir() -> Path:
    """Where the presets' job files and data are: alignd/presets of the installation (configs/ of a checkout)."""
    return Path(str(resources.files("alignd.presets")))


def cache_dir() -> Path:
    """$ALIGND_CACHE, else ~/.cache/alignd (alignd.models.tiny.default_cache_dir, without importing torch)."""
    return Path(os.environ.get("ALIGND_CACHE", Path.home() / ".cache" / "alignd"))


def resolve(path: str, *, key: str, base: Path | None = None, must_exist: bool = True) -> str:
    """A prefixed path made absolute (ConfigError naming `key` when the file is missing); a relative one joined to
    `base` when given; anything else unchanged."""
    for prefix, root, hint in (
        (PRESET_PREFIX, presets_dir, "a file shipped with alignd"),
        (CACHE_PREFIX, cache_dir, "prepare the real-model assets first: python -m alignd.assets"),
    ):
        if path.startswith(prefix):
            name = path[len(prefix) :]
            if not name or Path(name).is_absolute() or ".." in Path(name).parts:
                raise ConfigError(f"{key}: {path!r}: {prefix} takes a relative name without '..'")
            resolved = root() / name
            if must_exist and not resolved.exists():
                raise ConfigError(f"{key}: {path}: {resolved} does not exist ({hint})")
            return str(resolved)
    if base is not None and not Path(path).is_absolute():
        return str((base / path).resolve())
    return path


def run_paths(run_cfg) -> list[tuple[str, object, str]]:
    """(key, owner, attribute) of every data path of a run configuration (PipelineConfig or PPORunConfig)."""
    if isinstance(run_cfg, PipelineConfig):
        ev = run_cfg.evaluation
        return [
            ("demonstrations", run_cfg, "demonstrations"),
            ("ppo.prompts.path", run_cfg.ppo.prompts, "path"),
            ("evaluation.prompts.path", ev.prompts, "path"),
            ("evaluation.heldout_text", ev, "heldout_text"),
        ]
    return [("prompts.path", run_cfg.prompts, "path")]


def resolve_run_paths(run_cfg, *, base: Path | None = None, prefixes: bool = True, must_exist: bool = True) -> None:
    """Resolves the data paths of `run_cfg` in place: the prefixed ones (unless prefixes=False; ConfigError naming
    the key when one names no file, unless must_exist=False) and, with `base`, the relative ones."""
    for key, owner, attr in run_paths(run_cfg):
        value = getattr(owner, attr)
        if not value:
            continue
        if not prefixes and value.startswith((PRESET_PREFIX, CACHE_PREFIX)):
            continue
        setattr(owner, attr, resolve(value, key=key, base=base, must_exist=must_exist))
