"""kmock's Kubernetes emulator plus the API-server behaviour the operator relies on.

kmock 0.8 stores and streams objects, but (see DESIGN.md) it cannot serve namespaces, sets no
server-side metadata, ignores the status subresource boundary and collects no garbage. This
subclass adds exactly that, so kopf and the operator see a plausible API server:

* ``/api/v1/namespaces`` (list, get, watch) with ``default`` and any namespace declared;
* ``metadata.uid``, ``resourceVersion`` (on every write), ``generation`` (bumped when ``spec``
  changes), ``creationTimestamp`` and ``namespace`` on creation;
* writes to ``/status`` change only ``status``, other writes never change ``status`` (for
  resources declared with a status subresource), as the API server does;
* a failed JSON-patch ``test`` answers 422, so kopf retries instead of erroring;
* deleting an object deletes its dependents (ownerReferences), like the garbage collector;
* request matching stays fast: kmock compares each request with all earlier ones (quadratic),
  so only in-flight requests stay in kmock's list; all of them are in :attr:`log`.

It still ignores label selectors, PUT and server-side apply: the operator does not use them.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import gzip
import importlib.resources
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
import yaml
from kmock._internal import dicts, enums, rendering

CAPABILITIES = "packetflow.io/v1alpha1/capabilities"
ACTORS = "packetflow.io/v1alpha1/actors"
_NAMESPACES_PATH = "/api/v1/namespaces"


class ClusterEmulator(kmock.KubernetesEmulator):
    """A :class:`kmock.KubernetesEmulator` that behaves more like a real API server."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.namespace_names: list[str] = ["default"]
        self.log: list[rendering.Request] = []  # every request, for assertions
        self._versions = itertools.count(1)
        self._namespace_uids: dict[str, str] = {}
        self._faults: list[list[Any]] = []  # [method, path, status, times left]

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
                return aiohttp.web.json_response(
                    {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                     "reason": "NotFound", "code": 404,
                     "message": f'namespaces "{name}" not found'}, status=404)
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

    # --- server-side metadata, the status boundary, JSON-patch tests, garbage collection ----

    def _has_status_subresource(self, request: rendering.Request) -> bool:
        assert request.resource is not None
        for resource in self.resources:
            if resource == request.resource:
                return "status" in self.resources[resource].subresources
        return False

    def _stamp_create(self, request: rendering.Request) -> None:
        data = request.data
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.namespace:
            meta["namespace"] = request.namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self._versions))
        meta["generation"] = 1
        meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        if self._has_status_subresource(request):
            data.pop("status", None)

    def _stamp_update(self, request: rendering.Request) -> kmock.KubernetesError | None:
        assert request.resource is not None and request.name is not None
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None  # kmock answers 404 itself
        old = copy.deepcopy(dict(self.objects[key].raw))
        data = request.data
        subresource_status = self._has_status_subresource(request)
        if isinstance(data, dict):
            if request.subresource == "status":
                data_keep = {"status": data.get("status")}
                data.clear()
                data.update(data_keep)
            elif subresource_status:
                data.pop("status", None)
            try:
                new = dicts.merge_patch_dict(old, data)
            except ValueError as exc:
                return kmock.KubernetesError(422, "Invalid", str(exc))
        elif isinstance(data, list):
            try:
                new = jsonpatch.apply_patch(old, data, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return kmock.KubernetesError(422, "Invalid", f"the patch failed: {exc}")
        else:
            return kmock.KubernetesError(400, "BadRequest", "the patch is not JSON")
        version = str(next(self._versions))
        generation = old.get("metadata", {}).get("generation", 1)
        if new.get("spec") != old.get("spec"):
            generation += 1
        if isinstance(data, dict):
            data.setdefault("metadata", {}).update(resourceVersion=version, generation=generation)
        else:
            data.extend([{"op": "add", "path": "/metadata/resourceVersion", "value": version},
                         {"op": "add", "path": "/metadata/generation", "value": generation}])
        return None

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        self.log.append(request)
        try:
            for fault in self._faults:
                method, path, status, left = fault
                if left > 0 and request.method == method and request.url.path == path:
                    fault[3] -= 1
                    return await self._render_error(
                        kmock.KubernetesError(status, "InternalError", "injected fault"))
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
            if request.action == enums.action.CREATE and isinstance(request.data, dict):
                self._stamp_create(request)
            elif request.action == enums.action.UPDATE and request.name is not None:
                error = self._stamp_update(request)
                if error is not None:
                    return await self._render_error(error)
            elif request.action == enums.action.DELETE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and not self.objects[key].deleted:
                    deleted_uid = self.objects[key].raw.get("metadata", {}).get("uid")
        response = await super()._handle(request)
        if deleted_uid is not None and response.status < 300:
            await self._collect_garbage(deleted_uid)
        return response

    async def _collect_garbage(self, owner_uid: str) -> None:
        """Delete (in the background, recursively) every object owned by ``owner_uid``."""
        doomed: list[tuple[Any, str]] = []
        async with self._lock:
            for (resource, _, _), obj in list(self.objects.items()):
                if obj.deleted:
                    continue
                refs = obj.raw.get("metadata", {}).get("ownerReferences", []) or []
                if any(ref.get("uid") == owner_uid for ref in refs):
                    raw = copy.deepcopy(dict(obj.raw))
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})
                    doomed.append((resource, raw["metadata"]["uid"]))
        for _, uid in doomed:
            await self._collect_garbage(uid)

    # --- helpers for tests --------------------------------------------------------------------

    def fail_next(self, method: kmock.method, path: str, status: int = 500,
                  times: int = 1) -> None:
        """Answer the next ``times`` requests of ``method`` on ``path`` with ``status``."""
        self._faults.append([method, path, status, times])

    def live(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The current object, or None when absent or deleted."""
        key = (kmock.resource(resource), namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(dict(self.objects[key].raw))

    def names(self, resource: str, namespace: str) -> set[str]:
        """Names of the live objects of a resource in a namespace."""
        return {name for (res, ns, name), obj in self.objects.items()
                if res == kmock.resource(resource) and ns == namespace and not obj.deleted}


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
