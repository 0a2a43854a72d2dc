"""Where a remote step's ``address`` points: ``host:port`` as written, or a Kubernetes Service.

A Service is named ``name`` (this namespace), ``name.namespace`` or by its full DNS name.
Its gRPC port comes from the SRV record Kubernetes DNS publishes for the named port ``grpc``
(``_grpc._tcp.<service>``); without one, the runtime's default port is assumed, which is
what the operator gives every runtime Service.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver

log = logging.getLogger("packetflow.composition.resolve")

DEFAULT_GRPC_PORT = 50051
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# How long an answer is reused when DNS gives no TTL worth trusting (a negative answer).
NEGATIVE_TTL_SECONDS = 30.0


def current_namespace(environ: dict[str, str] | None = None) -> str:
    """The pod's namespace: ``PACKETFLOW_NAMESPACE``, else the service account's, else default."""
    environ = dict(os.environ) if environ is None else environ
    if environ.get("PACKETFLOW_NAMESPACE"):
        return environ["PACKETFLOW_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


DEFAULT_CLUSTER_DOMAIN = "cluster.local"  # unless PACKETFLOW_CLUSTER_DOMAIN says otherwise


def service_fqdn(name: str, namespace: str, cluster_domain: str) -> str:
    """``svc`` or ``svc.ns`` -> ``svc.ns.svc.<cluster domain>``; longer names are kept."""
    parts = name.rstrip(".").split(".")
    if len(parts) == 1:
        parts.append(namespace)
    if len(parts) == 2:
        return f"{parts[0]}.{parts[1]}.svc.{cluster_domain}"
    return name.rstrip(".")


class ServiceResolver:
    """Turns step addresses into ``host:port`` targets, caching SRV answers for their TTL."""

    def __init__(self, namespace: str | None = None, cluster_domain: str | None = None, *,
                 nameservers: Sequence[tuple[str, int]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.namespace = namespace or current_namespace()
        self.cluster_domain = cluster_domain or os.environ.get("PACKETFLOW_CLUSTER_DOMAIN",
                                                               DEFAULT_CLUSTER_DOMAIN)
        self.nameservers = list(nameservers) if nameservers is not None else None
        self.clock = clock
        self.cache: dict[str, tuple[str, float]] = {}
        self._resolver: dns.asyncresolver.Resolver | None = None

    async def resolve(self, address: str) -> str:
        """``host:port`` unchanged; a Service name -> its SRV target and port."""
        if ":" in address:
            return address
        cached = self.cache.get(address)
        if cached is not None and cached[1] > self.clock():
            return cached[0]
        target, ttl = await self._lookup(service_fqdn(address, self.namespace,
                                                      self.cluster_domain))
        self.cache[address] = (target, self.clock() + ttl)
        return target

    async def _lookup(self, fqdn: str) -> tuple[str, float]:
        try:
            answer = await self.resolver().resolve(f"_grpc._tcp.{fqdn}", "SRV", lifetime=2.0)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers,
                dns.exception.Timeout) as exc:
            log.info("no SRV record for %s (%s); assuming port %d", fqdn,
                     type(exc).__name__, DEFAULT_GRPC_PORT)
            return f"{fqdn}:{DEFAULT_GRPC_PORT}", NEGATIVE_TTL_SECONDS
        # Lowest priority first, then highest weight: the record RFC 2782 tries first.
        best = min(answer, key=lambda record: (record.priority, -record.weight))
        host = best.target.to_text().rstrip(".")
        ttl = float(answer.rrset.ttl) if answer.rrset is not None else NEGATIVE_TTL_SECONDS
        return f"{host}:{best.port}", ttl

    def resolver(self) -> dns.asyncresolver.Resolver:
        """The DNS resolver: the system's, or the given nameservers (tests, custom DNS)."""
        if self._resolver is None:
            if self.nameservers is None:
                self._resolver = dns.asyncresolver.Resolver()
            else:
                self._resolver = dns.asyncresolver.Resolver(configure=False)
                self._resolver.nameservers = [host for host, _ in self.nameservers]
                self._resolver.port = self.nameservers[0][1]
        return self._resolver
