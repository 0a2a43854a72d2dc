"""When to hedge: a capability's recent latency percentile, kept in O(1) per call.

A hedge is a second attempt, on another endpoint, of a call still unanswered after the
capability's recent ``percentile`` latency (p95 by default); the first answer wins and the
other attempt is cancelled. Only calls that are safe to run twice are hedged (``effects: []``),
and a :class:`~packetflow.gateway.budget.ShareBudget` caps hedges at a share of calls.
"""

from __future__ import annotations

import math

# Samples kept per capability and how often the percentile is recomputed from them: the
# sort is amortised over REFRESH_EVERY calls, so recording stays O(1) per call.
WINDOW_SIZE = 256
REFRESH_EVERY = 32
# No hedging until the estimate rests on this many samples.
MIN_SAMPLES = 32


class LatencyWindow:
    """The last ``size`` latencies of a capability and a percentile of them."""

    __slots__ = ("_count", "_every", "_min", "_percentile", "_samples", "threshold")

    def __init__(self, percentile: float, size: int = WINDOW_SIZE,
                 refresh_every: int = REFRESH_EVERY, min_samples: int = MIN_SAMPLES) -> None:
        self._percentile = percentile
        self._samples = [0.0] * size
        self._count = 0
        self._every = refresh_every
        self._min = min_samples
        self.threshold: float | None = None  # seconds; None until min_samples were seen

    def record(self, seconds: float) -> None:
        """Add one successful attempt's latency."""
        size = len(self._samples)
        self._samples[self._count % size] = seconds
        self._count += 1
        if self._count >= self._min and self._count % self._every == 0:
            filled = sorted(self._samples[:min(self._count, size)])
            rank = max(1, math.ceil(self._percentile / 100.0 * len(filled)))
            self.threshold = filled[rank - 1]


def hedge_delay(window: LatencyWindow, min_delay: float) -> float | None:
    """Seconds to wait before hedging, or None while there is no estimate yet."""
    threshold = window.threshold
    return None if threshold is None else max(threshold, min_delay)
