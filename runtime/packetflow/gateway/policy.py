"""Pure decisions of a call through the gateway: which version, whether to try again.

Metadata a caller may send (gRPC request headers):

* ``packetflow-session``: calls with the same value go to the same version (stable or
  canary) while the weight stays; when it changes, only the sessions whose bucket the new
  weight crosses move.
* ``packetflow-idempotency-key`` (``packetflow.context.IDEMPOTENCY_KEY``): the caller
  asserts that the capability applies a repeated key once (or that repeating the call is
  harmless), so the gateway may retry a capability that declares effects. The key travels to
  the backend, where a handler reads it from ``ctx.idempotency_key``. Actor messages carry
  their own ``message_id`` instead.
"""

from __future__ import annotations

import hashlib
import random

SESSION_KEY = "packetflow-session"

# gRPC status codes the decisions look at.
OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
RESOURCE_EXHAUSTED = 8
INTERNAL = 13
UNAVAILABLE = 14
DATA_LOSS = 15
# Codes that say the endpoint failed the call (the rest are the caller's doing or success).
SERVER_ERRORS = frozenset({UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL,
                           UNAVAILABLE, DATA_LOSS})
_BUCKETS = 10_000  # a session's position in 0..99.99 percent


def session_bucket(session: bytes) -> int:
    """A stable position of a session in ``0 .. 9999`` (hundredths of a percent)."""
    digest = hashlib.blake2b(session, digest_size=8).digest()
    return int.from_bytes(digest, "big") % _BUCKETS


def choose_canary(weight: int, session: bytes | None, rng: random.Random) -> bool:
    """Whether a call goes to the canary: ``weight`` percent of calls, or of sessions."""
    if weight <= 0:
        return False
    if weight >= 100:
        return True
    if session:
        return session_bucket(session) < weight * (_BUCKETS // 100)
    return rng.random() * 100 < weight


def may_retry(code: int, *, delivered: bool, safe: bool, other_endpoint: bool) -> bool:
    """Whether a failed attempt may be tried again (budget and deadline are checked apart).

    A call that never reached the backend (no connection, stream refused, past the last
    stream a closing connection accepted) may always be retried: nothing ran. Otherwise only
    a call that is ``safe`` to repeat, and only on UNAVAILABLE, or on RESOURCE_EXHAUSTED
    when another endpoint can take it (the same one would refuse again).
    """
    if not delivered:
        return True
    if not safe:
        return False
    return code == UNAVAILABLE or (code == RESOURCE_EXHAUSTED and other_endpoint)
