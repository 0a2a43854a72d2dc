"""A local cluster authority in a directory: what ``packetflow dev --mtls`` runs on and
``packetflow identity issue`` adds to, so zero trust can be tried without a cluster.

The directory holds ``ca.crt``/``ca.key`` (made once, kept), the dev server's certificate
(``server.crt``/``server.key``: SPIFFE ID ``spiffe://<domain>/ns/default/sa/packetflow-dev``,
valid for ``localhost`` and the loopback addresses) and a client certificate for the person at
the keyboard (``client.crt``/``client.key``: ``.../ns/default/sa/developer``). Leaves are issued
again when less than a third of their life is left.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from packetflow.identity.certs import Issued, authority_trust_domain, issue, new_authority
from packetflow.identity.files import write_atomically
from packetflow.identity.spiffe import Workload
from packetflow.identity.x509 import BundleError

DEV_TRUST_DOMAIN = "packetflow.local"
DEV_SERVER = Workload("default", "packetflow-dev")
DEV_CLIENT = Workload("default", "developer")
LEAF_LIFETIME = datetime.timedelta(days=7)
AUTHORITY_LIFETIME = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class IssuedFiles:
    """A certificate, its key and the bundle that verifies it, as files."""

    cert: Path
    key: Path
    ca: Path

    def flags(self) -> str:
        """How ``packetflow call`` names them."""
        return f"--cert {self.cert} --key {self.key} --ca {self.ca}"


def local_authority(directory: Path, trust_domain: str = DEV_TRUST_DOMAIN) -> Issued:
    """The authority in ``directory`` (made on first use); :class:`BundleError` when the one
    there is of another trust domain."""
    crt, key = directory / "ca.crt", directory / "ca.key"
    if crt.exists() and key.exists():
        authority = Issued(crt.read_bytes(), key.read_bytes())
        found = authority_trust_domain(authority.certificate)
        if found != trust_domain:
            raise BundleError(f"{crt} is the authority of trust domain {found!r}, not "
                              f"{trust_domain!r}")
        return authority
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    authority = new_authority(trust_domain, "packetflow", valid_for=AUTHORITY_LIFETIME)
    write_atomically(key, authority.key_pem, private=True)
    write_atomically(crt, authority.certificate_pem)
    return authority


def due(cert: Path, now: datetime.datetime) -> bool:
    """Whether the certificate in ``cert`` is missing, unreadable or past two thirds of its
    life (rotation starts well before expiry)."""
    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        return True
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return now >= start + (end - start) * 2 / 3


def issue_files(authority: Issued, directory: Path, stem: str, workload: Workload, *,
                dns_names: tuple[str, ...] = (), ip_addresses: tuple[str, ...] = (),
                valid_for: datetime.timedelta = LEAF_LIFETIME) -> IssuedFiles:
    """Issue ``workload`` a certificate as ``directory/stem.crt`` and ``stem.key`` (the key
    first, so a watcher that sees the new certificate finds its key)."""
    trust_domain = authority_trust_domain(authority.certificate)
    assert trust_domain is not None
    leaf = issue(authority, workload.spiffe_id(trust_domain), dns_names=dns_names,
                 ip_addresses=ip_addresses, valid_for=valid_for)
    files = IssuedFiles(directory / f"{stem}.crt", directory / f"{stem}.key",
                        directory / "ca.crt")
    write_atomically(files.key, leaf.key_pem, private=True)
    write_atomically(files.cert, leaf.certificate_pem)
    return files


def dev_identity(directory: Path, trust_domain: str = DEV_TRUST_DOMAIN
                 ) -> tuple[IssuedFiles, IssuedFiles]:
    """The dev server's and the developer's certificates under ``directory`` (issued when
    missing or due), and so the authority too."""
    fresh = not (directory / "ca.crt").exists()  # a new authority: every leaf is re-issued
    authority = local_authority(directory, trust_domain)
    now = datetime.datetime.now(datetime.UTC)
    issued = []
    for stem, workload, names, addresses in (
            ("server", DEV_SERVER, ("localhost",), ("127.0.0.1", "::1")),
            ("client", DEV_CLIENT, (), ())):
        files = IssuedFiles(directory / f"{stem}.crt", directory / f"{stem}.key",
                            directory / "ca.crt")
        if fresh or due(files.cert, now) or not files.key.exists():
            files = issue_files(authority, directory, stem, workload, dns_names=names,
                                ip_addresses=addresses)
        issued.append(files)
    return issued[0], issued[1]
