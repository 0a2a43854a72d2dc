"""Issuing certificates with the ``cryptography`` package: a CA per trust domain (an
organization) and SPIFFE leaf certificates (X509-SVIDs) it signs.

What ``packetflow federation certs`` writes, and what the tests build their cases from.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from packetflow.identity.spiffe import SpiffeId, check_trust_domain
from packetflow.identity.x509 import BundleError, spiffe_ids

# Certificates are back-dated a little: clocks of two organizations never agree exactly.
CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    certificate_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        """The certificate, parsed."""
        return x509.load_pem_x509_certificate(self.certificate_pem)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The private key, parsed."""
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise BundleError("the key is not an EC private key")
        return key


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return now or datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_authority(trust_domain: str, organization: str, *,
                  valid_for: datetime.timedelta = datetime.timedelta(days=365),
                  now: datetime.datetime | None = None) -> Issued:
    """A self-signed CA for ``trust_domain`` (its URI SAN is ``spiffe://trust_domain``)."""
    check_trust_domain(trust_domain)
    key = ec.generate_private_key(ec.SECP256R1())
    start = _now(now) - CLOCK_SKEW
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} authority")])
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + valid_for + CLOCK_SKEW)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
        .sign(key, hashes.SHA256()))
    return Issued(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def authority_trust_domain(authority: x509.Certificate) -> str | None:
    """The trust domain a CA made by :func:`new_authority` names, if it names one."""
    found = spiffe_ids(authority)
    return found[0].removeprefix("spiffe://").split("/")[0] if found else None


def issue(authority: Issued, spiffe_id: SpiffeId, *, dns_names: Sequence[str] = (),
          ip_addresses: Sequence[str] = (),
          valid_for: datetime.timedelta = datetime.timedelta(days=90),
          not_before: datetime.datetime | None = None,
          now: datetime.datetime | None = None,
          check_trust_domain: bool = True) -> Issued:
    """A leaf certificate (an X509-SVID usable for TLS server and client auth) for
    ``spiffe_id``, signed by ``authority``; ``dns_names``/``ip_addresses`` are the names a
    TLS client checks when it dials this workload.

    An authority issues only for its own trust domain; ``check_trust_domain=False`` exists
    so tests can forge the certificates the federation gateway must refuse.
    """
    ca = authority.certificate
    ca_domain = authority_trust_domain(ca)
    if check_trust_domain and ca_domain is not None and ca_domain != spiffe_id.trust_domain:
        raise BundleError(f"the authority of {ca_domain!r} cannot issue {spiffe_id}: a bundle "
                          "vouches only for its own trust domain")
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now(now) - CLOCK_SKEW)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    names += [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    certificate = (
        # An empty subject with a critical SAN, as RFC 5280 (and X509-SVID) has it: the
        # identity is the SPIFFE ID, nothing else.
        x509.CertificateBuilder().subject_name(x509.Name([]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + valid_for)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            authority.private_key().public_key()), critical=False)
        .sign(authority.private_key(), hashes.SHA256()))
    return Issued(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))
