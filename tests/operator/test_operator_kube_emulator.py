"""The emulator fixture fills kmock's gaps the way a real API server behaves."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.operator.kube_emulator import ClusterEmulator

DEPLOYMENTS = "/apis/apps/v1/namespaces/default/deployments"
MERGE = {"Content-Type": "application/merge-patch+json"}


async def test_namespaces_are_served(kube: httpx.AsyncClient) -> None:
    listing = (await kube.get("/api/v1/namespaces")).json()
    assert [ns["metadata"]["name"] for ns in listing["items"]] == ["default"]
    assert (await kube.get("/api/v1/namespaces/default")).json()["kind"] == "Namespace"
    assert (await kube.get("/api/v1/namespaces/nowhere")).status_code == 404


async def test_server_side_metadata_and_status_boundary(cluster: ClusterEmulator,
                                                        kube: httpx.AsyncClient) -> None:
    created = (await kube.post(DEPLOYMENTS, json={
        "metadata": {"name": "web"}, "spec": {"replicas": 1},
        "status": {"readyReplicas": 9}})).json()
    meta = created["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
    assert meta["generation"] == 1 and meta["namespace"] == "default"
    assert "status" not in created  # status is not writable through the main resource

    await kube.patch(f"{DEPLOYMENTS}/web", json={"metadata": {"labels": {"a": "b"}}},
                     headers=MERGE)
    await kube.patch(f"{DEPLOYMENTS}/web/status", json={"status": {"replicas": 1},
                                                        "spec": {"replicas": 7}},
                     headers=MERGE)
    same = cluster.live("apps/v1/deployments", "default", "web")
    assert same is not None and same["metadata"]["generation"] == 1
    assert same["spec"]["replicas"] == 1 and same["status"] == {"replicas": 1}
    await kube.patch(f"{DEPLOYMENTS}/web", json={"spec": {"replicas": 2}}, headers=MERGE)
    bumped = cluster.live("apps/v1/deployments", "default", "web")
    assert bumped is not None and bumped["metadata"]["generation"] == 2
    assert int(bumped["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])

    stale = [{"op": "test", "path": "/metadata/resourceVersion", "value": "0"},
             {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}]
    response = await kube.patch(f"{DEPLOYMENTS}/web", json=stale,
                                headers={"Content-Type": "application/json-patch+json"})
    assert response.status_code == 422


async def test_deleting_an_owner_collects_its_dependents(cluster: ClusterEmulator,
                                                         kube: httpx.AsyncClient) -> None:
    owner = (await kube.post(DEPLOYMENTS, json={"metadata": {"name": "owner"}})).json()
    ref = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "owner",
           "uid": owner["metadata"]["uid"], "controller": True}
    await kube.post("/api/v1/namespaces/default/configmaps",
                    json={"metadata": {"name": "owned", "ownerReferences": [ref]}})
    await kube.post("/api/v1/namespaces/default/configmaps", json={"metadata": {"name": "free"}})
    assert (await kube.delete(f"{DEPLOYMENTS}/owner")).status_code == 200
    assert cluster.names("v1/configmaps", "default") == {"free"}


async def watch_lines(kube: httpx.AsyncClient, path: str, count: int,
                      **params: str) -> list[dict[str, Any]]:
    """The first ``count`` events of a watch on ``path``."""
    events: list[dict[str, Any]] = []
    async with kube.stream("GET", path, params={"watch": "true", **params}) as response:
        async for line in response.aiter_lines():
            if line:
                events.append(json.loads(line))
            if len(events) == count:
                break
    return events


async def test_versions_lists_and_watches_as_an_api_server_keeps_them(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    labels = {"app.kubernetes.io/managed-by": "packetflow-operator"}
    first = (await kube.post(DEPLOYMENTS, json={"metadata": {"name": "a", "labels": labels},
                                                "spec": {"replicas": 1}})).json()
    listed = (await kube.get(DEPLOYMENTS)).json()
    since = listed["metadata"]["resourceVersion"]
    assert since == first["metadata"]["resourceVersion"]

    # A patch that changes nothing is no new version (and no event).
    same = (await kube.patch(f"{DEPLOYMENTS}/a", json={"spec": {"replicas": 1}},
                             headers=MERGE)).json()
    assert same["metadata"]["resourceVersion"] == since
    await kube.post(DEPLOYMENTS, json={"metadata": {"name": "b"}})  # not selected below
    changed = (await kube.patch(f"{DEPLOYMENTS}/a", json={"spec": {"replicas": 2}},
                                headers=MERGE)).json()
    assert int(changed["metadata"]["resourceVersion"]) > int(since)
    assert (await kube.delete(f"{DEPLOYMENTS}/a")).status_code == 200

    # From the listed version: every later change of the selected objects, in order; the
    # deletion at a version of its own.
    events = await watch_lines(kube, DEPLOYMENTS, 2, resourceVersion=since,
                               labelSelector="app.kubernetes.io/managed-by="
                                             "packetflow-operator")
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    assert events[0]["object"]["spec"]["replicas"] == 2
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions[0] == int(changed["metadata"]["resourceVersion"]) < versions[1]
    # Without a version: the current objects first.
    (added,) = await watch_lines(kube, DEPLOYMENTS, 1)
    assert added["type"] == "ADDED" and added["object"]["metadata"]["name"] == "b"
    # Nothing happening: a bookmark carries the version on.
    cluster.bookmark_seconds = 0.05
    (bookmark,) = await watch_lines(kube, DEPLOYMENTS, 1, resourceVersion=str(versions[1]),
                                    allowWatchBookmarks="true")
    assert bookmark["type"] == "BOOKMARK"
    assert int(bookmark["object"]["metadata"]["resourceVersion"]) >= versions[1]


async def test_conflicts_and_expired_versions_answer_as_an_api_server_does(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    created = (await kube.post(DEPLOYMENTS, json={"metadata": {"name": "web"}})).json()
    again = await kube.post(DEPLOYMENTS, json={"metadata": {"name": "web"}})
    assert again.status_code == 409 and again.json()["reason"] == "AlreadyExists"
    stale = {"metadata": {"resourceVersion": "999"}, "spec": {"replicas": 3}}
    refused = await kube.patch(f"{DEPLOYMENTS}/web", json=stale, headers=MERGE)
    assert refused.status_code == 409 and refused.json()["reason"] == "Conflict"
    current = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]},
               "spec": {"replicas": 3}}
    assert (await kube.patch(f"{DEPLOYMENTS}/web", json=current, headers=MERGE)).is_success

    cluster.compact("apps/v1/deployments")
    (expired,) = await watch_lines(kube, DEPLOYMENTS, 1, resourceVersion="1")
    assert expired["type"] == "ERROR" and expired["object"]["code"] == 410
