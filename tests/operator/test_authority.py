"""The cluster authority the operator keeps itself (``mtls_issuer: operator``): decisions as
pure functions of plain data and a clock, then the real operator on the emulator making the
authority once, issuing, reusing after a restart, renewing and restoring workload Secrets."""

from __future__ import annotations

import asyncio
import base64
import datetime
from typing import Any

import httpx
import kmock
import kubernetes_validate
import pytest
from pydantic import ValidationError

from packetflow.identity.certs import Issued, issue, new_authority
from packetflow.identity.spiffe import SpiffeId
from packetflow.identity.x509 import TrustBundle, authenticate, load_certificates
from packetflow.operator import authority, render
from packetflow.operator.authority import AuthorityError, AuthorityState, Leaf, LeafSpec
from packetflow.operator.permissions import AUTHORITY_PERMISSIONS, PERMISSIONS
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import Actor, Capability
from tests.operator.api import NS
from tests.operator.conftest import OperatorRunner, wait_for
from tests.operator.kube_emulator import CERTIFICATES, ClusterEmulator
from tests.operator.test_workload_identity import actor, capability, create_pay

OPERATOR_CA = OperatorSettings(mtls_issuer="operator", ca_namespace="pf-system",
                               trust_domain="acme.internal")
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
SECRETS = "v1/secrets"


OWNER = {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability", "name": "pay",
         "uid": "u-1", "controller": True, "blockOwnerDeletion": True}


def spec_of(resource: Capability | Actor | None = None) -> LeafSpec:
    spec = authority.workload_leaf(resource or capability(), "team-a", OPERATOR_CA, OWNER)
    assert spec is not None
    return spec


def issued_leaf(state: AuthorityState, spec: LeafSpec, now: datetime.datetime) -> Leaf:
    """What a Secret the authority wrote at ``now`` reads back as."""
    issued = issue(state.signer, SpiffeId.parse(spec.spiffe_id), dns_names=spec.dns_names,
                   valid_for=authority.LEAF_LIFETIME, now=now)
    leaf = authority.read_leaf(authority.render_leaf_secret(spec, issued, state.bundle()),
                               state.trusted)
    assert leaf is not None
    return leaf


def decoded(secret: dict[str, Any], key: str) -> bytes:
    return base64.b64decode(secret["data"][key])


# --------------------------------------------------------------------- pure: the decisions


def test_pods_are_the_same_whichever_authority_issues() -> None:
    cert_manager = OperatorSettings(mtls_issuer="ClusterIssuer/ca",
                                    trust_domain="acme.internal")
    for resource in (capability(), actor()):
        ours = render.desired_children(resource, "team-a", OPERATOR_CA)
        theirs = render.desired_children(resource, "team-a", cert_manager)
        # Same children but the Certificate: the operator writes the Secret itself.
        assert [c for c in theirs if c["kind"] != "Certificate"] == ours
        (certificate,) = [c for c in theirs if c["kind"] == "Certificate"]
        spec = spec_of(resource)
        assert (spec.secret, [spec.spiffe_id], list(spec.dns_names)) == (
            certificate["spec"]["secretName"], certificate["spec"]["uris"],
            certificate["spec"]["dnsNames"])


def test_a_workload_secret_holds_cert_managers_keys_and_a_certificate_the_bundle_vouches_for(
        ) -> None:
    state = authority.new_state("acme.internal", T0)
    spec = spec_of()
    issued = issue(state.signer, SpiffeId.parse(spec.spiffe_id), dns_names=spec.dns_names,
                   valid_for=authority.LEAF_LIFETIME, now=T0)
    secret = authority.render_leaf_secret(spec, issued, state.bundle())
    for version in ("1.29.0", "1.37.0"):
        kubernetes_validate.validate(secret, version, strict=True)
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    assert secret["metadata"]["ownerReferences"] == [OWNER]
    bundle = TrustBundle.from_pem("acme.internal", decoded(secret, "ca.crt"))
    (certificate,) = load_certificates(decoded(secret, "tls.crt"), "tls.crt")
    peer = authenticate(certificate, {"acme.internal": bundle}, T0 + datetime.timedelta(hours=1))
    assert str(peer.spiffe_id) == "spiffe://acme.internal/ns/team-a/sa/packetflow-pay"
    assert certificate.not_valid_after_utc - certificate.not_valid_before_utc == \
        datetime.timedelta(hours=24)


