"""The emulator fixture fills kmock's gaps the way a real API server behaves."""

from __future__ import annotations

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
