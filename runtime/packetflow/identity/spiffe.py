"""SPIFFE IDs (``spiffe://trust-domain/path``), parsed and checked as the SPIFFE spec says."""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe://"
# SPIFFE ID spec, section 2.1: trust domain names use lower-case letters, digits, '.', '-'
# and '_' only; path segments also allow upper-case letters.
TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]+$")
TRUST_DOMAIN_PATTERN = TRUST_DOMAIN_RE.pattern
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_LENGTH = 2048


class SpiffeIdError(ValueError):
    """Text that is not a valid SPIFFE ID; the message says which rule it breaks."""


def check_trust_domain(name: str) -> str:
    """``name`` if it is a valid trust domain name, else :class:`SpiffeIdError`."""
    if not name:
        raise SpiffeIdError("the trust domain is empty")
    if not TRUST_DOMAIN_RE.match(name):
        raise SpiffeIdError(f"trust domain {name!r} may hold only lower-case letters, digits, "
                            "'.', '-' and '_'")
    return name


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A SPIFFE ID: the trust domain that vouches for it and the workload path inside it."""

    trust_domain: str
    path: str = ""  # "" or "/seg/seg"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://domain/path``; :class:`SpiffeIdError` names the broken rule."""
        if len(text) > MAX_LENGTH:
            raise SpiffeIdError(f"longer than {MAX_LENGTH} bytes")
        if not text.startswith(SCHEME):
            raise SpiffeIdError(f"{text!r} does not start with {SCHEME}")
        rest = text[len(SCHEME):]
        if any(mark in rest for mark in "?#"):
            raise SpiffeIdError(f"{text!r} has a query or fragment")
        domain, slash, path = rest.partition("/")
        if "@" in domain or ":" in domain:
            raise SpiffeIdError(f"{text!r}: the trust domain may not carry a user or a port")
        check_trust_domain(domain)
        if slash:
            for segment in path.split("/"):
                if not segment:
                    raise SpiffeIdError(f"{text!r} has an empty path segment")
                if segment in (".", ".."):
                    raise SpiffeIdError(f"{text!r} has a relative path segment")
                if not _SEGMENT_RE.match(segment):
                    raise SpiffeIdError(f"{text!r}: path segment {segment!r} may hold only "
                                        "letters, digits, '.', '-' and '_'")
        return cls(domain, f"/{path}" if slash else "")

    @classmethod
    def of(cls, trust_domain: str, *segments: str) -> SpiffeId:
        """Build (and check) ``spiffe://trust_domain/seg/seg``."""
        return cls.parse(SCHEME + trust_domain + "".join(f"/{s}" for s in segments))

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"


# A Kubernetes workload's SPIFFE ID, as Istio and SPIRE's Kubernetes attestor write it:
# spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
_WORKLOAD_RE = re.compile(r"^/ns/([a-z0-9]([-a-z0-9]*[a-z0-9])?)"
                          r"/sa/([a-z0-9]([-a-z0-9.]*[a-z0-9])?)$")


@dataclass(frozen=True, order=True)
class Workload:
    """A Kubernetes workload: the namespace and service account a SPIFFE ID names."""

    namespace: str
    service_account: str

    def spiffe_id(self, trust_domain: str) -> SpiffeId:
        """``spiffe://trust_domain/ns/<namespace>/sa/<service account>``."""
        return SpiffeId.of(trust_domain, "ns", self.namespace, "sa", self.service_account)

    @classmethod
    def parse(cls, text: str) -> Workload:
        """``namespace/service-account`` (how access rules name one); SpiffeIdError else."""
        namespace, slash, account = text.partition("/")
        found = _WORKLOAD_RE.match(f"/ns/{namespace}/sa/{account}") if slash else None
        if found is None:
            raise SpiffeIdError(f"{text!r} is not namespace/service-account (lower-case "
                                "names: letters, digits, '-'; '.' in the account)")
        return cls(namespace, account)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account}"


def workload_of(spiffe_id: SpiffeId) -> Workload | None:
    """The workload a ``/ns/<ns>/sa/<sa>`` SPIFFE ID names; None for any other path."""
    found = _WORKLOAD_RE.match(spiffe_id.path)
    return Workload(found.group(1), found.group(3)) if found is not None else None
