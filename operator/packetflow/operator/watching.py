"""The operator's own watches: Capabilities, Actors and their children, without kopf's
per-event machinery.

kopf parses every event into its body views, detects causes, builds handler kwargs and runs a
worker task per object; at hundreds of Capabilities that was most of the operator's CPU, spent
before a single child was written. Here a watch is LIST, then WATCH from the list's
resourceVersion with bookmarks, resumed from the last version seen when the server ends it,
listed again on ``410 Gone``; the events go straight to the reconciler:

* a Capability or Actor whose generation this process has not handled is queued
  (:class:`OwnerQueue`: one reconcile per owner at a time, later events coalesce into one
  more), its first sight in this process being a create, an update or a resume exactly as
  kopf told them apart (:func:`reconcile_reason`, by ``status.observedGeneration``);
* a deleted owner is forgotten (its children go by ownerReferences), also when only a
  new list shows it is gone (deleted while the watch was down);
* a child event goes to :meth:`Reconciler.child_changed` (no I/O); a new list of children
  (at start, after 410) is compared whole, so a child deleted while the watch was down is
  created again at once (:meth:`Reconciler.children_listed`).

kopf still runs everything else (Federations, login, probes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import kopf

from packetflow.operator.client import ApiError, GoneError, KubeClient
from packetflow.operator.reconcile import OWNER_KINDS, Key, Reconciler, ResourceState
from packetflow.spec import API_VERSION

log = logging.getLogger("packetflow.operator.watching")
WATCH_SECONDS: Final = 300  # a watch ends after this long and resumes from its last version
STOP_GRACE_SECONDS: Final = 5.0  # running reconciles may finish at stop (kopf's own grace)
ERROR_BACKOFF: Final = (0.5, 1.0, 2.0, 5.0, 10.0)  # seconds before trying a failed call again
Reconcile = Callable[[Mapping[str, Any], str], Awaitable[None]]


@dataclass(frozen=True)
class WatchTarget:
    """One kind in one namespace (every namespace when None), optionally label-selected."""

    api_version: str
    kind: str
    namespace: str | None
    label_selector: str | None = None


class WatchSink(Protocol):
    """Where a watch delivers: a full list (at start and after 410), then the changes."""

    def listed(self, objects: list[dict[str, Any]]) -> None:
        """Every object that exists now (what is not here is gone)."""

    def changed(self, event_type: str, obj: dict[str, Any]) -> None:
        """One ADDED, MODIFIED or DELETED event, in resourceVersion order."""


async def watch_forever(client: KubeClient, target: WatchTarget, sink: WatchSink, *,
                        watch_seconds: int = WATCH_SECONDS) -> None:
    """LIST, then WATCH from the list's version (bookmarks keep it fresh), resume from the
    last version when a watch ends, LIST again when the version is gone (410)."""
    failures = 0
    await client.wait_configured()

    async def backoff(exc: ApiError, what: str) -> None:
        nonlocal failures
        log.warning("%s of %s failed (trying again): %s", what, target.kind, exc)
        await asyncio.sleep(ERROR_BACKOFF[min(failures, len(ERROR_BACKOFF) - 1)])
        failures += 1

    while True:
        try:
            objects, version = await client.list_versioned(
                target.api_version, target.kind, target.namespace,
                label_selector=target.label_selector)
        except ApiError as exc:
            await backoff(exc, "the list")
            continue
        _deliver(sink.listed, objects)
        while True:
            try:
                async for events in client.watch(
                        target.api_version, target.kind, target.namespace,
                        resource_version=version, label_selector=target.label_selector,
                        timeout_seconds=watch_seconds):
                    failures = 0
                    for event in events:
                        obj = event.get("object") or {}
                        version = str((obj.get("metadata") or {}).get("resourceVersion")
                                      or version)
                        if event.get("type") != "BOOKMARK":
                            _deliver(sink.changed, str(event.get("type")), obj)
            except GoneError:
                log.info("the watch of %s is too old: listing again", target.kind)
                break
            except ApiError as exc:
                await backoff(exc, "the watch")


def _deliver(handler: Callable[..., None], *args: Any) -> None:
    try:
        handler(*args)
    except Exception:  # one bad event must not end the watch for every other object
        log.exception("an event could not be handled")


def reconcile_reason(state: ResourceState | None, body: Mapping[str, Any]) -> str | None:
    """What a Capability event asks for: ``create`` (never handled), ``update`` (a
    generation not handled yet), ``resume`` (handled, but not by this process) or None
    (handled here already: a status write coming back, a label change; or being deleted)."""
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return None  # its children go with it (ownerReferences); nothing to apply
    generation = meta.get("generation")
    if state is None or state.uid != meta.get("uid"):
        observed = (body.get("status") or {}).get("observedGeneration")
        if observed is None:
            return "create"
        return "resume" if observed == generation else "update"
    return None if state.parsed and state.generation == generation else "update"


class OwnerQueue:
    """Runs one reconcile per owner at a time; events arriving meanwhile coalesce into one
    more (with the newest body). A reconcile raising :class:`kopf.TemporaryError` is tried
    again after its delay, unless a newer event came first."""

    def __init__(self, reconcile: Reconcile) -> None:
        self._reconcile = reconcile
        self._waiting: dict[Key, tuple[Mapping[str, Any], str]] = {}
        self._running: dict[Key, asyncio.Task[None]] = {}
        self._retries: dict[Key, asyncio.TimerHandle] = {}

    @property
    def pending(self) -> int:
        """Owners waiting or being reconciled (retries not counted): 0 when idle."""
        return len(self._running)

    def submit(self, key: Key, body: Mapping[str, Any], reason: str) -> None:
        """Reconcile ``body`` soon; a create stays a create if events pile up meanwhile."""
        retry = self._retries.pop(key, None)
        if retry is not None:
            retry.cancel()
        waiting = self._waiting.get(key)
        if waiting is not None and waiting[1] == "create":
            reason = "create"
        self._waiting[key] = (body, reason)
        if key not in self._running:
            task = asyncio.get_running_loop().create_task(self._work(key))
            self._running[key] = task

    def drop(self, key: Key) -> None:
        """Forget what is waiting for a deleted owner (a reconcile running finishes)."""
        self._waiting.pop(key, None)
        retry = self._retries.pop(key, None)
        if retry is not None:
            retry.cancel()

    async def _work(self, key: Key) -> None:
        try:
            while (item := self._waiting.pop(key, None)) is not None:
                body, reason = item
                try:
                    await self._reconcile(body, reason)
                except kopf.TemporaryError as exc:
                    self._retry(key, body, reason, float(exc.delay or 1.0))
                except Exception:  # a bug in one owner's reconcile must not stop the others
                    log.exception("reconcile of %s failed", "/".join(key))
        finally:
            del self._running[key]

    def _retry(self, key: Key, body: Mapping[str, Any], reason: str, delay: float) -> None:
        if key in self._waiting:
            return  # a newer event already asks for a reconcile

        def fire() -> None:
            self._retries.pop(key, None)
            self.submit(key, body, reason)
        self._retries[key] = asyncio.get_running_loop().call_later(delay, fire)

    async def aclose(self, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        """Drop what waits, let running reconciles finish (up to ``grace_seconds``: a
        reconcile cut short leaves work for the next start), then cancel the rest."""
        for handle in self._retries.values():
            handle.cancel()
        self._retries.clear()
        self._waiting.clear()
        tasks = list(self._running.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_seconds)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)


class OwnerEvents:
    """A Capability or Actor watch's sink: queue what needs a reconcile, forget what is
    deleted (and tell ``on_deleted`` the namespace it left)."""

    def __init__(self, kind: str, reconciler: Reconciler, queue: OwnerQueue,
                 namespace: str | None,
                 on_deleted: Callable[[str], None] | None = None) -> None:
        self.kind = kind
        self.reconciler = reconciler
        self.queue = queue
        self.namespace = namespace
        self.on_deleted = on_deleted  # the namespace a Capability left (the MCP bundle)

    def listed(self, objects: list[dict[str, Any]]) -> None:
        """Queue every owner needing work; forget the known ones no longer listed."""
        listed: set[Key] = set()
        for body in objects:
            meta = body.get("metadata") or {}
            listed.add((self.kind, str(meta.get("namespace")), str(meta.get("name"))))
            self.changed("ADDED", body)
        for key, state in list(self.reconciler.states.items()):
            if key[0] == self.kind and key not in listed \
                    and self.namespace in (None, state.namespace):
                self._forget(state.namespace, state.name, state.uid)

    def changed(self, event_type: str, obj: dict[str, Any]) -> None:
        """Queue a reconcile for an owner that needs one; forget a deleted one."""
        meta = obj.get("metadata") or {}
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        if event_type == "DELETED":
            self._forget(namespace, name, meta.get("uid"))
            return
        key = (self.kind, namespace, name)
        reason = reconcile_reason(self.reconciler.states.get(key), obj)
        if reason is not None:
            self.queue.submit(key, obj, reason)

    def _forget(self, namespace: str, name: str, uid: str | None) -> None:
        self.queue.drop((self.kind, namespace, name))
        self.reconciler.forget(namespace, name, uid, self.kind)
        if self.on_deleted is not None:
            self.on_deleted(namespace)


class ChildEvents:
    """A children watch's sink (one kind, one namespace or all): each event and each listed
    child to the reconciler; a list after the first (a 410) also finds the children deleted
    while the watch was down."""

    def __init__(self, reconciler: Reconciler, count: Callable[[str], None], kind: str,
                 namespace: str | None) -> None:
        self.reconciler = reconciler
        self.count = count  # the outcome of each event, for the metrics
        self.kind = kind
        self.namespace = namespace
        self.listed_once = asyncio.Event()  # the first list is in (the owners may start)

    def listed(self, objects: list[dict[str, Any]]) -> None:
        """Compare every listed child as an event would; on a relist, queue the owners whose
        children are missing from it. (The first list, at start, comes before the owners'
        reconciles, which take their children from it: Reconciler.listed_children.)"""
        for child in objects:
            self.reconciler.child_changed(None, child)
        if self.listed_once.is_set():
            self.reconciler.children_listed(self.kind, self.namespace, objects, "relist")
        self.listed_once.set()

    def changed(self, event_type: str, obj: dict[str, Any]) -> None:
        """One child event."""
        self.count(self.reconciler.child_changed(event_type, obj))


def owner_targets(namespaces: Iterable[str | None]) -> list[WatchTarget]:
    """The Capability and Actor watches: one of each per namespace (or for all)."""
    return [WatchTarget(API_VERSION, kind, namespace)
            for namespace in namespaces for kind in OWNER_KINDS]
