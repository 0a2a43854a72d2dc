"""Rate limits: a token bucket per (peer, export), with an explicit clock."""

from __future__ import annotations

from dataclasses import dataclass

from packetflow.spec import RateLimit


@dataclass
class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; a call takes one."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    @classmethod
    def of(cls, limit: RateLimit, now: float) -> TokenBucket:
        """A full bucket for ``limit`` (``burst`` unset: a tenth of a minute's calls)."""
        capacity = float(limit.burst or max(1, int(limit.per_minute / 10)))
        return cls(limit.per_minute / 60.0, capacity, capacity, now)

    def take(self, now: float) -> bool:
        """Take a token if one is there (refilled up to ``now`` first)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def retry_after(self) -> float:
        """Seconds until the next token."""
        return max(0.0, (1.0 - self.tokens) / self.rate)

    def same_limit(self, other: TokenBucket) -> bool:
        """Whether ``other`` limits at the same rate and burst."""
        return (self.rate, self.capacity) == (other.rate, other.capacity)
