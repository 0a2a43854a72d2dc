"""The cluster CA the operator keeps itself (``mtls_issuer: operator``): no cert-manager needed.

The authority lives in one Secret (``ca_secret`` in ``ca_namespace``), made once and reused:
``ca.crt``/``ca.key`` sign, ``bundle.crt`` is what every workload trusts, and while a new
authority is being introduced ``next.crt``/``next.key`` wait beside them. Each workload's
certificate goes into its Secret ``<name>-identity`` with the keys cert-manager writes
(``tls.crt``, ``tls.key``, ``ca.crt``: the bundle), so pods are the same whichever issues them.
Certificates are issued with :mod:`packetflow.identity.certs` (one model of identity), live
``CERTIFICATE_DURATION`` and are issued again ``CERTIFICATE_RENEW_BEFORE`` their expiry, by the
reconcile that needs one and by the operator's periodic resync.

Rotating the authority never leaves a workload distrusting a peer's certificate:

1. past two thirds of its life a new authority is made; the bundle becomes old + new and
   reaches every workload Secret, while the old one still signs;
2. ``PROPAGATION`` later (the kubelet has updated the mounted files) the new one signs, and
   every certificate of the old one is issued again;
3. once every workload's certificate is the new authority's, and has been for
   ``PROPAGATION``, the old one leaves the bundle.

Everything deciding is a pure function of plain data and ``now`` (tested without a cluster);
:class:`Authority` is the thin I/O edge the reconciler calls.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from packetflow.identity.certs import (
    CLOCK_SKEW,
    Issued,
    authority_trust_domain,
    issue,
    new_authority,
)
from packetflow.identity.spiffe import SpiffeId, Workload
from packetflow.identity.x509 import BundleError, fingerprint, load_certificates, spiffe_ids
from packetflow.operator import render
from packetflow.operator.client import ApiError, ConflictError, KubeClient, NotFoundError
from packetflow.operator.metrics import OperatorMetrics
from packetflow.operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

Manifest = dict[str, Any]
LEAF_LIFETIME: Final = datetime.timedelta(hours=int(render.CERTIFICATE_DURATION[:-1]))
RENEW_BEFORE: Final = datetime.timedelta(hours=int(render.CERTIFICATE_RENEW_BEFORE[:-1]))
AUTHORITY_LIFETIME: Final = datetime.timedelta(days=365)
# How long a changed Secret takes to reach the pods' files: the kubelet's sync period plus its
# cache, with room to spare.
PROPAGATION: Final = datetime.timedelta(minutes=5)
PROMOTE_AT_ANNOTATION: Final = "packetflow.io/promote-at"
ORGANIZATION: Final = "packetflow"


class AuthorityError(Exception):
    """The authority's Secret cannot be used (another trust domain, unreadable), or a
    workload's Secret name is taken by an object the operator does not manage."""


@dataclass(frozen=True)
class AuthorityState:
    """The authority: who signs, who is being introduced, and everything trusted."""

    signer: Issued
    trusted: tuple[bytes, ...]  # PEM of each authority in the bundle, signer first
    pending: Issued | None = None
    promote_at: datetime.datetime | None = None

    @property
    def signer_fingerprint(self) -> str:
        """Fingerprint of the signing authority."""
        return fingerprint(self.signer.certificate)

    def bundle(self) -> bytes:
        """The trust bundle every workload mounts as ``ca.crt``."""
        return b"".join(self.trusted)


@dataclass(frozen=True)
class LeafSpec:
    """A workload certificate the operator keeps: where (its Secret), for whom, owned by what."""

    namespace: str
    secret: str
    spiffe_id: str
    dns_names: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    owner: tuple[tuple[str, Any], ...] | None = None  # an ownerReference; None: unowned

    @property
    def key(self) -> tuple[str, str]:
        """(namespace, Secret name)."""
        return (self.namespace, self.secret)


