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
* the standard verbs are served here from kmock's object store, by key: kmock itself would
  match every request against its reaction DSL and scan every object (most of its CPU, and
  quadratic); only discovery goes through kmock's reactions. Every request is in :attr:`log`,
  and :meth:`api_calls` counts them by verb and client (User-Agent).

For tests and the bench: :meth:`miss_events` (changes no watch sees), :meth:`compact` (410
for older watches), :meth:`fail_next` and :meth:`clear_faults` (injected errors), :meth:`hold`
(a write kept in flight until the test lets it through), and
``/_emulator/calls`` and ``/_emulator/wait`` for a process that talks to the emulator over HTTP only
(``python -m tests.operator.kube_emulator --serve emulator`` prints its port).

It still ignores PUT and server-side apply: the operator does not use them.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import datetime
import gzip
import importlib.resources
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import orjson
import yaml
from kmock._internal import dicts, enums, k8s_dicts, rendering

CAPABILITIES = "packetflow.io/v1alpha1/capabilities"
ACTORS = "packetflow.io/v1alpha1/actors"
CERTIFICATES = "cert-manager.io/v1/certificates"  # cert-manager's CRD (zero trust)
_NAMESPACES_PATH = "/api/v1/namespaces"
TOKEN_REVIEWS_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
CONTROL_PATH = "/_emulator"
HISTORY = 200_000  # watch events kept per resource (a real API server keeps ~5 minutes)
# Client prefixes (User-Agent) of the operator's own requests: kopf's and the children's client.
OPERATOR_AGENTS = ("kopf/", "packetflow-operator/")
_VERBS = {enums.action.LIST: "list", enums.action.WATCH: "watch", enums.action.FETCH: "get",
          enums.action.CREATE: "create", enums.action.DELETE: "delete"}
WRITE_VERBS = frozenset({"create", "patch", "update", "delete"})


