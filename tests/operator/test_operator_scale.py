"""What the operator costs the API server (issue 17), counted on the emulator's request log.

The real kopf operator, the emulator over HTTP; the counts are behaviour, not timing: creating
a Capability costs one write per child and one status write, nothing is read first, the
children's events coming back cost nothing, an unchanged resync or restart writes nothing, a
burst of child events for one owner makes one reconcile.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import kmock
import kopf

from packetflow.operator.handlers import ObservedGenerationDiffBase
from packetflow.operator.metrics import OperatorMetrics
from packetflow.operator.reconcile import ResourceState
from tests.operator.api import NS, patch, post
from tests.operator.conftest import OperatorRunner, wait_for
from tests.operator.kube_emulator import CAPABILITIES, ClusterEmulator, verbs, writes
from tests.operator.test_operator_emulated import (
    CAPS_PATH,
    CHILD_PATHS,
    CONFIGMAPS,
    DEPLOYMENTS,
    SERVICES,
    capability,
    children,
)

COUNT = 12


def total(metrics: OperatorMetrics, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels."""
    return sum(sample.value for family in metrics.registry.collect()
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(key) == value
                                               for key, value in labels.items()))


def reconciles(runner: OperatorRunner, **labels: str) -> float:
    """Reconciles so far (kopf handler runs and queued ones)."""
    return total(runner.ctx.metrics, "packetflow_operator_reconciles_total", **labels)


async def created(cluster: ClusterEmulator, runner: OperatorRunner, count: int) -> None:
    """Wait until ``count`` Capabilities have their status for generation 1 and every child
    event has been taken in, with nothing queued."""
    def statuses() -> bool:
        return all((cluster.live(CAPABILITIES, NS, f"cap-{i}") or {}).get("status", {})
                   .get("observedGeneration") == 1 for i in range(count))
    await wait_for(statuses, timeout=30, what="every status")
    await wait_for(lambda: total(runner.ctx.metrics, "packetflow_operator_child_events_total")
                   >= 3 * count and runner.ctx.pending == 0, timeout=30,
                   what="every child event taken in")


async def create_capabilities(kube: httpx.AsyncClient, count: int) -> None:
    """kubectl apply of ``count`` Capabilities at once."""
    await asyncio.gather(*(post(kube, CAPS_PATH, capability(f"cap-{i}", replicas=1))
                           for i in range(count)))


async def assert_resync_writes_nothing(cluster: ClusterEmulator,
                                      runner: OperatorRunner) -> dict[str, int]:
    """One resync of unchanged owners: no write, only LISTs; its calls (watches aside: one
    the server ended meanwhile resumes from its last version, seen on a loaded machine)."""
    mark = len(cluster.log)
    assert runner.thread is not None
    await asyncio.to_thread(runner.thread.call, runner.ctx.reconciler.resync())
    await wait_for(lambda: runner.ctx.pending == 0, what="the resync's work")
    calls = cluster.api_calls(since=mark)
    assert writes(calls) == 0, calls
    resync = {call: n for call, n in calls.items() if not call.startswith("watch ")}
    assert verbs(resync)["list"] == sum(resync.values()), calls
    return resync


async def assert_restart_writes_nothing(cluster: ClusterEmulator, count: int) -> None:
    """A new operator resumes ``count`` unchanged owners and writes (and reads) nothing."""
    mark = len(cluster.log)
    runner = OperatorRunner([NS])
    await runner.start()
    try:
        await wait_for(lambda: reconciles(runner, trigger="resume") == count,
                       what="every owner resumed")
        await wait_for(lambda: runner.ctx.pending == 0, what="queued work")
        calls = cluster.api_calls(since=mark)
        assert writes(calls) == 0, calls
        # Nor reads: the children were listed before the owners resumed, and compared there.
        assert own_reads(calls) == 0, calls
    finally:
        await runner.stop()


@contextlib.asynccontextmanager
async def reconcile_held(runner: OperatorRunner, state: ResourceState) -> AsyncIterator[None]:
    """Within the block, an owner's lock is held on the operator's loop, as by a reconcile in
    progress: whatever arrives meanwhile waits."""
    thread = runner.thread
    assert thread is not None and thread.loop is not None
    loop = thread.loop
    release = asyncio.Event()  # waited for on the operator's loop, set through it
    holding = threading.Event()

    async def hold() -> None:
        async with state.lock:
            holding.set()
            await release.wait()
    held = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(hold(), loop))
    await wait_for(holding.is_set, what="the lock held")
    try:
        yield
    finally:
        loop.call_soon_threadsafe(release.set)
        await held


