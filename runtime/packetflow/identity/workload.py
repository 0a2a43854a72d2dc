"""A workload's own identity inside its cluster: its certificate, key and trust bundle, read
from files (a mounted Secret, ``packetflow dev --mtls``'s state dir) and re-read when they
change, as the credentials of every server and client the workload runs.

Servers built from it pick up a rotated certificate at the next handshake; clients see a new
:attr:`WorkloadIdentity.generation` and open new channels (calls in flight finish on the old
ones), so rotation fails no call. The bundle is the cluster's trust domain only: a certificate
of any other domain, or of an unknown authority, never authenticates.
"""

from __future__ import annotations

import datetime
import functools
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from packetflow.identity.files import Watched
from packetflow.identity.spiffe import SpiffeId, Workload, workload_of
from packetflow.identity.tls import (
    ALPN_H2,
    Credentials,
    channel_credentials,
    client_context,
    load_credentials,
    server_context,
)
from packetflow.identity.x509 import AuthenticationError, BundleError, TrustBundle, authenticate


@dataclass(frozen=True)
class WorkloadMaterial:
    """One consistent version of the files: our credentials and our trust domain's bundle."""

    credentials: Credentials
    bundle: TrustBundle

    @property
    def trust_domain(self) -> str:
        """Our trust domain (the cluster's)."""
        return self.bundle.trust_domain

    @functools.cached_property
    def bundle_pem(self) -> bytes:
        """The bundle as PEM (what TLS stacks load as roots)."""
        return self.bundle.pem()

    @functools.cached_property
    def grpc_server_configuration(self) -> grpc.ServerCertificateConfiguration:
        """What gRPC's server presents and verifies clients against."""
        return grpc.ssl_server_certificate_configuration(
            [(self.credentials.key_pem, self.credentials.chain_pem)],
            root_certificates=self.bundle_pem)

    @functools.cached_property
    def grpc_channel_credentials(self) -> grpc.ChannelCredentials:
        """What gRPC's client presents, trusting servers of our trust domain only."""
        return channel_credentials(self.credentials, self.bundle_pem)


def load_material(cert: Path, key: Path, ca: Path) -> WorkloadMaterial:
    """Read the three files; :class:`BundleError` names the file at fault (a certificate not
    of the bundle's trust domain, or not signed by it, is one)."""
    credentials = load_credentials(cert, key)
    try:
        pem = ca.read_bytes()
    except OSError as exc:
        raise BundleError(f"{exc.filename}: {exc.strerror}") from None
    domain = credentials.spiffe_id.trust_domain
    bundle = TrustBundle.from_pem(domain, pem, str(ca))
    try:
        authenticate(credentials.leaf, {domain: bundle}, datetime.datetime.now(datetime.UTC))
    except AuthenticationError as exc:
        raise BundleError(f"{cert}: {exc.message} (against {ca})") from None
    return WorkloadMaterial(credentials, bundle)


