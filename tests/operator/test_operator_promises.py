"""README promises of the operator, end to end against the Kubernetes emulator: its reconcile
metrics from a real `packetflow operator` process, and `ImmutableField` as Degraded."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import httpx

from tests.operator.api import NS, condition, post
from tests.operator.conftest import OperatorRunner, wait_for
from tests.operator.kube_emulator import ACTORS, ClusterEmulator
from tests.operator.test_actor_emulated import ACTORS_PATH, STATEFULSETS, STS_PATH, actor
from tests.operator.test_operator_emulated import CAPS_PATH, capability
from tests.support.processes import ROOT, free_port


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of metric ``name`` in a Prometheus exposition, by their labels."""
    found = {}
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels, _, value = line[len(name) + 1:].rpartition("} ")
        pairs = tuple(sorted(tuple(pair.split("=", 1)) for pair in labels.split(",")))
        found[tuple((k, v.strip('"')) for k, v in pairs)] = float(value)
    return found


async def test_operator_process_serves_reconcile_metrics(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    # $KUBECONFIG points at the emulator (the cluster fixture set it in this environment).
    operator = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "packetflow.cli", "operator", "--namespace", NS,
        "--metrics-address", metrics, "--liveness-address", "",
        cwd=ROOT, env={**os.environ, "PACKETFLOW_LOG_FORMAT": "plain"},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await post(kube, CAPS_PATH, capability("metered"))
        await post(kube, CAPS_PATH, capability("bad", implementation={"python": {}}))

        async def reconciles() -> dict[tuple[tuple[str, str], ...], float] | None:
            try:
                async with httpx.AsyncClient(timeout=10) as http:
                    text = (await http.get(f"http://{metrics}/metrics")).text
            except httpx.TransportError:
                return None  # not listening yet
            counted = samples(text, "packetflow_operator_reconciles_total")
            durations = samples(text, "packetflow_operator_reconcile_duration_seconds_count")
            results = {dict(labels)["result"] for labels in counted}
            return counted if durations and {"ok", "invalid"} <= results else None

        counted = await wait_for(reconciles, timeout=60, what="reconcile metrics")
        assert cluster.live("apps/v1/deployments", NS, "metered") is not None
        assert all(value >= 1 for value in counted.values())
        assert all(dict(labels)["trigger"] for labels in counted)
    finally:
        operator.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                _, err = await operator.communicate()
        finally:
            if operator.returncode is None:
                operator.kill()
                await operator.wait()
    assert operator.returncode == 0, err.decode()


async def test_a_statefulset_change_it_cannot_take_in_place_is_degraded_immutable_field(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    first = OperatorRunner([NS])
    await first.start()
    try:
        await post(kube, ACTORS_PATH, actor("notes"))  # SQLite: a 1Gi volume per pod
        await wait_for(lambda: cluster.live(STATEFULSETS, NS, "notes"), what="the StatefulSet")
    finally:
        await first.stop()
    # The operator comes back with a larger volume size: the claim template cannot change.
    second = OperatorRunner([NS], actor_storage_size="2Gi")
    await second.start()
    try:
        degraded = await wait_for(lambda: _true(condition(cluster, ACTORS, "notes", "Degraded")),
                                  timeout=30, what="Degraded=True")
        assert degraded["reason"] == "ImmutableField"
        assert "spec.volumeClaimTemplates" in degraded["message"]
        assert "--cascade=orphan" in degraded["message"]
        sts = cluster.live(STATEFULSETS, NS, "notes")
        assert sts is not None
        claim = sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]
        assert claim["storage"] == "1Gi"  # nothing was sent that the API server would refuse
        # The way out the message names: delete it (orphaning pods); the operator recreates it.
        response = await kube.request("DELETE", f"{STS_PATH}/notes",
                                      json={"propagationPolicy": "Orphan"})
        assert response.status_code < 300, response.text

        def recreated() -> dict[str, Any] | None:
            live = cluster.live(STATEFULSETS, NS, "notes")
            if live is None:
                return None
            requests = live["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]
            return live if requests["storage"] == "2Gi" else None

        await wait_for(recreated, timeout=30, what="the StatefulSet recreated with 2Gi")
        await wait_for(lambda: (condition(cluster, ACTORS, "notes", "Degraded") or {}).get(
            "status") == "False", timeout=30, what="Degraded cleared")
    finally:
        await second.stop()


def _true(found: dict[str, Any] | None) -> dict[str, Any] | None:
    return found if found is not None and found["status"] == "True" else None
