"""What the federation gateway knows of its peers and imports, as plain data shared by the
gateway (:mod:`packetflow.federation.gateway`, which keeps it current) and its data path
(:mod:`packetflow.federation.datapath`, which reads it on every call)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc

from packetflow.contracts import CompiledContract
from packetflow.federation.catalog import CatalogEntry
from packetflow.gateway.upstream import Upstream
from packetflow.identity.x509 import PeerCertificate
from packetflow.spec import FederationImport
from packetflow.v1 import federation_pb2_grpc

NOT_READ = "the peer's catalog has not been read yet"  # transient: UNAVAILABLE, not a verdict


@dataclass(frozen=True)
class Inbound:
    """Who an accepted inbound connection is."""

    peer: str
    certificate: PeerCertificate
    address: str


@dataclass
class PeerLink:
    """Our side of one peer: the reused channel, its catalog, what we saw of it."""

    name: str
    channel: grpc.aio.Channel | None = None
    stub: federation_pb2_grpc.FederationStub | None = None
    key: tuple[Any, ...] | None = None  # the material the channel was built with
    upstream: Upstream | None = None  # the data path's connection (Invoke)
    upstream_key: tuple[Any, ...] | None = None
    checked_key: tuple[Any, ...] | None = None  # the material the server's ID was checked for
    catalog: dict[str, CatalogEntry] = field(default_factory=dict)
    version: str = ""
    organization: str = ""
    connected: bool = False
    last_catalog: float | None = None
    last_handshake: float | None = None  # our last TLS handshake with it
    certificate_expiry: float | None = None  # its server certificate
    inbound_handshake: float | None = None  # its last TLS handshake with us
    inbound_expiry: float | None = None  # its client certificate
    identity_error: str | None = None  # its server failed our identity check
    fingerprint: str = ""  # its server certificate, as last checked
    error: str | None = None


@dataclass
class ImportState:
    """One import: the contract pinned when it was first seen, or why it cannot be called."""

    spec: FederationImport
    entry: CatalogEntry | None = None
    requires: CompiledContract = field(default_factory=lambda: CompiledContract.compile(None))
    provides: CompiledContract = field(default_factory=lambda: CompiledContract.compile(None))
    problem: str | None = NOT_READ

    def pin(self, entry: CatalogEntry) -> None:
        """Take ``entry``'s contract as the one local callers are checked against."""
        self.entry = entry
        self.requires = CompiledContract.compile(entry.requires)
        self.provides = CompiledContract.compile(entry.provides)
        self.problem = None