class WorkloadIdentity:
    """Our certificate, key and bundle from files, re-read (at most every ``interval``
    seconds) when they change; a half-rotated set keeps the last good one (``Watched``)."""

    def __init__(self, cert: Path, key: Path, ca: Path, *, interval: float = 1.0) -> None:
        self.files = (cert, key, ca)
        self.watched = Watched([cert, key, ca], lambda: load_material(cert, key, ca),
                               interval=interval)
        # gRPC asks for server material from its own threads, handshakes run in parallel.
        self._lock = threading.Lock()
        self._server_contexts: dict[str, tuple[int, ssl.SSLContext]] = {}

    def current(self) -> WorkloadMaterial:
        """The material now (reloaded first when the files changed)."""
        with self._lock:
            return self.watched.get()

    @property
    def generation(self) -> int:
        """Bumped by every reload: clients holding older credentials open new channels."""
        self.current()
        return self.watched.generation

    @property
    def spiffe_id(self) -> SpiffeId:
        """Our SPIFFE ID."""
        return self.current().credentials.spiffe_id

    @property
    def workload(self) -> Workload | None:
        """The namespace and service account our SPIFFE ID names, if it is a workload's."""
        return workload_of(self.spiffe_id)

    @property
    def trust_domain(self) -> str:
        """Our trust domain."""
        return self.current().trust_domain

    def grpc_server_credentials(self, client_certificate: bool = True
                                ) -> grpc.ServerCredentials:
        """gRPC server credentials requiring a client certificate of our trust domain (or,
        ``client_certificate=False``, none: the token port); each new handshake uses the
        material current then (rotation without a restart)."""
        served = [self.watched.generation]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            material = self.current()
            if self.watched.generation == served[0]:
                return None  # unchanged: gRPC keeps the configuration it has
            served[0] = self.watched.generation
            return material.grpc_server_configuration

        return grpc.dynamic_ssl_server_credentials(
            self.current().grpc_server_configuration, fetch,
            require_client_authentication=client_certificate)

    def server_ssl_context(self, alpn: str = ALPN_H2,
                           client_certificate: bool = True) -> ssl.SSLContext:
        """A TLS 1.3 server context (Python's ssl) presenting our certificate and asking for
        the client's (checked after the handshake by :meth:`authenticate`; with
        ``client_certificate=False`` asking for none: a token listener), serving ``alpn``;
        one per generation of the files."""
        material = self.current()
        generation = self.watched.generation
        key = f"{alpn}/{'mutual' if client_certificate else 'server'}"
        cached = self._server_contexts.get(key)
        if cached is None or cached[0] != generation:
            context = server_context(material.credentials, material.bundle_pem, alpn)
            if not client_certificate:
                context.verify_mode = ssl.CERT_NONE
            cached = self._server_contexts[key] = (generation, context)
        return cached[1]

    def rotating_server_context(self, alpn: str) -> ssl.SSLContext:
        """A server context for a listener that takes one context for good (uvicorn): each
        handshake switches to the current generation's (:meth:`server_ssl_context`)."""
        listener = server_context(self.current().credentials, self.current().bundle_pem, alpn)

        def switch(connection: ssl.SSLObject | ssl.SSLSocket, name: str | None,
                   context: ssl.SSLContext) -> None:
            connection.context = self.server_ssl_context(alpn)

        listener.sni_callback = switch
        return listener

    def authenticate(self, der: bytes | None) -> Principal:
        """The caller a connection's client certificate (DER; ``None``: it sent none) proves:
        of our trust domain, vouched for by our bundle, valid now; else
        :class:`AuthenticationError` saying why not."""
        if der is None:
            raise AuthenticationError("no-client-certificate",
                                      "the connection carries no client certificate")
        material = self.current()
        peer = authenticate(der, {material.trust_domain: material.bundle},
                            datetime.datetime.now(datetime.UTC))
        return Principal.of(peer.spiffe_id, peer.not_after.timestamp(), "certificate")

    def client_ssl_context(self) -> ssl.SSLContext:
        """A TLS 1.3 client context (Python's ssl) presenting our certificate, trusting our
        trust domain's authorities only (made anew per call: cheap next to a handshake)."""
        material = self.current()
        return client_context(material.credentials, material.bundle_pem)


@dataclass(frozen=True)
class Principal:
    """A caller whose identity was proven: by a certificate, a token, or a trusted forwarder
    that proved it first. ``caller`` is what handlers see as ``ctx.caller``."""

    spiffe_id: SpiffeId
    workload: Workload | None
    not_after: float | None  # epoch seconds; after it the proof is void
    source: str  # certificate, token, forwarded

    @classmethod
    def of(cls, spiffe_id: SpiffeId, not_after: float | None, source: str) -> Principal:
        """A principal for ``spiffe_id`` (its workload parsed once, here)."""
        return cls(spiffe_id, workload_of(spiffe_id), not_after, source)

    @functools.cached_property
    def caller(self) -> str:
        """The SPIFFE ID as text."""
        return str(self.spiffe_id)
