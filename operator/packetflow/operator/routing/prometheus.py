"""Read a capability's metrics from Prometheus' HTTP API (PromQL over the runtime's metrics,
and the gateway's when it exports them) into the controller's plain data.

Any failure (Prometheus down, a query refused, an unparseable answer) raises
:class:`MetricsUnavailable` naming the query: the controller then decides nothing about
replicas and says why in a status condition.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import httpx

from packetflow.operator.routing.model import NAN, Series, VersionStats

# Codes that count against availability (the caller's own mistakes do not).
FAILURE_CODES: Final = "INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED"
FEEDBACK: Final = "packetflow_feedback_score"
GATEWAY_CALLS: Final = "packetflow_gateway_calls_total"
GATEWAY_DURATION: Final = "packetflow_gateway_call_duration_seconds"
# The gateway's attempts, by endpoint and version: where stable and canary are told apart
# (it is the gateway that splits calls between them).
GATEWAY_ATTEMPTS: Final = "packetflow_gateway_requests_total"
GATEWAY_ATTEMPT_DURATION: Final = "packetflow_gateway_request_duration_seconds"


@dataclass(frozen=True)
class Family:
    """The runtime series a kind of resource is read from (calls carry a ``code`` label)."""

    label: str
    calls: str
    duration: str
    in_flight: str | None
    repeats: str | None


CAPABILITY: Final = Family("capability", "packetflow_capability_calls_total",
                           "packetflow_capability_call_duration_seconds",
                           "packetflow_capability_in_flight",
                           "packetflow_capability_repeated_inputs_total")
# An actor type's turns are its calls: one histogram, by outcome code.
ACTOR: Final = Family("actor_type", "packetflow_actor_turn_duration_seconds_count",
                      "packetflow_actor_turn_duration_seconds", None, None)
FAMILIES: Final = {"Capability": CAPABILITY, "Actor": ACTOR}


class MetricsUnavailable(Exception):
    """Prometheus could not answer; the message says which query and why."""


@dataclass(frozen=True)
class Readings:
    """Everything read for one resource at one time."""

    series: Series
    versions: dict[str, VersionStats] = field(default_factory=dict)
    rejected_ratio: float = NAN
    repeat_ratio: float = NAN
    satisfaction: float = NAN
    gateway: bool = False


@dataclass
class PrometheusReader:
    """PromQL range and instant queries for one resource (``capability`` label) at a time.

    ``step`` is the scrape interval (one sample each), ``window`` the ``rate()`` range,
    ``history`` how far back the forecast looks. ``scope`` adds label matchers (e.g. the
    namespace) to every selector; ``version_label`` is the gateway's label that splits
    stable from canary.
    """

    url: str
    step: float = 15.0
    window: float = 30.0
    history: float = 3600.0
    judge_window: float = 300.0
    timeout: float = 10.0
    version_label: str = "version"
    http: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        """Close the HTTP client if this reader made it."""
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    def _client(self) -> httpx.AsyncClient:
        if self.http is None:
            self.http = httpx.AsyncClient(base_url=self.url.rstrip("/"), timeout=self.timeout,
                                          trust_env=False)
        return self.http

    async def read(self, name: str, now: float, scope: Mapping[str, str] | None = None,
                   family: Family = CAPABILITY) -> Readings:
        """The metrics of the capability (or actor type, with ``family``) ``name`` up to
        ``now`` (unix seconds)."""
        labels = {family.label: name, **(scope or {})}
        calls, duration = family.calls, family.duration
        sel = _selector(labels)
        failed = _selector(labels, code=FAILURE_CODES)
        refused = _selector(labels, code="RESOURCE_EXHAUSTED")
        w = f"{round(self.window)}s"
        j = f"{round(self.judge_window)}s"
        end = math.floor(now / self.step) * self.step
        start = end - math.floor(self.history / self.step) * self.step
        ranges = {
            "calls": f"sum(rate({calls}{sel}[{w}]))",
            "errors": f"sum(rate({calls}{failed}[{w}]))",
            "service_p99": _p99(duration, sel, w),
            "service": f"sum(rate({duration}_sum{sel}[{w}])) / "
                       f"sum(rate({duration}_count{sel}[{w}]))",
            "in_flight": f"sum({family.in_flight}{sel})" if family.in_flight else "",
            "gateway_calls": f"sum(rate({GATEWAY_CALLS}{sel}[{w}]))",
            "gateway_p99": _p99(GATEWAY_DURATION, sel, w),
        }
        v = self.version_label
        # Gateway series name the capability (or actor type) in ``capability``.
        route = {"capability": name, **(scope or {})}
        versions = _selector(route)
        failed_versions = _selector(route, code=FAILURE_CODES)
        instants = {
            "rejected": f"sum(rate({calls}{refused}[{j}])) / sum(rate({calls}{sel}[{j}]))",
            "repeats": (f"sum(rate({family.repeats}{sel}[{j}])) / sum(rate({calls}{sel}[{j}]))"
                        if family.repeats else ""),
            "satisfaction": f"sum(rate({FEEDBACK}_sum{sel}[1h])) / "
                            f"sum(rate({FEEDBACK}_count{sel}[1h]))",
            "version_rate": f"sum by ({v}) (rate({GATEWAY_ATTEMPTS}{versions}[{j}]))",
            "version_errors": f"sum by ({v}) (rate({GATEWAY_ATTEMPTS}{failed_versions}[{j}]))",
            "version_p99": f"histogram_quantile(0.99, sum by ({v}, le) "
                           f"(rate({GATEWAY_ATTEMPT_DURATION}_bucket{versions}[{j}])))",
        }
        range_results = await asyncio.gather(*(self._range(q, start, end) if q else _none()
                                               for q in ranges.values()))
        instant_results = await asyncio.gather(*(self._instant(q, end) if q else _none()
                                                 for q in instants.values()))
        got = dict(zip(ranges, range_results, strict=True))
        once = dict(zip(instants, instant_results, strict=True))
        if not got["calls"] and not got["gateway_calls"]:
            raise MetricsUnavailable(f"no series {calls}{sel}: is Prometheus scraping its "
                                     "runtimes?")
        grid = [start + k * self.step for k in range(round((end - start) / self.step) + 1)]
        gateway = bool(got["gateway_calls"])

        def column(name: str) -> tuple[float, ...]:
            values = _single(got[name])
            return tuple(values.get(t, NAN) for t in grid)

        series = Series(
            step=self.step, end=float(end),
            rate=column("gateway_calls" if gateway else "calls"),
            errors=column("errors"),
            p99=column("gateway_p99" if gateway else "service_p99"),
            service=column("service"), service_p99=column("service_p99"),
            in_flight=column("in_flight"),
        )
        return Readings(series, _versions(once, v), _scalar(once["rejected"]),
                        _scalar(once["repeats"]), _scalar(once["satisfaction"]), gateway)

    async def _range(self, query: str, start: float, end: float) -> list[dict[str, Any]]:
        return await self._api("/api/v1/query_range", {"query": query, "start": start,
                                                        "end": end, "step": self.step})

    async def _instant(self, query: str, at: float) -> list[dict[str, Any]]:
        return await self._api("/api/v1/query", {"query": query, "time": at})

    async def _api(self, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        try:
            response = await self._client().get(path, params=params)
        except httpx.HTTPError as exc:
            raise MetricsUnavailable(f"Prometheus at {self.url} did not answer: "
                                     f"{type(exc).__name__}: {exc or 'no detail'}") from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400 or body.get("status") != "success":
            detail = body.get("error") or response.text[:200] or response.reason_phrase
            raise MetricsUnavailable(f"query {params['query']!r} failed "
                                     f"(HTTP {response.status_code}): {detail}")
        result = body.get("data", {}).get("result", [])
        return result if isinstance(result, list) else []


async def _none() -> list[dict[str, Any]]:
    """A query not made (the series does not exist for this kind)."""
    return []


def _selector(labels: Mapping[str, str], code: str | None = None) -> str:
    parts = [f'{key}="{value}"' for key, value in labels.items()]
    if code is not None:
        parts.append(f'code=~"{code}"')  # one code or an alternation
    return "{" + ",".join(parts) + "}"


def _p99(histogram: str, selector: str, window: str) -> str:
    return f"histogram_quantile(0.99, sum by (le) (rate({histogram}_bucket{selector}[{window}])))"


def _number(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return NAN


def _single(result: list[dict[str, Any]]) -> dict[float, float]:
    """A range result of one series as {timestamp: value}; none -> {}."""
    if not result:
        return {}
    return {float(t): _number(v) for t, v in result[0].get("values", [])}


def _scalar(result: list[dict[str, Any]]) -> float:
    if not result:
        return NAN
    return _number(result[0].get("value", [0, "NaN"])[1])


def _versions(once: Mapping[str, list[dict[str, Any]]], label: str) -> dict[str, VersionStats]:
    """Per-version stats when the series carry ``label`` (stable/canary)."""
    def by_version(name: str) -> dict[str, float]:
        return {str(r.get("metric", {}).get(label)): _number(r.get("value", [0, "NaN"])[1])
                for r in once[name] if r.get("metric", {}).get(label)}

    rates, errors, p99s = (by_version(n) for n in ("version_rate", "version_errors",
                                                    "version_p99"))
    out = {}
    for version, rate in rates.items():
        failed = errors.get(version, 0.0)
        out[version] = VersionStats(rate=rate, error_ratio=failed / rate if rate > 0 else NAN,
                                    p99=p99s.get(version, NAN))
    return out
