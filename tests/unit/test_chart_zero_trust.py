"""The chart's zero-trust parts, rendered by the real helm binary: the token reviewers'
ClusterRole and the operator's token settings, the gateway's and MCP aggregate's token
review, the operator's own authority (its Secret rules, the chart's workloads' identities),
one cluster domain for chart and operator."""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any, TypeVar

import kubernetes_validate
import pytest

from packetflow.gateway.settings import GatewaySettings
from packetflow.manifests import parse_manifest
from packetflow.operator import render as render_names
from packetflow.operator.authority import chart_leaf
from packetflow.operator.permissions import AUTHORITY_PERMISSIONS, PERMISSIONS
from packetflow.operator.settings import OperatorSettings
from packetflow.settings import RuntimeSettings
from packetflow.spec import Capability
from tests.unit.test_chart import (
    CHART,
    K8S_VERSION,
    NAMESPACE,
    RELEASE,
    by_kind,
    helm,
    operator_deployment,
    render,
    rule_triples,
)

__all__ = ["helm"]  # the fixture, imported for this module's tests
TOKENS = ("security.mtls.issuer=ClusterIssuer/pf-ca", "security.tokens.enabled=true")
CHART_WORKLOADS = ("gateway.enabled=true", "mcp.aggregate.enabled=true")
Settings = TypeVar("Settings", OperatorSettings, GatewaySettings, RuntimeSettings)