def _json(body: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.Response(body=orjson.dumps(body), status=status,
                                content_type="application/json")


def _status_error(status: int, reason: str, message: str,
                  details: Mapping[str, Any] | None = None) -> aiohttp.web.Response:
    return _json({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "reason": reason, "message": message, "details": dict(details or {}),
                  "code": status}, status)


def _created_name(request: rendering.Request) -> str | None:
    """The name in a create's body (a POST's path names only the collection)."""
    data = request.data if isinstance(request.data, dict) else {}
    return (data.get("metadata") or {}).get("name")


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
        self.live: collections.Counter[str] = collections.Counter()  # namespace -> objects
        self.dropping = 0  # changes to leave out of the log: watches miss them
        self.compactions = 0  # open watches end with 410 when this moves (see compact)
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
                self.live[str(metadata.get("namespace"))] -= 1
            else:
                if item["type"] == "ADDED":
                    self.live[str(metadata.get("namespace"))] += 1
                obj["metadata"].update(resourceVersion=metadata["resourceVersion"])
            if self.dropping > 0:
                self.dropping -= 1
                continue
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

    def compact(self, version: int) -> None:
        """Forget the history up to ``version``; end every open watch with 410."""
        self.compacted_to = version
        self.compactions += 1
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

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
        self._holds: list[tuple[kmock.method, str, str | None, asyncio.Event]] = []
        self.bookmark_seconds = 5.0  # a real API server sends one about every minute
        # kmock publishes every change with `await self._buses[resource].put(event)`.
        self._buses = collections.defaultdict(lambda: EventLog(self))
        # Projected ServiceAccount tokens issued here: token -> (namespace, account,
        # audiences, expiry in epoch seconds).
        self.tokens: dict[str, tuple[str, str, tuple[str, ...], float]] = {}
        self.token_reviews = 0

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
        if path.startswith(CONTROL_PATH):
            return await self._serve_control(raw_request, path)
        if raw_request.method == "POST" and path == TOKEN_REVIEWS_PATH:
            return await self._review_token(raw_request)
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

    # --- TokenReview: projected ServiceAccount tokens, as the API server checks them --------

    def issue_token(self, namespace: str, account: str, audiences: Iterable[str],
                    expires_in: float = 3600.0) -> str:
        """A JWT-shaped token for ``namespace/account`` (as a projected volume holds one),
        valid for ``audiences`` until ``expires_in`` seconds from now (negative: expired)."""
        expiry = time.time() + expires_in
        claims = {"aud": list(audiences), "exp": int(expiry), "iat": int(time.time()),
                  "iss": "https://kubernetes.default.svc",
                  "sub": f"system:serviceaccount:{namespace}:{account}"}
        parts = [{"alg": "RS256", "typ": "JWT"}, claims, {"sig": uuid.uuid4().hex}]
        token = ".".join(base64.urlsafe_b64encode(orjson.dumps(part)).rstrip(b"=").decode()
                         for part in parts)
        self.tokens[token] = (namespace, account, tuple(audiences), expiry)
        return token

    async def _review_token(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.Response:
        """authentication.k8s.io/v1 TokenReview: authenticated only for a token issued here,
        not expired, whose audiences meet the requested ones (the API server's rules)."""
        self.token_reviews += 1
        review = await raw_request.json()
        spec = review.get("spec") or {}
        wanted = list(spec.get("audiences") or [])
        found = self.tokens.get(spec.get("token", ""))
        status: dict[str, Any]
        if found is None:
            status = {"authenticated": False, "error": "invalid bearer token"}
        elif time.time() > found[3]:
            status = {"authenticated": False,
                      "error": "invalid bearer token, Token has expired."}
        elif wanted and not set(wanted) & set(found[2]):
            status = {"authenticated": False, "error": "invalid bearer token, token "
                      f"audiences {list(found[2])} is invalid for the target audiences "
                      f"{wanted}"}
        else:
            namespace, account = found[0], found[1]
            status = {"authenticated": True,
                      "audiences": [a for a in found[2] if not wanted or a in wanted],
                      "user": {"username": f"system:serviceaccount:{namespace}:{account}",
                               "groups": ["system:serviceaccounts",
                                          f"system:serviceaccounts:{namespace}"]}}
        return _json({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                      "metadata": {"creationTimestamp": None}, "spec": spec,
                      "status": status}, 201)

    # --- control: what a test in another process asks (the benchmark) ----------------------

    async def _serve_control(self, raw_request: aiohttp.web.BaseRequest,
                             path: str) -> aiohttp.web.StreamResponse:
        """``/_emulator/calls?since=N[&agents=A,B]``: :meth:`api_calls`, the log's length
        and this process's CPU seconds;
        ``/_emulator/wait?want=RESOURCE:COUNT,...&namespace=NS``: answers once the namespace
        holds that many objects of each resource (or 408 after ``timeout`` seconds)."""
        query = raw_request.query
        if path == f"{CONTROL_PATH}/calls":
            agents = tuple(query["agents"].split(",")) if "agents" in query else OPERATOR_AGENTS
            calls = self.api_calls(agents, since=int(query.get("since", "0")))
            return _json({"calls": dict(calls), "log": len(self.log),
                          "cpu_s": time.process_time()})
        if path == f"{CONTROL_PATH}/wait":
            wanted = [item.rsplit(":", 1) for item in query.get("want", "").split(",") if item]
            namespace = query.get("namespace", "default")
            deadline = asyncio.get_running_loop().time() + float(query.get("timeout", "600"))
            # Woken by each change of a resource waited for (not polling: the bench measures
            # the clients, and a poll would take the emulator's CPU from them).
            while missing := [(resource, number) for resource, number in wanted
                              if self.count(resource, namespace) < int(number)]:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    return _status_error(408, "Timeout", f"not reached: {query.get('want')}")
                log = self._buses[kmock.resource(missing[0][0])]
                assert isinstance(log, EventLog)
                await log.wait(min(left, 1.0))
            return _json({"ok": True})
        return _status_error(404, "NotFound", path)

    # --- objects: stored in kmock's store, served here directly -----------------------------
    # kmock would match every request against its reaction DSL (most of its CPU) and scan every
    # object per request; the standard verbs are served here by key instead.

    def _stored(self, resource: Any, namespace: str | None,
                name: str | None) -> k8s_dicts.Object | None:
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

    def _info(self, resource: Any) -> kmock.ResourceInfo | None:
        # Not resources.get(): the array makes an empty entry for any key it is asked for.
        if resource not in self.resources:
            return None
        return self.resources[resource]

    def _has_status_subresource(self, request: rendering.Request) -> bool:
        info = self._info(request.resource)
        return info is not None and "status" in info.subresources

    def _log(self, request: rendering.Request) -> EventLog:
        log = self._buses[request.resource]
        assert isinstance(log, EventLog)
        return log

    async def _create(self, request: rendering.Request) -> aiohttp.web.Response:
        data = request.data
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.namespace:
            meta["namespace"] = request.namespace
        assert request.resource is not None
        key = (request.resource, meta.get("namespace"), meta.get("name"))
        if self._stored(*key) is not None:
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
        async with self._lock:
            if key in self.objects:
                self.objects[key].create(data)  # a new life of a deleted name
            else:
                self.objects[key] = data
            await self._log(request).put({"type": "ADDED", "object": self.objects[key].raw})
            return _json(self.objects[key].raw, 201)

    def _updated(self, request: rendering.Request,
                 old: dict[str, Any]) -> dict[str, Any] | aiohttp.web.Response:
        """The object a patch makes of ``old``, or the reply refusing it."""
        assert request.resource is not None
        data = request.data
        if isinstance(data, dict):
            wanted = (data.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != old["metadata"].get("resourceVersion"):
                return _status_error(
                    409, "Conflict", f"Operation cannot be fulfilled on "
                    f'{request.resource.plural} "{request.name}": the object has been modified;'
                    " please apply your changes to the latest version and try again")
            if request.subresource == "status":
                data = {"status": data.get("status")}
            elif self._has_status_subresource(request):
                data = {key: value for key, value in data.items() if key != "status"}
            try:
                new = dict(dicts.merge_patch_dict(old, data))
            except ValueError as exc:
                return _status_error(422, "Invalid", str(exc))
        elif isinstance(data, list):
            try:
                new = jsonpatch.apply_patch(old, data, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return _status_error(422, "Invalid", f"the patch failed: {exc}")
        else:
            return _status_error(400, "BadRequest", "the patch is not JSON")
        metadata = dict(new.get("metadata") or {})
        # What the patch cannot change: identity, version, generation (bumped with the spec).
        for key in ("uid", "name", "namespace", "creationTimestamp", "resourceVersion"):
            if key in old["metadata"]:
                metadata[key] = old["metadata"][key]
        generation = old["metadata"].get("generation", 1)
        metadata["generation"] = generation + (1 if new.get("spec") != old.get("spec") else 0)
        new["metadata"] = metadata
        return new

    async def _update(self, request: rendering.Request) -> aiohttp.web.Response:
        async with self._lock:
            stored = self._stored(request.resource, request.namespace, request.name)
            if stored is None:
                return _status_error(404, "NotFound", f'"{request.name}" not found')
            old = stored.raw
            new = self._updated(request, old)
            if isinstance(new, aiohttp.web.Response):
                return new
            if new == old:
                return _json(old)  # a no-op: no new version, no event
            stored.create(new)  # the next version
            log = self._log(request)
            await log.put({"type": "MODIFIED", "object": stored.raw})
            meta = new["metadata"]
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                raw = stored.raw
                stored.delete()
                await log.put({"type": "DELETED", "object": raw})
                await self._collect_garbage_locked(meta["uid"])
                return _json(raw)
            return _json(stored.raw)

    async def _delete(self, request: rendering.Request) -> aiohttp.web.Response:
        async with self._lock:
            stored = self._stored(request.resource, request.namespace, request.name)
            if stored is None:
                return _status_error(404, "NotFound", f'"{request.name}" not found')
            meta = stored.raw["metadata"]
            log = self._log(request)
            if meta.get("deletionTimestamp"):
                return _json(stored.raw)  # already being deleted
            if meta.get("finalizers"):
                now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                stored.create({**stored.raw, "metadata": {**meta, "deletionTimestamp": now}})
                await log.put({"type": "MODIFIED", "object": stored.raw})
                return _json(stored.raw)
            raw = stored.raw
            stored.delete()
            await log.put({"type": "DELETED", "object": raw})
            await self._collect_garbage_locked(meta["uid"])
            return _json(raw)

    def _list(self, request: rendering.Request) -> aiohttp.web.Response:
        if not self._known(request.resource):
            return _status_error(404, "NotFound", "the server could not find the resource")
        try:
            terms = parse_label_selector(request.params.get("labelSelector"))
        except ValueError as exc:
            return _status_error(400, "BadRequest", str(exc))
        return _json({"metadata": {"resourceVersion": str(self._version)},
                      "items": self._matching(request, terms)})

    async def _watch(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        params = request.params
        try:
            terms = parse_label_selector(params.get("labelSelector"))
        except ValueError as exc:
            return _status_error(400, "BadRequest", str(exc))
        bookmarks = params.get("allowWatchBookmarks") == "true"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(params.get("timeoutSeconds") or 1800)
        log = self._log(request)
        raw_request = request._raw_request
        assert raw_request is not None and request.resource is not None
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw_request)

        async def send(event: Mapping[str, Any]) -> None:
            await response.write(orjson.dumps(event) + b"\n")

        since = params.get("resourceVersion")
        gone = {"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
            "reason": "Expired", "message": f"too old resource version: {since}"}}
        compactions = log.compactions
        if since in (None, "", "0"):
            # "Any version": the current objects first (taken atomically with the version).
            position = self._version
            for obj in self._matching(request, terms):
                await send({"type": "ADDED", "object": obj})
        else:
            position = int(since)
            if position < log.compacted_to:
                await send(gone)
                return response
        info = self._info(request.resource)
        while (left := deadline - loop.time()) > 0:
            if log.compactions != compactions:
                await send(gone)  # as an API server ends watches its window moved past
                return response
            events = log.after(position)
            for version, event in events:
                position = version
                obj = event["object"]
                if (request.namespace is None
                        or obj.get("metadata", {}).get("namespace") == request.namespace) \
                        and selects(terms, obj):
                    await send(event)
            if not events:
                await log.wait(min(left, self.bookmark_seconds))
                if bookmarks and not log.after(position):
                    position = max(position, self._version)
                    await send({"type": "BOOKMARK", "object": {
                        "kind": info.kind if info else None,
                        "apiVersion": _api_version(request.resource),
                        "metadata": {"resourceVersion": str(position)}}})
        return response

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        self.log.append(request)
        try:
            for method, path, name, release in self._holds:
                if request.method == method and request.url.path == path and name in (
                        None, request.name or _created_name(request)):
                    await release.wait()
            for fault in self._faults:
                method, path, status, left = fault
                if left > 0 and request.method == method and request.url.path == path:
                    fault[3] -= 1
                    return _status_error(status, "InternalError", "injected fault")
            return await self._serve(request)
        finally:
            # kmock matches each request against every request it has ever seen (quadratic: a
            # few thousand requests take seconds each); keep only the in-flight ones there.
            for index, seen in enumerate(self._requests):
                if seen is request:
                    del self._requests[index]
                    break

    async def _serve(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        action, resource, name = request.action, request.resource, request.name
        if resource is None or resource.plural is None:
            return await super()._handle(request)  # discovery: kmock's own reactions
        if action == enums.action.FETCH:
            stored = self._stored(resource, request.namespace, name)
            if stored is None:
                return _status_error(404, "NotFound", f'{resource.plural} "{name}" not found',
                                     {"name": name, "kind": resource.plural})
            return _json(stored.raw)
        if action == enums.action.LIST:
            return self._list(request)
        if action == enums.action.WATCH:
            return await self._watch(request)
        if action == enums.action.CREATE and isinstance(request.data, dict):
            return await self._create(request)
        if action == enums.action.UPDATE and name is not None:
            return await self._update(request)
        if action == enums.action.DELETE and name is not None:
            return await self._delete(request)
        return _status_error(405, "MethodNotAllowed", f"{request.method} is not emulated here")

    async def _collect_garbage_locked(self, owner_uid: str) -> None:
        """Delete (recursively) every object owned by ``owner_uid``, as the garbage collector
        does in the background; the caller holds the lock."""
        doomed: list[str] = []
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
            await self._collect_garbage_locked(uid)

    # --- helpers for tests --------------------------------------------------------------------

    def fail_next(self, method: kmock.method, path: str, status: int = 500,
                  times: int = 1) -> None:
        """Answer the next ``times`` requests of ``method`` on ``path`` with ``status``."""
        self._faults.append([method, path, status, times])

    def hold(self, method: kmock.method, path: str, name: str | None = None) -> asyncio.Event:
        """Serve the requests of ``method`` on ``path`` (of the object ``name``: a create
        goes by the name in its body) only once the event returned is set, as an API server
        slow to answer them; they are logged on arrival."""
        release = asyncio.Event()
        self._holds.append((method, path, name, release))
        return release

    def clear_faults(self) -> None:
        """Answer every request normally again."""
        self._faults.clear()

    def miss_events(self, resource: str, count: int = 1) -> None:
        """Leave the next ``count`` changes of ``resource`` out of every watch (they happen,
        but no watch sees them), as a watch that broke and resumed too late would."""
        log = self._buses[kmock.resource(resource)]
        assert isinstance(log, EventLog)
        log.dropping += count

    def compact(self, resource: str) -> None:
        """Forget the change history of ``resource`` so far (as etcd compaction does): open
        watches end with ``410 Expired``, and so does a watch from an older version."""
        log = self._buses[kmock.resource(resource)]
        assert isinstance(log, EventLog)
        log.compact(self._version)

    def live(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The current object, or None when absent or deleted."""
        obj = self._stored(kmock.resource(resource), namespace, name)
        return None if obj is None else copy.deepcopy(dict(obj.raw))

    def names(self, resource: str, namespace: str) -> set[str]:
        """Names of the live objects of a resource in a namespace."""
        return {name for (res, ns, name), obj in self.objects.items()
                if res == kmock.resource(resource) and ns == namespace and not obj.deleted}

    def count(self, resource: str, namespace: str) -> int:
        """How many objects of a resource created through the API a namespace holds now
        (kept up to date with every change: cheap to poll)."""
        log = self._buses[kmock.resource(resource)]
        assert isinstance(log, EventLog)
        return log.live[namespace]

    def api_calls(self, agents: Iterable[str] = OPERATOR_AGENTS,
                  since: int = 0) -> collections.Counter[str]:
        """Requests from ``log[since:]`` by clients whose User-Agent starts with one of
        ``agents``, counted by ``verb resource[/subresource]`` (``create deployments``,
        ``patch capabilities/status``; API discovery is ``get discovery``)."""
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
            target = "discovery"
            if request.resource is not None and request.resource.plural:
                target = request.resource.plural
                if request.subresource:
                    target += f"/{request.subresource}"
            counts[f"{verb} {target}"] += 1
        return counts


def verbs(calls: Mapping[str, int]) -> collections.Counter[str]:
    """:meth:`ClusterEmulator.api_calls`' counts summed by verb."""
    counts: collections.Counter[str] = collections.Counter()
    for key, count in calls.items():
        counts[key.split(" ", 1)[0]] += count
    return counts


def writes(calls: Mapping[str, int]) -> int:
    """The write requests among :meth:`ClusterEmulator.api_calls`' counts."""
    return sum(count for verb, count in verbs(calls).items() if verb in WRITE_VERBS)


def _api_version(resource: Any) -> str:
    return f"{resource.group}/{resource.version}" if resource.group else str(resource.version)


def declare_resources(emulator: ClusterEmulator) -> None:
    """Built-in resources (kmock's bundle) plus the Capability and Actor CRDs with their
    subresources, and cert-manager's Certificate."""
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
    emulator.resources[CERTIFICATES] = kmock.ResourceInfo(
        kind="Certificate", singular="certificate", namespaced=True,
        shortnames={"cert", "certs"}, categories={"cert-manager"},
        verbs={"create", "delete", "deletecollection", "get", "list", "patch", "update",
               "watch"},
        subresources={"status"})


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


async def serve() -> None:
    """The emulator on a free port for another process: print its URL, serve until stdin
    closes (``python -m tests.operator.kube_emulator --serve emulator``, as the benches'
    ``server_process`` runs servers)."""
    async with running_emulator() as (_, url):
        print(url.rsplit(":", 1)[1], flush=True)
        await asyncio.to_thread(sys.stdin.read)


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve", "emulator"]:
        sys.exit("usage: python -m tests.operator.kube_emulator --serve emulator")
    asyncio.run(serve())