@dataclass(frozen=True)
class Leaf:
    """What a workload Secret holds, as far as deciding goes."""

    spiffe_id: str
    dns_names: tuple[str, ...]
    authority: str  # fingerprint of the authority that signed it (by key identifier match)
    not_before: datetime.datetime
    not_after: datetime.datetime
    bundle_digest: str


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def new_state(trust_domain: str, now: datetime.datetime) -> AuthorityState:
    """A fresh authority for ``trust_domain``."""
    signer = new_authority(trust_domain, ORGANIZATION, valid_for=AUTHORITY_LIFETIME, now=now)
    return AuthorityState(signer, (signer.certificate_pem,))


def authority_due(authority: x509.Certificate, now: datetime.datetime) -> bool:
    """Whether an authority is past two thirds of its life (its successor starts then)."""
    start, end = authority.not_valid_before_utc, authority.not_valid_after_utc
    return now >= start + (end - start) * 2 / 3


def plan_rotation(state: AuthorityState, now: datetime.datetime,
                  leaves: Iterable[Leaf | None], make: Callable[[], Issued]) -> AuthorityState:
    """The authority's next state: introduce a successor (``make``), let it sign once the
    bundle had time to reach every pod, drop retired authorities once every workload's
    certificate (``leaves``; None: not seen yet) is the signer's (and expired ones anyway)."""
    if state.pending is None and authority_due(state.signer.certificate, now):
        pending = make()
        return replace(state, pending=pending, promote_at=now + PROPAGATION,
                       trusted=(*state.trusted, pending.certificate_pem))
    if state.pending is not None and state.promote_at is not None and now >= state.promote_at:
        signer = state.pending
        rest = tuple(pem for pem in state.trusted if pem != signer.certificate_pem)
        return AuthorityState(signer, (signer.certificate_pem, *rest))
    signing = state.signer_fingerprint
    settled = all(leaf is not None and leaf.authority == signing
                  and leaf.not_before + CLOCK_SKEW + PROPAGATION <= now for leaf in leaves)
    keep = tuple(pem for pem in state.trusted
                 if pem == state.signer.certificate_pem
                 or (state.pending is not None and pem == state.pending.certificate_pem)
                 or (not settled and x509.load_pem_x509_certificate(pem)
                     .not_valid_after_utc > now))
    return state if keep == state.trusted else replace(state, trusted=keep)


def leaf_action(leaf: Leaf | None, spec: LeafSpec, state: AuthorityState,
                now: datetime.datetime) -> str:
    """``issue`` (missing, for other names, of another authority, or due), ``trust`` (only the
    bundle changed) or ``keep``."""
    if leaf is None or leaf.spiffe_id != spec.spiffe_id or leaf.dns_names != spec.dns_names \
            or leaf.authority != state.signer_fingerprint or now >= leaf.not_after - RENEW_BEFORE:
        return "issue"
    if leaf.bundle_digest != _digest(state.bundle()):
        return "trust"
    return "keep"


def _decode(data: Mapping[str, Any], key: str) -> bytes | None:
    value = data.get(key)
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def read_leaf(secret: Mapping[str, Any], authorities: Iterable[bytes]) -> Leaf | None:
    """The certificate in a workload Secret, or None when it holds none (or garbage).
    ``authorities``: PEMs it may be signed by (its signer is told by key identifier)."""
    data = secret.get("data") or {}
    crt, bundle = _decode(data, "tls.crt"), _decode(data, "ca.crt")
    if crt is None or bundle is None or _decode(data, "tls.key") is None:
        return None
    try:
        certificate = load_certificates(crt, "tls.crt")[0]
        issuer_key = certificate.extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier).value.key_identifier
    except (BundleError, x509.ExtensionNotFound):
        return None
    signer = ""
    for pem in authorities:
        authority = x509.load_pem_x509_certificate(pem)
        own = authority.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        if own.digest == issuer_key:
            signer = fingerprint(authority)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ids = spiffe_ids(certificate)
    return Leaf(ids[0] if ids else "", tuple(names.get_values_for_type(x509.DNSName)), signer,
                certificate.not_valid_before_utc, certificate.not_valid_after_utc,
                _digest(bundle))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def render_leaf_secret(spec: LeafSpec, issued: Issued, bundle: bytes) -> Manifest:
    """A workload's identity Secret, with cert-manager's keys (``kubernetes.io/tls``)."""
    metadata: Manifest = {"name": spec.secret, "namespace": spec.namespace,
                          "labels": dict(spec.labels)}
    if spec.owner is not None:
        metadata["ownerReferences"] = [dict(spec.owner)]
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": metadata,
            "data": {"tls.crt": _b64(issued.certificate_pem), "tls.key": _b64(issued.key_pem),
                     "ca.crt": _b64(bundle)}}


