"""The operator's own watches (watching.py): LIST then WATCH from the list's version, resumed
when the server ends a watch, listed again on 410; the Capability queue; what a Capability event
asks for; the verbs the operator uses against the emulator are the ones granted."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import httpx
import kopf
import pytest
from prometheus_client import CollectorRegistry

from packetflow.operator.client import KubeClient
from packetflow.operator.metrics import OperatorMetrics
from packetflow.operator.permissions import PERMISSIONS
from packetflow.operator.reconcile import Reconciler
from packetflow.operator.settings import OperatorSettings
from packetflow.operator.watching import (
    OwnerEvents,
    OwnerQueue,
    WatchTarget,
    reconcile_reason,
    watch_forever,
)
from packetflow.spec import API_VERSION
from tests.operator.api import NS, creations, post
from tests.operator.conftest import OperatorRunner, wait_for
from tests.operator.kube_emulator import CAPABILITIES, ClusterEmulator, verbs
from tests.operator.test_operator_emulated import (
    CAPS_PATH,
    CHILD_PATHS,
    CONFIGMAPS,
    DEPLOYMENTS,
    SERVICES,
    capability,
    children,
)
from tests.operator.test_operator_scale import reconciles

SETTINGS = OperatorSettings(liveness_address=None, operator_metrics_address=None)


class Recorder:
    """A watch sink keeping what it was given."""

    def __init__(self) -> None:
        self.lists: list[set[str]] = []
        self.events: list[tuple[str, str]] = []

    def listed(self, objects: list[dict[str, Any]]) -> None:
        assert all(obj["kind"] == "Capability" for obj in objects)  # set on list items too
        self.lists.append({obj["metadata"]["name"] for obj in objects})

    def changed(self, event_type: str, obj: dict[str, Any]) -> None:
        self.events.append((event_type, obj["metadata"]["name"]))


async def test_a_watch_resumes_and_lists_again_when_its_version_is_gone(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    cluster.bookmark_seconds = 60.0  # no bookmark moves the watch past the compaction
    await post(kube, CAPS_PATH, capability("kept"))
    await post(kube, CAPS_PATH, capability("missed"))
    client = KubeClient()
    client.configure(kopf.ConnectionInfo(server=str(cluster.url)))
    sink = Recorder()
    watch = asyncio.create_task(watch_forever(
        client, WatchTarget(API_VERSION, "Capability", NS), sink, watch_seconds=1))
    try:
        await wait_for(lambda: sink.lists == [{"kept", "missed"}], what="the first list")
        await post(kube, CAPS_PATH, capability("seen"))
        await wait_for(lambda: ("ADDED", "seen") in sink.events, what="a watch event")
        # A watch that ends is resumed from its version: nothing is listed again.
        mark = len(cluster.log)
        await wait_for(lambda: verbs(cluster.api_calls(since=mark))["watch"] >= 1,
                       what="the watch resumed")
        assert verbs(cluster.api_calls(since=mark))["list"] == 0
        # A deletion no watch sees, then the history compacted: the watch ends with 410,
        # and the new list no longer has the deleted Capability.
        cluster.miss_events(CAPABILITIES)
        assert (await kube.delete(f"{CAPS_PATH}/missed")).status_code < 300
        cluster.compact(CAPABILITIES)
        await wait_for(lambda: len(sink.lists) == 2, what="a list after 410")
        assert sink.lists[1] == {"kept", "seen"}
        assert ("DELETED", "missed") not in sink.events
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await client.aclose()


def _body(generation: int, observed: int | None = None, uid: str = "u1",
          deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "c", "namespace": NS, "uid": uid, "generation": generation}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status = {} if observed is None else {"observedGeneration": observed}
    return {"apiVersion": API_VERSION, "kind": "Capability", "metadata": meta,
            "spec": {"intent": "x"}, "status": status}


def test_what_a_capability_event_asks_for() -> None:
    reconciler = Reconciler(KubeClient(), SETTINGS, OperatorMetrics(registry=CollectorRegistry()))
    # First sight in this process: by status.observedGeneration, as kopf told them apart.
    assert reconcile_reason(None, _body(1)) == "create"
    assert reconcile_reason(None, _body(2, observed=1)) == "update"
    assert reconcile_reason(None, _body(2, observed=2)) == "resume"
    assert reconcile_reason(None, _body(1, deleting=True)) is None
    state = reconciler._state(_body(2, observed=2))
    state.parsed, state.generation = True, 2
    # Handled here: its own status write coming back, a label change: nothing.
    assert reconcile_reason(state, _body(2, observed=2)) is None
    assert reconcile_reason(state, _body(3, observed=2)) == "update"
    # Same name, new object (deleted and created again meanwhile).
    assert reconcile_reason(state, _body(1, uid="u2")) == "create"


def _child(name: str, owner_uid: str, version: str) -> dict[str, Any]:
    owner = {"apiVersion": API_VERSION, "kind": "Capability", "name": "c", "uid": owner_uid,
             "controller": True}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": NS, "uid": f"child-{name}",
                         "resourceVersion": version, "ownerReferences": [owner]}}


async def test_children_listed_before_their_owner_are_kept_current_for_its_resume() -> None:
    reconciler = Reconciler(KubeClient(), SETTINGS, OperatorMetrics(registry=CollectorRegistry()))
    kept = reconciler.listed_children
    # Listed at start, the owner not known yet: kept, by (owner uid, kind, name).
    assert reconciler.child_changed(None, _child("c-bundle", "u1", "5")) == "unknown-owner"
    assert kept[("u1", "ConfigMap", "c-bundle")]["metadata"]["resourceVersion"] == "5"
    # What happens to a kept child next is kept too; an event of one never listed is not.
    reconciler.child_changed("MODIFIED", _child("c-bundle", "u1", "7"))
    assert kept[("u1", "ConfigMap", "c-bundle")]["metadata"]["resourceVersion"] == "7"
    reconciler.child_changed("ADDED", _child("other", "u1", "8"))
    assert ("u1", "ConfigMap", "other") not in kept
    reconciler.child_changed("DELETED", _child("c-bundle", "u1", "9"))
    assert kept == {}
    # Once the owner is known, an event makes the listed copy stale: dropped.
    reconciler.child_changed(None, _child("c-bundle", "u1", "10"))
    body = _body(1, observed=1)
    body["spec"] = {"intent": "x", "implementation": {"builtin": {"name": "echo"}}}
    state = reconciler._state(body)
    reconciler._load_spec(state, body)
    assert state.manifest is not None
    reconciler.child_changed("MODIFIED", _child("c-bundle", "u1", "11"))
    assert kept == {}
    await reconciler.aclose()  # the reconcile that event queued (its bundle is not ours)


async def test_the_queue_coalesces_events_and_retries_failures() -> None:
    calls: list[tuple[int, str]] = []
    release = asyncio.Event()
    failures = [kopf.TemporaryError("not yet", delay=0.05)]

    async def reconcile(body: Mapping[str, Any], reason: str) -> None:
        calls.append((body["metadata"]["generation"], reason))
        if len(calls) == 1:
            await release.wait()
        elif failures:
            raise failures.pop()

    queue = OwnerQueue(reconcile)
    key = ("Capability", NS, "c")
    queue.submit(key, _body(1), "create")
    await wait_for(lambda: calls, what="the first reconcile")
    for generation in (2, 3, 4):  # while it runs: one more reconcile, with the newest body
        queue.submit(key, _body(generation), "update")
    release.set()
    # The one after fails once and is tried again after its delay, with the same body.
    await wait_for(lambda: len(calls) == 3 and queue.pending == 0, what="the retry")
    assert calls == [(1, "create"), (4, "update"), (4, "update")]
    await queue.aclose()


async def test_a_relist_forgets_capabilities_deleted_meanwhile() -> None:
    reconciler = Reconciler(KubeClient(), SETTINGS, OperatorMetrics(registry=CollectorRegistry()))
    for name, uid in (("kept", "u1"), ("gone", "u2")):
        state = reconciler._state({**_body(1, observed=1, uid=uid),
                                   "metadata": {**_body(1)["metadata"], "name": name,
                                                "uid": uid}})
        state.parsed, state.generation = True, 1
    reconciled: list[str] = []

    async def reconcile(body: Mapping[str, Any], reason: str) -> None:
        reconciled.append(body["metadata"]["name"])
    left: list[str] = []
    events = OwnerEvents("Capability", reconciler, OwnerQueue(reconcile), NS, left.append)
    kept = {**_body(1, observed=1), "metadata": {**_body(1)["metadata"], "name": "kept"}}
    events.listed([kept])
    assert set(reconciler.states) == {("Capability", NS, "kept")}
    assert "u2" in reconciler.gone and left == [NS]
    await asyncio.sleep(0)
    assert reconciled == []  # the one still there is known and handled: no work


async def test_a_capability_deleted_while_the_operator_was_down_stays_gone(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    first = OperatorRunner([NS])
    await first.start()
    try:
        for name in ("alpha", "beta"):
            await post(kube, CAPS_PATH, capability(name, replicas=1))
        for name in ("alpha", "beta"):
            await children(cluster, name)
        await wait_for(lambda: reconciles(first) >= 2 and first.ctx.pending == 0,
                       what="both handled")
    finally:
        await first.stop()
    assert (await kube.delete(f"{CAPS_PATH}/beta")).status_code < 300  # its children go too

    mark = len(cluster.log)
    second = OperatorRunner([NS])
    await second.start()
    try:
        await wait_for(lambda: reconciles(second, trigger="resume") == 1,
                       what="alpha resumed")
        await wait_for(lambda: second.ctx.pending == 0, what="queued work")
        assert set(second.ctx.reconciler.states) == {("Capability", NS, "alpha")}
        calls = cluster.api_calls(since=mark)
        assert sum(calls[key] for key in calls if key.startswith(("create", "patch"))) == 0
        assert not cluster.live(DEPLOYMENTS, NS, "beta")
        for name in ("alpha", "beta"):  # nothing created twice
            assert creations(cluster, CHILD_PATHS[DEPLOYMENTS], name) == 1
            assert creations(cluster, CHILD_PATHS[SERVICES], name) == 1
            assert creations(cluster, CHILD_PATHS[CONFIGMAPS], f"{name}-bundle") == 1
        assert_calls_permitted(cluster.api_calls())
    finally:
        await second.stop()


def assert_calls_permitted(calls: Mapping[str, int]) -> None:
    """Every ``verb resource`` the operator called is granted in permissions.py."""
    granted = {(p.resource, verb) for p in PERMISSIONS for verb in p.verbs}
    for call in calls:
        verb, resource = call.split(" ", 1)
        if resource != "discovery":
            assert (resource, verb) in granted, call


@pytest.mark.parametrize("name", ["echo"])
async def test_every_call_of_a_capabilitys_life_is_permitted(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner, name: str) -> None:
    await post(kube, CAPS_PATH, capability(name, replicas=1))
    await children(cluster, name)
    await wait_for(lambda: reconciles(operator_runner) >= 1
                   and operator_runner.ctx.pending == 0, what="handled")
    assert (await kube.delete(f"{CAPS_PATH}/{name}")).status_code < 300
    await wait_for(lambda: not operator_runner.ctx.reconciler.states, what="forgotten")
    calls = cluster.api_calls()
    assert_calls_permitted(calls)
    # The Capability itself is only read (list, watch); its status is the one write to it.
    assert {call for call in calls if call.endswith(" capabilities")} <= {
        "list capabilities", "watch capabilities"}


async def test_the_operator_lists_again_after_410_and_forgets_what_it_missed(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    for name in ("alpha", "beta"):
        await post(kube, CAPS_PATH, capability(name, replicas=1))
        await children(cluster, name)
    await wait_for(lambda: reconciles(operator_runner) >= 2 and operator_runner.ctx.pending == 0,
                   what="both handled")
    mark = len(cluster.log)
    cluster.miss_events(CAPABILITIES)  # its deletion reaches no watch
    assert (await kube.delete(f"{CAPS_PATH}/beta")).status_code < 300
    cluster.compact(CAPABILITIES)
    await wait_for(lambda: set(operator_runner.ctx.reconciler.states)
                   == {("Capability", NS, "alpha")}, what="beta forgotten after a new list")
    await wait_for(lambda: operator_runner.ctx.pending == 0, what="queued work")
    calls = cluster.api_calls(since=mark)
    assert calls["list capabilities"] == 1, calls
    assert sum(calls[key] for key in calls if key.startswith(("create", "patch"))) == 0, calls
    # alpha, known and handled, costs nothing (beta's children, gone with it, may have
    # queued beta once: it was found gone, and forgotten).
    assert reconciles(operator_runner, trigger="create") == 2
    assert reconciles(operator_runner, trigger="update") == 0
    assert reconciles(operator_runner, trigger="resume") == 0
