"""Children before status: status writes wait (a bounded time) while children are written.

When many Capabilities arrive at once, what their users wait for is the children (the pods
start from them); the status line each one gets is news about those children. Written as
each owner finishes, the status writes share the API server with the other owners' child
writes still queued behind them, so every child appears later. Here they wait until no
owner is writing children (every owner's status then says the same, a moment later), never
longer than ``bound`` seconds, so steady churn elsewhere cannot hold a status back for good.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class ChildrenFirst:
    """Counts the owners writing children; :meth:`settled` waits until there are none."""

    def __init__(self, bound: float) -> None:
        self.bound = bound
        self._writing = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def writing(self) -> int:
        """Owners applying children now."""
        return self._writing

    @contextlib.contextmanager
    def writing_children(self) -> Iterator[None]:
        """Marks one owner's children being applied, for the block."""
        self._writing += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._writing -= 1
            if self._writing == 0:
                self._idle.set()

    async def settled(self) -> None:
        """Until no owner writes children, or ``bound`` seconds: a status write's turn."""
        if self._writing == 0 or self.bound <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.bound)
