"""kmock's Kubernetes emulator plus the API-server behaviour the operator relies on.

kmock 0.8 stores and streams objects, but (see DESIGN.md) it cannot serve namespaces, sets no
server-side metadata, ignores the status subresource boundary, resourceVersions and label
selectors, and collects no garbage. This subclass adds exactly that, so kopf and the operator
see a plausible API server:

* ``/api/v1/namespaces`` (list, get, watch) with ``default`` and any namespace declared;
* ``metadata.uid``, ``generation`` (bumped when ``spec`` changes), ``creationTimestamp`` and
  ``namespace`` on creation; ``resourceVersion`` from one cluster-wide counter, advanced by
  every change (deletions too) and by nothing else: a patch that changes nothing is a no-op
  (no new version, no watch event), as on a real API server;
* resourceVersion semantics: a list carries the version it was taken at; a watch from a
  version replays every change after it (ADDED/MODIFIED/DELETED, in order), a watch without
  one starts with the current objects; a version older than the kept history answers
  ``410 Gone``; ``allowWatchBookmarks`` gets BOOKMARK events; ``timeoutSeconds`` ends it;
* ``labelSelector`` on lists and watches (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``);
* ``409 AlreadyExists`` for creating an existing name and ``409 Conflict`` for a merge
  patch whose ``metadata.resourceVersion`` is not the current one (optimistic concurrency);
* writes to ``/status`` change only ``status``, other writes never change ``status`` (for
  resources declared with a status subresource), as the API server does;
* a failed JSON-patch ``test`` answers 422, so kopf retries instead of erroring;
* deleting an object deletes its dependents (ownerReferences), like the garbage collector;
* objects are found by key, not by scanning, and only in-flight requests stay in kmock's own
  list (it compares each request with all earlier ones); every request is in :attr:`log`,
  and :meth:`api_calls` counts them by verb and client (User-Agent).

It still ignores PUT and server-side apply: the operator does not use them.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import gzip
import importlib.resources
import json
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock._internal import dicts, enums, k8s, rendering

CAPABILITIES = "packetflow.io/v1alpha1/capabilities"
ACTORS = "packetflow.io/v1alpha1/actors"
_NAMESPACES_PATH = "/api/v1/namespaces"
HISTORY = 200_000  # watch events kept per resource (a real API server keeps ~5 minutes)
BOOKMARK_SECONDS = 5.0  # a real API server sends one about every minute
# Client prefixes (User-Agent) of the operator's own requests: kopf's and the children's client.
OPERATOR_AGENTS = ("kopf/", "packetflow-operator/")
_VERBS = {enums.action.LIST: "list", enums.action.WATCH: "watch", enums.action.FETCH: "get",
          enums.action.CREATE: "create", enums.action.DELETE: "delete"}
WRITE_VERBS = frozenset({"create", "patch", "update", "delete"})


def _status_error(status: int, reason: str, message: str,
                  details: Mapping[str, Any] | None = None) -> aiohttp.web.Response:
    return aiohttp.web.json_response(
        {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
         "reason": reason, "message": message, "details": dict(details or {}), "code": status},
        status=status)


def parse_label_selector(text: str | None) -> list[tuple[str, str, str | None]]:
    """``k=v,k!=v,k,!k`` as (key, operator, value) terms; set-based terms are refused."""
    terms: list[tuple[str, str, str | None]] = []
    for raw in (text or "").split(","):
        term = raw.strip()
        if not term:
            continue
        if " in " in term or " notin " in term or "(" in term:
            raise ValueError(f"set-based selectors are not emulated: {term!r}")
        if "!=" in term:
            key, value = term.split("!=", 1)
            terms.append((key.strip(), "!=", value.strip()))
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            terms.append((key.strip(), "=", value.strip()))
        elif term.startswith("!"):
            terms.append((term[1:].strip(), "!", None))
        else:
            terms.append((term, "exists", None))
    return terms


def selects(terms: Iterable[tuple[str, str, str | None]], obj: Mapping[str, Any]) -> bool:
    """Whether an object's labels satisfy every selector term."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for key, operator, value in terms:
        if operator == "=" and labels.get(key) != value:
            return False
        if operator == "!=" and labels.get(key) == value:
            return False
        if operator == "exists" and key not in labels:
            return False
        if operator == "!" and key in labels:
            return False
    return True


