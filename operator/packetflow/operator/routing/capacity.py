"""How many replicas a load needs within the latency objective: a queueing model (M/M/c,
Erlang C) over every replica's concurrency slots, corrected by what was observed.

Calls beyond a replica's concurrency wait (in the gateway, a client's retry, a queue); the
model says how likely a call waits longer than the latency left after its own service time,
so the capacity of a replica is the throughput it sustains *within the SLO*, not a fixed
utilisation. A learned factor scales the measured service time when reality disagrees.
"""

from __future__ import annotations

import math

# The share of calls allowed to wait past the budget: half the p99's 1%, the other half is
# left to service-time outliers.
WAIT_TAIL = 0.005
# Never plan slots busier than this, whatever the model says (it assumes a steady load).
MAX_UTILISATION = 0.92


def slots_needed(rate: float, service_s: float, wait_budget_s: float | None,
                 *, max_slots: int) -> int:
    """The fewest concurrency slots serving ``rate`` calls/s of mean ``service_s`` such that
    at most :data:`WAIT_TAIL` of calls wait longer than ``wait_budget_s`` (None: no latency
    objective, so only the utilisation cap applies). Capped at ``max_slots``."""
    if rate <= 0 or service_s <= 0:
        return 0
    offered = rate * service_s  # Erlangs: the slots busy on average
    least = max(1, math.ceil(offered / MAX_UTILISATION))
    if wait_budget_s is None:
        return min(least, max_slots)
    budget = max(wait_budget_s, 0.0)
    blocking = 1.0  # Erlang B, grown one slot at a time (stable recursion)
    for slots in range(1, max_slots + 1):
        blocking = offered * blocking / (slots + offered * blocking)
        if slots < least:
            continue
        # Erlang C: probability that a call waits at all; then the wait is exponential.
        waits = slots * blocking / (slots - offered * (1 - blocking))
        if waits * math.exp(-(slots / service_s - rate) * budget) <= WAIT_TAIL:
            return slots
    return max_slots


def replicas_needed(rate: float, service_s: float, wait_budget_s: float | None, *,
                    slots_per_replica: int, max_replicas: int) -> int:
    """Replicas whose slots (``slots_per_replica`` each) serve ``rate`` within the budget."""
    slots = slots_needed(rate, service_s, wait_budget_s,
                         max_slots=slots_per_replica * max_replicas)
    return math.ceil(slots / slots_per_replica)


def sustainable_rate(replicas: int, service_s: float, wait_budget_s: float | None, *,
                     slots_per_replica: int) -> float:
    """The highest rate ``replicas`` serve within the budget (bisection on the model)."""
    if replicas <= 0 or service_s <= 0:
        return 0.0
    slots = replicas * slots_per_replica
    low, high = 0.0, slots / service_s
    for _ in range(40):
        middle = (low + high) / 2
        if slots_needed(middle, service_s, wait_budget_s, max_slots=slots + 1) <= slots:
            low = middle
        else:
            high = middle
    return low