def render_authority_secret(state: AuthorityState, namespace: str, name: str) -> Manifest:
    """The authority's Secret: signer, bundle, and the successor while it is introduced."""
    data = {"ca.crt": _b64(state.signer.certificate_pem), "ca.key": _b64(state.signer.key_pem),
            "bundle.crt": _b64(state.bundle())}
    if state.pending is not None:
        data.update({"next.crt": _b64(state.pending.certificate_pem),
                     "next.key": _b64(state.pending.key_pem)})
    annotations = {PROMOTE_AT_ANNOTATION: state.promote_at.isoformat()} \
        if state.promote_at is not None else {}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations,
                         "labels": {render.LABEL_NAME: "packetflow",
                                    render.LABEL_COMPONENT: "authority",
                                    render.LABEL_PART_OF: "packetflow",
                                    render.LABEL_MANAGED_BY: render.MANAGED_BY}},
            "data": data}


def read_authority(secret: Mapping[str, Any], trust_domain: str) -> AuthorityState:
    """The authority a Secret holds; :class:`AuthorityError` naming what is wrong."""
    data = secret.get("data") or {}
    where = f"Secret {secret.get('metadata', {}).get('name')}"
    crt, key, bundle = (_decode(data, k) for k in ("ca.crt", "ca.key", "bundle.crt"))
    if crt is None or key is None or bundle is None:
        raise AuthorityError(f"{where}: needs ca.crt, ca.key and bundle.crt (base64 PEM)")
    signer = Issued(crt, key)
    try:
        found = authority_trust_domain(signer.certificate)
        signer.private_key()
        trusted = tuple(authority.public_bytes(Encoding.PEM)
                        for authority in load_certificates(bundle, "bundle.crt"))
    except (BundleError, ValueError) as exc:
        raise AuthorityError(f"{where}: {exc}") from None
    if found != trust_domain:
        raise AuthorityError(f"{where} is the authority of trust domain {found!r}, not "
                             f"{trust_domain!r}")
    nxt, nxt_key = _decode(data, "next.crt"), _decode(data, "next.key")
    promote_at = (secret.get("metadata", {}).get("annotations") or {}).get(
        PROMOTE_AT_ANNOTATION)
    if nxt is None or nxt_key is None or not isinstance(promote_at, str):
        return AuthorityState(signer, trusted)
    return AuthorityState(signer, trusted, Issued(nxt, nxt_key),
                          datetime.datetime.fromisoformat(promote_at))


def leaf_spec(namespace: str, secret: str, account: str, dns_names: Iterable[str],
              settings: OperatorSettings, labels: Mapping[str, str],
              owner: Mapping[str, Any] | None = None) -> LeafSpec:
    """The certificate of ServiceAccount ``account`` of ``namespace``, kept in ``secret``."""
    spiffe_id = Workload(namespace, account).spiffe_id(settings.trust_domain)
    return LeafSpec(namespace, secret, str(spiffe_id), tuple(dns_names),
                    tuple(sorted(labels.items())),
                    tuple(owner.items()) if owner is not None else None)


def workload_leaf(resource: render.Resource, namespace: str, settings: OperatorSettings,
                  owner: Mapping[str, Any]) -> LeafSpec | None:
    """A Capability's or Actor's certificate, as cert-manager's would be (same Secret, names
    and SPIFFE ID); None when its pods serve no mutual TLS."""
    if not render.has_workload_identity(resource, settings):
        return None
    spiffe_id, dns_names = render.certificate_names(resource, namespace, settings)
    return LeafSpec(namespace, render.identity_secret_name(resource.name), spiffe_id,
                    tuple(dns_names), tuple(sorted(render.child_labels(
                        resource.name, resource.kind).items())), tuple(owner.items()))


