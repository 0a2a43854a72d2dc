"""Playing kubectl against the emulator in tests: plain HTTP calls and reads of its objects."""

from __future__ import annotations

from typing import Any

import httpx
import kmock

from tests.operator.kube_emulator import ClusterEmulator

NS = "default"
MERGE = {"Content-Type": "application/merge-patch+json"}


async def post(kube: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Create an object; the API must accept it."""
    response = await kube.post(path, json=body)
    assert response.status_code < 300, response.text
    return dict(response.json())


async def patch(kube: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
    """Merge-patch an object; the API must accept it."""
    response = await kube.patch(path, json=body, headers=MERGE)
    assert response.status_code < 300, response.text


def condition(cluster: ClusterEmulator, resource: str, name: str,
              kind: str) -> dict[str, Any] | None:
    """The status condition ``kind`` of the object, if it has one."""
    obj = cluster.live(resource, NS, name) or {}
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == kind:
            return dict(cond)
    return None


def creations(cluster: ClusterEmulator, path: str, name: str) -> int:
    """How many times the object was POSTed (a second POST would be a duplicate create)."""
    return sum(1 for r in cluster.log if r.method == kmock.method.POST and r.url.path == path
               and isinstance(r.data, dict) and r.data["metadata"]["name"] == name)
