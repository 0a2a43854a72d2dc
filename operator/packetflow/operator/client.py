"""A small async Kubernetes REST client for the children the operator writes.

kopf talks to the API for its own needs (watching, its annotations, events) but has no public
client for arbitrary objects, so this one speaks plain HTTP with the credentials kopf's login
produced (the same :class:`kopf.ConnectionInfo`): one identity, one RBAC role.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import httpx
import kopf

from packetflow.spec import API_VERSION

# (apiVersion, kind) -> plural; the only kinds the operator reads or writes itself.
PLURALS: Final[dict[tuple[str, str], str]] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "StatefulSet"): "statefulsets",
    (API_VERSION, "Capability"): "capabilities",
    (API_VERSION, "Actor"): "actors",
    (API_VERSION, "Federation"): "federations",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
}


class ApiError(Exception):
    """A failed API call, with the HTTP status and the Kubernetes ``Status`` reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retriable(self) -> bool:
        """Transient failures (overload, timeouts, server errors, conflicts) are worth a retry."""
        return self.status in (0, 401, 408, 409, 429) or self.status >= 500


class NotFoundError(ApiError):
    """HTTP 404: the object (or its resource) does not exist."""


class ConflictError(ApiError):
    """HTTP 409: the object already exists, or a precondition failed."""


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None,
                subresource: str | None = None) -> str:
    """The REST path of a namespaced object, or of its collection when ``name`` is None."""
    plural = PLURALS[(api_version, kind)]
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{root}/namespaces/{namespace}/{plural}"
    if name is not None:
        path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
    return path


class KubeClient:
    """get / create / merge-patch for namespaced objects; errors raise :class:`ApiError`."""

    def __init__(self, *, timeout: float = 15.0) -> None:
        self._timeout = timeout
        self._http: httpx.AsyncClient | None = None
        self._info: kopf.ConnectionInfo | None = None
        # Clients replaced by a re-login; closed with this one (requests may still use them).
        self._retired: list[httpx.AsyncClient] = []

    def configure(self, info: kopf.ConnectionInfo) -> None:
        """Use these credentials from now on (kopf calls login again when they expire)."""
        if info == self._info and self._http is not None:
            return
        if self._http is not None:
            self._retired.append(self._http)
        self._info = info
        verify: Any = info.as_ssl_context() if info.server.startswith("https") else True
        self._http = httpx.AsyncClient(
            base_url=info.server, headers=info.as_http_headers(), verify=verify,
            timeout=self._timeout, trust_env=info.trust_env,
            # Enough for hundreds of concurrent reconciles without exhausting the API server.
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=50))

    async def aclose(self) -> None:
        """Close the connection pool."""
        for http in [*self._retired, *([self._http] if self._http else [])]:
            await http.aclose()
        self._http, self._retired = None, []

    async def _request(self, method: str, path: str, *, json: Any = None,
                       headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        if self._http is None:
            raise ApiError(0, "NotLoggedIn", "no credentials yet (kopf login has not run)")
        try:
            response = await self._http.request(method, path, json=json, headers=headers)
        except httpx.HTTPError as exc:
            raise ApiError(0, type(exc).__name__, str(exc) or "connection failed") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            cls = {404: NotFoundError, 409: ConflictError}.get(response.status_code, ApiError)
            raise cls(response.status_code, str(body.get("reason") or response.reason_phrase),
                      str(body.get("message") or response.text[:200]))
        data = response.json()
        return data if isinstance(data, dict) else {}

    async def get(self, api_version: str, kind: str, namespace: str,
                  name: str) -> dict[str, Any]:
        """Read one object."""
        return await self._request("GET", object_path(api_version, kind, namespace, name))

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create an object in its ``metadata.namespace``."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta["namespace"])
        return await self._request("POST", path, json=obj)

    async def merge_patch(self, api_version: str, kind: str, namespace: str, name: str,
                          patch: Mapping[str, Any], *,
                          subresource: str | None = None) -> dict[str, Any]:
        """Apply a JSON merge patch (RFC 7386) to an object or its subresource."""
        return await self._request(
            "PATCH", object_path(api_version, kind, namespace, name, subresource), json=patch,
            headers={"Content-Type": "application/merge-patch+json"})
