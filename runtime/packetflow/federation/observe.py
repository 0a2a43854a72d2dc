"""What the gateway shows: Prometheus metrics and a JSON status (what the operator copies
into the Federation's status), both on one small HTTP server off the event loop."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from packetflow.metrics import LATENCY_BUCKETS

STATUS_PATH = "/status"


class _Gauges(Collector):
    """Gauges read at scrape time from the gateway (no per-call updates)."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]
                 ) -> None:
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}
        for name, help_text, labels, value in self.read():
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, help_text,
                                                             labels=list(labels))
            family.add_metric(list(labels.values()), value)
        yield from families.values()


@dataclass
class FederationMetrics:
    """The gateway's metric families, on a registry of their own."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        self.calls = Counter(
            "packetflow_federation_calls", "Federated calls by direction, peer, capability "
            "and outcome code (refusals included).",
            ["direction", "peer", "capability", "code"], registry=self.registry)
        self.duration = Histogram(
            "packetflow_federation_call_duration_seconds",
            "Duration of allowed federated calls, gateway to gateway.",
            ["direction", "peer"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._answered: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        self.refusals = Counter(
            "packetflow_federation_refusals", "Refused connections and calls, by reason.",
            ["direction", "peer", "reason"], registry=self.registry)
        self.sla_breaches = Counter(
            "packetflow_federation_sla_breaches",
            "SLA windows that broke an objective (side: exporter or importer).",
            ["side", "peer", "capability"], registry=self.registry)

    def answered(self, direction: str, peer: str, capability: str, code: str,
                 seconds: float) -> None:
        """Count one allowed call and its duration (label children kept: per-call path)."""
        key = (direction, peer, capability, code)
        children = self._answered.get(key)
        if children is None:
            children = self._answered[key] = (self.calls.labels(*key),
                                              self.duration.labels(direction, peer))
        children[0].inc()
        children[1].observe(seconds)

    def gauges(self, read: Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]
               ) -> None:
        """Register gauges computed by ``read`` at each scrape."""
        self.registry.register(_Gauges(read))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


def start_http(address: str, registry: CollectorRegistry,
               status: Callable[[], bytes]) -> tuple[ThreadingWSGIServer, int]:
    """Serve ``/metrics`` and ``/status`` at ``host:port`` in a daemon thread."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO") == STATUS_PATH:
            body = status()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        return list(metrics_app(environ, start_response))

    host, _, port = address.rpartition(":")
    server = make_server(host.strip("[]"), int(port), app, ThreadingWSGIServer,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="federation-http", daemon=True).start()
    return server, int(server.server_port)
