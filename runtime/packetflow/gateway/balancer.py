"""Per-request endpoint choice: peak-EWMA latency x calls in flight, power of two choices.

As Finagle's and Linkerd's balancers: an endpoint's cost is its latency estimate times its
calls in flight plus one. The estimate is an exponentially weighted moving average that jumps
to any higher sample at once ("peak") and otherwise decays toward the samples with time
constant ``decay`` seconds; it also decays toward zero while nothing is observed, so an
endpoint that was slow once is tried again later. Two endpoints are drawn at random and the
cheaper gets the call: close to the best choice, without every caller herding onto the one
endpoint that looked best a moment ago.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

# Cost of an endpoint with calls in flight but no latency sample yet (Finagle's penalty):
# after the first call starts, a fresh endpoint waits for that call's answer before more.
PENDING_PENALTY = 1e6
DEFAULT_DECAY_SECONDS = 10.0

T = TypeVar("T")


class PeakEwma:
    """One endpoint's load: peak-sensitive latency average and calls in flight."""

    __slots__ = ("decay", "estimate", "pending", "stamp")

    def __init__(self, now: float, decay: float = DEFAULT_DECAY_SECONDS) -> None:
        self.decay = decay
        self.estimate = 0.0
        self.pending = 0
        self.stamp = now

    def _observe(self, sample: float, now: float) -> None:
        if sample > self.estimate:
            self.estimate = sample  # peak: a slower sample counts in full at once
        else:
            weight = math.exp(-max(now - self.stamp, 0.0) / self.decay)
            self.estimate = self.estimate * weight + sample * (1.0 - weight)
        self.stamp = now

    def cost(self, now: float) -> float:
        """Latency estimate (decayed to ``now``) times calls in flight plus one."""
        self._observe(0.0, now)
        if self.estimate == 0.0 and self.pending:
            return PENDING_PENALTY + self.pending
        return self.estimate * (self.pending + 1)

    def started(self) -> None:
        """A call to this endpoint began."""
        self.pending += 1

    def finished(self, latency: float, now: float, abandoned: bool = False) -> None:
        """A call ended after ``latency`` seconds. An ``abandoned`` call (a hedge's loser,
        a caller gone) took at least that long: it only ever raises the estimate."""
        self.pending -= 1
        if not abandoned or latency > self.estimate:
            self._observe(latency, now)


def pick_two(candidates: Sequence[T], cost: Callable[[T], float],
             rng: random.Random) -> T | None:
    """Power of two choices: the cheaper of two distinct random candidates (None if none)."""
    count = len(candidates)
    if count < 2:
        return candidates[0] if count else None
    first = rng.randrange(count)
    second = rng.randrange(count - 1)
    if second >= first:
        second += 1
    a, b = candidates[first], candidates[second]
    return a if cost(a) <= cost(b) else b