def component(objects: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    return [o for o in by_kind(objects, kind)
            if o["metadata"]["labels"].get("app.kubernetes.io/component") == name]


def settings_of(deployment: dict[str, Any], settings_type: type[Settings]) -> Settings:
    """The settings its first container parses from the chart's literal PACKETFLOW_* env."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    with pytest.MonkeyPatch.context() as env:
        for item in container["env"]:
            if "value" in item and item["name"].startswith("PACKETFLOW_"):
                env.setenv(item["name"], item["value"])
        return settings_type()


def operator_settings(objects: list[dict[str, Any]]) -> OperatorSettings:
    """The operator's settings as its pod would parse them from the chart's env."""
    return settings_of(operator_deployment(objects), OperatorSettings)


def test_token_reviewers_may_create_tokenreviews_and_nothing_else(helm: ModuleType) -> None:
    assert not component(render(helm), "ClusterRole", "token-reviewer")
    objects = render(helm, *TOKENS, "watchNamespaces={team-a,team-b}")
    (role,) = component(objects, "ClusterRole", "token-reviewer")
    (binding,) = component(objects, "ClusterRoleBinding", "token-reviewer")
    for obj in (role, binding):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert rule_triples(role["rules"]) == {("authentication.k8s.io", "tokenreviews", "create")}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    # The ServiceAccounts of the namespaces runtime pods run in (packetflow-<name> included).
    assert [s["name"] for s in binding["subjects"]] == [
        "system:serviceaccounts:team-a", "system:serviceaccounts:team-b"]
    assert {s["kind"] for s in binding["subjects"]} == {"Group"}
    (binding,) = component(render(helm, *TOKENS, "security.tokens.reviewerNamespaces={shop}"),
                           "ClusterRoleBinding", "token-reviewer")
    assert [s["name"] for s in binding["subjects"]] == ["system:serviceaccounts:shop"]
    (binding,) = component(render(helm, *TOKENS), "ClusterRoleBinding", "token-reviewer")
    assert [s["name"] for s in binding["subjects"]] == ["system:serviceaccounts"]


def test_token_settings_reach_the_operator(helm: ModuleType) -> None:
    settings = operator_settings(render(helm, *TOKENS, "security.tokens.port=50070",
                                        "security.tokens.expirationSeconds=7200"))
    assert (settings.tokens, settings.token_port, settings.token_expiration_seconds) == (
        True, 50070, 7200)


def test_tokens_without_an_issuer_fail_naming_the_value(helm: ModuleType) -> None:
    result = helm.run_helm("template", RELEASE, str(CHART), "--set",
                           "security.tokens.enabled=true", check=False)
    assert result.returncode != 0 and "security.tokens.enabled needs security.mtls.issuer" \
        in result.stderr
    result = helm.run_helm("template", RELEASE, str(CHART), "--set", TOKENS[0], "--set",
                           "security.tokens.expirationSeconds=60", check=False)
    assert result.returncode != 0 and "schema" in result.stderr


def chart_workload(objects: list[dict[str, Any]], name: str) -> dict[str, dict[str, Any]]:
    """The gateway's or MCP aggregate's objects by kind, each checked against the schemas."""
    found = {kind: only for kind in ("ServiceAccount", "Deployment", "Service")
             for only in component(objects, kind, name)}
    for obj in found.values():
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    return found


def test_with_tokens_the_gateway_serves_a_token_port_its_runtime_accepts(
        helm: ModuleType) -> None:
    gateway = chart_workload(render(helm, *TOKENS, *CHART_WORKLOADS,
                                    "security.tokens.port=50070"), "gateway")
    pod = gateway["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"name": "token", "containerPort": 50070, "protocol": "TCP"} in container["ports"]
    assert {"name": "token", "port": 50070, "targetPort": "token", "protocol": "TCP",
            "appProtocol": "grpc"} in gateway["Service"]["spec"]["ports"]
    # Its TokenReviews go out with its own API token (in-cluster: TOKEN_REVIEW_API unset).
    assert pod["automountServiceAccountToken"] is True
    assert gateway["ServiceAccount"].get("automountServiceAccountToken", True) is True
    # Parsing checks the TLS files are given too (a token address alone is refused).
    settings = settings_of(gateway["Deployment"], GatewaySettings)
    assert (settings.token_address, settings.token_review_api) == ("0.0.0.0:50070", None)


def test_with_tokens_the_mcp_aggregate_reviews_bearer_tokens_its_runtime_accepts(
        helm: ModuleType) -> None:
    aggregate = chart_workload(render(helm, *TOKENS, *CHART_WORKLOADS), "mcp-aggregate")
    pod = aggregate["Deployment"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    assert aggregate["ServiceAccount"]["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == aggregate["ServiceAccount"]["metadata"]["name"]
    settings = settings_of(aggregate["Deployment"], RuntimeSettings)
    assert (settings.mcp_token_review, settings.mcp_token, settings.token_address) == (
        True, None, None)  # tokens arrive on its MCP port; no gRPC token port of its own


def test_without_tokens_the_gateway_and_aggregate_neither_serve_nor_review_tokens(
        helm: ModuleType) -> None:
    objects = render(helm, TOKENS[0], *CHART_WORKLOADS, "security.tokens.port=50070")
    assert not component(objects, "ClusterRoleBinding", "token-reviewer")
    gateway = chart_workload(objects, "gateway")
    aggregate = chart_workload(objects, "mcp-aggregate")
    for workload in (gateway, aggregate):
        container = workload["Deployment"]["spec"]["template"]["spec"]["containers"][0]
        assert not {"PACKETFLOW_TOKEN_ADDRESS", "PACKETFLOW_MCP_TOKEN_REVIEW"} & {
            item["name"] for item in container["env"]}
        assert "token" not in {port["name"] for port in container["ports"]}
        assert "token" not in {port["name"] for port in workload["Service"]["spec"]["ports"]}
    # The gateway keeps the default (its API token, for its watches); the aggregate none.
    assert "automountServiceAccountToken" not in gateway["Deployment"]["spec"]["template"][
        "spec"]
    assert aggregate["Deployment"]["spec"]["template"]["spec"][
        "automountServiceAccountToken"] is False
    assert aggregate["ServiceAccount"]["automountServiceAccountToken"] is False


def test_the_gateway_and_aggregate_may_review_tokens_as_their_service_accounts_alone(
        helm: ModuleType) -> None:
    objects = render(helm, *TOKENS, *CHART_WORKLOADS, "mcp.aggregate.namespace=team-a",
                     "security.tokens.reviewerNamespaces={shop}")
    (binding,) = component(objects, "ClusterRoleBinding", "token-reviewer")
    kubernetes_validate.validate(binding, K8S_VERSION, strict=True)
    accounts = {(workload["ServiceAccount"]["metadata"]["namespace"],
                 workload["ServiceAccount"]["metadata"]["name"])
                for workload in (chart_workload(objects, "gateway"),
                                 chart_workload(objects, "mcp-aggregate"))}
    assert accounts == {(NAMESPACE, "pf-packetflow-gateway"), ("team-a", "pf-packetflow-mcp")}
    # Neither namespace's whole group: only the reviewer namespaces get one.
    assert binding["subjects"] == [
        {"kind": "Group", "apiGroup": "rbac.authorization.k8s.io",
         "name": "system:serviceaccounts:shop"},
        *({"kind": "ServiceAccount", "name": name, "namespace": namespace}
          for namespace, name in sorted(accounts))]


def test_tokens_and_an_mcp_token_secret_on_the_aggregate_fail_naming_both(
        helm: ModuleType) -> None:
    result = helm.run_helm("template", RELEASE, str(CHART), *(
        arg for value in (*TOKENS, *CHART_WORKLOADS, "mcp.tokenSecret=mcp-auth/token")
        for arg in ("--set", value)), check=False)
    assert result.returncode != 0
    assert "security.tokens.enabled and mcp.tokenSecret cannot both apply to the MCP " \
        "aggregate" in result.stderr
    # Without the aggregate nothing conflicts: runtime pods get the shared secret only.
    objects = render(helm, *TOKENS, "mcp.enabled=true", "mcp.tokenSecret=mcp-auth/token")
    assert operator_settings(objects).mcp_token_secret == "mcp-auth/token"


def operator_rules(objects: list[dict[str, Any]]) -> dict[str, set[tuple[str, str, str]]]:
    """The operator's grants per namespace ("*": its ClusterRole)."""
    grants: dict[str, set[tuple[str, str, str]]] = {}
    for role in component(objects, "ClusterRole", "operator"):
        grants.setdefault("*", set()).update(rule_triples(role["rules"]))
    for role in component(objects, "Role", "operator"):
        grants.setdefault(role["metadata"]["namespace"], set()).update(
            rule_triples(role["rules"]))
    return grants


def triples(permissions: Iterable[Any]) -> set[tuple[str, str, str]]:
    return {(p.api_group, p.resource, verb) for p in permissions for verb in p.verbs}


OPERATOR_CA = ("security.mtls.issuer=operator", "gateway.enabled=true",
               "mcp.aggregate.enabled=true")


@pytest.mark.parametrize("listed", [False, True], ids=["all-namespaces", "listed-namespaces"])
def test_the_operator_authority_gets_secrets_where_it_writes_them_and_only_then(
        helm: ModuleType, listed: bool) -> None:
    namespaces = ("watchNamespaces={team-a,team-b}",) if listed else ()
    plain = operator_rules(render(helm, *namespaces))
    grants = operator_rules(render(helm, *OPERATOR_CA, *namespaces))
    assert all(("", "secrets", "get") not in rules for rules in plain.values())
    everything = triples(PERMISSIONS) | triples(AUTHORITY_PERMISSIONS)
    if not listed:
        assert grants == {"*": everything}
        return
    assert grants == {"team-a": everything, "team-b": everything,
                      # the authority's Secret and the gateway's, in the release namespace
                      NAMESPACE: triples(AUTHORITY_PERMISSIONS)}


def test_the_operator_authority_replaces_cert_manager_for_the_charts_workloads(
        helm: ModuleType) -> None:
    objects = render(helm, *OPERATOR_CA)
    for obj in objects:
        if obj["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert not by_kind(objects, "Certificate")
    settings = operator_settings(objects)
    assert (settings.mtls_issuer, settings.ca_namespace) == ("operator", NAMESPACE)
    issued = {chart_leaf(identity, settings).secret for identity in
              settings.operator_identities}
    mounted = {volume["secret"]["secretName"] for deployment in by_kind(objects, "Deployment")
               for volume in deployment["spec"]["template"]["spec"]["volumes"]
               if volume["name"] == "identity"}
    assert issued == mounted == {"pf-packetflow-gateway-identity", "pf-packetflow-mcp-identity"}


def test_chart_and_operator_certificates_agree_on_the_cluster_domain(
        helm: ModuleType) -> None:
    objects = render(helm, "security.mtls.issuer=ClusterIssuer/pf-ca", "gateway.enabled=true",
                     "clusterDomain=corp.example")
    settings = operator_settings(objects)
    assert settings.cluster_domain == "corp.example"
    (certificate,) = by_kind(objects, "Certificate")
    name = certificate["spec"]["secretName"].removesuffix("-identity")
    # The chart's Certificate and the operator's names for a Service are one list.
    assert certificate["spec"]["dnsNames"] == render_names.service_dns_names(
        name, NAMESPACE, settings)
    assert f"{name}.{NAMESPACE}.svc.corp.example" in certificate["spec"]["dnsNames"]
    # Runtime pods resolve (and composition steps dial) Services under the same domain.
    capability = parse_manifest({
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
        "metadata": {"name": "pay"}, "spec": {"intent": "Pay", "implementation": {
            "builtin": {"name": "echo"}}}})
    assert isinstance(capability, Capability)
    container = render_names.render_deployment(capability, "team-a", settings)["spec"][
        "template"]["spec"]["containers"][0]
    assert {"name": "PACKETFLOW_CLUSTER_DOMAIN", "value": "corp.example"} in container["env"]
    _, dns = render_names.certificate_names(capability, "team-a", settings)
    assert "pay.team-a.svc.corp.example" in dns
