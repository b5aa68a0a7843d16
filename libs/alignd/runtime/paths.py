"""Paths named by requests: only under the roots a role was configured with (docs/security.md).

Every path a request carries (a run directory, a job's output or data, a
weights directory to load, a text to evaluate) goes through `Roots.check`,
which resolves it the way the filesystem will (symlinks followed, `..`
collapsed) and refuses it with INVALID_ARGUMENT naming the field unless the
result lies under one of the roots: the role's `paths.roots`, its run
directory and the presets shipped with alignd (alignd.datapaths). What a
refusal says does not depend on whether the path exists, so a caller cannot probe the filesystem outside the roots.

Directories a job creates carry an ownership marker (`OWNER_FILE`, written
when the directory is made); a job replaces or removes only directories that
carry it, so a request can never make a role delete what alignd did not
create.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from alignd.runtime.errors import InvalidArgument

OWNER_FILE = ".alignd-owned"


class Roots:
    """The directories paths in requests may lie under."""

    def __init__(self, roots: Iterable[str | os.PathLike], *, prefixes: Iterable[str | os.PathLike] = ()) -> None:
        # Resolved once (a root that is itself a symlink counts as where it points); duplicates dropped.
        self.roots = list(dict.fromkeys(os.path.realpath(os.path.expanduser(str(r))) for r in roots if str(r)))
        # Name prefixes allowed besides the roots (e.g. /dev/shm/alignd-weights-: the learner's shared-memory weights).
        self.prefixes = [os.path.realpath(str(p).rstrip("*")) for p in prefixes]

    def contains(self, real: str) -> bool:
        for root in self.roots:
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                return True
        return any(real.startswith(p) for p in self.prefixes)

    def check(self, value: str, field: str) -> Path:
        """The resolved path of `value`, or InvalidArgument naming `field` when it is empty, malformed or outside
        every root (after symlinks)."""
        if not value:
            raise InvalidArgument(field, "must not be empty")
        if "\x00" in value or len(value) > 4096:
            raise InvalidArgument(field, "not a usable path")
        real = os.path.realpath(os.path.expanduser(value))
        if not self.contains(real):
            raise InvalidArgument(
                field,
                "outside the directories this role may use (its paths.roots and run directory); "
                "configure paths.roots to allow it",
            )
        return Path(real)

    def describe(self) -> list[str]:
        return [*self.roots, *(p + "*" for p in self.prefixes)]


def role_roots(
    cfg,
    run_dir: str | os.PathLike | None,
    *,
    extra: Iterable[str | os.PathLike] = (),
    prefixes: Iterable[str | os.PathLike] = (),
) -> Roots:
    """A role's Roots: its paths.roots, its run directory, `extra` (e.g. directories it was configured with) and the
    presets shipped with alignd (alignd.datapaths: what `preset:` paths name, the same on every role)."""
    from alignd.datapaths import presets_dir

    return Roots([*cfg.paths.roots, *([run_dir] if run_dir else []), *extra, presets_dir()], prefixes=prefixes)


def mark_owned(directory: Path) -> None:
    """Marks a directory alignd created (see the module docs)."""
    (Path(directory) / OWNER_FILE).write_text("created by alignd; alignd may replace or remove this directory\n")


def is_owned(directory: Path) -> bool:
    return (Path(directory) / OWNER_FILE).is_file()
