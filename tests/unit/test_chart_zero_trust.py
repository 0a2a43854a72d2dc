"""The chart's zero-trust parts, rendered by the real helm binary: the token reviewers'
ClusterRole and the operator's token settings, the operator's own authority (its Secret
rules, the chart's workloads' identities), one cluster domain for chart and operator."""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest

from packetflow.manifests import parse_manifest
from packetflow.operator import render as render_names
from packetflow.operator.authority import chart_leaf
from packetflow.operator.permissions import AUTHORITY_PERMISSIONS, PERMISSIONS
from packetflow.operator.settings import OperatorSettings
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


def component(objects: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    return [o for o in by_kind(objects, kind)
            if o["metadata"]["labels"].get("app.kubernetes.io/component") == name]


def operator_settings(objects: list[dict[str, Any]],
                      monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    """The operator's settings as its pod would parse them from the chart's env."""
    container = operator_deployment(objects)["spec"]["template"]["spec"]["containers"][0]
    for item in container["env"]:
        if "value" in item and item["name"].startswith("PACKETFLOW_"):
            monkeypatch.setenv(item["name"], item["value"])
    return OperatorSettings()


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


def test_token_settings_reach_the_operator(helm: ModuleType,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    settings = operator_settings(render(helm, *TOKENS, "security.tokens.port=50070",
                                        "security.tokens.expirationSeconds=7200"),
                                 monkeypatch)
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
        helm: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(helm, *OPERATOR_CA)
    for obj in objects:
        if obj["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert not by_kind(objects, "Certificate")
    settings = operator_settings(objects, monkeypatch)
    assert (settings.mtls_issuer, settings.ca_namespace) == ("operator", NAMESPACE)
    issued = {chart_leaf(identity, settings).secret for identity in
              settings.operator_identities}
    mounted = {volume["secret"]["secretName"] for deployment in by_kind(objects, "Deployment")
               for volume in deployment["spec"]["template"]["spec"]["volumes"]
               if volume["name"] == "identity"}
    assert issued == mounted == {"pf-packetflow-gateway-identity", "pf-packetflow-mcp-identity"}


def test_chart_and_operator_certificates_agree_on_the_cluster_domain(
        helm: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(helm, "security.mtls.issuer=ClusterIssuer/pf-ca", "gateway.enabled=true",
                     "clusterDomain=corp.example")
    settings = operator_settings(objects, monkeypatch)
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
