"""The routing table: what discovery found (plain data) and the live objects calls use.

Discovery (a routes file, or Kubernetes) produces :class:`Routes`, plain and comparable. The
:class:`RoutingTable` turns each snapshot into routes of live endpoints, keeping every
endpoint's statistics, budgets and connections across snapshots, so a reload or a weight
change neither forgets what was learned nor drops a call in flight: calls hold the objects
they started with, and an address that leaves is drained, not cut.

Under zero trust a route may name the workload its backends must be (``identity``: what
Kubernetes discovery derives from the Capability, what a routes file says): a backend whose
certificate names another is refused as its connection opens, before any call is sent on it,
and fails like an unreachable endpoint (retried elsewhere, ejected in a row).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from packetflow.actors.timing import rendezvous_owner
from packetflow.gateway.balancer import PeakEwma, pick_two
from packetflow.gateway.budget import ShareBudget
from packetflow.gateway.hedging import LatencyWindow
from packetflow.gateway.metrics import GatewayMetrics
from packetflow.gateway.outlier import (
    OutlierPolicy,
    OutlierState,
    consecutive_ejection_due,
    eject,
    may_eject,
    sweep,
)
from packetflow.gateway.policy import SERVER_ERRORS
from packetflow.gateway.upstream import PeerCheck, Upstream
from packetflow.identity.spiffe import SCHEME, SpiffeId, Workload
from packetflow.identity.workload import WorkloadIdentity
from packetflow.identity.x509 import AuthenticationError, spiffe_id_of
from packetflow.spec import Traffic, duration_seconds

log = logging.getLogger("packetflow.gateway")

STABLE, CANARY, MEMBERS = "stable", "canary", "members"


# ------------------------------------------------------------------ what discovery finds


@dataclass(frozen=True)
class CapabilityBackends:
    """A capability's backends: addresses of the stable and canary versions, and its policy.

    ``effects`` is None while unknown (the gateway then asks a backend, DescribeCapability).
    """

    name: str
    stable: tuple[str, ...] = ()
    canary: tuple[str, ...] = ()
    weight: int = 0
    traffic: Traffic = field(default_factory=Traffic)
    effects: tuple[str, ...] | None = None
    intent: str = ""
    implementation: str = ""
    identity: str | None = None  # who every backend must be (see expected_identity)


@dataclass(frozen=True)
class ActorBackends:
    """An actor type's members: (member id, address) pairs, as placement names them."""

    name: str
    members: tuple[tuple[str, str], ...] = ()
    identity: str | None = None  # who every member must be (see expected_identity)


def expected_identity(text: str, trust_domain: str) -> SpiffeId:
    """The SPIFFE ID a route's ``identity`` names: written out, or ``namespace/service-account``
    of ``trust_domain`` (the gateway's own); :class:`SpiffeIdError` when it is neither."""
    if text.startswith(SCHEME):
        return SpiffeId.parse(text)
    return Workload.parse(text).spiffe_id(trust_domain)


def presented_identity(transport: asyncio.BaseTransport) -> str:
    """Who a TLS connection's peer certificate says the peer is (for a refusal's message)."""
    ssl_object = transport.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if der is None:
        return "no certificate"
    try:
        return str(spiffe_id_of(x509.load_der_x509_certificate(der)))
    except AuthenticationError as exc:
        return f"unnamed ({exc.message})"


def identity_check(expected: SpiffeId) -> PeerCheck:
    """A backend connection's check: its certificate (already chained to our trust domain's
    authorities by the handshake) must name ``expected``; ValueError names both."""
    wanted = str(expected)

    def check(transport: asyncio.BaseTransport) -> None:
        presented = presented_identity(transport)
        if presented != wanted:
            peer = transport.get_extra_info("peername")
            log.warning("backend %s refused: it presented %s, expected %s", peer, presented,
                        wanted, extra={"endpoint": str(peer), "expected": wanted,
                                       "presented": presented})
            raise ValueError(f"the backend presented {presented}, expected {wanted}")

    return check


