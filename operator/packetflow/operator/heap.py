"""The operator process's garbage collector, set for a heap of long-lived state.

The operator keeps a few kilobytes of state per Capability and allocates many short-lived
containers per API call (decoded JSON). With CPython's defaults (a young collection every 700
allocations) the collector walked the whole heap, every imported module included, over and
over: about a third of the operator's CPU while 1,000 Capabilities arrived. What is imported
at start never becomes garbage, so it is frozen out of every collection, and the young
generation is collected less often (its cost per collection grows with it, the number of
collections falls: the total halves).
"""

from __future__ import annotations

import gc
from typing import Final

YOUNG_THRESHOLD: Final = 10_000  # allocations between young collections (CPython: 700)


def settle_heap() -> None:
    """Collect once, freeze what exists now (modules, settings) out of later collections,
    and collect the young generation every :data:`YOUNG_THRESHOLD` allocations."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
