"""The gateway's Kubernetes discovery against the API emulator over HTTP.

Capabilities, Actors and EndpointSlices are written as kubectl and the EndpointSlice
controller would; the slices point at real runtimes on 127.0.0.1, so calls go all the way
through the gateway. (The emulator ignores label selectors: the gateway filters slices by
their ``kubernetes.io/service-name`` label itself.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import kmock
import pytest

from packetflow.client import CallError, RuntimeClient, tls_credentials
from packetflow.engine import Engine
from packetflow.gateway.kube import KubeApi, KubeDiscovery
from packetflow.gateway.server import GatewayServer
from packetflow.identity.local import issue_files, local_authority
from packetflow.identity.spiffe import Workload
from packetflow.identity.workload import WorkloadIdentity
from packetflow.manifests import load_text
from packetflow.server import RuntimeServer
from tests.conftest import eventually
from tests.integration.test_gateway_tokens import calls_served
from tests.integration.test_gateway_zero_trust import GATEWAY
from tests.integration.test_zero_trust import DOMAIN, MANIFESTS, caller_of, secure_runtime
from tests.operator.api import patch, post
from tests.operator.kube_emulator import ClusterEmulator

CAPS = "/apis/packetflow.io/v1alpha1/namespaces/{ns}/capabilities"
ACTORS = "/apis/packetflow.io/v1alpha1/namespaces/default/actors"
SLICES = "/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"


def capability(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
            "metadata": {"name": name},
            "spec": {"intent": "Say which version answers",
                     "implementation": {"builtin": {"name": "echo"}}, **spec}}


def endpoint_slice(name: str, service: str, port: int, *, ready: bool = True,
                   pod: str | None = None) -> dict[str, Any]:
    """An EndpointSlice as the controller writes it (labels copied from the Service)."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/service-name": service,
                "app.kubernetes.io/part-of": "packetflow"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready},
                           "targetRef": {"kind": "Pod", "name": pod or f"{name}-pod"}}],
            "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}]}


async def version_server(version: str) -> RuntimeServer:
    """A real runtime whose ``greeter`` answers with its version."""
    manifest = f"""
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {{name: greeter}}
spec:
  intent: Say which version answers
  implementation:
    builtin: {{name: transform, config: {{expression: "{{version: '{version}'}}"}}}}
"""
    return await RuntimeServer.start(Engine(load_text(manifest).capabilities), "127.0.0.1:0")


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, RuntimeServer]]:
    started = {v: await version_server(v) for v in ("stable", "canary")}
    yield started
    for server in started.values():
        await server.stop(grace=0)


async def running(cluster: ClusterEmulator, namespaces: list[str], sync_wait: float = 15.0
                  ) -> tuple[GatewayServer, asyncio.Task[None]]:
    gateway = await GatewayServer.start("127.0.0.1:0")
    discovery = KubeDiscovery(KubeApi(str(cluster.url)), namespaces, sync_wait)
    return gateway, asyncio.create_task(discovery.run(gateway.apply))


async def test_discovery_follows_capabilities_slices_and_weights(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        servers: dict[str, RuntimeServer]) -> None:
    await post(kube, CAPS.format(ns="default"), capability(
        "greeter", effects=["network"], canary={"weight": 0},
        traffic={"retries": {"maxAttempts": 2}}))
    await post(kube, SLICES.format(ns="default"),
               endpoint_slice("greeter-a1", "greeter", servers["stable"].port))
    await post(kube, SLICES.format(ns="default"),
               endpoint_slice("greeter-canary-b1", "greeter-canary", servers["canary"].port))
    gateway, watching = await running(cluster, ["default"])
    try:
        await eventually(lambda: "greeter" in gateway.table.capabilities, timeout=20)
        route = gateway.table.capabilities["greeter"]
        assert route.effects == ("network",) and route.policy.max_attempts == 2
        assert [e.address for e in route.stable.endpoints] == \
            [f"127.0.0.1:{servers['stable'].port}"]
        async with RuntimeClient(f"127.0.0.1:{gateway.port}") as client:
            assert await client.invoke("greeter", {}, timeout=10) == {"version": "stable"}
            assert [c.intent for c in await client.list()] == ["Say which version answers"]
            # The routing controller's lever: spec.canary.weight.
            await patch(kube, f"{CAPS.format(ns='default')}/greeter",
                        {"spec": {"canary": {"weight": 100}}})
            await eventually(lambda: gateway.table.capabilities["greeter"].weight == 100,
                             timeout=20)
            assert await client.invoke("greeter", {}, timeout=10) == {"version": "canary"}
            # A canary endpoint that stops being ready is drained: calls fall back to stable.
            await patch(kube, f"{SLICES.format(ns='default')}/greeter-canary-b1",
                        {"endpoints": [{"addresses": ["127.0.0.1"],
                                        "conditions": {"ready": False}}]})
            await eventually(lambda: not gateway.table.capabilities["greeter"].canary.endpoints,
                             timeout=20)
            assert await client.invoke("greeter", {}, timeout=10) == {"version": "stable"}
            await kube.delete(f"{SLICES.format(ns='default')}/greeter-a1")
            await eventually(lambda: not gateway.table.capabilities["greeter"].stable.endpoints,
                             timeout=20)
            with pytest.raises(CallError) as none:
                await client.invoke("greeter", {}, timeout=10)
            assert none.value.code == grpc.StatusCode.UNAVAILABLE
            await kube.delete(f"{CAPS.format(ns='default')}/greeter")
            await eventually(lambda: "greeter" not in gateway.table.capabilities, timeout=20)
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await gateway.stop(grace=0)


