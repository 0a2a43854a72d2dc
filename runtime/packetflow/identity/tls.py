"""TLS 1.3 with mutual authentication: our credentials, contexts and gRPC channel credentials.

Servers authenticate clients in two steps. OpenSSL checks that the client's chain reaches one
of the authorities it was given (the union of every trusted bundle) during the handshake; the
caller then checks the leaf against the bundle of the trust domain its SPIFFE ID names
(:func:`packetflow.identity.x509.authenticate`). OpenSSL's own validity-period check is turned
off so that an expired or not-yet-valid certificate completes the handshake and is refused by
that second step, with a reason and a fingerprint to audit, instead of vanishing in a failed
handshake nobody can see.
"""

from __future__ import annotations

import contextlib
import functools
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from packetflow.identity.spiffe import SpiffeId
from packetflow.identity.x509 import (
    AuthenticationError,
    BundleError,
    fingerprint,
    load_certificates,
    spiffe_id_of,
)

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (Python's ssl has no name for it): the validity period is
# checked after the handshake, where a refusal can be audited (see the module docstring).
_NO_CHECK_TIME = 0x200000
ALPN_H2 = "h2"  # gRPC speaks HTTP/2 and refuses a TLS session that did not negotiate it


@dataclass(frozen=True)
class Credentials:
    """A workload's certificate chain and private key, checked to belong together."""

    chain_pem: bytes
    key_pem: bytes
    leaf: x509.Certificate

    @functools.cached_property
    def spiffe_id(self) -> SpiffeId:
        """The SPIFFE ID of our leaf certificate."""
        return spiffe_id_of(self.leaf)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Our leaf certificate's fingerprint."""
        return fingerprint(self.leaf)

    def load_into(self, context: ssl.SSLContext) -> None:
        """Present these credentials from ``context`` (at its next handshakes: rotation)."""
        with _private_files(self) as (cert, key):
            context.load_cert_chain(cert, key)


def load_credentials(cert_path: Path, key_path: Path) -> Credentials:
    """Read a chain (leaf first) and its key; :class:`BundleError` names the file at fault."""
    try:
        chain_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{exc.filename}: {exc.strerror}") from None
    leaf = load_certificates(chain_pem, str(cert_path))[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != leaf.public_key().public_bytes(*raw):
        raise BundleError(f"{key_path} is not the key of the certificate in {cert_path}")
    try:
        spiffe_id_of(leaf)
    except AuthenticationError as exc:
        raise BundleError(f"{cert_path}: {exc.message}") from None
    return Credentials(chain_pem, key_pem, leaf)


@contextlib.contextmanager
def _private_files(credentials: Credentials) -> Iterator[tuple[str, str]]:
    """The chain and key in files only we can read: Python's ssl loads a chain from files
    only, and the exact bytes checked above are what must be loaded."""
    with tempfile.TemporaryDirectory(prefix="packetflow-tls-") as directory:
        cert, key = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
        for path, data in ((cert, credentials.chain_pem), (key, credentials.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
        yield cert, key


def _context(purpose: int, credentials: Credentials, authorities_pem: bytes,
             alpn: str = ALPN_H2) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    credentials.load_into(context)
    if authorities_pem:
        context.load_verify_locations(cadata=authorities_pem.decode())
    context.set_alpn_protocols([alpn])
    return context


def server_context(credentials: Credentials, authorities_pem: bytes,
                   alpn: str = ALPN_H2) -> ssl.SSLContext:
    """A TLS 1.3-only server context asking every client for a certificate chaining to one of
    ``authorities_pem``; validity periods and a missing certificate are left to the caller's
    second step (see the module docstring), which refuses them where they can be audited.
    ``alpn``: the protocol served (``http/1.1`` for an HTTP/1.1 server)."""
    context = _context(ssl.PROTOCOL_TLS_SERVER, credentials, authorities_pem, alpn)
    context.verify_mode = ssl.CERT_OPTIONAL
    context.verify_flags |= _NO_CHECK_TIME
    # No session tickets: every connection is a full handshake with a certificate checked
    # against the bundles of that moment (channels are long-lived; resumption would save
    # little and hide rotation).
    context.num_tickets = 0
    return context


def client_context(credentials: Credentials | None, authorities_pem: bytes) -> ssl.SSLContext:
    """A TLS 1.3-only client context presenting ``credentials`` (if any) and trusting only
    ``authorities_pem``; the server is identified by its SPIFFE ID, not by a host name."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    if credentials is not None:
        credentials.load_into(context)
    context.load_verify_locations(cadata=authorities_pem.decode())
    context.set_alpn_protocols([ALPN_H2])
    return context


def channel_credentials(credentials: Credentials,
                        authorities_pem: bytes) -> grpc.ChannelCredentials:
    """gRPC channel credentials presenting ``credentials`` to a server whose certificate must
    chain to ``authorities_pem`` (and name the dialled host in its SANs)."""
    return grpc.ssl_channel_credentials(root_certificates=authorities_pem,
                                        private_key=credentials.key_pem,
                                        certificate_chain=credentials.chain_pem)