@dataclass(frozen=True)
class Routes:
    """Everything one discovery snapshot says; ``problems`` names what cannot be routed."""

    capabilities: Mapping[str, CapabilityBackends] = field(default_factory=dict)
    actors: Mapping[str, ActorBackends] = field(default_factory=dict)
    problems: Mapping[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------ policy in seconds


@dataclass(frozen=True)
class RoutePolicy:
    """:class:`packetflow.spec.Traffic` in the units the gateway computes with."""

    outlier: OutlierPolicy
    retry_percent: float
    retry_min_per_second: float
    retry_window: float
    max_attempts: int
    hedging: bool
    hedge_percentile: float
    hedge_percent: float
    hedge_min_delay: float

    @classmethod
    def from_traffic(cls, traffic: Traffic) -> RoutePolicy:
        """The policy a manifest's (or routes file's) ``traffic`` declares."""
        retries, hedging = traffic.retries, traffic.hedging
        return cls(OutlierPolicy.from_spec(traffic.outlier_detection), retries.budget_percent,
                   retries.min_per_second, duration_seconds(retries.window),
                   retries.max_attempts, hedging.enabled, hedging.percentile,
                   hedging.max_percent, duration_seconds(hedging.min_delay))


DEFAULT_POLICY = RoutePolicy.from_traffic(Traffic())


# ------------------------------------------------------------------ live objects


class Endpoint:
    """One address serving one version of one capability (or an actor type's member)."""

    __slots__ = ("address", "codes", "duration", "load", "member", "metrics", "outlier",
                 "route_name", "upstream", "version")

    def __init__(self, route_name: str, version: str, address: str, upstream: Upstream,
                 member: str | None, metrics: GatewayMetrics, now: float) -> None:
        self.route_name = route_name
        self.version = version
        self.address = address
        self.upstream = upstream
        self.member = member
        self.load = PeakEwma(now)
        self.outlier = OutlierState()
        self.metrics = metrics
        self.duration = metrics.request_duration.labels(route_name, version, address)
        self.codes: dict[str, Any] = {}  # code name -> counter child, filled as codes occur

    def count(self, code_name: str, seconds: float) -> None:
        """Record one attempt's outcome and (when answered) its latency."""
        child = self.codes.get(code_name)
        if child is None:
            child = self.codes[code_name] = self.metrics.requests.labels(
                self.route_name, self.version, self.address, code_name)
        child.inc()
        if seconds >= 0:
            self.duration.observe(seconds)


class Pool:
    """The endpoints of one version; ``available`` excludes the ejected ones."""

    __slots__ = ("available", "endpoints", "name", "next_sweep", "policy", "route_name")

    def __init__(self, route_name: str, name: str, endpoints: list[Endpoint],
                 policy: OutlierPolicy, now: float, previous: Pool | None = None) -> None:
        self.route_name = route_name
        self.name = name
        self.endpoints = endpoints
        self.policy = policy
        self.available = [e for e in endpoints if not e.outlier.ejected]
        # Frequent snapshots (endpoints churning) must not keep postponing the interval.
        self.next_sweep: float = previous.next_sweep if previous is not None \
            else now + policy.interval

    def pick(self, rng: random.Random, now: float,
             exclude: Iterable[Endpoint] = ()) -> Endpoint | None:
        """Two random choices by peak-EWMA cost, skipping ``exclude`` when others remain."""
        candidates = self.available
        if exclude:
            others = [e for e in candidates if e not in exclude]
            candidates = others or candidates
        return pick_two(candidates, lambda e: e.load.cost(now), rng)

    def why_empty(self) -> str:
        """Why no endpoint can take a call."""
        if not self.endpoints:
            return "no ready endpoint"
        return f"all {len(self.endpoints)} endpoints are ejected"


class CapabilityRoute:
    """A capability's pools, canary weight, policy, budgets and recent latency."""

    def __init__(self, backends: CapabilityBackends, stable: Pool, canary: Pool,
                 policy: RoutePolicy, retry_budget: ShareBudget, hedge_budget: ShareBudget,
                 latency: LatencyWindow) -> None:
        self.name = backends.name
        self.backends = backends
        self.stable = stable
        self.canary = canary
        self.weight = backends.weight
        self.policy = policy
        self.effects = backends.effects
        self.intent = backends.intent
        self.implementation = backends.implementation
        self.retry_budget = retry_budget
        self.hedge_budget = hedge_budget
        self.latency = latency

    @property
    def pure(self) -> bool:
        """Known to declare no effects: safe to run twice (retries, hedges)."""
        return self.effects == ()

    def pools(self) -> tuple[Pool, ...]:
        """Every pool of the route."""
        return (self.stable, self.canary)


class ActorRoute:
    """An actor type's members; an actor id belongs to one by rendezvous hashing."""

    def __init__(self, backends: ActorBackends, members: Pool, policy: RoutePolicy,
                 retry_budget: ShareBudget) -> None:
        self.name = backends.name
        self.backends = backends
        self.members = members
        self.policy = policy
        self.retry_budget = retry_budget
        self.by_member = {e.member: e for e in members.endpoints}
        self.intent = ""  # from a member's DescribeActorType, for ListActorTypes

    def owner(self, actor_id: str, exclude: Iterable[Endpoint] = ()) -> Endpoint | None:
        """The member that owns ``actor_id`` among those in service (placement's hashing);
        with ``exclude``, the next in line (where the actor moves if the owner is gone)."""
        skip = {e.member for e in exclude}
        members = [e.member for e in self.members.available if e.member not in skip]
        member = rendezvous_owner(actor_id, [m for m in members if m is not None])
        return None if member is None else self.by_member[member]

    def pools(self) -> tuple[Pool, ...]:
        """Every pool of the route."""
        return (self.members,)


Route = CapabilityRoute | ActorRoute


class RoutingTable:
    """The live routes, rebuilt from each discovery snapshot without losing state."""

    def __init__(self, metrics: GatewayMetrics, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 identity: WorkloadIdentity | None = None) -> None:
        self.metrics = metrics
        self.identity = identity  # mutual TLS to backends, as the gateway's workload
        self.clock = clock
        self.rng = rng or random.Random()
        self.capabilities: dict[str, CapabilityRoute] = {}
        self.actors: dict[str, ActorRoute] = {}
        self.problems: Mapping[str, str] = {}
        self.upstreams: dict[str, Upstream] = {}
        self.routes = Routes()

    # -------------------------------------------------------------- applying a snapshot

    def apply(self, routes: Routes) -> None:
        """Make ``routes`` current: reuse endpoints, budgets and connections that stay;
        drain connections to addresses no route names any more."""
        now = self.clock()
        capabilities = {name: self._capability_route(backends, now)
                        for name, backends in routes.capabilities.items()}
        actors = {name: self._actor_route(backends, now)
                  for name, backends in routes.actors.items()}
        used = {id(e.upstream) for route in _both(capabilities, actors)
                for pool in route.pools() for e in pool.endpoints}
        for key in [k for k, u in self.upstreams.items() if id(u) not in used]:
            self.upstreams.pop(key).retire()
        self._forget_metrics(capabilities, actors)
        self.capabilities, self.actors = capabilities, actors
        self.problems = routes.problems
        self.routes = routes
        for route in capabilities.values():
            self.metrics.canary_weight.labels(route.name).set(route.weight)
            for pool in route.pools():
                self.metrics.endpoints.labels(route.name, pool.name).set(len(pool.endpoints))
        for actor_route in actors.values():
            self.metrics.endpoints.labels(actor_route.name, MEMBERS).set(
                len(actor_route.members.endpoints))

    def _upstream(self, address: str, identity: str | None) -> Upstream:
        """The connection to ``address``, shared by every route expecting the same workload
        there (one expecting another gets a connection of its own, checked against it)."""
        expected = expected_identity(identity, self.identity.trust_domain) \
            if identity is not None and self.identity is not None else None
        key = address if expected is None else f"{address} as {expected}"
        upstream = self.upstreams.get(key)
        if upstream is None:
            check = identity_check(expected) if expected is not None else None
            upstream = self.upstreams[key] = Upstream(address, self.identity, check)
        return upstream

    def _endpoints(self, name: str, version: str, previous: Pool | None,
                   members: Iterable[tuple[str | None, str]], now: float,
                   identity: str | None = None) -> list[Endpoint]:
        known = {(e.member, e.address): e for e in previous.endpoints} if previous else {}
        endpoints = []
        for member, address in members:
            upstream = self._upstream(address, identity)
            endpoint = known.get((member, address))
            if endpoint is None or endpoint.upstream is not upstream:
                endpoint = Endpoint(name, version, address, upstream, member, self.metrics, now)
            endpoints.append(endpoint)
        return endpoints

    def _capability_route(self, backends: CapabilityBackends, now: float) -> CapabilityRoute:
        old = self.capabilities.get(backends.name)
        policy = RoutePolicy.from_traffic(backends.traffic)
        same_policy = old is not None and old.policy == policy
        pools = []
        for version, addresses in ((STABLE, backends.stable), (CANARY, backends.canary)):
            previous = None if old is None else (old.stable if version == STABLE
                                                 else old.canary)
            endpoints = self._endpoints(backends.name, version, previous,
                                        ((None, a) for a in dict.fromkeys(addresses)), now,
                                        backends.identity)
            pools.append(Pool(backends.name, version, endpoints, policy.outlier, now, previous))
        if old is not None and same_policy:
            retry_budget, hedge_budget, latency = \
                old.retry_budget, old.hedge_budget, old.latency
        else:
            retry_budget = self._retry_budget(policy)
            hedge_budget = ShareBudget(policy.hedge_percent, 0.0, policy.retry_window,
                                       self.clock)
            latency = LatencyWindow(policy.hedge_percentile)
        route = CapabilityRoute(backends, pools[0], pools[1], policy, retry_budget,
                                hedge_budget, latency)
        if old is not None:  # what was learned from a backend still holds
            if backends.effects is None:
                route.effects = old.effects
            if not backends.intent:
                route.intent, route.implementation = old.intent, old.implementation
        return route

    def _retry_budget(self, policy: RoutePolicy) -> ShareBudget:
        return ShareBudget(policy.retry_percent, policy.retry_min_per_second,
                           policy.retry_window, self.clock)

    def _actor_route(self, backends: ActorBackends, now: float) -> ActorRoute:
        old = self.actors.get(backends.name)
        previous = None if old is None else old.members
        policy = DEFAULT_POLICY
        endpoints = self._endpoints(backends.name, MEMBERS, previous, backends.members, now,
                                    backends.identity)
        pool = Pool(backends.name, MEMBERS, endpoints, policy.outlier, now, previous)
        budget = old.retry_budget if old is not None else self._retry_budget(policy)
        route = ActorRoute(backends, pool, policy, budget)
        if old is not None:  # what a member said still holds
            route.intent = old.intent
        return route

    def _forget_metrics(self, capabilities: Mapping[str, CapabilityRoute],
                        actors: Mapping[str, ActorRoute]) -> None:
        """Drop the series of endpoints that left, so churn does not grow /metrics."""
        def keys(routes: Iterable[Route]) -> set[tuple[str, str, str]]:
            return {(route.name, e.version, e.address) for route in routes
                    for pool in route.pools() for e in pool.endpoints}
        kept = keys(_both(capabilities, actors))
        for route in _both(self.capabilities, self.actors):
            for pool in route.pools():
                for e in pool.endpoints:
                    if (route.name, e.version, e.address) in kept:
                        continue
                    _remove(self.metrics.request_duration, route.name, e.version, e.address)
                    for code in e.codes:
                        _remove(self.metrics.requests, route.name, e.version, e.address, code)

    # -------------------------------------------------------------- outlier bookkeeping

    def route(self, name: str) -> Route | None:
        """The current route of a capability or actor type."""
        return self.capabilities.get(name) or self.actors.get(name)

    def record(self, route_name: str, endpoint: Endpoint, code: int,
               gateway_failure: bool) -> None:
        """Count an attempt's outcome for outlier detection; eject on failures in a row.

        The current route is looked up by name: a call may have started before a reload.
        """
        state = endpoint.outlier
        state.record(code not in SERVER_ERRORS, gateway_failure)
        route = self.route(route_name)
        if route is None or not consecutive_ejection_due(state, route.policy.outlier):
            return
        for pool in route.pools():
            if endpoint in pool.endpoints and may_eject([e.outlier for e in pool.endpoints],
                                                        pool.policy):
                self._eject(route, pool, endpoint, "consecutive-failures")
                return

    def _eject(self, route: Route, pool: Pool, endpoint: Endpoint, reason: str) -> None:
        seconds = eject(endpoint.outlier, self.clock(), pool.policy)
        pool.available = [e for e in pool.endpoints if not e.outlier.ejected]
        self.metrics.ejections.labels(route.name, endpoint.address, reason).inc()
        self._count_ejected(route)
        log.warning("ejected %s from %s for %.1fs (%s)", endpoint.address, route.name, seconds,
                    reason, extra={"capability": route.name, "endpoint": endpoint.address,
                                   "reason": reason, "seconds": seconds})

    def _count_ejected(self, route: Route) -> None:
        self.metrics.ejected.labels(route.name).set(
            sum(e.outlier.ejected for pool in route.pools() for e in pool.endpoints))

    def sweep(self) -> None:
        """Each pool's interval work when it is due: returns, success-rate ejections."""
        now = self.clock()
        for route in _both(self.capabilities, self.actors):
            for pool in route.pools():
                if now < pool.next_sweep:
                    continue
                pool.next_sweep = now + pool.policy.interval
                result = sweep([e.outlier for e in pool.endpoints], now, pool.policy)
                for index in result.ejected:
                    endpoint = pool.endpoints[index]
                    self.metrics.ejections.labels(route.name, endpoint.address,
                                                  "success-rate").inc()
                    log.warning("ejected %s from %s (success rate)", endpoint.address,
                                route.name, extra={"capability": route.name,
                                                   "endpoint": endpoint.address,
                                                   "reason": "success-rate"})
                for index in result.returned:
                    log.info("%s returns to %s", pool.endpoints[index].address, route.name)
                if result.ejected or result.returned:
                    pool.available = [e for e in pool.endpoints if not e.outlier.ejected]
                    self._count_ejected(route)

    async def aclose(self) -> None:
        """Close every backend connection."""
        for upstream in list(self.upstreams.values()):
            await upstream.aclose()
        self.upstreams.clear()


def _both(capabilities: Mapping[str, CapabilityRoute],
          actors: Mapping[str, ActorRoute]) -> list[Route]:
    return [*capabilities.values(), *actors.values()]


def _remove(family: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        family.remove(*labels)
