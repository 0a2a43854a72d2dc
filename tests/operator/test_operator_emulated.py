"""The real kopf operator against the Kubernetes emulator over HTTP.

Each test plays kubectl (and the kubelet) with plain HTTP calls and asserts on the objects the
emulator holds. Waits poll with a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

from typing import Any

import httpx
import kmock

from tests.operator.api import NS, condition, creations, patch, post
from tests.operator.conftest import OperatorRunner, wait_for
from tests.operator.kube_emulator import CAPABILITIES, ClusterEmulator

CAPS_PATH = f"/apis/packetflow.io/v1alpha1/namespaces/{NS}/capabilities"
DEPLOYMENTS = "apps/v1/deployments"
CONFIGMAPS = "v1/configmaps"
SERVICES = "v1/services"
CHILD_PATHS = {DEPLOYMENTS: f"/apis/apps/v1/namespaces/{NS}/deployments",
               CONFIGMAPS: f"/api/v1/namespaces/{NS}/configmaps",
               SERVICES: f"/api/v1/namespaces/{NS}/services"}
HASH = "packetflow.io/spec-hash"


def capability(name: str, **spec: Any) -> dict[str, Any]:
    """A valid Capability manifest (builtin echo) with spec overrides."""
    return {
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"intent": "Echo what it gets", "requires": {"message": {"type": "string"}},
                 "implementation": {"builtin": {"name": "echo"}}, **spec},
    }


async def children(cluster: ClusterEmulator, name: str) -> dict[str, dict[str, Any]]:
    """Wait for all three children and return them."""
    def found() -> dict[str, dict[str, Any]] | None:
        objs = {DEPLOYMENTS: cluster.live(DEPLOYMENTS, NS, name),
                CONFIGMAPS: cluster.live(CONFIGMAPS, NS, f"{name}-bundle"),
                SERVICES: cluster.live(SERVICES, NS, name)}
        return objs if all(objs.values()) else None  # type: ignore[return-value]
    result: dict[str, dict[str, Any]] = await wait_for(found, what=f"children of {name}")
    return result


async def kubelet_reports_ready(kube: httpx.AsyncClient, cluster: ClusterEmulator,
                                name: str, replicas: int) -> None:
    """Write the Deployment's status the way the deployment controller would."""
    deployment = cluster.live(DEPLOYMENTS, NS, name)
    assert deployment is not None
    await patch(kube, f"{CHILD_PATHS[DEPLOYMENTS]}/{name}/status", {"status": {
        "observedGeneration": deployment["metadata"]["generation"], "replicas": replicas,
        "readyReplicas": replicas, "updatedReplicas": replicas,
        "availableReplicas": replicas}})


