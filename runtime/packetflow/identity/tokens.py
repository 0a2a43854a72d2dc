"""Callers proven by projected Kubernetes ServiceAccount tokens, checked with TokenReview.

A pod that cannot present a workload certificate mounts a projected token for the audience
``packetflow`` and sends it as ``authorization: Bearer <token>``. The API server says whether
it is genuine, unexpired and meant for that audience (``authentication.k8s.io/v1``
TokenReview); the caller is then ``spiffe://<trust domain>/ns/<namespace>/sa/<account>``, the
same identity a certificate would carry, so ``spec.access`` treats both alike.

Where tokens are accepted: gRPC's Python server cannot ask for a client certificate and also
admit clients without one on the same port, so tokens come on a port of their own
(``PACKETFLOW_TOKEN_ADDRESS``: TLS with the workload's certificate, no client certificate
asked), served by the same gRPC server and servicers as the mutual-TLS port. The TLS
terminator (:mod:`packetflow.identity.terminator`) could accept both on one port, but only by
relaying every byte of every call through Python, mutual TLS callers included: on two cores
that costs more than a second port, which a NetworkPolicy can also open to exactly the pods
that need it.

Reviews are cached by the token's hash until the earlier of ``CACHE_SECONDS`` and the token's
own expiry (its ``exp`` claim: only ever shortening what the API server vouched for), refusals
for ``REFUSAL_CACHE_SECONDS``; the cache is bounded; concurrent calls with one token share one
review.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import httpx
import orjson

from packetflow.identity.spiffe import SpiffeIdError, Workload
from packetflow.identity.workload import Principal
from packetflow.identity.x509 import AuthenticationError

log = logging.getLogger("packetflow.identity.tokens")

AUDIENCE: Final = "packetflow"
TOKEN_REVIEWS: Final = "/apis/authentication.k8s.io/v1/tokenreviews"
SERVICE_ACCOUNT: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
IN_CLUSTER_API: Final = "https://kubernetes.default.svc"
CACHE_SECONDS = 60.0
REFUSAL_CACHE_SECONDS = 5.0
CACHE_ENTRIES = 4096
REVIEW_TIMEOUT = 10.0
_PREFIX: Final = "system:serviceaccount:"


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, unverified (it may only shorten a cache entry), or None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    expiry = claims.get("exp") if isinstance(claims, dict) else None
    return float(expiry) if isinstance(expiry, int | float) else None


def decide_review(status: Mapping[str, Any], audience: str, trust_domain: str,
                  expiry: float | None) -> Principal:
    """The caller a TokenReview's ``status`` proves, or :class:`AuthenticationError`: not
    authenticated (expired, forged...), not for ``audience``, or not a ServiceAccount."""
    if status.get("authenticated") is not True:
        raise AuthenticationError("token-refused", "the API server refused the token: "
                                  f"{status.get('error') or 'not authenticated'}")
    audiences = status.get("audiences") or []
    if audience not in audiences:
        raise AuthenticationError("wrong-audience", f"the token is for {audiences}, not for "
                                  f"audience {audience!r}")
    username = str((status.get("user") or {}).get("username", ""))
    namespace, _, account = username.removeprefix(_PREFIX).partition(":")
    try:
        if not username.startswith(_PREFIX):
            raise SpiffeIdError(username)
        workload = Workload.parse(f"{namespace}/{account}")
    except SpiffeIdError:
        raise AuthenticationError("not-a-service-account", f"the token is {username!r}'s, "
                                  "not a ServiceAccount's") from None
    return Principal.of(workload.spiffe_id(trust_domain), expiry, "token")


class TokenReviewer:
    """Asks the API server about tokens (``review``), remembering its answers a while."""

    def __init__(self, api: str, trust_domain: str, *, audience: str = AUDIENCE,
                 credentials: Callable[[], str | None] = lambda: None,
                 verify: ssl.SSLContext | bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.api = api.rstrip("/")
        self.trust_domain = trust_domain
        self.audience = audience
        self.credentials = credentials  # our own token, re-read per review (it rotates)
        self.clock = clock
        self.http = httpx.AsyncClient(verify=verify, timeout=REVIEW_TIMEOUT)
        self._cache: dict[bytes, tuple[Principal | AuthenticationError, float]] = {}
        self._pending: dict[bytes, asyncio.Future[Principal]] = {}

    @classmethod
    def in_cluster(cls, trust_domain: str, api: str | None = None,
                   audience: str = AUDIENCE) -> TokenReviewer:
        """Reviews as this pod's ServiceAccount (its mounted token and the cluster's CA)."""
        ca = SERVICE_ACCOUNT / "ca.crt"
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) \
            if ca.exists() else True

        def own_token() -> str | None:
            path = SERVICE_ACCOUNT / "token"
            return path.read_text().strip() if path.exists() else None

        return cls(api or IN_CLUSTER_API, trust_domain, audience=audience,
                   credentials=own_token, verify=verify)

    def known(self, token: str) -> Principal | None:
        """The remembered answer about ``token``, without waiting: the caller it proves,
        :class:`AuthenticationError` for a remembered refusal, None when it must be asked."""
        cached = self._cache.get(hashlib.sha256(token.encode()).digest())
        if cached is None or self.clock() >= cached[1]:
            return None
        if isinstance(cached[0], AuthenticationError):
            raise cached[0]
        return cached[0]

    async def review(self, token: str) -> Principal:
        """The caller ``token`` proves; :class:`AuthenticationError` says why not."""
        known = self.known(token)
        if known is not None:
            return known
        key = hashlib.sha256(token.encode()).digest()
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.ensure_future(self._review(key, token))
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        return await asyncio.shield(pending)

    async def _review(self, key: bytes, token: str) -> Principal:
        headers = {"content-type": "application/json"}
        own = self.credentials()
        if own:
            headers["authorization"] = f"Bearer {own}"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [self.audience]}}
        try:
            answer = await self.http.post(self.api + TOKEN_REVIEWS, content=orjson.dumps(body),
                                          headers=headers)
        except httpx.HTTPError as exc:  # not remembered: the next call asks again
            raise AuthenticationError("review-failed", f"TokenReview failed: {exc!r}") from None
        if answer.status_code not in (200, 201):
            raise AuthenticationError("review-failed", "TokenReview failed: HTTP "
                                      f"{answer.status_code} {answer.text[:200]}")
        expiry = token_expiry(token)
        now = self.clock()
        try:
            principal = decide_review(answer.json().get("status") or {}, self.audience,
                                      self.trust_domain, expiry)
        except AuthenticationError as exc:
            self._remember(key, exc, now + REFUSAL_CACHE_SECONDS)
            raise
        until = now + CACHE_SECONDS
        self._remember(key, principal, until if expiry is None else min(until, expiry))
        return principal

    def _remember(self, key: bytes, value: Principal | AuthenticationError,
                  until: float) -> None:
        if len(self._cache) >= CACHE_ENTRIES:
            now = self.clock()
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()  # a bound, not an eviction order
        self._cache[key] = (value, until)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.http.aclose()