def chart_leaf(identity: str, settings: OperatorSettings) -> LeafSpec:
    """The chart's gateway or MCP aggregate (``namespace/name``: its ServiceAccount and
    Service): names as the chart's cert-manager Certificate has them."""
    namespace, name = identity.split("/", 1)
    return leaf_spec(namespace, render.identity_secret_name(name), name,
                     render.service_dns_names(name, namespace, settings),
                     settings, {render.LABEL_NAME: "packetflow",
                                render.LABEL_PART_OF: "packetflow",
                                render.LABEL_MANAGED_BY: render.MANAGED_BY})


@dataclass
class Authority:
    """The operator's CA and the workload Secrets it issued (what each holds, remembered so
    a reconcile with nothing due costs no API call)."""

    client: KubeClient
    settings: OperatorSettings
    metrics: OperatorMetrics
    clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)
    state: AuthorityState | None = None
    leaves: dict[tuple[str, str], Leaf] = field(default_factory=dict)
    specs: dict[tuple[str, str], LeafSpec] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def authority(self) -> AuthorityState:
        """The authority: read from its Secret, made and stored there the first time."""
        if self.state is not None:
            return self.state
        async with self._lock:
            if self.state is None:
                self.state = await self._load()
            return self.state

    async def _load(self) -> AuthorityState:
        namespace, name = self._home()
        try:
            secret = await self.client.get("v1", "Secret", namespace, name)
        except NotFoundError:
            fresh = new_state(self.settings.trust_domain, self.clock())
            try:
                await self.client.create(render_authority_secret(fresh, namespace, name))
                self.metrics.child_writes.labels("Secret", "create").inc()
                logger.info("made the cluster authority of %s in Secret %s/%s",
                            self.settings.trust_domain, namespace, name)
                return fresh
            except ConflictError:  # made meanwhile (by an operator before a restart)
                secret = await self.client.get("v1", "Secret", namespace, name)
        return read_authority(secret, self.settings.trust_domain)

    def _home(self) -> tuple[str, str]:
        assert self.settings.ca_namespace is not None  # the settings insist
        return self.settings.ca_namespace, self.settings.ca_secret

    async def ensure(self, spec: LeafSpec) -> int:
        """Bring one workload Secret up to date (issue, re-issue, or refresh its bundle);
        the writes made (0 when nothing was due: no API call either, once it was seen)."""
        state = await self.authority()
        self.specs[spec.key] = spec
        leaf = self.leaves.get(spec.key)
        live: Mapping[str, Any] | None = None
        if leaf is None:
            try:
                live = await self.client.get("v1", "Secret", spec.namespace, spec.secret)
            except NotFoundError:
                live = None
            if live is not None:
                self._check_managed(live, spec)
                leaf = read_leaf(live, state.trusted)
        action = leaf_action(leaf, spec, state, self.clock())
        if action == "keep":
            if leaf is not None:
                self.leaves[spec.key] = leaf
            return 0
        if action == "trust":
            assert leaf is not None
            await self.client.merge_patch("v1", "Secret", spec.namespace, spec.secret,
                                          {"data": {"ca.crt": _b64(state.bundle())}})
            self.metrics.child_writes.labels("Secret", "patch").inc()
            self.leaves[spec.key] = replace(leaf, bundle_digest=_digest(state.bundle()))
            return 1
        issued = issue(state.signer, SpiffeId.parse(spec.spiffe_id), dns_names=spec.dns_names,
                       valid_for=LEAF_LIFETIME, now=self.clock())
        secret = render_leaf_secret(spec, issued, state.bundle())
        await self._write(secret, exists=leaf is not None or live is not None)
        self.leaves[spec.key] = Leaf(spec.spiffe_id, spec.dns_names, state.signer_fingerprint,
                                     issued.certificate.not_valid_before_utc,
                                     issued.certificate.not_valid_after_utc,
                                     _digest(state.bundle()))
        return 1

    @staticmethod
    def _check_managed(live: Mapping[str, Any], spec: LeafSpec) -> None:
        labels = (live.get("metadata") or {}).get("labels") or {}
        if labels.get(render.LABEL_MANAGED_BY) != render.MANAGED_BY:
            raise AuthorityError(f"Secret {spec.secret} exists and is not managed by the "
                                 "operator: its identity is not written there")

    async def _write(self, secret: Manifest, *, exists: bool) -> None:
        meta = secret["metadata"]
        body = {key: value for key, value in secret.items() if key not in ("apiVersion",
                                                                             "kind")}
        if exists:
            try:
                await self.client.merge_patch("v1", "Secret", meta["namespace"], meta["name"],
                                              body)
                self.metrics.child_writes.labels("Secret", "patch").inc()
                return
            except NotFoundError:
                pass  # deleted meanwhile: made again
        try:
            await self.client.create(secret)
            self.metrics.child_writes.labels("Secret", "create").inc()
        except ConflictError:
            live = await self.client.get("v1", "Secret", meta["namespace"], meta["name"])
            self._check_managed(live, self.specs[(meta["namespace"], meta["name"])])
            await self.client.merge_patch("v1", "Secret", meta["namespace"], meta["name"],
                                          body)
            self.metrics.child_writes.labels("Secret", "patch").inc()

    def forget(self, namespace: str, secret: str) -> None:
        """Stop keeping a workload's Secret (its owner is gone; the Secret goes with it)."""
        self.leaves.pop((namespace, secret), None)
        self.specs.pop((namespace, secret), None)

    async def issue_chart_identities(self) -> None:
        """Certificates of the chart's own workloads (``operator_identities``) at startup,
        before any resync; failures are logged (the resync tries again)."""
        for identity in self.settings.operator_identities:
            spec = chart_leaf(identity, self.settings)
            try:
                await self.ensure(spec)
            except (ApiError, AuthorityError) as exc:
                logger.warning("could not issue Secret %s/%s (tried again next round): %s",
                               spec.namespace, spec.secret, exc)

    async def renew(self) -> int:
        """The periodic pass: advance the authority's rotation, notice workload Secrets
        deleted behind the operator's back, bring every known one up to date; writes made."""
        try:
            state = await self.authority()
        except AuthorityError as exc:  # a person must act; the next resync looks again
            logger.warning("the cluster authority cannot be used: %s", exc)
            return 0
        async with self._lock:
            now = self.clock()
            leaves = [self.leaves.get(key) for key in self.specs]
            planned = plan_rotation(state, now, leaves, lambda: new_authority(
                self.settings.trust_domain, ORGANIZATION, valid_for=AUTHORITY_LIFETIME,
                now=now))
            writes = 0
            if planned != state:
                namespace, name = self._home()
                secret = render_authority_secret(planned, namespace, name)
                await self.client.merge_patch("v1", "Secret", namespace, name, {
                    "metadata": {"annotations": {PROMOTE_AT_ANNOTATION: None,
                                                 **secret["metadata"]["annotations"]}},
                    "data": {"next.crt": None, "next.key": None, **secret["data"]}})
                self.metrics.child_writes.labels("Secret", "patch").inc()
                self.state, writes = planned, 1
        for namespace in sorted({namespace for namespace, _ in self.specs}):
            present = {str(s["metadata"]["name"]) for s in await self.client.list_objects(
                "v1", "Secret", namespace,
                label_selector=f"{render.LABEL_MANAGED_BY}={render.MANAGED_BY}")}
            for key in [k for k in self.leaves if k[0] == namespace and k[1] not in present]:
                del self.leaves[key]  # deleted by someone: issued again below
        for identity in self.settings.operator_identities:
            spec = chart_leaf(identity, self.settings)
            self.specs.setdefault(spec.key, spec)
        for spec in list(self.specs.values()):
            try:
                writes += await self.ensure(spec)
            except (ApiError, AuthorityError) as exc:
                logger.warning("could not renew Secret %s/%s (tried again next round): %s",
                               spec.namespace, spec.secret, exc)
        return writes
