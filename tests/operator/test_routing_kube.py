"""The routing controller's Kubernetes side against the emulator over HTTP: replicas written
through the scale subresource, recommendations and conditions in status, Events, approval
and rejection by annotation, and Prometheus being down.

Metrics are real: an in-process runtime engine serves its own /metrics under generated
calls and a real Prometheus scrapes it every second.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import kmock
import orjson
import pytest

from packetflow.context import CallContext
from packetflow.engine import Engine
from packetflow.manifests import load_text
from packetflow.operator.routing.cli import ClusterSource
from packetflow.operator.routing.kube import ControllerKube
from packetflow.operator.routing.loop import KubernetesSink, RoutingController
from packetflow.operator.routing.prometheus import PrometheusReader
from packetflow.operator.routing.settings import ControllerSettings
from packetflow.serve import start_metrics_server
from tests.conftest import eventually
from tests.operator.api import NS, patch, post
from tests.operator.kube_emulator import CAPABILITIES, ClusterEmulator
from tests.support.prometheus import PrometheusServer, free_port

CAPS = f"/apis/packetflow.io/v1alpha1/namespaces/{NS}/capabilities"
SETTINGS = ControllerSettings(scrape_interval_seconds=1, history_seconds=30,
                              pod_startup_seconds=2, controller_interval_seconds=1,
                              namespace_label="", controller_metrics_address="")


def manifest(name: str, scaling: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "intent": f"{name}: a capability without effects whose inputs repeat",
        "implementation": {"builtin": {"name": "echo"}},
        "slo": {"latencyP99Ms": 500}}
    if scaling:
        spec["scaling"] = {"minReplicas": 2, "maxReplicas": 8, "scaleDownDelay": "5m"}
    return {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
            "metadata": {"name": name, "namespace": NS}, "spec": spec}


@pytest.fixture
async def controller_kube(cluster: ClusterEmulator) -> AsyncIterator[ControllerKube]:
    """The controller's client, logged in with the emulator's kubeconfig ($KUBECONFIG)."""
    kube = ControllerKube()
    kube.login()
    try:
        yield kube
    finally:
        await kube.aclose()


async def calls_forever(engine: Engine) -> None:
    """Repeating inputs to both capabilities, about 100 calls/s each."""
    n = 0
    while True:
        n += 1
        for name in ("alpha", "beta"):
            payload = orjson.dumps({"message": str(n % 5)})
            await engine.invoke_json(name, payload, CallContext(name, f"t{n}"))
        await asyncio.sleep(0.01)


@pytest.fixture
async def prometheus() -> AsyncIterator[PrometheusServer]:
    """A real Prometheus scraping a real engine's /metrics while calls are made to it."""
    text = "\n---\n".join(orjson.dumps(manifest(name, False)).decode()
                          for name in ("alpha", "beta"))
    engine = Engine(load_text(text, "caps.yaml").capabilities)
    metrics_server, port = start_metrics_server(engine.metrics.registry, "127.0.0.1:0")
    load = asyncio.create_task(calls_forever(engine))
    server = PrometheusServer.start([f"127.0.0.1:{port}"])
    try:
        yield server
    finally:
        server.stop()
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load
        metrics_server.shutdown()
        metrics_server.server_close()
        await engine.aclose()


def status(cluster: ClusterEmulator, name: str) -> dict[str, Any]:
    return dict((cluster.live(CAPABILITIES, NS, name) or {}).get("status") or {})


def posted_events(cluster: ClusterEmulator) -> list[dict[str, Any]]:
    return [r.data for r in cluster.log if r.method == kmock.method.POST
            and r.url.path == f"/api/v1/namespaces/{NS}/events"]


