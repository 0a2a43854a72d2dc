"""The chart's zero-trust parts beyond the operator's own RBAC: the token reviewers'
ClusterRole, the operator's settings for tokens, rendered by the real helm binary."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest

from packetflow.operator.settings import OperatorSettings
from tests.unit.test_chart import (
    CHART,
    K8S_VERSION,
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
