"""Repeated inputs of capabilities without effects: how often they repeat, and (``spec.cache``)
their results reused.

The repeat share is the routing controller's signal for proposing a cache: the runtime counts
``packetflow_capability_repeated_inputs_total`` for calls whose input bytes equal one of the
last :data:`RECENT_INPUTS` distinct inputs of that capability (only for ``effects: []``, whose
results a cache could serve).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

RECENT_INPUTS = 1024


class RecentInputs:
    """The last ``capacity`` distinct inputs (by hash); :meth:`seen` says if one repeats."""

    def __init__(self, capacity: int = RECENT_INPUTS) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[int, None] = OrderedDict()

    def seen(self, key: int) -> bool:
        """Whether ``key`` is among the recent inputs; remembers it either way."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        self._keys[key] = None
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return False


class ResultCache:
    """Encoded results by input, reused for ``ttl_s``; least recently used evicted first."""

    def __init__(self, ttl_s: float, max_entries: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()

    def get(self, payload: bytes) -> bytes | None:
        """The cached result of this exact input, if fresh."""
        found = self._entries.get(payload)
        if found is None:
            return None
        expires, result = found
        if expires < self.clock():
            del self._entries[payload]
            return None
        self._entries.move_to_end(payload)
        return result

    def put(self, payload: bytes, result: bytes) -> None:
        """Remember ``result`` for ``payload``."""
        self._entries[payload] = (self.clock() + self.ttl_s, result)
        self._entries.move_to_end(payload)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
