"""Runtime pods' identities from cert-manager (``mtls_issuer``): rendered purely (built-in
kinds checked against the real Kubernetes schemas), applied and restored on the emulator."""

from __future__ import annotations

from typing import Any

import httpx
import kubernetes_validate
import pytest
from pydantic import ValidationError

from packetflow.manifests import parse_manifest
from packetflow.operator import render
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import Actor, Capability
from tests.operator.api import NS, post
from tests.operator.conftest import OperatorRunner, wait_for
from tests.operator.kube_emulator import CERTIFICATES, ClusterEmulator

MTLS = OperatorSettings(mtls_issuer="ClusterIssuer/packetflow-ca", trust_domain="acme.internal")


def capability(**spec: Any) -> Capability:
    resource = parse_manifest({
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
        "metadata": {"name": "pay", "namespace": "team-a"},
        "spec": {"intent": "Pay", "implementation": {"builtin": {"name": "echo"}}, **spec}})
    assert isinstance(resource, Capability), resource
    return resource


def actor() -> Actor:
    resource = parse_manifest({
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Actor",
        "metadata": {"name": "cart", "namespace": "team-a"},
        "spec": {"intent": "A cart", "implementation": {"python": {
            "module": "examples.research", "class": "ResearchAssistant"}}}})
    assert isinstance(resource, Actor), resource
    return resource


def pod(workload: dict[str, Any]) -> dict[str, Any]:
    return dict(workload["spec"]["template"]["spec"])


@pytest.mark.parametrize("version", ("1.29.0", "1.37.0"))
def test_built_in_children_stay_valid_kubernetes_objects(version: str) -> None:
    for resource in (capability(canary={"image": "x:2", "weight": 5}), actor()):
        for child in render.desired_children(resource, "team-a", MTLS):
            if child["kind"] != "Certificate":  # cert-manager's: checked below
                kubernetes_validate.validate(child, version, strict=True)


def test_each_workload_gets_an_account_and_a_certificate_of_its_spiffe_id() -> None:
    children = render.desired_children(capability(), "team-a", MTLS)
    assert [c["kind"] for c in children] == ["ServiceAccount", "Certificate", "ConfigMap",
                                             "Service", "Deployment"]
    account, certificate = children[0], children[1]
    assert account["metadata"]["name"] == "packetflow-pay"
    assert account["automountServiceAccountToken"] is False
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    assert certificate["metadata"]["name"] == "pay-identity"
    assert certificate["spec"] == {
        "secretName": "pay-identity", "duration": "24h", "renewBefore": "8h",
        "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
        "usages": ["digital signature", "key encipherment", "server auth", "client auth"],
        "uris": ["spiffe://acme.internal/ns/team-a/sa/packetflow-pay"],
        "dnsNames": ["pay", "pay.team-a", "pay.team-a.svc", "pay.team-a.svc.cluster.local"],
        "issuerRef": {"group": "cert-manager.io", "kind": "ClusterIssuer",
                      "name": "packetflow-ca"}}
    # Owned like every child, so the operator watches and restores it.
    assert certificate["metadata"]["labels"]["packetflow.io/capability"] == "pay"


