"""Trust scores: a Beta reputation per peer and dimension, decaying with a half-life.

A score is the mean of Beta(positive + w*s0, negative + w*(1-s0)): the prior counts as ``w``
observations at the initial score ``s0``, so a peer without evidence scores ``s0`` and every
observation moves it less as evidence accumulates. Evidence decays exponentially (old
behaviour fades with ``halfLife``). Within each evidence window at most ``cap`` positive and
``cap`` negative observations count: a peer flooding cheap successful calls gains no more
than one honest window's worth.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from packetflow.spec import TrustPolicy, duration_seconds

RELIABILITY = "reliability"  # call outcomes
PERFORMANCE = "performance"  # latency within the SLA
SECURITY = "securityCompliance"  # authentication and policy failures attributed to the peer
DIMENSIONS = (RELIABILITY, PERFORMANCE, SECURITY)


@dataclass(frozen=True)
class TrustParams:
    """The numbers of a :class:`TrustPolicy`."""

    minimum: float
    half_life_s: float
    initial: float
    prior_weight: float
    window_s: float
    cap: int

    @classmethod
    def of(cls, policy: TrustPolicy) -> TrustParams:
        """From the manifest's ``trust`` block."""
        return cls(policy.minimum_score, duration_seconds(policy.half_life),
                   policy.initial_score, policy.prior_weight,
                   duration_seconds(policy.evidence_window), policy.max_evidence_per_window)


@dataclass(frozen=True)
class Evidence:
    """What is known about one peer on one dimension."""

    positive: float = 0.0  # decayed weight of good observations, as of ``at``
    negative: float = 0.0
    at: float = 0.0
    window: float = -math.inf  # start of the current evidence window
    window_positive: int = 0
    window_negative: int = 0
    observations: int = 0  # every observation made, counted or not
    capped: int = 0  # observations the window cap left out

    def to_json(self) -> dict[str, Any]:
        """Plain data (persisted between restarts)."""
        return {"positive": self.positive, "negative": self.negative, "at": self.at,
                "window": self.window if math.isfinite(self.window) else None,
                "windowPositive": self.window_positive,
                "windowNegative": self.window_negative,
                "observations": self.observations, "capped": self.capped}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Evidence:
        """From :meth:`to_json`."""
        window = data.get("window")
        return cls(float(data["positive"]), float(data["negative"]), float(data["at"]),
                   -math.inf if window is None else float(window),
                   int(data["windowPositive"]), int(data["windowNegative"]),
                   int(data["observations"]), int(data["capped"]))


NO_EVIDENCE = Evidence()


def decayed(evidence: Evidence, now: float, params: TrustParams) -> tuple[float, float]:
    """(positive, negative) weights decayed to ``now``."""
    factor = 0.5 ** (max(0.0, now - evidence.at) / params.half_life_s)
    return evidence.positive * factor, evidence.negative * factor


def observe(evidence: Evidence, good: bool, now: float, params: TrustParams) -> Evidence:
    """``evidence`` after one observation at ``now`` (left out beyond the window's cap)."""
    window = math.floor(now / params.window_s) * params.window_s
    same = window == evidence.window
    window_positive = evidence.window_positive if same else 0
    window_negative = evidence.window_negative if same else 0
    # Built whole, not with dataclasses.replace: this runs several times per federated call.
    if (window_positive if good else window_negative) >= params.cap:
        return Evidence(evidence.positive, evidence.negative, evidence.at, window,
                        window_positive, window_negative, evidence.observations + 1,
                        evidence.capped + 1)
    positive, negative = decayed(evidence, now, params)
    return Evidence(positive + good, negative + (not good), now, window,
                    window_positive + good, window_negative + (not good),
                    evidence.observations + 1, evidence.capped)


def score(evidence: Evidence, now: float, params: TrustParams) -> float:
    """The Beta mean with the prior: ``initial`` without evidence."""
    positive, negative = decayed(evidence, now, params)
    weight = params.prior_weight
    return (positive + weight * params.initial) / (positive + negative + weight)


@dataclass
class TrustBook:
    """Evidence per peer and dimension (the gateway's mutable holder of the pure values)."""

    params: TrustParams
    evidence: dict[tuple[str, str], Evidence] = field(default_factory=dict)

    def observe(self, peer: str, dimension: str, good: bool, now: float) -> None:
        """Record one observation."""
        key = (peer, dimension)
        self.evidence[key] = observe(self.evidence.get(key, NO_EVIDENCE), good, now,
                                     self.params)

    def score(self, peer: str, dimension: str, now: float) -> float:
        """The peer's score on one dimension."""
        return score(self.evidence.get((peer, dimension), NO_EVIDENCE), now, self.params)

    def lowest(self, peer: str, now: float) -> tuple[str, float]:
        """The peer's weakest dimension and its score (the first of equals)."""
        # A plain loop: this runs on every federated call, in both directions.
        found, lowest = DIMENSIONS[0], math.inf
        for dimension in DIMENSIONS:
            value = score(self.evidence.get((peer, dimension), NO_EVIDENCE), now, self.params)
            if value < lowest:
                found, lowest = dimension, value
        return found, lowest

    def refusal(self, peer: str, now: float) -> str | None:
        """Why calls to and from ``peer`` are refused now, naming the dimension; ``None``
        while every dimension is at or above the minimum."""
        dimension, value = self.lowest(peer, now)
        if value >= self.params.minimum:
            return None
        return (f"peer {peer} is below the trust threshold on {dimension} "
                f"({value:.3f} < {self.params.minimum:.3f})")

    def explain(self, peer: str, now: float) -> dict[str, dict[str, float | int]]:
        """Per dimension: the score and the evidence behind it (what status shows)."""
        out: dict[str, dict[str, float | int]] = {}
        for dimension in DIMENSIONS:
            evidence = self.evidence.get((peer, dimension), Evidence())
            positive, negative = decayed(evidence, now, self.params)
            out[dimension] = {"score": round(score(evidence, now, self.params), 4),
                              "positive": round(positive, 3), "negative": round(negative, 3),
                              "observations": evidence.observations,
                              "capped": evidence.capped}
        return out

    def items(self) -> Iterator[tuple[tuple[str, str], Evidence]]:
        """Every (peer, dimension) with evidence."""
        return iter(self.evidence.items())
