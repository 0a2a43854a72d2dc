"""``status.activeActors``: counted on the members' own /metrics (real runtimes' exposition)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import start_http_server

from packetflow.actors import ActorSystem
from packetflow.engine import Engine
from packetflow.operator import active
from packetflow.operator.settings import OperatorSettings
from tests.operator.api import NS, post
from tests.operator.conftest import OperatorRunner, wait_for
from tests.operator.kube_emulator import ACTORS, ClusterEmulator
from tests.support.actors import handler_actor

ACTORS_PATH = f"/apis/packetflow.io/v1alpha1/namespaces/{NS}/actors"


def test_member_urls_go_through_the_headless_service() -> None:
    urls = active.member_metrics_urls("chat", "team", 2, OperatorSettings())
    assert urls == ["http://chat-0.chat-headless.team.svc:9464/metrics",
                    "http://chat-1.chat-headless.team.svc:9464/metrics"]


@pytest.fixture
async def members(tmp_path: Path) -> AsyncIterator[Callable[[int], Any]]:
    """Runtimes with ``n`` active ``ledger`` actors each; yields a maker of their /metrics."""
    systems: list[ActorSystem] = []
    servers: list[Any] = []

    async def member(active_count: int) -> str:
        engine = Engine([])  # the runtime's metrics registry, as a pod's /metrics serves it
        system = ActorSystem(engine, state_dir=tmp_path / f"m{len(systems)}")
        systems.append(system)
        assert await system.replace([handler_actor("ledger", "Ledger")]) == []
        for i in range(active_count):
            await system.get("ledger").send(f"id-{i}", {"n": i})
        server, _ = start_http_server(0, "127.0.0.1", registry=engine.metrics.registry)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/metrics"

    yield member
    for server in servers:
        server.shutdown()
        server.server_close()
    for system in systems:
        await system.aclose()


async def test_the_count_sums_every_member_or_says_nothing(
        members: Callable[[int], Any]) -> None:
    urls = [await members(2), await members(3)]
    async with httpx.AsyncClient() as http:
        assert await active.count_active(http, urls, "ledger") == 5
        assert await active.count_active(http, urls, "other-type") is None
        # One member that cannot be asked: no count rather than an understated one.
        dead = "http://127.0.0.1:9/metrics"
        assert await active.count_active(http, [*urls, dead], "ledger") is None


async def test_resync_writes_the_active_count_into_the_status(
        cluster: ClusterEmulator, kube: httpx.AsyncClient, members: Callable[[int], Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = await members(4)
    # In a cluster these are the pods' DNS names under the headless Service.
    monkeypatch.setattr(active, "member_metrics_urls", lambda *_args: [url])
    runner = OperatorRunner([NS], resync_seconds=0.3)
    await runner.start()
    try:
        await post(kube, ACTORS_PATH, {
            "apiVersion": "packetflow.io/v1alpha1", "kind": "Actor",
            "metadata": {"name": "ledger", "namespace": NS},
            "spec": {"intent": "Record numbers", "implementation": {"python": {
                "module": "tests.support.actor_handlers", "class": "Ledger"}}}})
        await wait_for(lambda: (cluster.live(ACTORS, NS, "ledger") or {}).get(
            "status", {}).get("activeActors") == 4, what="status.activeActors = 4")
    finally:
        await runner.stop()
