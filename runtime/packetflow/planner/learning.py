"""What the planner learns from outcomes: preference scores and the plan cache (pure).

Every executed plan leaves an :class:`Outcome` (trace id, intent terms, capabilities, success,
latency). User satisfaction is *not* copied here: it stays in the feedback store, keyed by the
same trace id (``packetflow feedback TRACE_ID --score``, the routing controller's signal), and
is joined in when scores are computed. A capability's preference for an intent is the
smoothed mean reward of the outcomes of similar intents that used it: the user's score when
there is one, else success (1, a little less when slow) or, for the capability whose step
failed, 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import orjson

PRIOR = 1.0  # weight of the neutral 0.5 every capability starts from
SIMILAR = 0.3  # intents sharing less than this (Jaccard of terms) teach nothing
UNRATED_WEIGHT = 0.5  # a run without user feedback counts half
SLOW_MS = 50_000.0  # latency at which a success is worth 0.8 (and no less)
CACHE_SIMILARITY = 0.85
BAD_FEEDBACK = 0.5  # a cached plan whose runs score below this is dropped


@dataclass(frozen=True)
class Outcome:
    """One execution of a plan."""

    trace_id: str
    terms: tuple[str, ...]
    capabilities: tuple[str, ...]
    ok: bool
    failed: str  # the capability whose step failed ("" when none, or unknown)
    latency_ms: float
    at: float


@dataclass(frozen=True)
class Preference:
    """A capability's learned score for an intent (0.5: nothing known) and its evidence."""

    score: float
    evidence: float


def similarity(a: Iterable[str], b: Iterable[str]) -> float:
    """Jaccard similarity of two term sets."""
    first, second = set(a), set(b)
    if not first and not second:
        return 1.0
    return len(first & second) / len(first | second)


def reward(outcome: Outcome, capability: str, feedback: float | None) -> float | None:
    """What ``outcome`` says of ``capability`` (``None``: nothing)."""
    if feedback is not None:
        return feedback
    if outcome.ok:
        return 1.0 - 0.2 * min(1.0, outcome.latency_ms / SLOW_MS)
    return 0.0 if outcome.failed == capability else None


def preferences(terms: Sequence[str], outcomes: Iterable[Outcome],
                feedback: Mapping[str, float]) -> dict[str, Preference]:
    """Preference of every capability seen in similar intents' outcomes."""
    totals: dict[str, list[float]] = {}
    for outcome in outcomes:
        weight = similarity(terms, outcome.terms)
        if weight < SIMILAR:
            continue
        rated = feedback.get(outcome.trace_id)
        for capability in outcome.capabilities:
            value = reward(outcome, capability, rated)
            if value is None:
                continue
            w = weight * (1.0 if rated is not None else UNRATED_WEIGHT)
            sums = totals.setdefault(capability, [0.0, 0.0])
            sums[0] += w * value
            sums[1] += w
    return {name: Preference(round((0.5 * PRIOR + s) / (PRIOR + w), 4), round(w, 4))
            for name, (s, w) in totals.items()}


# ----------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class CacheEntry:
    """A plan that ran well, and for which intents it may be reused."""

    key: str  # signature + the intent's terms and constants
    signature: str  # what must match exactly: input fields and types, allowed set, options
    terms: tuple[str, ...]
    constants: str  # the intent's values (JSON): "in 2 sentences" is not "in 3 sentences"
    manifest: str  # JSON of the plan's manifest
    traces: tuple[str, ...]  # runs that used it (their feedback can condemn it)
    at: float


def signature(fields: Mapping[str, str], allowed: Iterable[str], options: str) -> str:
    """What a reused plan needs unchanged: the input's fields and types, the capabilities
    the planner may use, and the options that shaped the plan."""
    body = orjson.dumps({"fields": dict(sorted(fields.items())), "allowed": sorted(allowed),
                         "options": options})
    return hashlib.sha256(body).hexdigest()[:32]


def cache_key(sig: str, terms: Sequence[str], constants: str) -> str:
    """The exact key of an entry."""
    return hashlib.sha256(orjson.dumps([sig, sorted(set(terms)), constants])).hexdigest()[:32]


def best_cached(entries: Iterable[CacheEntry], terms: Sequence[str], constants: str,
                feedback: Mapping[str, float]) -> tuple[CacheEntry | None, list[CacheEntry]]:
    """The most similar reusable entry (or ``None``), and the entries users condemned
    (their runs' mean feedback is below ``BAD_FEEDBACK``), which should be dropped."""
    best: tuple[float, CacheEntry] | None = None
    condemned = []
    for entry in entries:
        scores = [feedback[t] for t in entry.traces if t in feedback]
        if scores and sum(scores) / len(scores) < BAD_FEEDBACK:
            condemned.append(entry)
            continue
        if entry.constants != constants:
            continue
        found = similarity(terms, entry.terms)
        if found >= CACHE_SIMILARITY and (best is None or found > best[0]):
            best = (found, entry)
    return (None if best is None else best[1]), condemned
