"""ServiceAccount tokens from the operator (``tokens``): the runtime's token port, the
callers' projected tokens, the NetworkPolicy's port; rendered purely (checked against the real
Kubernetes schemas) and applied on the emulator with only permitted calls."""

from __future__ import annotations

from typing import Any

import httpx
import kubernetes_validate
import pytest
from pydantic import ValidationError

from packetflow.operator import render
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import Actor, Capability
from tests.operator.api import NS, post
from tests.operator.conftest import OperatorRunner, wait_for
from tests.operator.kube_emulator import ClusterEmulator
from tests.operator.test_operator_watching import assert_calls_permitted
from tests.operator.test_workload_identity import actor, capability

TOKENS = OperatorSettings(mtls_issuer="ClusterIssuer/ca", tokens=True, token_port=50060,
                          token_expiration_seconds=1800, network_policies=True)


def composition() -> Capability:
    return capability(implementation={"composition": {"steps": [
        {"call": {"capability": "echo"}}]}})


def pod_of(children: list[dict[str, Any]]) -> dict[str, Any]:
    (workload,) = [c for c in children if c["kind"] in ("Deployment", "StatefulSet")]
    return dict(workload["spec"]["template"]["spec"])


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container["env"]}


@pytest.mark.parametrize("version", ("1.29.0", "1.37.0"))
def test_token_children_stay_valid_kubernetes_objects(version: str) -> None:
    for resource in (capability(), composition(), actor()):
        for child in render.desired_children(resource, "team-a", TOKENS):
            if child["kind"] != "Certificate":  # cert-manager's, no schema here
                kubernetes_validate.validate(child, version, strict=True)


def test_runtime_pods_serve_the_token_port_and_review_with_their_own_account() -> None:
    children = render.desired_children(capability(), "team-a", TOKENS)
    pod = pod_of(children)
    (container,) = pod["containers"]
    assert env_of(container)["PACKETFLOW_TOKEN_ADDRESS"] == "0.0.0.0:50060"
    assert {"name": "token", "containerPort": 50060, "protocol": "TCP"} in container["ports"]
    # TokenReview is an API call: the pod's own token is mounted, as its account.
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == "packetflow-pay"
    (service,) = [c for c in children if c["kind"] == "Service"]
    assert {"name": "token", "port": 50060, "targetPort": "token", "protocol": "TCP"} \
        in service["spec"]["ports"]
    # A capability that calls nobody needs no token of its own to call with.
    assert all("projected" not in volume for volume in pod["volumes"])


@pytest.mark.parametrize("resource", [composition(), actor()], ids=["composition", "actor"])
def test_callers_get_a_projected_token_for_the_packetflow_audience(
        resource: Capability | Actor) -> None:
    pod = pod_of(render.desired_children(resource, "team-a", TOKENS))
    (volume,) = [v for v in pod["volumes"] if v["name"] == "packetflow-token"]
    assert volume["projected"] == {"sources": [{"serviceAccountToken": {
        "audience": "packetflow", "expirationSeconds": 1800, "path": "token"}}]}
    (container,) = pod["containers"]
    assert {"name": "packetflow-token", "mountPath": "/var/run/secrets/packetflow",
            "readOnly": True} in container["volumeMounts"]


def test_the_network_policy_opens_the_token_port_to_the_same_callers() -> None:
    (policy,) = [c for c in render.desired_children(capability(), "team-a", TOKENS)
                 if c["kind"] == "NetworkPolicy"]
    callers = policy["spec"]["ingress"][0]
    assert {"protocol": "TCP", "port": "token"} in callers["ports"]
    assert {"protocol": "TCP", "port": "grpc"} in callers["ports"]
    metrics = policy["spec"]["ingress"][1]
    assert metrics["ports"] == [{"protocol": "TCP", "port": "metrics"}]


def test_without_tokens_or_for_a_foreign_image_nothing_changes() -> None:
    mtls = OperatorSettings(mtls_issuer="ClusterIssuer/ca")
    pod = pod_of(render.desired_children(composition(), "team-a", mtls))
    assert pod["automountServiceAccountToken"] is False
    assert "PACKETFLOW_TOKEN_ADDRESS" not in env_of(pod["containers"][0])
    image = capability(implementation={"image": {"image": "x:1", "port": 7000}})
    pod = pod_of(render.desired_children(image, "team-a", TOKENS))
    assert pod["automountServiceAccountToken"] is False
    assert [p["name"] for p in pod["containers"][0]["ports"]] == ["grpc"]


def test_tokens_without_mutual_tls_are_refused_naming_the_setting() -> None:
    with pytest.raises(ValidationError, match="needs mtls_issuer"):
        OperatorSettings(tokens=True)


async def test_the_operator_applies_the_token_port_with_permitted_calls(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    runner = OperatorRunner([NS], mtls_issuer="ClusterIssuer/ca", tokens=True)
    await runner.start()
    try:
        await post(kube, f"/apis/packetflow.io/v1alpha1/namespaces/{NS}/capabilities", {
            "apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
            "metadata": {"name": "flow", "namespace": NS},
            "spec": {"intent": "Flow", "implementation": {"composition": {"steps": [
                {"call": {"capability": "echo"}}]}}}})
        deployment = await wait_for(lambda: cluster.live("apps/v1/deployments", NS, "flow"),
                                    what="the Deployment")
        service = await wait_for(lambda: cluster.live("v1/services", NS, "flow"),
                                 what="the Service")
        pod = deployment["spec"]["template"]["spec"]
        assert env_of(pod["containers"][0])["PACKETFLOW_TOKEN_ADDRESS"] == "0.0.0.0:50052"
        assert "packetflow-token" in {v["name"] for v in pod["volumes"]}
        assert "token" in {p["name"] for p in service["spec"]["ports"]}
        await wait_for(lambda: runner.ctx.pending == 0, what="idle")
    finally:
        await runner.stop()
    assert_calls_permitted(cluster.api_calls())
