"""Pure timing rules of reminders, schedules and placement."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable


def next_due(due_at: float, period: float, now: float) -> float:
    """The next slot of a periodic reminder that fired at ``now`` for slot ``due_at``.

    Slots missed while nothing ran are skipped, not replayed: after downtime a reminder fires
    once for the missed period and then resumes its rhythm (no backlog flood).
    """
    if period <= 0:
        raise ValueError("period must be positive")
    missed = max(0, math.floor((now - due_at) / period))
    return due_at + (missed + 1) * period


def rendezvous_owner(key: str, members: Iterable[str]) -> str | None:
    """The member owning ``key`` by rendezvous (highest random weight) hashing.

    Each member's weight is a hash of (member, key); when a member leaves only its keys move.
    """
    best: tuple[bytes, str] | None = None
    for member in members:
        weight = hashlib.blake2b(f"{member}\0{key}".encode(), digest_size=8).digest()
        if best is None or (weight, member) > best:
            best = (weight, member)
    return None if best is None else best[1]