class EventLog:
    """Every change of one resource, in resourceVersion order; watches replay from it.

    Versions are given here, where kmock publishes a change (under its lock, right after it
    stored the object), so the log is ordered by version and the stored object, the reply to
    the writer and the watch event all carry the same one.
    """

    def __init__(self, emulator: ClusterEmulator) -> None:
        self._emulator = emulator
        self.events: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(
            maxlen=HISTORY)
        self.compacted_to = 0  # events up to this version are gone: older watches get 410
        self._wakeup = asyncio.Event()

    async def put(self, *items: dict[str, Any]) -> None:
        """Record changes (kmock's bus interface) and wake the watches. Never awaits, so a
        change and its event are atomic for every other coroutine."""
        for item in items:
            obj = item["object"]
            metadata = dict(obj.get("metadata") or {})
            version = self._emulator.next_version()
            metadata["resourceVersion"] = str(version)
            if item["type"] == "DELETED":
                obj = {**obj, "metadata": metadata}  # the last state, at a version of its own
            else:
                obj["metadata"].update(resourceVersion=metadata["resourceVersion"])
            if len(self.events) == self.events.maxlen:
                self.compacted_to = self.events[0][0]
            self.events.append((version, {"type": item["type"], "object": obj}))
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

    def after(self, version: int) -> list[tuple[int, dict[str, Any]]]:
        """Events with a version greater than ``version``, oldest first."""
        newer: list[tuple[int, dict[str, Any]]] = []
        for entry in reversed(self.events):
            if entry[0] <= version:
                break
            newer.append(entry)
        newer.reverse()
        return newer

    async def wait(self, timeout: float) -> None:
        """Until the next change, or ``timeout`` seconds."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)


class ClusterEmulator(kmock.KubernetesEmulator):
    """A :class:`kmock.KubernetesEmulator` that behaves more like a real API server."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.namespace_names: list[str] = ["default"]
        self.log: list[rendering.Request] = []  # every request, for assertions
        self._version = 0
        self._namespace_uids: dict[str, str] = {}
        self._faults: list[list[Any]] = []  # [method, path, status, times left]
        # kmock publishes every change with `await self._buses[resource].put(event)`.
        self._buses = collections.defaultdict(lambda: EventLog(self))

    def next_version(self) -> int:
        """The next cluster-wide resourceVersion."""
        self._version += 1
        return self._version

    # --- namespaces: kmock's URL parser cannot route /api/v1/namespaces[/NAME] ---------------

    def _namespace_object(self, name: str) -> dict[str, Any]:
        uid = self._namespace_uids.setdefault(name, str(uuid.uuid4()))
        return {"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "uid": uid, "resourceVersion": "1",
                             "labels": {"kubernetes.io/metadata.name": name}},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        path = raw_request.path.rstrip("/")
        if raw_request.method == "GET" and (path == _NAMESPACES_PATH or (
                path.startswith(_NAMESPACES_PATH + "/") and path.count("/") == 4)):
            return await self._serve_namespaces(raw_request, path)
        return await super().__call__(raw_request)

    async def _serve_namespaces(self, raw_request: aiohttp.web.BaseRequest,
                                path: str) -> aiohttp.web.StreamResponse:
        if path != _NAMESPACES_PATH:
            name = path.rsplit("/", 1)[-1]
            if name not in self.namespace_names:
                return _status_error(404, "NotFound", f'namespaces "{name}" not found')
            return aiohttp.web.json_response(self._namespace_object(name))
        items = [self._namespace_object(name) for name in self.namespace_names]
        if raw_request.query.get("watch") != "true":
            return aiohttp.web.json_response({"apiVersion": "v1", "kind": "NamespaceList",
                                              "metadata": {"resourceVersion": "1"},
                                              "items": items})
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        for item in items:
            await response.write(json.dumps({"type": "ADDED", "object": item}).encode() + b"\n")
        # Namespaces never change here; hold the stream as the API server would.
        timeout = float(raw_request.query.get("timeoutSeconds", "3600"))
        await asyncio.sleep(timeout)
        return response

    # --- reads: by key (kmock scans every object), resourceVersions, label selectors ---------

    def _stored(self, resource: Any, namespace: str | None,
                name: str | None) -> k8s.k8s_dicts.Object | None:
        key = (resource, namespace, name)
        if name is None or key not in self.objects:
            return None
        obj = self.objects[key]
        return None if obj.deleted else obj

    def _known(self, resource: Any) -> bool:
        return any(resource == known for known in self._get_resources())

    def _matching(self, request: rendering.Request,
                  terms: list[tuple[str, str, str | None]]) -> list[dict[str, Any]]:
        return [obj.raw for (resource, namespace, _), obj in self.objects.items()
                if resource == request.resource and not obj.deleted
                and (request.namespace is None or namespace == request.namespace)
                and selects(terms, obj.raw)]

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        obj = self._stored(request.resource, request.namespace, request.name)
        if obj is None:
            raise k8s.KubernetesError(404, "NotFound", f"{request.name!r} not found",
                                      {"name": request.name})
        return obj.raw

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        meta = request.data.get("metadata", {})
        obj = self._stored(request.resource, request.namespace or meta.get("namespace"),
                           meta.get("name"))
        assert obj is not None  # stored by kmock's _handle() just before
        return obj.raw

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        key = (request.resource, request.namespace, request.name)
        return self.objects[key].last.raw

    _serve_delete = _serve_update  # the last state, as the API server answers a deletion

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        if not self._known(request.resource):
            raise k8s.KubernetesResourceNotFoundError()
        try:
            terms = parse_label_selector(request.params.get("labelSelector"))
        except ValueError as exc:
            raise k8s.KubernetesError(400, "BadRequest", str(exc)) from exc
        return {"metadata": {"resourceVersion": str(self._version)},
                "items": self._matching(request, terms)}

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        params = request.params
        terms = parse_label_selector(params.get("labelSelector"))
        bookmarks = params.get("allowWatchBookmarks") == "true"
        deadline = asyncio.get_running_loop().time() + float(
            params.get("timeoutSeconds") or 1800)
        log = self._buses[request.resource]
        assert isinstance(log, EventLog)
        yield b""  # the headers go out now, even if nothing happens for a while
        since = params.get("resourceVersion")
        if since in (None, "", "0"):
            # "Any version": the current objects first (taken atomically with the version).
            position = self._version
            for obj in self._matching(request, terms):
                yield {"type": "ADDED", "object": obj}
        else:
            position = int(since)
            if position < log.compacted_to:
                yield {"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                    "reason": "Expired", "message": f"too old resource version: {since}"}}
                return
        kind = self.resources[request.resource].kind if request.resource in self.resources \
            else None
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            events = log.after(position)
            for version, event in events:
                position = version
                obj = event["object"]
                if (request.namespace is None
                        or obj.get("metadata", {}).get("namespace") == request.namespace) \
                        and selects(terms, obj):
                    yield event
            if not events:
                await log.wait(min(left, BOOKMARK_SECONDS))
                if bookmarks and not log.after(position):
                    position = max(position, self._version)
                    yield {"type": "BOOKMARK", "object": {
                        "kind": kind, "apiVersion": _api_version(request.resource),
                        "metadata": {"resourceVersion": str(position)}}}

    # --- server-side metadata, the status boundary, preconditions, garbage collection -------

    def _has_status_subresource(self, request: rendering.Request) -> bool:
        assert request.resource is not None
        for resource in self.resources:
            if resource == request.resource:
                return "status" in self.resources[resource].subresources
        return False

    def _stamp_create(self, request: rendering.Request) -> aiohttp.web.Response | None:
        data = request.data
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.namespace:
            meta["namespace"] = request.namespace
        if self._stored(request.resource, meta.get("namespace"), meta.get("name")) is not None:
            assert request.resource is not None
            return _status_error(
                409, "AlreadyExists",
                f'{request.resource.plural} "{meta.get("name")}" already exists',
                {"name": meta.get("name"), "group": request.resource.group,
                 "kind": request.resource.plural})
        meta["uid"] = str(uuid.uuid4())
        meta["generation"] = 1
        meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        meta.pop("resourceVersion", None)  # given when the change is published
        if self._has_status_subresource(request):
            data.pop("status", None)
        return None

    def _stamp_update(self, request: rendering.Request) -> aiohttp.web.Response | None:
        """Validate and complete a patch; a reply when it must not reach kmock (an error, or
        a no-op answered with the unchanged object)."""
        assert request.resource is not None and request.name is not None
        stored = self._stored(request.resource, request.namespace, request.name)
        if stored is None:
            return None  # kmock answers 404 itself
        old = stored.raw  # neither patch function below changes its input
        data = request.data
        subresource_status = self._has_status_subresource(request)
        if isinstance(data, dict):
            wanted = (data.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != old["metadata"].get("resourceVersion"):
                return _status_error(
                    409, "Conflict", f'Operation cannot be fulfilled on {request.resource.plural}'
                    f' "{request.name}": the object has been modified; please apply your '
                    "changes to the latest version and try again")
            if request.subresource == "status":
                data_keep = {"status": data.get("status")}
                data.clear()
                data.update(data_keep)
            elif subresource_status:
                data.pop("status", None)
            try:
                new = dicts.merge_patch_dict(old, data)
            except ValueError as exc:
                return _status_error(422, "Invalid", str(exc))
        elif isinstance(data, list):
            try:
                new = jsonpatch.apply_patch(old, data, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return _status_error(422, "Invalid", f"the patch failed: {exc}")
        else:
            return _status_error(400, "BadRequest", "the patch is not JSON")
        if new == old:
            return aiohttp.web.json_response(old)  # no new version, no event
        generation = old.get("metadata", {}).get("generation", 1)
        if new.get("spec") != old.get("spec"):
            generation += 1
        if isinstance(data, dict):
            data.setdefault("metadata", {})["generation"] = generation
            data["metadata"].pop("resourceVersion", None)
        else:
            data.append({"op": "add", "path": "/metadata/generation", "value": generation})
        return None

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        self.log.append(request)
        try:
            for fault in self._faults:
                method, path, status, left = fault
                if left > 0 and request.method == method and request.url.path == path:
                    fault[3] -= 1
                    return _status_error(status, "InternalError", "injected fault")
            return await self._handle_stamped(request)
        finally:
            # kmock matches each request against every request it has ever seen (quadratic: a
            # few thousand requests take seconds each); keep only the in-flight ones there.
            for index, seen in enumerate(self._requests):
                if seen is request:
                    del self._requests[index]
                    break

    async def _handle_stamped(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        deleted_uid: str | None = None
        if request.resource is not None:
            reply: aiohttp.web.Response | None = None
            if request.action == enums.action.CREATE and isinstance(request.data, dict):
                reply = self._stamp_create(request)
            elif request.action == enums.action.UPDATE and request.name is not None:
                reply = self._stamp_update(request)
            elif request.action == enums.action.DELETE and request.name is not None:
                stored = self._stored(request.resource, request.namespace, request.name)
                if stored is not None:
                    deleted_uid = stored.raw.get("metadata", {}).get("uid")
            if reply is not None:
                return reply
        response = await super()._handle(request)
        if deleted_uid is not None and response.status < 300:
            await self._collect_garbage(deleted_uid)
        return response

    async def _collect_garbage(self, owner_uid: str) -> None:
        """Delete (in the background, recursively) every object owned by ``owner_uid``."""
        doomed: list[str] = []
        async with self._lock:
            for (resource, _, _), obj in list(self.objects.items()):
                if obj.deleted:
                    continue
                refs = obj.raw.get("metadata", {}).get("ownerReferences", []) or []
                if any(ref.get("uid") == owner_uid for ref in refs):
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})
                    doomed.append(raw["metadata"]["uid"])
        for uid in doomed:
            await self._collect_garbage(uid)

    # --- helpers for tests --------------------------------------------------------------------

    def fail_next(self, method: kmock.method, path: str, status: int = 500,
                  times: int = 1) -> None:
        """Answer the next ``times`` requests of ``method`` on ``path`` with ``status``."""
        self._faults.append([method, path, status, times])

    def live(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The current object, or None when absent or deleted."""
        obj = self._stored(kmock.resource(resource), namespace, name)
        return None if obj is None else copy.deepcopy(dict(obj.raw))

    def names(self, resource: str, namespace: str) -> set[str]:
        """Names of the live objects of a resource in a namespace."""
        return {name for (res, ns, name), obj in self.objects.items()
                if res == kmock.resource(resource) and ns == namespace and not obj.deleted}

    def count(self, resource: str, namespace: str) -> int:
        """How many live objects of a resource a namespace holds."""
        return len(self.names(resource, namespace))

    def api_calls(self, agents: Iterable[str] = OPERATOR_AGENTS,
                  since: int = 0) -> collections.Counter[str]:
        """Requests by Kubernetes verb (get, list, watch, create, patch, delete) made by
        clients whose User-Agent starts with one of ``agents``, from ``log[since:]`` on;
        ``verb resource[/subresource]`` keys are counted too."""
        prefixes = tuple(agents)
        counts: collections.Counter[str] = collections.Counter()
        for request in self.log[since:]:
            agent = next((value for key, value in request.headers.items()
                          if key.lower() == "user-agent"), "")
            if not agent.startswith(prefixes):
                continue
            if request.action == enums.action.UPDATE:
                verb = "patch" if request.method == kmock.method.PATCH else "update"
            else:
                verb = _VERBS.get(request.action, "get") if request.action else "get"
            counts[verb] += 1
            if request.resource is not None:
                target = request.resource.plural or "?"
                if request.subresource:
                    target += f"/{request.subresource}"
                counts[f"{verb} {target}"] += 1
        return counts


def writes(calls: Mapping[str, int]) -> int:
    """The write requests among :meth:`ClusterEmulator.api_calls`' counts."""
    return sum(count for verb, count in calls.items() if verb in WRITE_VERBS)


def _api_version(resource: Any) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def declare_resources(emulator: ClusterEmulator) -> None:
    """Built-in resources (kmock's bundle) plus the Capability and Actor CRDs with their
    subresources."""
    # Same as kmock's load_bundled(), which trips a DeprecationWarning (read_binary) on 3.11.
    bundle = importlib.resources.files("kmock._internal").joinpath("resources.json.gz")
    emulator.resources.load_data(gzip.decompress(bundle.read_bytes()))
    emulator.resources[CAPABILITIES] = kmock.ResourceInfo(
        kind="Capability", singular="capability", namespaced=True, shortnames={"cap"},
        categories={"packetflow"},
        verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
        subresources={"status", "scale"})
    emulator.resources[ACTORS] = kmock.ResourceInfo(
        kind="Actor", singular="actor", namespaced=True, shortnames={"act"},
        categories={"packetflow"},
        verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
        subresources={"status", "scale"})


def write_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig whose current context points at ``server`` (no credentials needed)."""
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "tests", "user": {"token": "emulator-token"}}],
        "contexts": [{"name": "emulator",
                      "context": {"cluster": "emulator", "user": "tests",
                                  "namespace": "default"}}],
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@asynccontextmanager
async def running_emulator() -> AsyncIterator[tuple[ClusterEmulator, str]]:
    """A started emulator with the resources declared, and its URL."""
    async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
        declare_resources(emulator)
        yield emulator, str(server.url).rstrip("/")