def test_leaves_are_issued_when_missing_renamed_foreign_or_due_and_kept_otherwise() -> None:
    state = authority.new_state("acme.internal", T0)
    spec = spec_of()
    leaf = issued_leaf(state, spec, T0)
    assert authority.leaf_action(None, spec, state, T0) == "issue"
    assert authority.leaf_action(leaf, spec, state, T0 + datetime.timedelta(hours=15)) == "keep"
    # Renewed 8 h before expiry (issued back-dated 5 min: due at 15 h 55 min).
    assert authority.leaf_action(leaf, spec, state, T0 + datetime.timedelta(hours=16)) == \
        "issue"
    other = authority.new_state("acme.internal", T0)
    assert authority.leaf_action(leaf, spec, other, T0) == "issue"  # another authority's
    renamed = LeafSpec(spec.namespace, spec.secret, spec.spiffe_id, ("elsewhere",),
                       spec.labels, spec.owner)
    assert authority.leaf_action(leaf, renamed, state, T0) == "issue"
    grown = AuthorityState(state.signer, (*state.trusted, other.signer.certificate_pem))
    assert authority.leaf_action(leaf, spec, grown, T0) == "trust"  # only the bundle moved


def test_the_authority_rotates_without_a_moment_of_distrust() -> None:
    state = authority.new_state("acme.internal", T0)
    old = state.signer.certificate_pem
    spec = spec_of()
    due = T0 + datetime.timedelta(days=244)
    leaves = [issued_leaf(state, spec, due - datetime.timedelta(hours=1))]
    successors: list[Issued] = []

    def make() -> Issued:
        successors.append(new_authority("acme.internal", "packetflow", now=due))
        return successors[-1]

    assert authority.plan_rotation(state, T0 + datetime.timedelta(days=200), leaves,
                                   make) == state
    # 1. Past two thirds of its life: the successor is trusted first, the old one still signs.
    introducing = authority.plan_rotation(state, due, leaves, make)
    (new,) = successors
    assert introducing.signer == state.signer and introducing.pending == new
    assert introducing.trusted == (old, new.certificate_pem)
    assert authority.leaf_action(leaves[0], spec, introducing, due) == "trust"
    assert authority.plan_rotation(introducing, due + datetime.timedelta(minutes=4), leaves,
                                   make) == introducing
    # 2. Once the bundle had time to reach every pod, the successor signs; old leaves go.
    promoted_at = due + authority.PROPAGATION
    promoted = authority.plan_rotation(introducing, promoted_at, leaves, make)
    assert promoted.signer == new and promoted.pending is None
    assert promoted.trusted == (new.certificate_pem, old)
    assert authority.leaf_action(leaves[0], spec, promoted, promoted_at) == "issue"
    # 3. The old authority stays trusted until every leaf is the new one's, long enough.
    assert authority.plan_rotation(promoted, promoted_at, [*leaves, None], make) == promoted
    reissued = [issued_leaf(promoted, spec, promoted_at)]
    assert authority.plan_rotation(promoted, promoted_at, reissued, make) == promoted
    settled = promoted_at + authority.PROPAGATION + datetime.timedelta(minutes=6)
    final = authority.plan_rotation(promoted, settled, reissued, make)
    assert final.trusted == (new.certificate_pem,) and final.signer == new
    assert len(successors) == 1


def test_the_authority_secret_round_trips_and_refuses_another_trust_domain() -> None:
    state = authority.new_state("acme.internal", T0)
    pending = AuthorityState(state.signer, state.trusted, authority.new_state(
        "acme.internal", T0).signer, T0 + authority.PROPAGATION)
    for each in (state, pending):
        secret = authority.render_authority_secret(each, "pf-system", "packetflow-ca")
        kubernetes_validate.validate(secret, "1.37.0", strict=True)
        assert authority.read_authority(secret, "acme.internal") == each
    secret = authority.render_authority_secret(state, "pf-system", "packetflow-ca")
    with pytest.raises(AuthorityError, match=r"trust domain 'acme\.internal', not 'other\.org'"):
        authority.read_authority(secret, "other.org")
    with pytest.raises(AuthorityError, match=r"needs ca\.crt, ca\.key and bundle\.crt"):
        authority.read_authority({"metadata": {"name": "packetflow-ca"}, "data": {}},
                                 "acme.internal")


def test_the_operator_authority_needs_a_home_and_a_resync() -> None:
    with pytest.raises(ValidationError, match="needs ca_namespace"):
        OperatorSettings(mtls_issuer="operator")
    with pytest.raises(ValidationError, match="resync_seconds must be between"):
        OperatorSettings(mtls_issuer="operator", ca_namespace="pf", resync_seconds=0)
    with pytest.raises(ValidationError, match=r"operator_identities\.0"):
        OperatorSettings(mtls_issuer="operator", ca_namespace="pf",
                         operator_identities=["gateway-without-namespace"])


# ------------------------------------------------------------------ the emulator: I/O edge


def assert_authority_calls_permitted(cluster: ClusterEmulator) -> None:
    granted = {(p.resource, verb) for p in (*PERMISSIONS, *AUTHORITY_PERMISSIONS)
               for verb in p.verbs}
    for call in cluster.api_calls():
        verb, resource = call.split(" ", 1)
        if resource != "discovery":
            assert (resource, verb) in granted, call


