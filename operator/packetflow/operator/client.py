"""A small async Kubernetes REST client for the objects the operator reads and writes itself.

kopf talks to the API for its own needs (watching, its annotations, events) but has no public
client for arbitrary objects, so this one speaks plain HTTP with the credentials kopf's login
produced (the same :class:`kopf.ConnectionInfo`): one identity, one RBAC role. It runs on
aiohttp, kopf's own HTTP stack: its connection pool stays cheap with hundreds of requests
queued, where that bookkeeping was most of the operator's CPU on httpx.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from importlib import metadata
from typing import Any, Final

import aiohttp
import kopf
import orjson

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
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("cert-manager.io/v1", "Certificate"): "certificates",
    ("v1", "Event"): "events",
    ("v1", "Secret"): "secrets",
}
LIST_PAGE: Final = 500  # objects per LIST page: bounded responses however many there are


def _user_agent() -> str:
    try:
        version = metadata.version("packetflow")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        version = "dev"
    return f"packetflow-operator/{version}"


USER_AGENT: Final = _user_agent()


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
    """HTTP 409: the object already exists (``AlreadyExists``), or a precondition failed."""


class GoneError(ApiError):
    """HTTP 410 (or a watch's ERROR event with code 410): the resourceVersion a watch asked
    for is older than the API server keeps; list again."""


def _error(status: int, decoded: Mapping[str, Any], reason: str, message: str) -> ApiError:
    """The error for a failed call from its ``Status`` body, else the fallbacks given."""
    cls = {404: NotFoundError, 409: ConflictError, 410: GoneError}.get(status, ApiError)
    return cls(status, str(decoded.get("reason") or reason),
               str(decoded.get("message") or message))


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None,
                subresource: str | None = None) -> str:
    """The REST path of a namespaced object, or of its collection when ``name`` is None
    (in every namespace when ``namespace`` is None too)."""
    plural = PLURALS[(api_version, kind)]
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{root}/{plural}" if namespace is None else \
        f"{root}/namespaces/{namespace}/{plural}"
    if name is not None:
        path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
    return path


class KubeClient:
    """get / list / create / merge-patch for namespaced objects; errors raise :class:`ApiError`.

    The session is made on first use inside the running loop (kopf's login handler runs in a
    thread), and made again when kopf logs in anew (expired credentials).
    """

    def __init__(self, *, timeout: float = 15.0, connections: int = 50,
                 user_agent: str = USER_AGENT) -> None:
        # Per connection and per read, not in total: waiting for a free connection while
        # hundreds of reconciles queue is not the API server being slow.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                              sock_read=timeout)
        self._connections = connections
        self._user_agent = user_agent
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._session_info: kopf.ConnectionInfo | None = None
        # Sessions replaced by a re-login; closed with this client (requests may still use them).
        self._retired: list[aiohttp.ClientSession] = []
        self._configured = asyncio.Event()

    def configure(self, info: kopf.ConnectionInfo) -> None:
        """Use these credentials from now on (kopf calls login again when they expire)."""
        self._info = info
        self._configured.set()

    async def wait_configured(self) -> None:
        """Until the first credentials are there (kopf's login may finish after startup)."""
        await self._configured.wait()

    def _current_session(self) -> tuple[aiohttp.ClientSession, str]:
        info = self._info
        if info is None:
            raise ApiError(0, "NotLoggedIn", "no credentials yet (kopf login has not run)")
        if self._session is None or self._session_info != info:
            if self._session is not None:
                self._retired.append(self._session)
            ssl: Any = info.as_ssl_context() if info.server.startswith("https") else True
            self._session = aiohttp.ClientSession(
                headers={**info.as_http_headers(), "User-Agent": self._user_agent},
                timeout=self._timeout, trust_env=info.trust_env,
                # Enough for hundreds of concurrent reconciles without exhausting the server.
                connector=aiohttp.TCPConnector(limit=self._connections, ssl=ssl))
            self._session_info = info
        return self._session, info.server.rstrip("/")

    async def aclose(self) -> None:
        """Close the connection pool."""
        for session in [*self._retired, *([self._session] if self._session else [])]:
            await session.close()
        self._session, self._session_info, self._retired = None, None, []

    async def _request(self, method: str, path: str, *, body: Any = None,
                       content_type: str = "application/json",
                       params: Mapping[str, str] | None = None) -> dict[str, Any]:
        session, server = self._current_session()
        data = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else None
        try:
            async with session.request(method, server + path, data=data, headers=headers,
                                       params=params) as response:
                payload = await response.read()
                status, phrase = response.status, response.reason or ""
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiError(0, type(exc).__name__, str(exc) or "connection failed") from exc
        try:
            decoded = orjson.loads(payload) if payload else {}
        except orjson.JSONDecodeError:
            decoded = {}
        decoded = decoded if isinstance(decoded, dict) else {}
        if status >= 400:
            raise _error(status, decoded, phrase, payload[:200].decode(errors="replace"))
        return decoded

    async def get(self, api_version: str, kind: str, namespace: str,
                  name: str) -> dict[str, Any]:
        """Read one object."""
        return await self._request("GET", object_path(api_version, kind, namespace, name))

    async def list_objects(self, api_version: str, kind: str, namespace: str, *,
                           label_selector: str | None = None) -> list[dict[str, Any]]:
        """Every object of a kind in a namespace (page by page), optionally label-selected."""
        items, _ = await self.list_versioned(api_version, kind, namespace,
                                             label_selector=label_selector)
        return items

    async def list_versioned(self, api_version: str, kind: str, namespace: str | None, *,
                             label_selector: str | None = None
                             ) -> tuple[list[dict[str, Any]], str]:
        """Every object of a kind in a namespace (all when None), page by page, and the
        resourceVersion the list was taken at (a watch from it misses nothing)."""
        params: dict[str, str] = {"limit": str(LIST_PAGE)}
        if label_selector:
            params["labelSelector"] = label_selector
        items: list[dict[str, Any]] = []
        version = ""
        while True:
            page = await self._request("GET", object_path(api_version, kind, namespace),
                                       params=params)
            for item in page.get("items") or []:
                if isinstance(item, dict):
                    # A real API server's list items carry neither kind nor apiVersion.
                    item.setdefault("apiVersion", api_version)
                    item.setdefault("kind", kind)
                    items.append(item)
            meta = page.get("metadata") or {}
            # Every page of one list is read at the first page's version.
            version = version or str(meta.get("resourceVersion") or "")
            token = meta.get("continue")
            if not token:
                return items, version
            params["continue"] = str(token)

    async def watch(self, api_version: str, kind: str, namespace: str | None, *,
                    resource_version: str, label_selector: str | None = None,
                    timeout_seconds: int = 300) -> AsyncIterator[list[dict[str, Any]]]:
        """Watch a kind from ``resource_version`` with bookmarks until the server ends the
        watch; yields the events (``{"type", "object"}``) that arrived together, in order.
        Raises :class:`GoneError` when the version is too old (also as an ERROR event)."""
        session, server = self._current_session()
        params = {"watch": "true", "resourceVersion": resource_version,
                  "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds)}
        if label_selector:
            params["labelSelector"] = label_selector
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout.sock_connect,
                                        sock_read=timeout_seconds + 30)
        try:
            async with session.get(server + object_path(api_version, kind, namespace),
                                   params=params, timeout=timeout) as response:
                if response.status >= 400:
                    payload = await response.read()
                    try:
                        decoded = orjson.loads(payload) if payload else {}
                    except orjson.JSONDecodeError:
                        decoded = {}
                    raise _error(response.status, decoded if isinstance(decoded, dict) else {},
                                 response.reason or "", "watch refused")
                pending = b""
                async for chunk in response.content.iter_any():
                    lines = (pending + chunk).split(b"\n")
                    pending = lines.pop()
                    events = [orjson.loads(line) for line in lines if line.strip()]
                    for event in events:
                        if event.get("type") == "ERROR":
                            status = event.get("object") or {}
                            raise _error(int(status.get("code") or 500), status,
                                         "WatchError", "the watch ended with an error")
                    if events:
                        yield events
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiError(0, type(exc).__name__, str(exc) or "watch failed") from exc

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create an object in its ``metadata.namespace``."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta["namespace"])
        return await self._request("POST", path, body=obj)

    async def merge_patch(self, api_version: str, kind: str, namespace: str, name: str,
                          patch: Mapping[str, Any], *,
                          subresource: str | None = None) -> dict[str, Any]:
        """Apply a JSON merge patch (RFC 7386) to an object or its subresource."""
        return await self._request(
            "PATCH", object_path(api_version, kind, namespace, name, subresource), body=patch,
            content_type="application/merge-patch+json")
