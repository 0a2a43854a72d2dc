"""The operator killed with SIGKILL mid-reconcile (a real ``packetflow operator`` process
against the Kubernetes emulator over HTTP), then started again: every Capability converges to
its children, none is created twice, and each status describes the current generation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import kmock
import pytest

from tests.operator.api import NS, condition, creations, patch, post
from tests.operator.conftest import wait_for
from tests.operator.kube_emulator import (
    CAPABILITIES,
    ClusterEmulator,
)
from tests.operator.test_operator_emulated import (
    CAPS_PATH,
    CHILD_PATHS,
    CONFIGMAPS,
    DEPLOYMENTS,
    SERVICES,
    capability,
)
from tests.support.processes import ROOT

NAMES = [f"cap-{i}" for i in range(8)]
CONVERGE_SECONDS = 60.0  # a loaded 2-core machine; kopf retries after 0.2 s here


class OperatorProcess:
    """``packetflow operator`` in a subprocess, watching the test namespace."""

    def __init__(self, log: Path) -> None:
        self.log = log
        with log.open("a") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "packetflow.cli", "operator", "--namespace", NS,
                 "--liveness-address", "", "--metrics-address", ""],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=sink,
                env={**os.environ, "PACKETFLOW_RETRY_DELAY_SECONDS": "0.2"})

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
def operators() -> Iterator[list[OperatorProcess]]:
    """Operator processes of a test; any still running at the end are killed."""
    started: list[OperatorProcess] = []
    yield started
    for operator in started:
        operator.kill()


CHILDREN = {DEPLOYMENTS: "{}", SERVICES: "{}", CONFIGMAPS: "{}-bundle"}


def child_uids(cluster: ClusterEmulator) -> dict[tuple[str, str], str]:
    """(resource, name) -> uid of the test's Capabilities' children that exist now."""
    found = {}
    for name in NAMES:
        for resource, pattern in CHILDREN.items():
            obj = cluster.live(resource, NS, pattern.format(name))
            if obj is not None:
                found[resource, pattern.format(name)] = obj["metadata"]["uid"]
    return found


def children_made(cluster: ClusterEmulator) -> int:
    """Children of the test's Capabilities that exist now."""
    return len(child_uids(cluster))


def owned(cluster: ClusterEmulator, owner_uid: str) -> list[tuple[str, str]]:
    """Every (resource, name) in the namespace whose owner is ``owner_uid``."""
    return sorted((resource, child) for resource in CHILDREN
                  for child in cluster.names(resource, NS)
                  if any(ref["uid"] == owner_uid for ref in (cluster.live(
                      resource, NS, child) or {})["metadata"].get("ownerReferences", [])))


async def test_operator_killed_mid_reconcile_converges_without_duplicates(
        tmp_path: Path, cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operators: list[OperatorProcess]) -> None:
    for name in NAMES:
        await post(kube, CAPS_PATH, capability(name, replicas=1))
    # Every Service POST fails while the first operator runs, so however fast it is, it is
    # killed mid-reconcile: ConfigMaps made, Services refused, Deployments not tried yet.
    cluster.fail_next(kmock.method.POST, CHILD_PATHS[SERVICES], status=503, times=1_000_000)
    first = OperatorProcess(tmp_path / "operator.log")
    operators.append(first)
    await wait_for(lambda: children_made(cluster) > 0 or first.process.poll() is not None,
                   timeout=CONVERGE_SECONDS, what="a first child")
    first.kill()
    cluster.clear_faults()
    before = child_uids(cluster)
    assert 0 < len(before) < 3 * len(NAMES), (before, first.log.read_text())
    # While no operator runs, one Capability is edited.
    await patch(kube, f"{CAPS_PATH}/{NAMES[0]}", {"spec": {"replicas": 3}})

    second = OperatorProcess(tmp_path / "operator.log")
    operators.append(second)
    await wait_for(lambda: children_made(cluster) == 3 * len(NAMES),
                   timeout=CONVERGE_SECONDS, what="every child")

    def current(name: str) -> bool:
        obj = cluster.live(CAPABILITIES, NS, name) or {}
        status = obj.get("status", {})
        return (status.get("observedGeneration") == obj["metadata"]["generation"]
                and condition(cluster, CAPABILITIES, name, "Ready") is not None)

    await wait_for(lambda: all(current(name) for name in NAMES), timeout=CONVERGE_SECONDS,
                   what="every status for its generation")
    edited = cluster.live(DEPLOYMENTS, NS, NAMES[0])
    assert edited is not None and edited["spec"]["replicas"] == 3  # the edit made while down
    after = child_uids(cluster)
    # What the killed operator made was kept (adopted, not replaced): same objects.
    assert {key: after[key] for key in before} == before
    for name in NAMES:
        # Exactly one child of each kind per Capability: a POST the restart repeated for a
        # child that already existed was refused (409) and turned into a read and a patch.
        uid = (cluster.live(CAPABILITIES, NS, name) or {})["metadata"]["uid"]
        assert owned(cluster, uid) == sorted(
            (resource, pattern.format(name)) for resource, pattern in CHILDREN.items()), name
        assert creations(cluster, CHILD_PATHS[DEPLOYMENTS], name) <= 2, name
    assert second.process.poll() is None, second.log.read_text()
