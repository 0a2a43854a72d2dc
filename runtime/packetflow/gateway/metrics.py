"""Prometheus metrics of the gateway, per capability (or actor type) and endpoint."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from packetflow.metrics import LATENCY_BUCKETS


@dataclass
class GatewayMetrics:
    """The gateway's metric families, on a registry of their own."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        self.calls = Counter(
            "packetflow_gateway_calls", "Calls through the gateway by final outcome code.",
            ["capability", "code"], registry=self.registry)
        self.call_duration = Histogram(
            "packetflow_gateway_call_duration_seconds",
            "Time from a call's arrival to its answer, retries and hedges included.",
            ["capability"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter(
            "packetflow_gateway_requests",
            "Attempts sent to an endpoint (version: stable, canary or members) by outcome "
            "code (CANCELLED: a hedge that lost).",
            ["capability", "version", "endpoint", "code"], registry=self.registry)
        self.request_duration = Histogram(
            "packetflow_gateway_request_duration_seconds",
            "Time from an attempt's start to its endpoint's answer.",
            ["capability", "version", "endpoint"], buckets=LATENCY_BUCKETS,
            registry=self.registry)
        self.retries = Counter(
            "packetflow_gateway_retries", "Attempts made again after a failure.",
            ["capability"], registry=self.registry)
        self.hedges = Counter(
            "packetflow_gateway_hedges", "Second attempts started for a slow call.",
            ["capability"], registry=self.registry)
        self.budget_exhausted = Counter(
            "packetflow_gateway_budget_exhausted",
            "Retries (kind=retry) or hedges (kind=hedge) refused because the budget was spent.",
            ["capability", "kind"], registry=self.registry)
        self.ejections = Counter(
            "packetflow_gateway_ejections",
            "Endpoints ejected, by reason (consecutive-failures, success-rate).",
            ["capability", "endpoint", "reason"], registry=self.registry)
        self.ejected = Gauge(
            "packetflow_gateway_endpoints_ejected", "Endpoints ejected right now.",
            ["capability"], registry=self.registry)
        self.endpoints = Gauge(
            "packetflow_gateway_endpoints", "Endpoints known, per version.",
            ["capability", "version"], registry=self.registry)
        self.canary_weight = Gauge(
            "packetflow_gateway_canary_weight", "Percent of calls sent to the canary.",
            ["capability"], registry=self.registry)
        self.unauthenticated = Counter(
            "packetflow_gateway_unauthenticated_connections",
            "Connections refused under mutual TLS, by reason (plaintext, "
            "untrusted-certificate, no-client-certificate, expired, unknown-trust-domain...).",
            ["reason"], registry=self.registry)
        self.unauthenticated_calls = Counter(
            "packetflow_gateway_unauthenticated_calls",
            "Calls refused on the token listener, by reason (no-credentials, token-refused, "
            "wrong-audience, not-a-service-account, review-failed): nothing was forwarded.",
            ["reason"], registry=self.registry)
