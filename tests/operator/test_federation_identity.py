"""A Federation's gateway as a workload of the cluster's trust domain (``mtls_issuer``): its
ServiceAccount, certificate, TLS settings and health port, rendered purely (checked against
the real Kubernetes schemas), and issued by the operator's own authority on the emulator."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import kmock
import kubernetes_validate
import pytest

from packetflow.identity.x509 import load_certificates, spiffe_ids
from packetflow.manifests import parse_manifest
from packetflow.operator import federation, render
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import Capability
from tests.operator.api import NS, post
from tests.operator.conftest import OperatorRunner, wait_for
from tests.operator.kube_emulator import CERTIFICATES, ClusterEmulator
from tests.operator.test_authority import assert_authority_calls_permitted
from tests.support.federation import issue_body, issue_federation

CERT_MANAGER = OperatorSettings(mtls_issuer="ClusterIssuer/ca", trust_domain="acme.internal",
                                health_port=8100)
OPERATOR_CA = OperatorSettings(mtls_issuer="operator", ca_namespace="pf-system",
                               trust_domain="acme.internal", health_port=8100)
FEDERATIONS = "packetflow.io/v1alpha1/federations"


def children(settings: OperatorSettings) -> dict[str, dict[str, Any]]:
    found = federation.desired_children(issue_federation(), "partners-ns", settings)
    return {child["kind"]: child for child in found if child["kind"] != "Service"}


def pod(settings: OperatorSettings) -> dict[str, Any]:
    return dict(children(settings)["Deployment"]["spec"]["template"]["spec"])


@pytest.mark.parametrize("version", ("1.29.0", "1.37.0"))
def test_the_gateways_children_stay_valid_kubernetes_objects(version: str) -> None:
    for settings in (CERT_MANAGER, OPERATOR_CA):
        for child in federation.desired_children(issue_federation(), "partners-ns", settings):
            if child["kind"] != "Certificate":
                kubernetes_validate.validate(child, version, strict=True)
    kubernetes_validate.validate(federation.render_service_account("partners-ns"), version,
                                 strict=True)


def test_the_gateway_gets_a_certificate_of_the_namespaces_federation_account() -> None:
    certificate = children(CERT_MANAGER)["Certificate"]
    spec = certificate["spec"]
    assert certificate["metadata"]["name"] == spec["secretName"] == \
        f"{issue_federation().name}-federation-identity"
    assert spec["uris"] == ["spiffe://acme.internal/ns/partners-ns/sa/packetflow-federation"]
    assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": "ClusterIssuer",
                                 "name": "ca"}
    # Callers dial the local Service and every import by name.
    local = federation.local_service_name(issue_federation().name)
    assert f"{local}.partners-ns.svc.cluster.local" in spec["dnsNames"]
    for imported in issue_federation().spec.imports:
        assert f"{imported.local_name}.partners-ns.svc" in spec["dnsNames"]


def test_the_gateway_pod_runs_as_it_with_tls_settings_and_plaintext_health() -> None:
    spec = pod(CERT_MANAGER)
    assert spec["serviceAccountName"] == "packetflow-federation"
    assert spec["automountServiceAccountToken"] is False
    secret = f"{issue_federation().name}-federation-identity"
    assert {"name": "workload-identity", "secret": {"secretName": secret,
                                                    "defaultMode": 0o440}} in spec["volumes"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (env["PACKETFLOW_TLS_CERT"], env["PACKETFLOW_TLS_KEY"], env["PACKETFLOW_TLS_CA"],
            env["PACKETFLOW_HEALTH_ADDRESS"]) == (
        "/etc/packetflow-identity/tls.crt", "/etc/packetflow-identity/tls.key",
        "/etc/packetflow-identity/ca.crt", "0.0.0.0:8100")
    assert {"name": "workload-identity", "mountPath": "/etc/packetflow-identity",
            "readOnly": True} in container["volumeMounts"]
    # The organization's identity stays where it was, beside it.
    assert {"name": "identity", "mountPath": "/etc/packetflow/identity", "readOnly": True} \
        in container["volumeMounts"]
    assert {"name": "health", "containerPort": 8100, "protocol": "TCP"} in container["ports"]
    assert container["readinessProbe"]["grpc"] == container["livenessProbe"]["grpc"] == {
        "port": 8100}


def test_without_mtls_the_gateway_is_unchanged_and_the_operator_ca_needs_no_certificate(
        ) -> None:
    plain = pod(OperatorSettings())
    assert "serviceAccountName" not in plain
    assert plain["containers"][0]["readinessProbe"]["grpc"] == {"port": 50051}
    assert "Certificate" not in children(OPERATOR_CA)
    # Pods are the same whichever authority issues the Secret.
    assert pod(OPERATOR_CA) == pod(CERT_MANAGER)


def test_runtime_pods_do_not_take_the_federation_gateway_for_a_forwarder() -> None:
    # It names no caller to an mTLS runtime (the runtime sees its own workload), so trusting
    # it to name one would only widen what a stolen gateway certificate could claim.
    capability = parse_manifest({
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
        "metadata": {"name": "translate"},
        "spec": {"intent": "Translate", "implementation": {"builtin": {"name": "echo"}}}})
    assert isinstance(capability, Capability)
    container = render.render_deployment(capability, "partners-ns", CERT_MANAGER)["spec"][
        "template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "PACKETFLOW_TLS_CERT" in env
    assert federation.workload_spiffe_id("partners-ns", CERT_MANAGER) not in \
        env.get("PACKETFLOW_TRUSTED_FORWARDERS", "")


async def test_the_operator_issues_the_gateways_workload_identity(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    cluster.resources[FEDERATIONS] = kmock.ResourceInfo(
        kind="Federation", singular="federation", namespaced=True, shortnames={"fed"},
        categories={"packetflow"},
        verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
        subresources={"status"})
    runner = OperatorRunner([NS], mtls_issuer="operator", ca_namespace=NS,
                            federation_status_url="http://127.0.0.1:9/status")
    await runner.start()
    try:
        body = {**issue_body(), "metadata": {"name": "partners", "namespace": NS}}
        created = await post(kube, f"/apis/packetflow.io/v1alpha1/namespaces/{NS}/"
                             "federations", body)
        secret = await wait_for(lambda: cluster.live("v1/secrets", NS,
                                                     "partners-federation-identity"),
                                what="the gateway's workload Secret")
        deployment = await wait_for(lambda: cluster.live("apps/v1/deployments", NS,
                                                         "partners-federation"),
                                    what="the gateway's Deployment")
        assert cluster.live("v1/serviceaccounts", NS, "packetflow-federation") is not None
        (owner,) = secret["metadata"]["ownerReferences"]
        assert owner["uid"] == created["metadata"]["uid"]
        (certificate,) = load_certificates(base64.b64decode(secret["data"]["tls.crt"]),
                                           "tls.crt")
        assert spiffe_ids(certificate) == [
            f"spiffe://cluster.local/ns/{NS}/sa/packetflow-federation"]
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == \
            "packetflow-federation"
        assert not cluster.names(CERTIFICATES, NS)
    finally:
        await runner.stop()
    assert_authority_calls_permitted(cluster)
