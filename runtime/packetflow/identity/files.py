"""Material read from files and re-read when they change (certificate rotation).

A Kubernetes Secret or ConfigMap volume is updated by an atomic symlink swap; a person
rotating files by hand writes them one after the other. Either way the next check sees new
(mtime, size, inode) triples and reloads; a load that fails (a certificate already new, its
key not yet) keeps the last good value and is tried again at the next check, so no call ever
sees half-rotated material.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("packetflow.identity")

Stamp = tuple[tuple[int, int, int], ...]


def _stamp(paths: Sequence[Path]) -> Stamp:
    stamps = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append((-1, -1, -1))
        else:
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(stamps)


class Watched(Generic[T]):
    """A value loaded from ``paths`` by ``load``; :meth:`get` reloads it when a file changed
    (checked at most every ``interval`` seconds). The first load must succeed."""

    def __init__(self, paths: Sequence[Path], load: Callable[[], T], *,
                 paths_of: Callable[[T], Sequence[Path]] | None = None,
                 interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.paths = list(paths)
        self.load = load
        self.paths_of = paths_of  # a loaded value may name more files to watch (a config)
        self.interval = interval
        self.clock = clock
        self._stamp = _stamp(self.paths)
        self.value = load()
        self._follow(self.value)
        self.generation = 1
        self.error: str | None = None  # why the newest files did not load, if they did not
        self._checked = clock()

    def get(self) -> T:
        """The current value, reloaded first if the files changed since the last check."""
        now = self.clock()
        if now - self._checked >= self.interval:
            self._checked = now
            self.refresh()
        return self.value

    def _follow(self, value: T) -> None:
        if self.paths_of is not None:
            paths = list(self.paths_of(value))
            if paths != self.paths:
                # Stamped after the load: a change in between shows at the next change.
                self.paths, self._stamp = paths, _stamp(paths)

    def refresh(self) -> bool:
        """Reload now if the files changed; True when a new value was loaded."""
        stamp = _stamp(self.paths)
        if stamp == self._stamp:
            return False
        try:
            value = self.load()
        except Exception as exc:  # any load failure keeps the last good material
            message = f"{exc}"
            if message != self.error:
                log.warning("keeping the previous material: %s", message)
            self.error = message
            return False
        self._stamp, self.value, self.error = stamp, value, None
        self._follow(value)
        self.generation += 1
        log.info("material reloaded", extra={"files": [str(p) for p in self.paths],
                                             "generation": self.generation})
        return True


def write_atomically(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``path`` through a rename, so a process watching it never reads half of it;
    ``private``: readable by this user only (keys)."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(temporary, path)
