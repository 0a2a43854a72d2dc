"""The gateway's workload identity: mutual TLS on both sides of its HTTP/2 relay.

Callers present certificates of the cluster's trust domain; each connection is authenticated
once, after its handshake, and the proven caller rides on every call the gateway forwards
(``packetflow-caller``, which runtimes believe only from a trusted forwarder such as the
gateway). Towards backends the gateway presents its own certificate. Frames are relayed as
before: TLS only wraps the bytes of each connection.
"""

from __future__ import annotations

import datetime
import ssl

from packetflow.identity.tls import ALPN_H2, client_context, server_context
from packetflow.identity.workload import Principal, WorkloadIdentity
from packetflow.identity.x509 import AuthenticationError, authenticate


class GatewayIdentity:
    """SSL contexts from the current material (made once per generation: rotation) and the
    authentication of callers' certificates."""

    def __init__(self, identity: WorkloadIdentity) -> None:
        self.identity = identity
        self._contexts: dict[bool, tuple[int, ssl.SSLContext]] = {}

    @property
    def generation(self) -> int:
        """Bumped when the files were reloaded: connections to backends are made anew."""
        return self.identity.generation

    def _context(self, server_side: bool) -> ssl.SSLContext:
        generation = self.identity.generation
        cached = self._contexts.get(server_side)
        if cached is not None and cached[0] == generation:
            return cached[1]
        material = self.identity.current()
        make = server_context if server_side else client_context
        context = make(material.credentials, material.bundle_pem)
        self._contexts[server_side] = (generation, context)
        return context

    def server_context(self) -> ssl.SSLContext:
        """For the next caller's handshake: our certificate, a client certificate asked for
        (validity and trust domain are checked after the handshake, by :meth:`authenticate`)."""
        return self._context(True)

    def client_context(self) -> ssl.SSLContext:
        """For the next connection to a backend: our certificate, our authorities only."""
        return self._context(False)

    def authenticate(self, der: bytes | None) -> Principal:
        """The caller a connection's client certificate proves; :class:`AuthenticationError`
        (no certificate, expired, another trust domain...) says why there is none."""
        if der is None:
            raise AuthenticationError("no-client-certificate",
                                      "the connection carries no client certificate")
        material = self.identity.current()
        peer = authenticate(der, {material.trust_domain: material.bundle},
                            datetime.datetime.now(datetime.UTC))
        return Principal.of(peer.spiffe_id, peer.not_after.timestamp(), "certificate")


def negotiated_h2(transport: object) -> bool:
    """Whether a TLS transport negotiated HTTP/2 (gRPC insists on ALPN ``h2``)."""
    get = getattr(transport, "get_extra_info", None)
    ssl_object = get("ssl_object") if get is not None else None
    return ssl_object is not None and ssl_object.selected_alpn_protocol() == ALPN_H2
