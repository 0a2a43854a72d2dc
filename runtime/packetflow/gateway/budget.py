"""Budgets for extra attempts (retries, hedges): a share of recent calls, plus a floor.

As Finagle's and Linkerd's retry budgets: every call deposits one, every extra attempt
withdraws one, and withdrawals within the last ``window`` seconds may reach
``percent`` of the deposits in that window plus ``min_per_second x window``. When every
endpoint fails, retries stay at that share instead of multiplying the load on a sick service.
"""

from __future__ import annotations

import math
from collections.abc import Callable


class ShareBudget:
    """Extra attempts allowed as a share of recent calls (per-second buckets over a window)."""

    __slots__ = ("_clock", "_deposits", "_floor", "_ratio", "_slots", "_tick", "_withdrawals",
                 "deposited", "withdrawn")

    def __init__(self, percent: float, min_per_second: float, window: float,
                 clock: Callable[[], float]) -> None:
        size = max(1, math.ceil(window))
        self._ratio = percent / 100.0
        self._floor = min_per_second * size
        self._clock = clock
        self._deposits = [0] * size
        self._withdrawals = [0] * size
        self._tick = math.floor(clock())
        self.deposited = 0  # in the window
        self.withdrawn = 0

    def _advance(self) -> int:
        tick = math.floor(self._clock())
        size = len(self._deposits)
        if tick != self._tick:
            # Empty the buckets of the seconds that went by (all of them after a long pause).
            for passed in range(self._tick + 1, min(tick, self._tick + size) + 1):
                slot = passed % size
                self.deposited -= self._deposits[slot]
                self.withdrawn -= self._withdrawals[slot]
                self._deposits[slot] = self._withdrawals[slot] = 0
            self._tick = tick
        return tick % size

    def deposit(self) -> None:
        """Count one call."""
        self._deposits[self._advance()] += 1
        self.deposited += 1

    def try_withdraw(self) -> bool:
        """Take one extra attempt if the budget allows; False when it is spent."""
        slot = self._advance()
        if self.withdrawn >= self._floor + self._ratio * self.deposited:
            return False
        self._withdrawals[slot] += 1
        self.withdrawn += 1
        return True