async def test_actor_members_are_pods_and_names_clash_across_namespaces(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    cluster.namespace_names.append("other")
    await post(kube, ACTORS, {
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Actor",
        "metadata": {"name": "ledger"},
        "spec": {"intent": "Record", "implementation": {"python": {
            "module": "tests.support.actor_handlers", "class": "Ledger"}}}})
    await post(kube, SLICES.format(ns="default"),
               endpoint_slice("ledger-x", "ledger", 50001, pod="ledger-0"))
    await post(kube, SLICES.format(ns="default"),
               endpoint_slice("ledger-headless-x", "ledger-headless", 50001, pod="ledger-0"))
    await post(kube, CAPS.format(ns="default"), capability("twice"))
    await post(kube, CAPS.format(ns="other"), capability("twice"))
    gateway, watching = await running(cluster, [])
    try:
        await eventually(lambda: "ledger" in gateway.table.actors, timeout=20)
        members = gateway.table.actors["ledger"].members.endpoints
        assert [(e.member, e.address) for e in members] == [("ledger-0", "127.0.0.1:50001")]
        assert "twice" not in gateway.table.capabilities
        async with RuntimeClient(f"127.0.0.1:{gateway.port}") as client:
            with pytest.raises(CallError) as clash:
                await client.invoke("twice", {}, timeout=10)
        assert clash.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "default, other" in clash.value.message
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await gateway.stop(grace=0)


async def test_a_resource_it_may_not_read_does_not_hold_back_the_others(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        servers: dict[str, RuntimeServer]) -> None:
    await post(kube, CAPS.format(ns="default"), capability("greeter"))
    await post(kube, SLICES.format(ns="default"),
               endpoint_slice("greeter-a1", "greeter", servers["stable"].port))
    # RBAC without actors: every list of them is forbidden.
    cluster.fail_next(kmock.method.GET, ACTORS, status=403, times=1000)
    gateway, watching = await running(cluster, ["default"], sync_wait=0.5)
    try:
        await eventually(lambda: "greeter" in gateway.table.capabilities, timeout=20)
        async with RuntimeClient(f"127.0.0.1:{gateway.port}") as client:
            assert await client.invoke("greeter", {}, timeout=10) == {"version": "stable"}
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await gateway.stop(grace=0)


async def test_under_mutual_tls_a_backend_must_be_the_capabilitys_workload(
        cluster: ClusterEmulator, kube: httpx.AsyncClient, tmp_path: Path) -> None:
    # The operator runs a Capability's pods as <namespace>/packetflow-<name>; a pod of another
    # workload (same cluster authority) behind its Service gets no call.
    cluster.namespace_names.append("team-a")
    authority = local_authority(tmp_path, DOMAIN)
    forwarders = [caller_of(GATEWAY)]
    async with secure_runtime(tmp_path, authority, Workload("team-a", "packetflow-whoami"),
                              MANIFESTS, trusted_forwarders=forwarders) as (right, _), \
            secure_runtime(tmp_path, authority, Workload("team-a", "packetflow-guarded"),
                           MANIFESTS, trusted_forwarders=forwarders) as (impostor, _):
        await post(kube, CAPS.format(ns="team-a"), capability("whoami", implementation={
            "python": {"module": "tests.support.handlers", "function": "whoami"}}))
        for name, server in (("whoami-a", right), ("whoami-b", impostor)):
            await post(kube, SLICES.format(ns="team-a"),
                       endpoint_slice(name, "whoami", server.port))
        own = issue_files(authority, tmp_path, GATEWAY.service_account, GATEWAY,
                          ip_addresses=("127.0.0.1",))
        gateway = await GatewayServer.start(
            "127.0.0.1:0", identity=WorkloadIdentity(own.cert, own.key, own.ca))
        discovery = KubeDiscovery(KubeApi(str(cluster.url)), ["team-a"])
        watching = asyncio.create_task(discovery.run(gateway.apply))
        alice = issue_files(authority, tmp_path, "alice", Workload("team-a", "alice"))
        try:
            await eventually(lambda: "whoami" in gateway.table.capabilities and len(
                gateway.table.capabilities["whoami"].stable.endpoints) == 2, timeout=20)
            ejections = gateway.table.metrics.ejections

            async def impostor_ejected() -> bool:
                answer = await client.invoke("whoami", {}, timeout=30)
                assert answer["caller"] == caller_of(Workload("team-a", "alice"))
                return any(sample.labels["endpoint"] == f"127.0.0.1:{impostor.port}"
                           for metric in ejections.collect() for sample in metric.samples)

            async with RuntimeClient(f"127.0.0.1:{gateway.port}", credentials=tls_credentials(
                    alice.cert, alice.key, alice.ca)) as client:
                await eventually(impostor_ejected, timeout=60, what="the impostor's ejection")
            assert calls_served(impostor) == 0
            assert calls_served(right) >= 1
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            await gateway.stop(grace=0)