async def test_create_renders_children_and_turns_ready(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    cap = await post(kube, CAPS_PATH, capability("echo", replicas=2))
    objs = await children(cluster, "echo")
    for obj in objs.values():
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["uid"] == cap["metadata"]["uid"] and owner["controller"] is True
        assert owner["kind"] == "Capability"
    assert objs[DEPLOYMENTS]["spec"]["replicas"] == 2
    assert "echo" in objs[CONFIGMAPS]["data"]["bundle.yaml"]
    assert [p["name"] for p in objs[SERVICES]["spec"]["ports"]] == ["grpc", "metrics"]

    ready = await wait_for(lambda: condition(cluster, CAPABILITIES, "echo", "Ready"),
                           what="a Ready condition")
    assert ready["status"] == "False"  # no pods yet

    await kubelet_reports_ready(kube, cluster, "echo", 2)
    await wait_for(
        lambda: (condition(cluster, CAPABILITIES, "echo", "Ready") or {}).get("status") == "True",
        what="Ready=True")
    status = cluster.live(CAPABILITIES, NS, "echo")["status"]  # type: ignore[index]
    assert status["readyReplicas"] == 2 and status["replicas"] == 2
    assert status["endpoint"] == "echo.default.svc:50051"
    assert status["observedGeneration"] == 1
    assert condition(cluster, CAPABILITIES, "echo", "Degraded")["status"] == "False"  # type: ignore[index]
    for resource, name in ((DEPLOYMENTS, "echo"), (SERVICES, "echo"),
                           (CONFIGMAPS, "echo-bundle")):
        assert creations(cluster, CHILD_PATHS[resource], name) == 1


async def test_update_rolls_pods_and_leaves_autoscaled_replicas(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    await post(kube, CAPS_PATH, capability("scaled"))  # no replicas: an autoscaler owns them
    objs = await children(cluster, "scaled")
    assert "replicas" not in objs[DEPLOYMENTS]["spec"]
    old_hash = objs[DEPLOYMENTS]["spec"]["template"]["metadata"]["annotations"][HASH]
    # The HPA scales the Deployment; the operator must not fight it.
    await patch(kube, f"{CHILD_PATHS[DEPLOYMENTS]}/scaled", {"spec": {"replicas": 5}})

    await patch(kube, f"{CAPS_PATH}/scaled", {"spec": {"intent": "Echo, louder"}})

    def rolled() -> dict[str, Any] | None:
        deployment = cluster.live(DEPLOYMENTS, NS, "scaled") or {}
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        return deployment if annotations[HASH] != old_hash else None
    deployment = await wait_for(rolled, what="a new spec hash on the pod template")
    assert deployment["spec"]["replicas"] == 5
    bundle = cluster.live(CONFIGMAPS, NS, "scaled-bundle")["data"]["bundle.yaml"]  # type: ignore[index]
    assert "Echo, louder" in bundle
    await wait_for(lambda: cluster.live(CAPABILITIES, NS, "scaled")["status"]  # type: ignore[index]
                   .get("observedGeneration") == 2, what="observedGeneration 2")

    # Setting spec.replicas (e.g. `kubectl scale capability`) hands the count to the operator.
    await patch(kube, f"{CAPS_PATH}/scaled", {"spec": {"replicas": 3}})
    await wait_for(lambda: cluster.live(DEPLOYMENTS, NS, "scaled")["spec"]  # type: ignore[index]
                   .get("replicas") == 3, what="replicas from the spec")


async def test_invalid_capability_is_degraded_with_no_children(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    await post(kube, CAPS_PATH, capability("bad", requires={"a": {"type": "strin"}}))
    degraded = await wait_for(lambda: condition(cluster, CAPABILITIES, "bad", "Degraded"),
                              what="a Degraded condition")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
    assert "spec.requires.a.type" in degraded["message"]
    assert condition(cluster, CAPABILITIES, "bad", "Ready")["status"] == "False"  # type: ignore[index]

    def warning_event() -> dict[str, Any] | None:
        for (resource, _, _), obj in cluster.objects.items():
            raw = obj.raw if not obj.deleted else {}
            if resource.plural == "events" and raw.get("reason") == "InvalidSpec":
                return dict(raw)
        return None
    event = await wait_for(warning_event, what="a Kubernetes Event")
    assert event["type"] == "Warning" and "spec.requires.a.type" in event["message"]
    assert event["involvedObject"]["name"] == "bad"
    assert not cluster.names(DEPLOYMENTS, NS) and not cluster.names(SERVICES, NS)
    assert not cluster.names(CONFIGMAPS, NS)

    # Fixing the spec recovers: children appear and Degraded clears.
    await patch(kube, f"{CAPS_PATH}/bad", {"spec": {"requires": {"a": {"type": "string"}}}})
    await children(cluster, "bad")
    await wait_for(
        lambda: (condition(cluster, CAPABILITIES, "bad", "Degraded") or {}).get("status")
        == "False", what="Degraded=False after the fix")


async def test_deleted_or_edited_child_is_restored(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    await post(kube, CAPS_PATH, capability("sturdy", replicas=1))
    objs = await children(cluster, "sturdy")
    old_uid = objs[DEPLOYMENTS]["metadata"]["uid"]

    response = await kube.delete(f"{CHILD_PATHS[DEPLOYMENTS]}/sturdy")
    assert response.status_code < 300
    back = await wait_for(lambda: cluster.live(DEPLOYMENTS, NS, "sturdy"),
                          what="the Deployment to come back")
    assert back["metadata"]["uid"] != old_uid

    response = await kube.delete(f"{CHILD_PATHS[SERVICES]}/sturdy")
    assert response.status_code < 300
    await wait_for(lambda: cluster.live(SERVICES, NS, "sturdy"), what="the Service to come back")

    # Someone edits the pod template: the operator puts it back.
    template = back["spec"]["template"]
    template["spec"]["containers"][0]["image"] = "evil:latest"
    await patch(kube, f"{CHILD_PATHS[DEPLOYMENTS]}/sturdy", {"spec": {"template": template}})
    await wait_for(lambda: cluster.live(DEPLOYMENTS, NS, "sturdy")["spec"]["template"]  # type: ignore[index]
                   ["spec"]["containers"][0]["image"] != "evil:latest", what="the edit undone")


async def test_a_failed_reconcile_after_a_child_event_is_retried(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    await post(kube, CAPS_PATH, capability("healed", replicas=1))
    await children(cluster, "healed")
    # The Deployment's DELETED event finds the API failing: its reconcile is retried.
    cluster.fail_next(kmock.method.POST, CHILD_PATHS[DEPLOYMENTS])
    response = await kube.delete(f"{CHILD_PATHS[DEPLOYMENTS]}/healed")
    assert response.status_code < 300
    await wait_for(lambda: cluster.live(DEPLOYMENTS, NS, "healed"),
                   what="the retry to recreate the Deployment")
    # Created, refused (the injected fault), recreated by the retry.
    assert creations(cluster, CHILD_PATHS[DEPLOYMENTS], "healed") == 3


async def test_resync_finds_what_no_watch_event_told(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    runner = OperatorRunner([NS], resync_seconds=0.5)
    await runner.start()
    try:
        await post(kube, CAPS_PATH, capability("unseen", replicas=1))
        await children(cluster, "unseen")
        # The Service goes, and no watch sees it go: only the resync's list can tell.
        cluster.miss_events(SERVICES)
        response = await kube.delete(f"{CHILD_PATHS[SERVICES]}/unseen")
        assert response.status_code < 300
        await wait_for(lambda: cluster.live(SERVICES, NS, "unseen"),
                       what="the resync to recreate the Service")
        assert creations(cluster, CHILD_PATHS[SERVICES], "unseen") == 2
    finally:
        await runner.stop()


async def test_deleting_capability_collects_children_for_good(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    await post(kube, CAPS_PATH, capability("brief"))
    await children(cluster, "brief")
    response = await kube.delete(f"{CAPS_PATH}/brief")
    assert response.status_code < 300
    # No finalizer: the Capability goes at once, its children by ownerReferences (GC).
    assert cluster.live(CAPABILITIES, NS, "brief") is None
    reconciler = operator_runner.ctx.reconciler
    await wait_for(lambda: ("Capability", NS, "brief") not in reconciler.states,
                   what="the operator to forget")
    assert not cluster.names(DEPLOYMENTS, NS) and not cluster.names(SERVICES, NS)
    assert not cluster.names(CONFIGMAPS, NS)


async def test_restart_converges_without_duplicates(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    first = OperatorRunner([NS])
    await first.start()
    try:
        await post(kube, CAPS_PATH, capability("alpha", replicas=1))
        # Stop while its children may still be in flight: the restart must cope either way.
        await wait_for(lambda: cluster.live(CONFIGMAPS, NS, "alpha-bundle"), what="a first child")
    finally:
        await first.stop()

    # While no operator runs: a new Capability and an edit of the old one.
    await post(kube, CAPS_PATH, capability("beta", replicas=1))
    await patch(kube, f"{CAPS_PATH}/alpha", {"spec": {"replicas": 2}})
    second = OperatorRunner([NS])
    await second.start()
    try:
        await children(cluster, "beta")
        await children(cluster, "alpha")
        await wait_for(lambda: cluster.live(DEPLOYMENTS, NS, "alpha")["spec"]  # type: ignore[index]
                       ["replicas"] == 2, what="alpha's edit applied after the restart")
    finally:
        await second.stop()
    for name in ("alpha", "beta"):
        assert creations(cluster, CHILD_PATHS[DEPLOYMENTS], name) == 1
        assert creations(cluster, CHILD_PATHS[SERVICES], name) == 1
        assert creations(cluster, CHILD_PATHS[CONFIGMAPS], f"{name}-bundle") == 1
