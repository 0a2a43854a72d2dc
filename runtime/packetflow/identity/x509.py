"""Trust bundles per trust domain, and authenticating a certificate against the right one.

The SPIFFE federation rule: a bundle authenticates only its own trust domain. A certificate
names its trust domain in its SPIFFE ID; it is checked against that domain's bundle and no
other, so a certificate signed by one peer's authority that claims another peer's (or our
own) trust domain is refused, even though the TLS layer, which trusts every bundle at once,
let it through.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from packetflow.identity.spiffe import SpiffeId, SpiffeIdError, check_trust_domain


class AuthenticationError(Exception):
    """A certificate that does not authenticate; ``reason`` is a stable short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class BundleError(ValueError):
    """Bytes that are not a usable trust bundle (or certificate chain)."""


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lower-case hex (what audit records carry)."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_certificates(pem: bytes, what: str) -> tuple[x509.Certificate, ...]:
    """Every certificate in a PEM text; :class:`BundleError` naming ``what`` when none parse."""
    try:
        certificates = tuple(x509.load_pem_x509_certificates(pem))
    except ValueError as exc:
        raise BundleError(f"{what}: not PEM certificates ({exc})") from None
    if not certificates:
        raise BundleError(f"{what}: holds no certificate")
    return certificates


def spiffe_ids(certificate: x509.Certificate) -> list[str]:
    """The ``spiffe://`` URIs among the certificate's subject alternative names."""
    try:
        names = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [uri for uri in names.get_values_for_type(x509.UniformResourceIdentifier)
            if uri.startswith("spiffe://")]


def spiffe_id_of(certificate: x509.Certificate) -> SpiffeId:
    """The certificate's one SPIFFE ID (X509-SVID: exactly one URI SAN), or
    :class:`AuthenticationError`."""
    found = spiffe_ids(certificate)
    if len(found) != 1:
        raise AuthenticationError(
            "no-spiffe-id", "the certificate carries no SPIFFE ID" if not found else
            f"the certificate carries {len(found)} SPIFFE IDs; an X509-SVID has exactly one")
    try:
        return SpiffeId.parse(found[0])
    except SpiffeIdError as exc:
        raise AuthenticationError("bad-spiffe-id", f"the certificate's SPIFFE ID: {exc}") \
            from None


@dataclass(frozen=True)
class TrustBundle:
    """The authorities (CA certificates) that vouch for one trust domain's identities."""

    trust_domain: str
    authorities: tuple[x509.Certificate, ...]

    @classmethod
    def from_pem(cls, trust_domain: str, pem: bytes, source: str = "bundle") -> TrustBundle:
        """Parse a PEM bundle; :class:`BundleError` names ``source`` and what is wrong."""
        try:
            check_trust_domain(trust_domain)
        except SpiffeIdError as exc:
            raise BundleError(f"{source}: {exc}") from None
        authorities = load_certificates(pem, source)
        for authority in authorities:
            try:
                constraints = authority.extensions.get_extension_for_class(
                    x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                constraints = None
            if constraints is None or not constraints.ca:
                raise BundleError(f"{source}: {authority.subject.rfc4514_string() or 'a cert'}"
                                  " is not a CA certificate (basicConstraints CA:TRUE)")
        return cls(trust_domain, authorities)

    @functools.cached_property
    def fingerprints(self) -> frozenset[str]:
        """Fingerprints of the bundle's authorities (computed once: checked on every call)."""
        return frozenset(fingerprint(a) for a in self.authorities)

    def pem(self) -> bytes:
        """The bundle as PEM (what TLS stacks load as root certificates)."""
        return b"".join(a.public_bytes(serialization.Encoding.PEM) for a in self.authorities)


@dataclass(frozen=True)
class PeerCertificate:
    """An authenticated certificate: whose it is and which authority vouched for it."""

    spiffe_id: SpiffeId
    fingerprint: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    authority: str  # fingerprint of the bundle authority the chain ends at

    def valid_at(self, now: datetime.datetime) -> bool:
        """Whether ``now`` is inside the certificate's validity period."""
        return self.not_before <= now <= self.not_after


def check_validity(certificate: x509.Certificate, now: datetime.datetime) -> None:
    """:class:`AuthenticationError` (``expired`` / ``not-yet-valid``) outside its period."""
    if now > certificate.not_valid_after_utc:
        raise AuthenticationError("expired", "the certificate expired at "
                                  f"{certificate.not_valid_after_utc.isoformat()}")
    if now < certificate.not_valid_before_utc:
        raise AuthenticationError("not-yet-valid", "the certificate is not valid before "
                                  f"{certificate.not_valid_before_utc.isoformat()}")


def authenticate(leaf: x509.Certificate | bytes, bundles: Mapping[str, TrustBundle],
                 now: datetime.datetime,
                 intermediates: tuple[x509.Certificate, ...] = ()) -> PeerCertificate:
    """Check ``leaf`` (a certificate or its DER) against the bundle of the trust domain its
    SPIFFE ID names, and only that one; :class:`AuthenticationError` says why not."""
    if isinstance(leaf, bytes):
        try:
            leaf = x509.load_der_x509_certificate(leaf)
        except ValueError as exc:
            raise AuthenticationError("malformed", f"not an X.509 certificate: {exc}") from None
    spiffe_id = spiffe_id_of(leaf)
    check_validity(leaf, now)
    bundle = bundles.get(spiffe_id.trust_domain)
    if bundle is None:
        raise AuthenticationError(
            "unknown-trust-domain",
            f"{spiffe_id}: no trust bundle for trust domain {spiffe_id.trust_domain!r}")
    verifier = (verification.PolicyBuilder()
                .store(verification.Store(list(bundle.authorities)))
                .time(now).max_chain_depth(4).build_client_verifier())
    try:
        verified = verifier.verify(leaf, list(intermediates))
    except verification.VerificationError as exc:
        raise AuthenticationError(
            "untrusted-issuer",
            f"{spiffe_id} is not vouched for by the trust bundle of "
            f"{spiffe_id.trust_domain!r} ({exc})") from None
    return PeerCertificate(spiffe_id, fingerprint(leaf), leaf.not_valid_before_utc,
                           leaf.not_valid_after_utc, fingerprint(verified.chain[-1]))
