"""Actors on the operator's own watches (watching.py), as Capabilities are: create, update and
delete without kopf, one reconcile for a burst of child events, no writes on an unchanged
resync or restart; and a child deleted while no watch saw it comes back at the relist after
410, not at the periodic resync."""

from __future__ import annotations

import asyncio

import httpx

from tests.operator.api import NS, patch, post
from tests.operator.conftest import OperatorRunner, wait_for
from tests.operator.kube_emulator import ACTORS, ClusterEmulator, writes
from tests.operator.test_actor_emulated import (
    ACTORS_PATH,
    CONFIGMAPS,
    SERVICES,
    STATEFULSETS,
    STS_PATH,
    actor,
    actor_children,
)
from tests.operator.test_operator_emulated import (
    CAPS_PATH,
    CHILD_PATHS,
    DEPLOYMENTS,
    capability,
    children,
)
from tests.operator.test_operator_scale import (
    assert_restart_writes_nothing,
    assert_resync_writes_nothing,
    reconcile_held,
    reconciles,
    total,
)
from tests.operator.test_operator_watching import assert_calls_permitted

COUNT = 3


async def settled(cluster: ClusterEmulator, runner: OperatorRunner, names: list[str],
                  generation: int = 1) -> None:
    """Every named Actor's status is written for ``generation`` and nothing is queued."""
    def handled() -> bool:
        return all((cluster.live(ACTORS, NS, name) or {}).get("status", {})
                   .get("observedGeneration") == generation for name in names)
    await wait_for(handled, timeout=30, what="every Actor's status")
    await wait_for(lambda: runner.ctx.pending == 0, timeout=30, what="queued work")


async def test_an_actors_life_goes_through_the_operators_own_watch(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    mark = len(cluster.log)
    await post(kube, ACTORS_PATH, actor("life", replicas=1))
    await actor_children(cluster, "life")
    await settled(cluster, operator_runner, ["life"])
    assert reconciles(operator_runner, trigger="create") == 1

    await patch(kube, f"{ACTORS_PATH}/life", {"spec": {"intent": "Remember more"}})
    await wait_for(lambda: "Remember more" in (cluster.live(CONFIGMAPS, NS, "life-bundle")
                                               or {}).get("data", {}).get("bundle.yaml", ""),
                   what="the bundle updated")
    await settled(cluster, operator_runner, ["life"], generation=2)
    assert reconciles(operator_runner, trigger="update") == 1

    assert (await kube.delete(f"{ACTORS_PATH}/life")).status_code < 300
    await wait_for(lambda: ("Actor", NS, "life") not in operator_runner.ctx.reconciler.states,
                   what="the Actor forgotten")
    calls = cluster.api_calls(since=mark)
    assert_calls_permitted(calls)
    # kopf no longer touches Actors; the operator reads them and writes only their status.
    assert not [call for call in cluster.api_calls(["kopf/"], since=mark) if "actors" in call]
    assert {call for call in calls if " actors" in call} <= {
        "list actors", "watch actors", "patch actors/status"}, calls


async def test_unchanged_actors_cost_no_write_on_resync_or_restart(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    names = [f"act-{i}" for i in range(COUNT)]
    first = OperatorRunner([NS])
    await first.start()
    try:
        await asyncio.gather(*(post(kube, ACTORS_PATH, actor(name, replicas=1))
                               for name in names))
        await settled(cluster, first, names)
        await assert_resync_writes_nothing(cluster, first)
    finally:
        await first.stop()
    await assert_restart_writes_nothing(cluster, COUNT)


async def test_a_burst_of_an_actors_child_events_makes_one_reconcile(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    await post(kube, ACTORS_PATH, actor("busy", replicas=1))
    await actor_children(cluster, "busy")
    await settled(cluster, operator_runner, ["busy"])
    state = operator_runner.ctx.reconciler.states[("Actor", NS, "busy")]
    async with reconcile_held(operator_runner, state):
        for round_ in range(3):
            await patch(kube, f"/api/v1/namespaces/{NS}/configmaps/busy-bundle",
                        {"data": {"bundle.yaml": f"tampered {round_}"}})
            await patch(kube, f"{STS_PATH}/busy", {"spec": {"replicas": 5 + round_}})
        metrics = operator_runner.ctx.metrics
        await wait_for(lambda: total(metrics, "packetflow_operator_child_events_total",
                                     outcome="queued") >= 6, what="every edit's event")

    def restored() -> bool:
        bundle = cluster.live(CONFIGMAPS, NS, "busy-bundle") or {}
        sts = cluster.live(STATEFULSETS, NS, "busy") or {}
        return "tampered" not in bundle["data"]["bundle.yaml"] \
            and sts["spec"]["replicas"] == 1
    await wait_for(restored, what="every edit undone")
    await wait_for(lambda: operator_runner.ctx.pending == 0, what="queued work")
    assert reconciles(operator_runner, trigger="child-changed") == 1
    assert cluster.live(SERVICES, NS, "busy-headless") is not None


async def test_a_relist_after_410_brings_back_children_deleted_unseen(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    # The periodic resync is minutes away (its default): only the relist can bring them back.
    assert operator_runner.ctx.settings.resync_seconds >= 60
    await post(kube, CAPS_PATH, capability("cap", replicas=1))
    await post(kube, ACTORS_PATH, actor("act", replicas=1))
    await children(cluster, "cap")
    await actor_children(cluster, "act")
    await settled(cluster, operator_runner, ["act"])
    await wait_for(lambda: reconciles(operator_runner) == 2 and operator_runner.ctx.pending == 0,
                   what="both handled")
    mark = len(cluster.log)
    for resource, path, name in ((DEPLOYMENTS, CHILD_PATHS[DEPLOYMENTS], "cap"),
                                 (STATEFULSETS, STS_PATH, "act")):
        cluster.miss_events(resource)  # the deletion reaches no watch
        assert (await kube.delete(f"{path}/{name}")).status_code < 300
        cluster.compact(resource)  # the watches end with 410 and list again
    await wait_for(lambda: cluster.live(DEPLOYMENTS, NS, "cap")
                   and cluster.live(STATEFULSETS, NS, "act"), what="both children back")
    await wait_for(lambda: operator_runner.ctx.pending == 0, what="queued work")
    calls = cluster.api_calls(since=mark)
    assert calls["create deployments"] == calls["create statefulsets"] == 1, calls
    assert writes(calls) == 2, calls  # nothing else is written again
    assert reconciles(operator_runner, trigger="relist") == 2
