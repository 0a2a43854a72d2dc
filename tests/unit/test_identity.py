"""Identity without I/O: SPIFFE IDs, bundles per trust domain, certificate issuance and
authentication, credentials, and material re-read on change."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from packetflow.identity.certs import issue, new_authority
from packetflow.identity.files import Watched
from packetflow.identity.spiffe import SpiffeId, SpiffeIdError
from packetflow.identity.tls import load_credentials, server_context
from packetflow.identity.x509 import (
    AuthenticationError,
    BundleError,
    TrustBundle,
    authenticate,
    fingerprint,
)

ACME = new_authority("acme.example", "acme")
GLOBEX = new_authority("globex.example", "globex")
BUNDLES = {"acme.example": TrustBundle.from_pem("acme.example", ACME.certificate_pem),
           "globex.example": TrustBundle.from_pem("globex.example", GLOBEX.certificate_pem)}


def now() -> datetime.datetime:
    """The time of the check (not of collection: a suite can run for many minutes)."""
    return datetime.datetime.now(datetime.UTC)


@pytest.mark.parametrize("text", ["spiffe://acme.example", "spiffe://acme.example/a/b-c.d_e",
                                  "spiffe://a_b.c-d/X"])
def test_valid_spiffe_ids_round_trip(text: str) -> None:
    assert str(SpiffeId.parse(text)) == text


@pytest.mark.parametrize(("text", "rule"), [
    ("https://acme.example/x", "does not start with spiffe://"),
    ("spiffe://Acme.example/x", "lower-case"),
    ("spiffe://acme.example:443/x", "port"),
    ("spiffe://user@acme.example/x", "user"),
    ("spiffe://acme.example//x", "empty path segment"),
    ("spiffe://acme.example/x/", "empty path segment"),
    ("spiffe://acme.example/../x", "relative"),
    ("spiffe://acme.example/x?y=1", "query"),
    ("spiffe://acme.example/a b", "path segment"),
    ("spiffe:///x", "empty"),
])
def test_invalid_spiffe_ids_name_the_rule(text: str, rule: str) -> None:
    with pytest.raises(SpiffeIdError, match=rule):
        SpiffeId.parse(text)


def test_a_certificate_authenticates_against_its_own_domains_bundle() -> None:
    leaf = issue(GLOBEX, SpiffeId.of("globex.example", "federation", "gateway"))
    found = authenticate(leaf.certificate, BUNDLES, now())
    assert str(found.spiffe_id) == "spiffe://globex.example/federation/gateway"
    assert found.fingerprint == fingerprint(leaf.certificate)
    assert found.authority == fingerprint(GLOBEX.certificate)


def test_a_bundle_authenticates_only_its_own_trust_domain() -> None:
    forged = issue(GLOBEX, SpiffeId.of("acme.example", "gateway"), check_trust_domain=False)
    with pytest.raises(AuthenticationError) as caught:
        authenticate(forged.certificate, BUNDLES, now())
    assert caught.value.reason == "untrusted-issuer"
    assert "acme.example" in caught.value.message


def test_issuing_for_another_domain_is_refused_by_default() -> None:
    with pytest.raises(BundleError, match="only for its own trust domain"):
        issue(GLOBEX, SpiffeId.of("acme.example", "gateway"))


@pytest.mark.parametrize(("offset", "reason"), [(-10, "expired"), (1, "not-yet-valid")])
def test_validity_period_is_checked(offset: int, reason: str) -> None:
    leaf = issue(ACME, SpiffeId.of("acme.example", "x"),
                 not_before=now() + datetime.timedelta(days=offset),
                 valid_for=datetime.timedelta(days=5))
    with pytest.raises(AuthenticationError) as caught:
        authenticate(leaf.certificate, BUNDLES, now())
    assert caught.value.reason == reason


def test_unknown_trust_domain_and_missing_spiffe_id() -> None:
    stray = issue(ACME, SpiffeId.of("evil.example", "x"), check_trust_domain=False)
    with pytest.raises(AuthenticationError) as caught:
        authenticate(stray.certificate, BUNDLES, now())
    assert caught.value.reason == "unknown-trust-domain"
    with pytest.raises(AuthenticationError) as no_id:
        authenticate(ACME.certificate, BUNDLES, now())  # a CA's URI has no path, but is one
    assert no_id.value.reason in ("untrusted-issuer", "no-spiffe-id")
    with pytest.raises(AuthenticationError) as garbage:
        authenticate(b"not a certificate", BUNDLES, now())
    assert garbage.value.reason == "malformed"


def test_a_bundle_holds_authorities_only() -> None:
    leaf = issue(ACME, SpiffeId.of("acme.example", "x"))
    with pytest.raises(BundleError, match="not a CA certificate"):
        TrustBundle.from_pem("acme.example", leaf.certificate_pem, "acme.crt")
    with pytest.raises(BundleError, match=r"acme\.crt: not PEM certificates"):
        TrustBundle.from_pem("acme.example", b"", "acme.crt")
    with pytest.raises(BundleError, match="lower-case"):
        TrustBundle.from_pem("ACME", ACME.certificate_pem)


def test_credentials_key_must_match_certificate(tmp_path: Path) -> None:
    leaf, other = (issue(ACME, SpiffeId.of("acme.example", "x")) for _ in range(2))
    (tmp_path / "tls.crt").write_bytes(leaf.certificate_pem)
    (tmp_path / "tls.key").write_bytes(other.key_pem)
    with pytest.raises(BundleError, match="is not the key of the certificate"):
        load_credentials(tmp_path / "tls.crt", tmp_path / "tls.key")
    (tmp_path / "tls.key").write_bytes(leaf.key_pem)
    credentials = load_credentials(tmp_path / "tls.crt", tmp_path / "tls.key")
    assert str(credentials.spiffe_id) == "spiffe://acme.example/x"
    context = server_context(credentials, GLOBEX.certificate_pem)
    assert context.minimum_version.name == "TLSv1_3"
    assert context.num_tickets == 0  # every connection a full, freshly checked handshake


def test_watched_material_reloads_on_change_and_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "value"
    path.write_text("1")
    clock = [0.0]

    def load() -> int:
        return int(path.read_text())

    watched = Watched([path], load, interval=1.0, clock=lambda: clock[0])
    assert (watched.get(), watched.generation) == (1, 1)
    path.write_text("22")
    assert watched.get() == 1  # not checked again before the interval
    clock[0] = 1.0
    assert (watched.get(), watched.generation) == (22, 2)
    path.write_text("half-written")
    clock[0] = 2.0
    assert watched.get() == 22 and watched.error is not None
    path.write_text("333")
    clock[0] = 3.0
    assert (watched.get(), watched.generation, watched.error) == (333, 3, None)