def test_pods_run_as_the_account_with_the_certificate_and_plaintext_health() -> None:
    settings = OperatorSettings(mtls_issuer="Issuer/ca", health_port=8100)
    deployment = render.render_deployment(capability(), "team-a", settings)
    spec = pod(deployment)
    assert spec["serviceAccountName"] == "packetflow-pay"
    assert spec["automountServiceAccountToken"] is False
    assert {"name": "identity", "secret": {"secretName": "pay-identity",
                                           "defaultMode": 0o440}} in spec["volumes"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (env["PACKETFLOW_TLS_CERT"], env["PACKETFLOW_TLS_KEY"], env["PACKETFLOW_TLS_CA"]) \
        == ("/etc/packetflow-identity/tls.crt", "/etc/packetflow-identity/tls.key",
            "/etc/packetflow-identity/ca.crt")
    assert env["PACKETFLOW_HEALTH_ADDRESS"] == "0.0.0.0:8100"
    assert {"name": "health", "containerPort": 8100, "protocol": "TCP"} in container["ports"]
    assert container["readinessProbe"]["grpc"] == container["livenessProbe"]["grpc"] \
        == {"port": 8100}
    assert {"name": "identity", "mountPath": "/etc/packetflow-identity", "readOnly": True} \
        in container["volumeMounts"]


def test_pods_believe_the_caller_named_by_the_trusted_forwarders_only() -> None:
    gateway = "spiffe://acme.internal/ns/pf-system/sa/pf-packetflow-gateway"
    settings = OperatorSettings(mtls_issuer="Issuer/ca", trust_domain="acme.internal",
                                trusted_forwarders=[gateway])
    (container,) = pod(render.render_deployment(capability(), "team-a", settings))[
        "containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PACKETFLOW_TRUSTED_FORWARDERS"] == f'["{gateway}"]'
    (container,) = pod(render.render_deployment(capability(), "team-a", MTLS))["containers"]
    assert "PACKETFLOW_TRUSTED_FORWARDERS" not in {e["name"] for e in container["env"]}
    with pytest.raises(ValidationError, match="does not start with spiffe://"):
        OperatorSettings(trusted_forwarders=["pf-system/gateway"])


def test_the_canary_shares_the_identity_and_actor_members_are_named() -> None:
    children = render.desired_children(capability(canary={"image": "x:2", "weight": 5}),
                                       "team-a", MTLS)
    deployments = [c for c in children if c["kind"] == "Deployment"]
    assert {pod(d)["serviceAccountName"] for d in deployments} == {"packetflow-pay"}
    (certificate,) = render.render_certificate(actor(), "team-a", MTLS)["spec"]["dnsNames"][4:]
    assert certificate == "*.cart-headless.team-a.svc"  # members forward to each other


def test_without_an_issuer_or_for_a_foreign_image_nothing_changes() -> None:
    plain = render.desired_children(capability(), "team-a", OperatorSettings())
    assert [c["kind"] for c in plain] == ["ConfigMap", "Service", "Deployment"]
    assert "serviceAccountName" not in pod(plain[-1])
    image = capability(implementation={"image": {"image": "x:1", "port": 7000}})
    kinds = [c["kind"] for c in render.desired_children(image, "team-a", MTLS)]
    assert kinds == ["ConfigMap", "Service", "Deployment"]


async def create_pay(kube: httpx.AsyncClient) -> dict[str, Any]:
    """Capability ``pay`` (builtin echo) created in the emulator's namespace."""
    return await post(kube, f"/apis/packetflow.io/v1alpha1/namespaces/{NS}/capabilities", {
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
        "metadata": {"name": "pay", "namespace": NS},
        "spec": {"intent": "Pay", "implementation": {"builtin": {"name": "echo"}}}})


async def test_the_operator_applies_and_restores_identities(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    runner = OperatorRunner([NS], mtls_issuer="ClusterIssuer/packetflow-ca")
    await runner.start()
    try:
        created = await create_pay(kube)
        certificate = await wait_for(lambda: cluster.live(CERTIFICATES, NS, "pay-identity"),
                                     what="the Certificate")
        account = await wait_for(lambda: cluster.live("v1/serviceaccounts", NS,
                                                      "packetflow-pay"),
                                 what="the ServiceAccount")
        deployment = await wait_for(lambda: cluster.live("apps/v1/deployments", NS, "pay"),
                                    what="the Deployment")
        for child in (certificate, account):
            (owner,) = child["metadata"]["ownerReferences"]
            assert owner["uid"] == created["metadata"]["uid"]
        assert certificate["spec"]["uris"] == [
            "spiffe://cluster.local/ns/default/sa/packetflow-pay"]
        assert pod(deployment)["serviceAccountName"] == "packetflow-pay"
        response = await kube.delete(f"/apis/cert-manager.io/v1/namespaces/{NS}/"
                                     "certificates/pay-identity")
        assert response.status_code < 300
        back = await wait_for(lambda: cluster.live(CERTIFICATES, NS, "pay-identity"),
                              what="the Certificate to come back")
        assert back["metadata"]["uid"] != certificate["metadata"]["uid"]
    finally:
        await runner.stop()