@contextlib.asynccontextmanager
async def cap_0_deployment_held(cluster: ClusterEmulator, status_wait_seconds: float
                                ) -> AsyncIterator[tuple[OperatorRunner, asyncio.Event]]:
    """An operator whose POST of cap-0's Deployment the emulator holds until the event
    yielded is set (and at the end): cap-0 keeps writing children meanwhile."""
    held = cluster.hold(kmock.method.POST, CHILD_PATHS[DEPLOYMENTS], name="cap-0")
    runner = OperatorRunner([NS], status_wait_seconds=status_wait_seconds)
    await runner.start()
    try:
        yield runner, held
    finally:
        held.set()
        await runner.stop()


def own_reads(calls: dict[str, int]) -> int:
    """GETs of single objects (not lists, watches or discovery)."""
    return verbs(calls)["get"] - calls["get discovery"]


async def test_creating_capabilities_costs_a_write_per_child_and_one_status_write(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    mark = len(cluster.log)
    await create_capabilities(kube, COUNT)
    await created(cluster, operator_runner, COUNT)

    calls = cluster.api_calls(since=mark)
    assert calls["create configmaps"] == calls["create services"] == COUNT
    assert calls["create deployments"] == COUNT
    assert calls["patch capabilities/status"] == COUNT
    assert writes(calls) == 4 * COUNT, calls  # nothing else: no kopf annotation, no marker
    assert own_reads(calls) == 0, calls  # no GET before a create
    # One reconcile each on a quiet machine; the bound is two. A loaded one once
    # reconciled one Capability from another trigger first (11 "create" of 12 in all),
    # writing nothing more (the counts above hold).
    assert COUNT <= reconciles(operator_runner) <= 2 * COUNT
    metrics = operator_runner.ctx.metrics
    assert total(metrics, "packetflow_operator_child_events_total", outcome="queued") == 0


async def test_unchanged_resync_and_restart_write_nothing(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    first = OperatorRunner([NS])
    await first.start()
    try:
        await create_capabilities(kube, COUNT)
        await created(cluster, first, COUNT)
        resync = await assert_resync_writes_nothing(cluster, first)
        assert sum(resync.values()) <= 6, resync  # a few LISTs, not a call per resource
    finally:
        await first.stop()
    await assert_restart_writes_nothing(cluster, COUNT)


async def test_statuses_wait_while_another_capabilitys_children_are_written(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    # The bound beyond this test: only the order is seen.
    async with cap_0_deployment_held(cluster, status_wait_seconds=60) as (runner, held):
        mark = len(cluster.log)
        await create_capabilities(kube, COUNT)
        gate = runner.ctx.reconciler.children_first

        def only_cap_0_writing() -> bool:
            return gate.writing == 1 and all(cluster.live(DEPLOYMENTS, NS, f"cap-{i}")
                                             for i in range(1, COUNT))
        await wait_for(only_cap_0_writing, what="every child but cap-0's Deployment")
        assert cluster.api_calls(since=mark)["patch capabilities/status"] == 0
        held.set()
        await created(cluster, runner, COUNT)
        calls = cluster.api_calls(since=mark)
        assert calls["patch capabilities/status"] == COUNT, calls  # still one each
        assert writes(calls) == 4 * COUNT, calls


async def test_readiness_arriving_while_a_status_waits_goes_in_that_write(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    async with cap_0_deployment_held(cluster, status_wait_seconds=60) as (runner, held):
        await post(kube, CAPS_PATH, capability("cap-0", replicas=1))
        await post(kube, CAPS_PATH, capability("cap-1", replicas=1))
        gate = runner.ctx.reconciler.children_first
        await wait_for(lambda: gate.writing == 1 and cluster.live(DEPLOYMENTS, NS, "cap-1"),
                       what="cap-1's status waiting behind cap-0's Deployment")
        metrics = runner.ctx.metrics
        events = total(metrics, "packetflow_operator_child_events_total")
        # The deployment controller reports cap-1 ready while its status waits.
        await patch(kube, f"{CHILD_PATHS[DEPLOYMENTS]}/cap-1/status", {"status": {
            "observedGeneration": 1, "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}})
        await wait_for(lambda: total(metrics, "packetflow_operator_child_events_total")
                       > events, what="the readiness event")
        held.set()
        await created(cluster, runner, 2)
        ready = [c for c in cluster.live(CAPABILITIES, NS, "cap-1")["status"]["conditions"]
                 if c["type"] == "Ready"]
        assert ready[0]["status"] == "True", ready  # in the one status write
        assert reconciles(runner, trigger="child-changed") == 0
        assert cluster.api_calls()["patch capabilities/status"] == 2


async def test_a_status_waits_for_other_children_no_longer_than_its_bound(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    async with cap_0_deployment_held(cluster, status_wait_seconds=0.2) as (runner, held):
        await create_capabilities(kube, COUNT)

        def others_handled() -> bool:
            return all((cluster.live(CAPABILITIES, NS, f"cap-{i}") or {}).get("status", {})
                       .get("observedGeneration") == 1 for i in range(1, COUNT))
        await wait_for(others_handled, timeout=30, what="the other statuses, cap-0 held")
        assert runner.ctx.reconciler.children_first.writing == 1  # cap-0's still in flight
        held.set()
        await created(cluster, runner, COUNT)


async def test_a_burst_of_child_events_makes_one_reconcile(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    await post(kube, CAPS_PATH, capability("busy", replicas=1))
    objs = await children(cluster, "busy")
    await wait_for(lambda: operator_runner.ctx.pending == 0
                   and reconciles(operator_runner) == 1, what="the creation to settle")
    state = operator_runner.ctx.reconciler.states[("Capability", NS, "busy")]
    async with reconcile_held(operator_runner, state):
        edits = 0
        for round_ in range(3):
            await patch(kube, f"{CHILD_PATHS[CONFIGMAPS]}/busy-bundle",
                        {"data": {"bundle.yaml": f"tampered {round_}"}})
            await patch(kube, f"{CHILD_PATHS[SERVICES]}/busy",
                        {"spec": {"ports": [{"name": "grpc", "port": 1000 + round_}]}})
            template = objs[DEPLOYMENTS]["spec"]["template"]
            template["spec"]["containers"][0]["image"] = f"evil:{round_}"
            await patch(kube, f"{CHILD_PATHS[DEPLOYMENTS]}/busy",
                        {"spec": {"template": template}})
            edits += 3
        metrics = operator_runner.ctx.metrics
        await wait_for(lambda: total(metrics, "packetflow_operator_child_events_total",
                                     outcome="queued") >= edits, what="every edit's event")

    def restored() -> bool:
        bundle = cluster.live(CONFIGMAPS, NS, "busy-bundle") or {}
        service = cluster.live(SERVICES, NS, "busy") or {}
        deployment = cluster.live(DEPLOYMENTS, NS, "busy") or {}
        return ("tampered" not in bundle["data"]["bundle.yaml"]
                and service["spec"]["ports"][0]["port"] == 50051
                and deployment["spec"]["template"]["spec"]["containers"][0]["image"]
                != "evil:2")
    await wait_for(restored, what="every edit undone")
    await wait_for(lambda: operator_runner.ctx.pending == 0, what="queued work")
    assert reconciles(operator_runner, trigger="child-changed") == 1


async def test_a_deleted_child_is_created_again_with_one_write(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    await post(kube, CAPS_PATH, capability("again", replicas=1))
    await children(cluster, "again")
    await wait_for(lambda: operator_runner.ctx.pending == 0
                   and reconciles(operator_runner) == 1, what="the creation to settle")
    mark = len(cluster.log)
    assert (await kube.delete(f"{CHILD_PATHS[DEPLOYMENTS]}/again")).status_code < 300
    await wait_for(lambda: cluster.live(DEPLOYMENTS, NS, "again"), what="the Deployment back")
    await wait_for(lambda: operator_runner.ctx.pending == 0, what="queued work")
    calls = cluster.api_calls(since=mark)
    # The owner is read once (is it being deleted?), the Deployment created, nothing else.
    assert calls["create deployments"] == writes(calls) == 1, calls
    assert own_reads(calls) == calls["get capabilities"] == 1, calls
    assert reconciles(operator_runner, trigger="child-deleted") == 1


async def test_a_failed_creation_is_retried(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    cluster.fail_next(kmock.method.POST, CHILD_PATHS[DEPLOYMENTS])
    await post(kube, CAPS_PATH, capability("retried", replicas=1))
    await children(cluster, "retried")

    def handled() -> dict[str, Any] | None:
        status = (cluster.live(CAPABILITIES, NS, "retried") or {}).get("status", {})
        # The retry (the operator's queue, not kopf) leaves nothing of kopf's in status.
        done = status.get("observedGeneration") == 1 and "kopf" not in status
        return status if done else None
    await wait_for(handled, what="the retry to finish")
    assert reconciles(operator_runner, trigger="create", result="api-error") == 1
    assert reconciles(operator_runner, trigger="create", result="ok") == 1


def test_kopf_diff_base_is_the_handled_generation() -> None:
    storage = ObservedGenerationDiffBase()

    def body(generation: int, observed: int | None) -> kopf.Body:
        status = {} if observed is None else {"status": {"observedGeneration": observed}}
        return kopf.Body({"metadata": {"name": "x", "generation": generation,
                                       "labels": {"any": "label"}},
                          "spec": {"intent": "x"}, **status})

    assert storage.fetch(body=body(1, None)) is None  # never handled: create
    assert storage.build(body=body(2, 1)) != storage.fetch(body=body(2, 1))  # update
    assert storage.build(body=body(2, 2)) == storage.fetch(body=body(2, 2))  # handled
    # Labels and annotations are no change: nothing renders from them.
    assert storage.build(body=body(2, 2)) == {"spec": {"generation": 2}}
