"""Federations without a cluster: the CRD, the gateway's children, its status."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from packetflow.manifests import parse_document
from packetflow.operator import federation as render
from packetflow.operator.crds import render_federation_crd
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import Federation
from tests.support.federation import issue_body, issue_federation
from tests.unit.test_crds import _walk, crd_errors

SETTINGS = OperatorSettings()
NS = "partners-ns"

body = issue_body
federation = issue_federation


def children(**spec: Any) -> dict[tuple[str, str], dict[str, Any]]:
    found = render.desired_children(federation(**spec), NS, SETTINGS)
    claim = render.render_audit_claim(federation(**spec), NS, SETTINGS)
    return {(c["kind"], c["metadata"]["name"]): c for c in [*found, *([claim] if claim else [])]}


# ---------------------------------------------------------------------- the CRD

def schema() -> dict[str, Any]:
    found: dict[str, Any] = render_federation_crd()["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"]
    return found


def test_crd_names_columns_and_subresources() -> None:
    crd = render_federation_crd()
    assert crd["metadata"]["name"] == "federations.packetflow.io"
    assert crd["spec"]["names"]["shortNames"] == ["fed"]
    (version,) = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}  # nothing to scale
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Peers"] == ".status.peersConnected"
    assert columns["Lowest-Trust"] == ".status.lowestTrustScore"
    assert next(iter(columns)) == "Ready" and list(columns)[-1] == "Age"


def test_crd_schema_is_structural_and_free_form_only_for_probe_input_and_status() -> None:
    preserved = {path for path, node in _walk(schema())
                 if node.get("x-kubernetes-preserve-unknown-fields")}
    assert preserved == {"spec.exports[].sla.probe.input", "status"}
    for path, node in _walk(schema()):
        assert not {"$ref", "anyOf", "oneOf", "allOf"} & set(node), path


def test_the_issues_manifest_passes_the_crd() -> None:
    assert crd_errors(body(), schema=schema()) == []


@pytest.mark.parametrize(("spec", "path", "words"), [
    ({"identity": {"certFile": "a", "keyFile": "b"}}, "spec.identity", "a Secret"),
    ({"peers": [{"name": "globex", "organization": "globex", "trustDomain": "globex.example",
                 "endpoint": "x:1", "trustBundle": {"file": "ca.crt"}}]},
     "spec.peers[0].trustBundle", "a ConfigMap key"),
    ({"exports": [{"capability": "a", "to": ["globex"],
                   "pricing": {"perExecution": 1, "subscription": {"perMonth": 1}}}]},
     "spec.exports[0].pricing", "exactly one of perExecution"),
    ({"replicas": 3}, "spec", "shared audit log"),
    ({"trustDomain": "ACME"}, "spec.trustDomain", "does not match"),
])
def test_crd_refuses_what_a_cluster_cannot_run(spec: dict[str, Any], path: str,
                                               words: str) -> None:
    found = crd_errors(body(**spec), schema=schema())
    assert any(p == path and words in message for p, message in found), found


# ---------------------------------------------------------------------- children

@pytest.mark.parametrize("version", ["1.27", "1.30"])
def test_children_are_valid_kubernetes_objects(version: str) -> None:
    for child in children().values():
        kubernetes_validate.validate(child, version, strict=True)


def test_config_names_the_mounted_files_and_the_gateway_settings() -> None:
    config = children()[("ConfigMap", "partners-federation")]
    document = yaml.safe_load(config["data"]["config.yaml"])
    assert document["kind"] == "Federation" and document["metadata"]["name"] == "partners"
    assert document["spec"]["identity"] == {"certFile": "/etc/packetflow/identity/tls.crt",
                                            "keyFile": "/etc/packetflow/identity/tls.key"}
    assert document["spec"]["peers"][0]["trustBundle"] == {
        "file": "/etc/packetflow/peers/globex/ca.crt"}
    assert document["gateway"]["listen"] == "0.0.0.0:8443"
    assert document["gateway"]["local"] == f"0.0.0.0:{SETTINGS.grpc_port}"
    # The config the gateway will load is valid for it.
    parsed = parse_document(document)
    assert isinstance(parsed, Federation) and parsed.spec.exports[0].capability == "sentiment"


def test_deployment_mounts_identity_and_bundles_without_subpath() -> None:
    deployment = children()[("Deployment", "partners-federation")]
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["identity"]["secret"]["secretName"] == "pf-federation-tls"
    assert volumes["peer-0"]["configMap"] == {"name": "globex-ca", "items": [
        {"key": "ca.crt", "path": "ca.crt"}]}
    assert volumes["audit"]["persistentVolumeClaim"]["claimName"] == "partners-federation-audit"
    (container,) = pod["containers"]
    assert container["args"] == ["federation", "--config",
                                 "/etc/packetflow/federation/config.yaml"]
    assert all("subPath" not in mount for mount in container["volumeMounts"])
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # one SQLite writer
    assert pod["automountServiceAccountToken"] is False


def test_peers_and_exports_change_without_a_rollout() -> None:
    before = children()[("Deployment", "partners-federation")]
    after = children(exports=[], trust={"minimumScore": 0.5})[
        ("Deployment", "partners-federation")]
    assert before == after  # the gateway reloads its config itself
    moved = children(endpoint={"port": 9443})[("Deployment", "partners-federation")]
    assert moved != before


def test_services_keep_the_local_port_off_the_load_balancer() -> None:
    found = children()
    peer = found[("Service", "partners-federation")]["spec"]
    assert peer["type"] == "LoadBalancer"
    assert [p["name"] for p in peer["ports"]] == ["federation"]
    local = found[("Service", "partners-federation-local")]["spec"]
    assert local["type"] == "ClusterIP" and {p["name"] for p in local["ports"]} == {
        "grpc", "metrics"}
    imported = found[("Service", "globex-translate")]["spec"]
    assert imported["type"] == "ClusterIP" and imported["ports"][0]["name"] == "grpc"


def test_postgresql_audit_needs_no_claim_and_reads_the_dsn_from_a_secret() -> None:
    store = {"store": {"postgresql": {"dsnFrom": {"secretKeyRef": {"name": "pg",
                                                                   "key": "dsn"}}}}}
    found = children(audit=store, replicas=2)
    assert not any(kind == "PersistentVolumeClaim" for kind, _ in found)
    deployment = found[("Deployment", "partners-federation")]
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PACKETFLOW_FEDERATION_AUDIT_DSN"]["valueFrom"]["secretKeyRef"] == {
        "name": "pg", "key": "dsn"}
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}


def test_files_are_for_a_machine_not_a_cluster() -> None:
    local = federation(identity={"certFile": "a.crt", "keyFile": "a.key"})
    (error,) = render.kubernetes_errors(local, "ns/partners")
    assert error.path == "spec.identity" and "secretName" in error.message


# ---------------------------------------------------------------------- status

REPORT: dict[str, Any] = {
    "peers": [
        {"name": "globex", "organization": "globex", "trustDomain": "globex.example",
         "connected": True, "lastHandshake": "2026-01-01T00:00:00Z",
         "certificateExpiry": "2026-04-01T00:00:00Z", "catalogVersion": "abc",
         "trust": {"reliability": {"score": 0.93, "positive": 9.0, "negative": 0.0,
                                   "observations": 9, "capped": 0}},
         "lowestTrust": {"dimension": "reliability", "score": 0.93}, "refused": None},
        {"name": "initech", "connected": False, "trust": {},
         "lowestTrust": {"dimension": "performance", "score": 0.9}},
    ],
    "exports": [{"capability": "sentiment", "calls": 10, "errors": 1, "slaBreaches": 2}],
    "imports": [{"name": "globex-translate", "peer": "globex", "capability": "translate",
                 "ready": True, "problem": None, "slaBreaches": 0}],
    "audit": {"headHash": "f" * 64, "records": 12},
}
READY_DEPLOYMENT = {"metadata": {"name": "partners-federation", "generation": 1},
                    "spec": {"replicas": 1},
                    "status": {"observedGeneration": 1, "replicas": 1, "readyReplicas": 1,
                               "updatedReplicas": 1}}


def test_status_from_the_gateways_report() -> None:
    status = render.federation_status(READY_DEPLOYMENT, REPORT, previous=None, generation=1,
                                      now="T")
    assert status["peersConnected"] == "1/2"
    assert status["lowestTrustScore"] == 0.9
    assert status["peers"][0]["trust"]["reliability"]["observations"] == 9
    assert status["exports"] == [{"capability": "sentiment", "calls": 10, "errors": 1,
                                  "slaBreaches": 2}]
    assert status["audit"]["headHash"] == "f" * 64
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Ready": "True",
                                                                      "Degraded": "False"}
    schema_errors = crd_errors({**body(), "status": {k: v for k, v in status.items()
                                                     if v is not None}}, schema=schema())
    assert schema_errors == []


def test_an_unreachable_gateway_keeps_the_last_report() -> None:
    status = render.federation_status(READY_DEPLOYMENT, None, previous=None, generation=1,
                                      now="T", error="connection refused")
    assert "peers" not in status and status["reportError"] == "connection refused"


def test_breaches_that_grew_become_events() -> None:
    before = render.federation_status(READY_DEPLOYMENT, REPORT, previous=None, generation=1,
                                      now="T")
    report = copy.deepcopy(REPORT)
    report["exports"][0]["slaBreaches"] = 3
    after = render.federation_status(READY_DEPLOYMENT, report, previous=None, generation=1,
                                     now="T")
    assert render.new_breaches(before, after) == [
        "export sentiment: SLA breached (1 more window(s), 3 in all)"]
    assert render.new_breaches(after, after) == []


def test_a_federated_capability_runs_in_a_runtime_pod() -> None:
    from packetflow.manifests import load_text
    from packetflow.operator import render as capability_render

    (capability,) = load_text(
        "apiVersion: packetflow.io/v1alpha1\nkind: Capability\nmetadata: {name: french}\n"
        "spec:\n  intent: x\n  implementation: {federated: {peer: globex, capability: "
        "translate, gateway: 'partners-federation-local:50051'}}\n").capabilities
    for child in capability_render.desired_children(capability, NS, SETTINGS):
        kubernetes_validate.validate(child, "1.30", strict=True)
        if child["kind"] == "Deployment":
            pod = child["spec"]["template"]["spec"]
            volumes = {v["name"] for v in pod["volumes"]}
            assert {m["name"] for m in pod["containers"][0]["volumeMounts"]} <= volumes
