"""How many actors of a type are active: read from each member pod's own /metrics.

The runtime exports ``packetflow_actors_active{actor_type}`` per process. The operator knows
the members (the StatefulSet's pods, addressable through the headless Service), so the count
costs one small HTTP GET per member, made on the periodic resync rather than on every event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

from packetflow.operator import render
from packetflow.operator.settings import OperatorSettings

ACTIVE_METRIC = "packetflow_actors_active"


def member_metrics_urls(name: str, namespace: str, replicas: int,
                        settings: OperatorSettings) -> list[str]:
    """The /metrics URL of every member pod of the Actor ``name``."""
    headless = render.headless_service_name(name)
    return [f"http://{pod}.{headless}.{namespace}.{settings.cluster_domain_suffix}:"
            f"{settings.metrics_port}/metrics" for pod in render.member_names(name, replicas)]


def active_in(exposition: str, actor_type: str) -> int | None:
    """The active-actor gauge of ``actor_type`` in a Prometheus text exposition, if there."""
    for family in text_string_to_metric_families(exposition):
        if family.name != ACTIVE_METRIC:
            continue
        for sample in family.samples:
            if sample.labels.get("actor_type") == actor_type:
                return int(sample.value)
    return None


async def count_active(http: httpx.AsyncClient, urls: Sequence[str], actor_type: str,
                       timeout: float = 2.0) -> int | None:
    """The sum over the members, or ``None`` when any member cannot tell (a partial sum
    would understate the count)."""
    async def one(url: str) -> int | None:
        try:
            response = await http.get(url, timeout=timeout)
            response.raise_for_status()
        except httpx.HTTPError:
            return None
        return active_in(response.text, actor_type)

    counts = await asyncio.gather(*(one(url) for url in urls))
    if not counts or any(count is None for count in counts):
        return None
    return sum(count for count in counts if count is not None)
