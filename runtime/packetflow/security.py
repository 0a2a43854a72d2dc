"""Zero trust in the runtime: who a call comes from (proven, never claimed) and whether they
may make it.

gRPC terminates mutual TLS natively (:mod:`packetflow.identity.workload`); every call then
reads its connection's client certificate from ``context.auth_context()`` and maps it to a
:class:`Principal` through a cache keyed by the certificate itself, so parsing happens once per
certificate, not per call. The ``packetflow-caller`` metadata names the caller only when the
connection belongs to a trusted forwarder (the gateway, the MCP aggregate, another member of
this very workload); from anyone else it is ignored and logged at debug. A call on the token
port (no certificate) proves its caller with a projected ServiceAccount token instead
(:mod:`packetflow.identity.tokens`), reviewed before the call's context is made.

Authorization is a :class:`packetflow.access.Policy` per capability or actor type, compiled
on first use and again only when its ``spec.access`` changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from cryptography import x509

from packetflow.access import AccessDenied, DefaultPolicy, Policy
from packetflow.errors import Unauthenticated
from packetflow.identity.spiffe import SpiffeId, SpiffeIdError
from packetflow.identity.tokens import TokenReviewer
from packetflow.identity.workload import Principal, WorkloadIdentity
from packetflow.identity.x509 import AuthenticationError, spiffe_id_of
from packetflow.metrics import RuntimeMetrics
from packetflow.spec import Access

log = logging.getLogger("packetflow.security")

# Certificates (and claimed callers) remembered; past this the cache starts over (a bound,
# not an eviction order: real clusters have far fewer workloads).
CACHE_ENTRIES = 4096


class CallGuard:
    """Proves callers and applies each target's access policy (one per runtime process)."""

    def __init__(self, identity: WorkloadIdentity, metrics: RuntimeMetrics, *,
                 home_namespace: str, default_policy: DefaultPolicy = "namespace",
                 trusted_forwarders: Iterable[str] = ()) -> None:
        self.identity = identity
        self.metrics = metrics
        self.home_namespace = home_namespace
        self.default_policy: DefaultPolicy = default_policy
        self.trust_domain = identity.trust_domain
        # Our own workload forwards to itself (actor members): it is trusted like the gateway.
        self.forwarders = frozenset([*trusted_forwarders, str(identity.spiffe_id)])
        self._by_certificate: dict[bytes, Principal | AuthenticationError] = {}
        self._claimed: dict[str, Principal | AuthenticationError] = {}
        self._policies: dict[tuple[str, str], tuple[Access | None, Policy]] = {}
        self._refusals: dict[str, Any] = {}
        self.tokens: TokenReviewer | None = None  # with a token port: reviews bearer tokens

    async def prove(self, context: Any, claimed: str | None = None) -> Principal:
        """:meth:`principal`; on a connection without a client certificate (the token port),
        the caller its bearer token proves (a ``packetflow-caller`` claim is ignored)."""
        if self.tokens is None or context.auth_context().get("x509_pem_cert"):
            return self.principal(context, claimed)
        token = next((str(value).removeprefix("Bearer ")
                      for key, value in context.invocation_metadata() or ()
                      if key == "authorization" and str(value).startswith("Bearer ")), None)
        if token is None:
            raise self._refuse("no-credentials", "the call carries neither a client "
                               "certificate nor a bearer token")
        try:
            return await self.tokens.review(token)  # a SPIFFE ID of our trust domain
        except AuthenticationError as exc:
            raise self._refuse(exc.reason, exc.message) from None

    # --- authentication ------------------------------------------------------------------

    def principal(self, context: Any, claimed: str | None = None) -> Principal:
        """The proven caller of a gRPC call (``context``: its ServicerContext), or
        :class:`Unauthenticated` saying why there is none; ``claimed``: the
        ``packetflow-caller`` metadata, believed from a trusted forwarder only."""
        certificates = context.auth_context().get("x509_pem_cert")
        if not certificates:
            raise self._refuse("no-client-certificate",
                               "the connection carries no client certificate")
        pem = certificates[0]
        found = self._by_certificate.get(pem)
        if found is None:
            found = self._remember(self._by_certificate, pem, self._from_certificate(pem))
        if isinstance(found, AuthenticationError):
            raise self._refuse(found.reason, found.message)
        if found.not_after is not None and time.time() > found.not_after:
            raise self._refuse("expired", f"the client certificate of {found.caller} expired")
        if claimed is None:
            return found
        if found.caller not in self.forwarders:
            log.debug("ignored %s=%r from %s: not a trusted forwarder", "packetflow-caller",
                      claimed, found.caller)
            return found
        forwarded = self._claimed.get(claimed)
        if forwarded is None:
            forwarded = self._remember(self._claimed, claimed, self._from_claim(claimed))
        if isinstance(forwarded, AuthenticationError):
            raise self._refuse(forwarded.reason, f"{found.caller} forwarded a call for "
                               f"{claimed!r}: {forwarded.message}")
        return forwarded

    def _from_certificate(self, pem: bytes) -> Principal | AuthenticationError:
        try:
            certificate = x509.load_pem_x509_certificate(pem)
            spiffe_id = spiffe_id_of(certificate)
        except ValueError as exc:
            return AuthenticationError("malformed", f"unreadable client certificate: {exc}")
        except AuthenticationError as exc:
            return exc
        if spiffe_id.trust_domain != self.trust_domain:
            # Only a certificate our own authority signed gets this far (gRPC checked the
            # chain against our bundle): one that claims another domain is forged.
            return AuthenticationError(
                "wrong-trust-domain", f"{spiffe_id} is not of this cluster's trust domain "
                f"{self.trust_domain!r}")
        not_after = certificate.not_valid_after_utc
        return Principal.of(spiffe_id, not_after.timestamp(), "certificate")

    def _from_claim(self, claimed: str) -> Principal | AuthenticationError:
        try:
            spiffe_id = SpiffeId.parse(claimed)
        except SpiffeIdError as exc:
            return AuthenticationError("bad-spiffe-id", str(exc))
        if spiffe_id.trust_domain != self.trust_domain:
            return AuthenticationError("wrong-trust-domain", f"{spiffe_id} is not of trust "
                                       f"domain {self.trust_domain!r}")
        return Principal.of(spiffe_id, None, "forwarded")

    @staticmethod
    def _remember(cache: dict[Any, Principal | AuthenticationError], key: Any,
                  value: Principal | AuthenticationError) -> Principal | AuthenticationError:
        if len(cache) >= CACHE_ENTRIES:
            cache.clear()
        cache[key] = value
        return value

    def _refuse(self, reason: str, message: str) -> Unauthenticated:
        counter = self._refusals.get(reason)
        if counter is None:
            counter = self._refusals[reason] = self.metrics.unauthenticated.labels(reason)
        counter.inc()
        return Unauthenticated(message)

    # --- authorization -------------------------------------------------------------------

    def policy(self, kind: str, name: str, access: Access | None) -> Policy:
        """The compiled policy of a target (recompiled when its ``access`` changed)."""
        cached = self._policies.get((kind, name))
        if cached is not None and cached[0] is access:
            return cached[1]
        policy = Policy(f"{kind} {name!r}", access, self.home_namespace, self.default_policy)
        self._policies[(kind, name)] = (access, policy)
        return policy

    def authorize(self, kind: str, name: str, access: Access | None,
                  principal: Principal) -> None:
        """Return if ``principal`` may call the target; else :class:`AccessDenied` naming
        the rule, counted in ``packetflow_access_denied_total``."""
        try:
            self.policy(kind, name, access).check(principal.caller, principal.workload)
        except AccessDenied as exc:
            self.metrics.access_denied.labels(kind, name, exc.rule).inc()
            log.info("access denied", extra={"target": f"{kind}/{name}",
                                             "caller": principal.caller, "rule": exc.rule})
            raise



class SecurityConfigError(Exception):
    """Zero-trust settings that cannot work (a file, a SPIFFE ID); the message names it."""
