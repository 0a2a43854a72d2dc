"""The Kubernetes emulator over HTTP as fixtures (a pytest plugin, registered in
tests/conftest.py): the operator tests and the fault tests use them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.operator.kube_emulator import ClusterEmulator, running_emulator, write_kubeconfig


@pytest.fixture
async def cluster(tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ClusterEmulator]:
    """The emulator, with $KUBECONFIG pointing at it (kopf's login reads it)."""
    async with running_emulator() as (emulator, url):
        monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", url)))
        yield emulator


@pytest.fixture
async def kube(cluster: ClusterEmulator) -> AsyncIterator[httpx.AsyncClient]:
    """A plain HTTP client for the emulator, playing kubectl and the kubelet."""
    async with httpx.AsyncClient(base_url=str(cluster.url), timeout=10) as client:
        yield client
