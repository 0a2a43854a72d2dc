"""End to end on a kind cluster: image, Helm install, apply examples, Ready, call, scale, delete.

Needs a Docker engine, ``kind`` and ``kubectl`` (helm comes from tests/helm.py). Where any is
missing the tests skip with the reason; pytest-kind is deliberately not used because it errors
instead of skipping without Docker. Set PACKETFLOW_E2E_KEEP=1 to keep the cluster afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
IMAGE_REPOSITORY = "packetflow"
IMAGE_TAG = "e2e"
NAMESPACE = "packetflow-system"
APP_NAMESPACE = "default"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


def missing_prerequisite() -> str | None:
    """Why the e2e suite cannot run here, or None when it can."""
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30,
                              check=False)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0:
        lines = (info.stderr or info.stdout).strip().splitlines()
        return f"no Docker engine (`docker info` failed: {lines[-1] if lines else 'no output'})"
    return None


def _load_helm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("packetflow_e2e_helm", ROOT / "tests" / "helm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def wait_for(what: str, check: Callable[[], Any], timeout: float = 180.0,
             interval: float = 1.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (subprocess.CalledProcessError, OSError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)  # a poll interval, not a guess at how long anything takes
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Cluster:
    """A kind cluster with its own kubeconfig; commands run against it."""

    def __init__(self, name: str, kubeconfig: Path, helm: ModuleType) -> None:
        self.name = name
        self.kubeconfig = kubeconfig
        self.helm = helm
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    def run(self, *args: str, timeout: float = 600) -> str:
        result = subprocess.run(list(args), capture_output=True, text=True, env=self.env,
                                timeout=timeout, check=False)
        if result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, args, result.stdout,
                                                result.stderr)
        return result.stdout

    def kubectl(self, *args: str, timeout: float = 300) -> str:
        return self.run("kubectl", *args, timeout=timeout)

    def get(self, kind: str, name: str, namespace: str = APP_NAMESPACE) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.kubectl("-n", namespace, "get", kind, name,
                                                        "-o", "json"))
        return found

    def exists(self, kind: str, name: str, namespace: str = APP_NAMESPACE) -> bool:
        out = self.kubectl("-n", namespace, "get", kind, "--ignore-not-found", "-o", "name",
                           "--field-selector", f"metadata.name={name}")
        return bool(out.strip())

    @contextmanager
    def port_forward(self, target: str, remote: str) -> Iterator[int]:
        """Forward a free local port to ``target``'s named port; yields the local port."""
        process = subprocess.Popen(
            ["kubectl", "-n", APP_NAMESPACE, "port-forward", target, f":{remote}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env)
        try:
            assert process.stdout is not None
            line = process.stdout.readline()  # "Forwarding from 127.0.0.1:NNNNN -> 50051"
            match = re.search(r"127\.0\.0\.1:(\d+)", line)
            assert match, f"kubectl port-forward said {line!r}"
            yield int(match.group(1))
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = missing_prerequisite()
    if reason:
        pytest.skip(f"e2e needs Docker, kind and kubectl: {reason}")
    helm = _load_helm()
    name = f"packetflow-e2e-{os.getpid()}"
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    created = Cluster(name, kubeconfig, helm)
    created.run("kind", "create", "cluster", "--name", name, "--kubeconfig", str(kubeconfig),
                "--wait", "180s", timeout=900)
    try:
        image = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
        created.run("docker", "build", "-t", image, str(ROOT), timeout=1200)
        created.run("kind", "load", "docker-image", image, "--name", name, timeout=600)
        yield created
    finally:
        if not os.environ.get("PACKETFLOW_E2E_KEEP"):
            subprocess.run(["kind", "delete", "cluster", "--name", name], capture_output=True,
                           check=False, timeout=300)


@pytest.fixture(scope="module")
def installed(cluster: Cluster) -> Cluster:
    cluster.helm.run_helm(
        "install", "pf", str(ROOT / "charts" / "packetflow"), "--kubeconfig",
        str(cluster.kubeconfig), "--namespace", NAMESPACE, "--create-namespace",
        "--set", f"image.repository={IMAGE_REPOSITORY}", "--set", f"image.tag={IMAGE_TAG}",
        "--set", "image.pullPolicy=Never", "--wait", "--timeout", "300s")
    return cluster


def packetflow_cli() -> str:
    """The ``packetflow`` command installed beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).with_name("packetflow")
    found = str(beside) if beside.is_file() else shutil.which("packetflow")
    assert found, "the packetflow CLI is not installed"
    return found


def builtin_examples() -> dict[str, Path]:
    """Example manifests the stock image can run (python examples need their module in it)."""
    found: dict[str, Path] = {}
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if (isinstance(document, dict) and document.get("kind") == "Capability"
                    and "builtin" in document["spec"]["implementation"]):
                found[document["metadata"]["name"]] = path
    return found


def test_helm_install_runs_the_operator(installed: Cluster) -> None:
    deployment = installed.get("deployment", "pf-packetflow-operator", NAMESPACE)
    assert deployment["status"].get("readyReplicas") == 1
    crd = json.loads(installed.kubectl("get", "crd", "capabilities.packetflow.io", "-o", "json"))
    assert crd["spec"]["names"]["shortNames"] == ["cap"]


def test_capability_lifecycle(installed: Cluster) -> None:
    examples = builtin_examples()
    if "echo" not in examples:
        pytest.skip("examples/echo.yaml is missing")
    for path in sorted(set(examples.values())):
        installed.kubectl("apply", "-n", APP_NAMESPACE, "-f", str(path))
    for name in examples:
        installed.kubectl("-n", APP_NAMESPACE, "wait", "--for=condition=Ready", f"cap/{name}",
                          "--timeout=300s", timeout=330)

    # Status as the operator reports it.
    echo = installed.get("cap", "echo")
    status = echo["status"]
    assert status["observedGeneration"] == echo["metadata"]["generation"]
    assert status["endpoint"] == f"echo.{APP_NAMESPACE}.svc:50051"
    assert status["readyReplicas"] >= 1
    listing = installed.kubectl("-n", APP_NAMESPACE, "get", "cap")
    assert "READY" in listing and "INTENT" in listing and "echo" in listing

    # A call through a port-forward, with the packetflow CLI.
    with installed.port_forward("svc/echo", "grpc") as port:
        def call() -> Any:
            out = subprocess.run(
                [packetflow_cli(), "call", "echo", "--address", f"127.0.0.1:{port}",
                 "--data", '{"message": "hello from kind"}'],
                capture_output=True, text=True, timeout=60, check=True)
            return json.loads(out.stdout)

        assert wait_for("a call to echo", call, timeout=60) == {"message": "hello from kind"}

    # The runtime's metrics through the Service's named port.
    with installed.port_forward("svc/echo", "metrics") as port:
        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                return str(r.read().decode())

        assert "# HELP" in wait_for("runtime metrics", scrape, timeout=60)

    # Scale through the scale subresource; the operator must follow it.
    installed.kubectl("-n", APP_NAMESPACE, "scale", "cap/echo", "--replicas=2")
    installed.kubectl("-n", APP_NAMESPACE, "wait", "--for=jsonpath={.status.readyReplicas}=2",
                      "cap/echo", "--timeout=300s", timeout=330)
    assert installed.get("deployment", "echo")["spec"]["replicas"] == 2

    # Delete: the children go with it (ownerReferences, garbage collection).
    installed.kubectl("-n", APP_NAMESPACE, "delete", "cap/echo", "--wait=true", "--timeout=120s",
                      timeout=150)
    for kind in ("deployment", "service"):
        wait_for(f"{kind}/echo to be deleted",
                 lambda kind=kind: not installed.exists(kind, "echo"), timeout=120)
    wait_for("configmap/echo-bundle to be deleted",
             lambda: not installed.exists("configmap", "echo-bundle"), timeout=120)


def test_invalid_capability_is_rejected_by_the_api_server(installed: Cluster) -> None:
    bad = {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
           "metadata": {"name": "two-ways", "namespace": APP_NAMESPACE},
           "spec": {"intent": "x", "implementation": {"builtin": {"name": "echo"},
                                                      "python": {"module": "m",
                                                                 "function": "f"}}}}
    result = subprocess.run(["kubectl", "apply", "-f", "-"], input=json.dumps(bad),
                            capture_output=True, text=True, env=installed.env, timeout=60,
                            check=False)
    assert result.returncode != 0
    assert "exactly one of" in result.stderr


def test_actor_lifecycle(installed: Cluster) -> None:
    """An Actor (SQLite, one replica) becomes a StatefulSet with a volume, turns Ready and
    reports its members; replicas > 1 with SQLite is refused by the API server (CRD rule)."""
    name = "e2e-memo"
    manifest = {"apiVersion": "packetflow.io/v1alpha1", "kind": "Actor",
                "metadata": {"name": name, "namespace": APP_NAMESPACE},
                "spec": {"intent": "Remember what was said",
                         "implementation": {"python": {"module": "examples.research",
                                                       "class": "ResearchAssistant"}},
                         "store": {"sqlite": {}}, "replicas": 1}}
    applied = subprocess.run(["kubectl", "apply", "-f", "-"], input=json.dumps(manifest),
                             capture_output=True, text=True, env=installed.env, timeout=60,
                             check=False)
    assert applied.returncode == 0, applied.stderr
    sts = wait_for(f"statefulset/{name}", lambda: installed.get("statefulset", name),
                   timeout=120)
    assert sts["spec"]["serviceName"] == f"{name}-headless"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"
    headless = installed.get("service", f"{name}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    # The image must carry examples.research for the pod to become ready; the operator's part
    # (children, status) is checked either way.
    actor = wait_for("the Actor's status", lambda: installed.get("act", name).get("status"),
                     timeout=120)
    assert actor["members"] == [f"{name}-0"]

    manifest["spec"]["replicas"] = 2
    refused = subprocess.run(["kubectl", "apply", "-f", "-"], input=json.dumps(manifest),
                             capture_output=True, text=True, env=installed.env, timeout=60,
                             check=False)
    assert refused.returncode != 0 and "shared store" in refused.stderr

    installed.kubectl("-n", APP_NAMESPACE, "delete", f"act/{name}", "--wait=true",
                      "--timeout=120s", timeout=150)
    wait_for(f"statefulset/{name} to be deleted",
             lambda: not installed.exists("statefulset", name), timeout=120)
