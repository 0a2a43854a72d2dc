"""Actors: the real kopf operator against the Kubernetes emulator over HTTP.

As in test_operator_emulated.py, the tests play kubectl (and the StatefulSet controller) with
plain HTTP calls; every wait polls with a deadline.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests.operator.api import NS, condition, creations, patch, post
from tests.operator.conftest import OperatorRunner, wait_for
from tests.operator.kube_emulator import ACTORS, CAPABILITIES, ClusterEmulator

ACTORS_PATH = f"/apis/packetflow.io/v1alpha1/namespaces/{NS}/actors"
CAPS_PATH = f"/apis/packetflow.io/v1alpha1/namespaces/{NS}/capabilities"
STATEFULSETS = "apps/v1/statefulsets"
CONFIGMAPS = "v1/configmaps"
SERVICES = "v1/services"
STS_PATH = f"/apis/apps/v1/namespaces/{NS}/statefulsets"
PG = {"postgresql": {"dsnFrom": {"secretKeyRef": {"name": "pg", "key": "dsn"}}}}


def actor(name: str, **spec: Any) -> dict[str, Any]:
    """A valid Actor manifest with spec overrides."""
    return {
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Actor",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"intent": "Remember the conversation",
                 "requires": {"query": {"type": "string"}},
                 "implementation": {"python": {"module": "examples.research",
                                               "class": "ResearchAssistant"}}, **spec},
    }


async def actor_children(cluster: ClusterEmulator, name: str) -> dict[str, dict[str, Any]]:
    def found() -> dict[str, dict[str, Any]] | None:
        objs = {"sts": cluster.live(STATEFULSETS, NS, name),
                "bundle": cluster.live(CONFIGMAPS, NS, f"{name}-bundle"),
                "service": cluster.live(SERVICES, NS, name),
                "headless": cluster.live(SERVICES, NS, f"{name}-headless")}
        return objs if all(objs.values()) else None  # type: ignore[return-value]
    result: dict[str, dict[str, Any]] = await wait_for(found, what=f"children of {name}")
    return result


async def test_actor_runs_as_a_statefulset_and_turns_ready(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    created = await post(kube, ACTORS_PATH, actor("chat", store=PG, replicas=2))
    objs = await actor_children(cluster, "chat")
    for obj in objs.values():
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["kind"] == "Actor" and owner["uid"] == created["metadata"]["uid"]
        assert owner["controller"] is True
    sts = objs["sts"]["spec"]
    assert sts["replicas"] == 2 and sts["serviceName"] == "chat-headless"
    assert "volumeClaimTemplates" not in sts  # PostgreSQL: no volume per pod
    assert objs["headless"]["spec"]["clusterIP"] == "None"
    assert "kind: Actor" in objs["bundle"]["data"]["bundle.yaml"]

    ready = await wait_for(lambda: condition(cluster, ACTORS, "chat", "Ready"),
                           what="a Ready condition")
    assert ready["status"] == "False"
    # The StatefulSet controller reports both members ready, rollout complete.
    live = cluster.live(STATEFULSETS, NS, "chat")
    assert live is not None
    await patch(kube, f"{STS_PATH}/chat/status", {"status": {
        "observedGeneration": live["metadata"]["generation"], "replicas": 2,
        "readyReplicas": 2, "currentRevision": "chat-1", "updateRevision": "chat-1"}})
    await wait_for(
        lambda: (condition(cluster, ACTORS, "chat", "Ready") or {}).get("status") == "True",
        what="Ready=True")
    status = cluster.live(ACTORS, NS, "chat")["status"]  # type: ignore[index]
    assert status["members"] == ["chat-0", "chat-1"]
    assert status["readyReplicas"] == 2 and status["observedGeneration"] == 1
    assert status["endpoint"] == "chat.default.svc:50051"
    assert status["selector"].endswith("app.kubernetes.io/component=actor")
    for path, name in ((STS_PATH, "chat"), (f"/api/v1/namespaces/{NS}/services", "chat"),
                       (f"/api/v1/namespaces/{NS}/services", "chat-headless"),
                       (f"/api/v1/namespaces/{NS}/configmaps", "chat-bundle")):
        assert creations(cluster, path, name) == 1, (path, name)

    # Scaling the Actor scales the StatefulSet and the members follow.
    await patch(kube, f"{ACTORS_PATH}/chat", {"spec": {"replicas": 3}})
    await wait_for(lambda: cluster.live(STATEFULSETS, NS, "chat")["spec"]  # type: ignore[index]
                   ["replicas"] == 3, what="replicas 3 on the StatefulSet")
    await wait_for(lambda: cluster.live(ACTORS, NS, "chat")["status"]  # type: ignore[index]
                   .get("members") == ["chat-0", "chat-1", "chat-2"], what="three members")
    assert creations(cluster, STS_PATH, "chat") == 1


async def test_sqlite_actor_gets_a_volume_and_refuses_replicas(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    await post(kube, ACTORS_PATH, actor("notes"))  # SQLite, the default store
    objs = await actor_children(cluster, "notes")
    (claim,) = objs["sts"]["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "state"
    before = objs["sts"]["metadata"]["resourceVersion"]

    # No API-server validation in the emulator: the operator's own check must catch it.
    await patch(kube, f"{ACTORS_PATH}/notes", {"spec": {"replicas": 2}})
    degraded = await wait_for(
        lambda: ((c := condition(cluster, ACTORS, "notes", "Degraded"))
                 and c["status"] == "True" and c),
        what="Degraded=True")
    assert degraded["reason"] == "InvalidSpec"
    assert degraded["message"].startswith("spec.replicas: ")
    assert (condition(cluster, ACTORS, "notes", "Ready") or {})["status"] == "False"

    def warning_event() -> dict[str, Any] | None:
        for (resource, _, _), obj in cluster.objects.items():
            raw = obj.raw if not obj.deleted else {}
            if resource.plural == "events" and raw.get("reason") == "InvalidSpec" \
                    and raw.get("involvedObject", {}).get("name") == "notes":
                return dict(raw)
        return None
    event = await wait_for(warning_event, what="a Kubernetes Event")
    assert "spec.replicas" in event["message"] and event["involvedObject"]["kind"] == "Actor"
    # Children untouched: the StatefulSet still runs the last good spec.
    sts = cluster.live(STATEFULSETS, NS, "notes")
    assert sts is not None and sts["metadata"]["resourceVersion"] == before
    assert sts["spec"]["replicas"] == 1


async def test_deleted_statefulset_comes_back_and_actor_deletion_collects_children(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    await post(kube, ACTORS_PATH, actor("sturdy"))
    objs = await actor_children(cluster, "sturdy")
    assert (await kube.delete(f"{STS_PATH}/sturdy")).status_code < 300
    back = await wait_for(lambda: cluster.live(STATEFULSETS, NS, "sturdy"),
                          what="the StatefulSet to come back")
    assert back["metadata"]["uid"] != objs["sts"]["metadata"]["uid"]

    assert (await kube.delete(f"{ACTORS_PATH}/sturdy")).status_code < 300
    reconciler = operator_runner.ctx.reconciler
    await wait_for(lambda: ("Actor", NS, "sturdy") not in reconciler.states,
                   what="the operator to forget the Actor")
    assert not cluster.names(STATEFULSETS, NS) and not cluster.names(SERVICES, NS)
    assert not cluster.names(CONFIGMAPS, NS)


async def test_actor_and_capability_share_the_namespace(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    await post(kube, CAPS_PATH, {
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
        "metadata": {"name": "echo", "namespace": NS},
        "spec": {"intent": "Echo", "implementation": {"builtin": {"name": "echo"}}}})
    await post(kube, ACTORS_PATH, actor("memo"))
    await actor_children(cluster, "memo")
    await wait_for(lambda: cluster.live("apps/v1/deployments", NS, "echo"),
                   what="the Capability's Deployment")
    await wait_for(lambda: condition(cluster, ACTORS, "memo", "Ready"), what="the Actor's status")
    # The status is written after the children: wait for it too.
    await wait_for(lambda: condition(cluster, CAPABILITIES, "echo", "Ready"),
                   what="the Capability's status")
    assert not cluster.names("apps/v1/deployments", NS) & {"memo"}
    assert not cluster.names(STATEFULSETS, NS) & {"echo"}


async def test_mcp_aggregate_bundle_follows_the_capabilities(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    runner = OperatorRunner([NS], mcp_enabled=True, mcp_aggregate_namespace=NS)
    await runner.start()
    try:
        for name in ("alpha", "beta"):
            await post(kube, CAPS_PATH, {
                "apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"intent": f"Echo {name}",
                         "implementation": {"builtin": {"name": "echo"}}}})

        def bundle() -> str:
            configmap = cluster.live(CONFIGMAPS, NS, "packetflow-mcp-bundle") or {}
            return str(configmap.get("data", {}).get("bundle.yaml", ""))
        await wait_for(lambda: "alpha.default.svc:50051" in bundle()
                       and "beta.default.svc:50051" in bundle(), what="both in the bundle")
        service = await wait_for(lambda: cluster.live(SERVICES, NS, "alpha"),
                                 what="alpha's Service")
        assert "mcp" in [p["name"] for p in service["spec"]["ports"]]

        assert (await kube.delete(f"{CAPS_PATH}/beta")).status_code < 300
        await wait_for(lambda: "beta" not in bundle() and "alpha" in bundle(),
                       what="beta gone from the bundle")
        assert creations(cluster, f"/api/v1/namespaces/{NS}/configmaps",
                         "packetflow-mcp-bundle") == 1
    finally:
        await runner.stop()