def secret_writes(cluster: ClusterEmulator, name: str) -> int:
    """Creations and patches of Secret ``name`` in the emulator's log."""
    path = f"/api/v1/namespaces/{NS}/secrets"
    return sum(1 for r in cluster.log
               if (r.method == kmock.method.PATCH and r.url.path == f"{path}/{name}")
               or (r.method == kmock.method.POST and r.url.path == path
                   and isinstance(r.data, dict) and r.data["metadata"]["name"] == name))


async def resync(runner: OperatorRunner) -> None:
    """One resync pass on the operator's own loop."""
    assert runner.thread is not None
    await asyncio.to_thread(runner.thread.call, runner.ctx.reconciler.resync())


async def test_the_operator_issues_reuses_renews_and_restores_identities(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    settings = {"mtls_issuer": "operator", "ca_namespace": NS,
                "operator_identities": [f"{NS}/pf-packetflow-gateway"]}
    runner = OperatorRunner([NS], **settings)
    await runner.start()
    try:
        created = await create_pay(kube)
        leaf = await wait_for(lambda: cluster.live(SECRETS, NS, "pay-identity"),
                              what="the workload Secret")
        ca = cluster.live(SECRETS, NS, "packetflow-ca")
        assert ca is not None
        gateway = await wait_for(lambda: cluster.live(SECRETS, NS,
                                                      "pf-packetflow-gateway-identity"),
                                 what="the chart gateway's Secret")
        (owner,) = leaf["metadata"]["ownerReferences"]
        assert owner["uid"] == created["metadata"]["uid"]
        assert "ownerReferences" not in gateway["metadata"]  # the chart's: nobody owns it
        bundle = {"cluster.local": TrustBundle.from_pem("cluster.local",
                                                        decoded(ca, "bundle.crt"))}
        now = datetime.datetime.now(datetime.UTC)
        for secret, account in ((leaf, "packetflow-pay"), (gateway, "pf-packetflow-gateway")):
            assert decoded(secret, "ca.crt") == decoded(ca, "bundle.crt")
            peer = authenticate(load_certificates(decoded(secret, "tls.crt"), "tls.crt")[0],
                                bundle, now)
            assert str(peer.spiffe_id) == f"spiffe://cluster.local/ns/{NS}/sa/{account}"
        assert not cluster.names(CERTIFICATES, NS)  # no cert-manager involved
        await wait_for(lambda: runner.ctx.pending == 0, what="idle")
    finally:
        await runner.stop()
    # A restarted operator reuses the authority and the valid certificates: no writes.
    writes = secret_writes(cluster, "pay-identity")
    runner = OperatorRunner([NS], **settings)
    ctx = await runner.start()
    try:
        await wait_for(lambda: ("Capability", NS, "pay") in ctx.reconciler.states
                       and ctx.pending == 0, what="resumed")
        assert ctx.reconciler.authority is not None
        assert ctx.reconciler.authority.leaves  # it read the Secret back
        assert secret_writes(cluster, "pay-identity") == writes
        assert cluster.live(SECRETS, NS, "packetflow-ca") == ca  # made once, reused
        # 17 hours on, the resync renews the certificate (8 h before expiry).
        real_clock = ctx.reconciler.authority.clock
        ctx.reconciler.authority.clock = lambda: real_clock() + datetime.timedelta(hours=17)
        await resync(runner)
        renewed = cluster.live(SECRETS, NS, "pay-identity")
        assert renewed is not None and decoded(renewed, "tls.crt") != decoded(leaf, "tls.crt")
        # A Secret deleted behind the operator's back is issued again by the next resync.
        assert (await kube.delete(f"/api/v1/namespaces/{NS}/secrets/pay-identity")
                ).status_code < 300
        await resync(runner)
        assert cluster.live(SECRETS, NS, "pay-identity") is not None
        # The authority rotates through its Secret: introduced, promoted, the old one gone.
        for days, minutes, trusted in ((250, 0, 2), (250, 6, 2), (250, 18, 1)):
            ctx.reconciler.authority.clock = lambda d=days, m=minutes: real_clock() + \
                datetime.timedelta(days=d, minutes=m)
            await resync(runner)
            home = cluster.live(SECRETS, NS, "packetflow-ca")
            leaf = cluster.live(SECRETS, NS, "pay-identity")
            assert home is not None and leaf is not None
            assert len(load_certificates(decoded(home, "bundle.crt"), "bundle")) == trusted
            assert decoded(leaf, "ca.crt") == decoded(home, "bundle.crt")
            assert ("next.crt" in home["data"]) == (minutes == 0)
            if minutes:  # promoted: the workload's certificate is the new authority's
                signer = TrustBundle.from_pem("cluster.local", decoded(home, "ca.crt"))
                authenticate(load_certificates(decoded(leaf, "tls.crt"), "tls.crt")[0],
                             {"cluster.local": signer},
                             real_clock() + datetime.timedelta(days=250, minutes=minutes))
        assert decoded(home, "ca.crt") != decoded(ca, "ca.crt")
    finally:
        await runner.stop()
    assert_authority_calls_permitted(cluster)
