"""Calls under load while something changes (a certificate rotates, a route moves): callers
loop until stopped, counting answered calls and keeping every failure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType

from packetflow.client import CallError
from tests.conftest import eventually


class Load:
    """``workers`` callers each running ``batch`` (some calls; it returns how many were
    answered) again and again inside ``async with``; a batch that fails is kept in
    :attr:`failures`."""

    def __init__(self, batch: Callable[[], Awaitable[int]], workers: int = 8) -> None:
        self.batch = batch
        self.workers = workers
        self.done = 0
        self.failures: list[CallError] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Future[None]] = []

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.done += await self.batch()
            except CallError as exc:
                self.failures.append(exc)

    async def goes_on(self, calls: int = 50) -> None:
        """Wait for ``calls`` more answered calls (the load did not stall)."""
        settled = self.done
        await eventually(lambda: self.done >= settled + calls, timeout=60,
                         what=f"{calls} more calls")

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.ensure_future(self._run()) for _ in range(self.workers)]
        await self.goes_on()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