async def test_replicas_recommendations_approval_and_rejection(
        cluster: ClusterEmulator, kube: httpx.AsyncClient, controller_kube: ControllerKube,
        prometheus: PrometheusServer) -> None:
    await post(kube, CAPS, manifest("alpha", scaling=True))
    await post(kube, CAPS, manifest("beta", scaling=False))
    reader = PrometheusReader(prometheus.url, step=1, window=2, history=30)
    controller = RoutingController(SETTINGS, reader, KubernetesSink(controller_kube))
    source = ClusterSource(controller_kube, [NS])

    async def tick() -> None:
        await controller.tick(*await source.resources())

    async def pending(name: str) -> list[dict[str, Any]]:
        await tick()
        return [r for r in status(cluster, name).get("recommendations", [])
                if r["phase"] == "pending"]

    try:
        # Both capabilities repeat their inputs and declare no effects: caching is proposed
        # (risky: it waits), and alpha, below its minReplicas, is scaled.
        alpha = await eventually_value(lambda: pending("alpha"), "a recommendation for alpha")
        beta = await eventually_value(lambda: pending("beta"), "a recommendation for beta")
        assert alpha[0]["kind"] == "cache" and alpha[0]["risk"] == "risky"
        scale_writes = [r for r in cluster.log if r.method == kmock.method.PATCH
                        and r.url.path == f"{CAPS}/alpha/scale"]
        assert scale_writes and scale_writes[0].data["spec"] == {"replicas": 2}
        assert (cluster.live(CAPABILITIES, NS, "alpha") or {})["spec"]["replicas"] >= 2
        assert not [r for r in cluster.log if r.url.path == f"{CAPS}/beta/scale"]  # no scaling
        routing = status(cluster, "alpha")["routing"]
        conditions = {c["type"]: c for c in routing["conditions"]}
        assert conditions["MetricsAvailable"]["status"] == "True"
        assert conditions["ScalingActive"]["status"] == "True"
        reasons = {e["reason"] for e in posted_events(cluster)}
        assert {"Scaled", "Recommended"} <= reasons
        # Approve alpha's cache, reject beta's, the way kubectl annotate would.
        await patch(kube, f"{CAPS}/alpha", {"metadata": {"annotations": {
            "packetflow.io/approve": alpha[0]["id"]}}})
        await patch(kube, f"{CAPS}/beta", {"metadata": {"annotations": {
            "packetflow.io/reject": beta[0]["id"]}}})
        await tick()
        approved = cluster.live(CAPABILITIES, NS, "alpha") or {}
        assert approved["spec"]["cache"] == {"ttl": "60s", "maxEntries": 10000}
        phases = {r["id"]: r["phase"] for r in status(cluster, "alpha")["recommendations"]}
        assert phases[alpha[0]["id"]] == "applied"
        history = status(cluster, "alpha")["optimizationHistory"]
        assert [(h["id"], h["verdict"]) for h in history] == [(alpha[0]["id"], "pending")]
        assert "cache" not in (cluster.live(CAPABILITIES, NS, "beta") or {})["spec"]
        phases = {r["id"]: r["phase"] for r in status(cluster, "beta")["recommendations"]}
        assert phases[beta[0]["id"]] == "rejected"
        assert "CacheEnabled" in {e["reason"] for e in posted_events(cluster)}
        # The operator's own status keys are never touched by the controller.
        assert "conditions" not in status(cluster, "alpha")
    finally:
        await reader.aclose()


async def eventually_value(check: Any, what: str) -> Any:
    found: list[Any] = []

    async def probe() -> bool:
        found[:] = [await check()]
        return bool(found[0])

    await eventually(probe, timeout=60, what=what)
    return found[0]


async def test_prometheus_down_keeps_replicas(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        controller_kube: ControllerKube) -> None:
    scaled = manifest("alpha", scaling=True)
    scaled["spec"]["replicas"] = 5
    await post(kube, CAPS, scaled)
    reader = PrometheusReader(f"http://127.0.0.1:{free_port()}", step=1, window=2)
    controller = RoutingController(SETTINGS, reader, KubernetesSink(controller_kube))
    source = ClusterSource(controller_kube, [NS])
    try:
        for _ in range(3):
            await controller.tick(*await source.resources())
    finally:
        await reader.aclose()
    assert not [r for r in cluster.log if r.url.path.endswith("/scale")]
    assert (cluster.live(CAPABILITIES, NS, "alpha") or {})["spec"]["replicas"] == 5
    conditions = {c["type"]: c for c in status(cluster, "alpha")["routing"]["conditions"]}
    assert conditions["MetricsAvailable"]["status"] == "False"
    assert conditions["MetricsAvailable"]["reason"] == "PrometheusUnavailable"
    assert conditions["ScalingActive"]["status"] == "False"
    # One warning Event when metrics went missing, not one per tick.
    warnings = [e for e in posted_events(cluster) if e["reason"] == "MetricsUnavailable"]
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning"
    assert warnings[0]["involvedObject"]["name"] == "alpha"
