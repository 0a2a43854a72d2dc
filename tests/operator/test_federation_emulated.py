"""Federations: the real kopf operator against the Kubernetes emulator over HTTP, reading a
real federation gateway's report (two organizations in process, real mutual TLS)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import kmock
import pytest

from tests.operator.api import NS, condition, creations, patch, post
from tests.operator.conftest import OperatorRunner, wait_for
from tests.operator.kube_emulator import ClusterEmulator
from tests.support.federation import DEFAULT_EXPORTS, Federation, running_federation

FEDERATIONS = "packetflow.io/v1alpha1/federations"
FEDS_PATH = f"/apis/packetflow.io/v1alpha1/namespaces/{NS}/federations"
DEPLOYMENTS = "apps/v1/deployments"
DEPLOY_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments"
# Each test sets up and tears down two organizations' gateways (real mTLS) and the operator:
# on a loaded 2-core machine that alone once took most of the default 120 s.
pytestmark = pytest.mark.timeout(300)


def federation(name: str = "partners", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "organization": "globex", "trustDomain": "globex.example",
        "identity": {"secretName": "globex-federation-tls"},
        "peers": [
            {"name": "acme", "organization": "acme", "trustDomain": "acme.example",
             "endpoint": "federation.acme.example:8443",
             "trustBundle": {"configMapRef": {"name": "acme-ca"}}},
            {"name": "initech", "organization": "initech", "trustDomain": "initech.example",
             "endpoint": "federation.initech.example:8443",
             "trustBundle": {"configMapRef": {"name": "initech-ca"}}}],
        "exports": [{"capability": "translate", "to": ["acme"],
                     "sla": {"latencyP99Ms": 0.001, "window": "1s"}}],
        "imports": [{"peer": "acme", "capability": "sentiment", "as": "acme-sentiment"}],
    }
    return {"apiVersion": "packetflow.io/v1alpha1", "kind": "Federation",
            "metadata": {"name": name, "namespace": NS}, "spec": {**base, **spec}}


@pytest.fixture
async def gateways(tmp_path: Path) -> AsyncIterator[Federation]:
    """Real gateways; globex's reports, with an SLA every call breaches, in 1 s windows."""
    exports = DEFAULT_EXPORTS.replace("latencyP99Ms: 5000", "latencyP99Ms: 0.001").replace(
        "availability: 50", "availability: 50, window: 1s")
    async with running_federation(tmp_path / "orgs", exports=exports, http=True) as running:
        yield running


@pytest.fixture
async def operator(cluster: ClusterEmulator,
                   gateways: Federation) -> AsyncIterator[OperatorRunner]:
    """The operator, with Federations declared, reading globex's gateway's report."""
    cluster.resources[FEDERATIONS] = kmock.ResourceInfo(
        kind="Federation", singular="federation", namespaced=True, shortnames={"fed"},
        categories={"packetflow"},
        verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
        subresources={"status"})
    runner = OperatorRunner(["default"], federation_status_url=(
        f"http://127.0.0.1:{gateways.exporter.http_port}/status"), resync_seconds=0.5)
    await runner.start()
    try:
        yield runner
    finally:
        await runner.stop()


async def make_ready(kube: httpx.AsyncClient, cluster: ClusterEmulator, name: str) -> None:
    """Play the deployment controller: the gateway's pod is ready."""
    deployment = cluster.live(DEPLOYMENTS, NS, name)
    assert deployment is not None
    await patch(kube, f"{DEPLOY_PATH}/{name}/status", {"status": {
        "observedGeneration": deployment["metadata"].get("generation", 1), "replicas": 1,
        "readyReplicas": 1, "updatedReplicas": 1}})


async def test_federation_runs_a_gateway_and_reports_its_peers(
        cluster: ClusterEmulator, kube: httpx.AsyncClient, operator: OperatorRunner,
        gateways: Federation) -> None:
    created = await post(kube, FEDS_PATH, federation())

    def children() -> dict[str, Any] | None:
        found = {"deployment": cluster.live(DEPLOYMENTS, NS, "partners-federation"),
                 "config": cluster.live("v1/configmaps", NS, "partners-federation"),
                 "peers": cluster.live("v1/services", NS, "partners-federation"),
                 "local": cluster.live("v1/services", NS, "partners-federation-local"),
                 "import": cluster.live("v1/services", NS, "acme-sentiment"),
                 "audit": cluster.live("v1/persistentvolumeclaims", NS,
                                       "partners-federation-audit")}
        return found if all(found.values()) else None

    found = await wait_for(children, what="the gateway's children")
    uid = created["metadata"]["uid"]
    for key in ("deployment", "config", "peers", "local", "import"):
        (owner,) = found[key]["metadata"]["ownerReferences"]
        assert owner["kind"] == "Federation" and owner["uid"] == uid
    assert "ownerReferences" not in found["audit"]["metadata"]  # outlives the Federation
    await make_ready(kube, cluster, "partners-federation")

    def reported() -> dict[str, Any] | None:
        status = (cluster.live(FEDERATIONS, NS, "partners") or {}).get("status", {})
        ready = condition(cluster, FEDERATIONS, "partners", "Ready")
        return status if ready and ready["status"] == "True" and status.get(
            "peersConnected") == "1/2" and status.get("audit", {}).get("headHash") else None

    status = await wait_for(reported, timeout=60, what="status from the gateway's report")
    acme = next(p for p in status["peers"] if p["name"] == "acme")
    assert acme["connected"] and acme["certificateExpiry"] and acme["catalogVersion"]
    assert set(acme["trust"]) == {"reliability", "performance", "securityCompliance"}
    assert 0 < status["lowestTrustScore"] <= 1
    assert creations(cluster, DEPLOY_PATH, "partners-federation") == 1

    def breach_event() -> bool:
        return any(r.method == kmock.method.POST and r.url.path.endswith("/events")
                   and isinstance(r.data, dict) and r.data.get("reason") == "SlaBreached"
                   for r in cluster.log)

    # The probe calls translate every second against a 0.001 ms p99: windows breach.
    await wait_for(breach_event, timeout=60, what="an SlaBreached Event")


async def test_invalid_federation_is_reported_and_runs_nothing(
        cluster: ClusterEmulator, kube: httpx.AsyncClient, operator: OperatorRunner) -> None:
    await post(kube, FEDS_PATH, federation(
        "local-files", identity={"certFile": "tls.crt", "keyFile": "tls.key"}))

    def invalid() -> dict[str, Any] | None:
        return condition(cluster, FEDERATIONS, "local-files", "Degraded")

    degraded = await wait_for(invalid, what="InvalidSpec")
    assert degraded["reason"] == "InvalidSpec"
    assert "spec.identity" in degraded["message"] and "secretName" in degraded["message"]
    assert cluster.live(DEPLOYMENTS, NS, "local-files-federation") is None


async def test_deleted_gateway_deployment_comes_back(
        cluster: ClusterEmulator, kube: httpx.AsyncClient, operator: OperatorRunner) -> None:
    await post(kube, FEDS_PATH, federation("healing"))
    await wait_for(lambda: cluster.live(DEPLOYMENTS, NS, "healing-federation"),
                   what="the Deployment")
    response = await kube.delete(f"{DEPLOY_PATH}/healing-federation")
    assert response.status_code < 300, response.text
    await wait_for(lambda: creations(cluster, DEPLOY_PATH, "healing-federation") == 2,
                   what="the Deployment to be recreated")
