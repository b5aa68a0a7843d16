"""Files re-read when they change: the tokens file, TLS certificates, a client's token (stdlib only).

A change is a different (mtime, size, inode) of any of the files: a rewrite in place, a rename into place, or a
Kubernetes Secret's symlink swap. A version that cannot be read or parsed keeps the last good value; it is
reported once through `on_error`, not re-read on every call, and so is a file that disappears.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
_MISSING = ("missing",)


class WatchedFiles(Generic[T]):
    """The value `load()` makes of `paths`, loaded again when one of them changes.

    The first load happens in the constructor and raises what `load` raises (OSError, ValueError): a role fails
    at start on an unusable file. Later failures of the kinds in `errors` keep the last good value."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
        load: Callable[[], T],
        *,
        on_error: Callable[[Exception], None],
        errors: tuple[type[Exception], ...] = (OSError, ValueError),
    ) -> None:
        # label -> path; a label names the file in errors (a config key, e.g. "cert_file /etc/tls/tls.crt")
        named = paths.items() if isinstance(paths, Mapping) else ((os.fspath(p), p) for p in paths)
        self.paths = {label: os.fspath(p) for label, p in named}
        self._load, self._on_error, self._errors = load, on_error, errors
        self._lock = threading.Lock()
        self._signature = self.signature()
        self.value: T = load()

    def signature(self) -> tuple:
        """(mtime, size, inode) of every file; OSError naming the file that cannot be stat'ed."""
        out = []
        for label, path in self.paths.items():
            try:
                st = os.stat(path)
            except OSError as exc:
                raise OSError(f"{label if label == path else f'{label} {path}'}: {exc.strerror}") from None
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def refresh(self) -> bool:
        """Loads the files again if they changed; True when a new value was loaded."""
        try:
            signature = self.signature()
        except OSError as exc:
            with self._lock:
                if self._signature != _MISSING:  # reported once, not on every call
                    self._signature = _MISSING
                    self._on_error(exc)
            return False
        if signature == self._signature:
            return False
        with self._lock:
            if signature == self._signature:
                return False
            self._signature = signature  # a bad version is read once, not on every call
            try:
                value = self._load()
            except self._errors as exc:
                self._on_error(exc)
                return False
            self.value = value
            return True

    def get(self) -> T:
        """The current value, after a refresh."""
        self.refresh()
        return self.value
