"""The chart's routing controller, SLO rules and dashboard, rendered by the real helm."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from packetflow.metrics import RuntimeMetrics
from packetflow.operator.routing.loop import ControllerMetrics
from packetflow.operator.routing.permissions import CONTROLLER_PERMISSIONS
from packetflow.operator.routing.slo import RULES_FILE, render_rules
from tests.unit.test_chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    VALUE_SETS,
    by_kind,
    declared_permissions,
    helm,
    render,
    rule_triples,
)

ROOT = Path(__file__).resolve().parents[2]
ENABLED = VALUE_SETS["controller"]
__all__ = ["helm"]  # the fixture, imported for this module's tests


def component(objects: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    return [o for o in by_kind(objects, kind)
            if o["metadata"]["labels"].get("app.kubernetes.io/component") == name]


def test_controller_is_off_by_default_and_needs_a_prometheus(helm: ModuleType) -> None:
    assert not component(render(helm), "Deployment", "controller")
    result = helm.run_helm("template", RELEASE, str(CHART), "--set", "controller.enabled=true",
                           check=False)
    assert result.returncode != 0
    assert "prometheus.url is required when controller.enabled is true" in result.stderr


def test_controller_deployment(helm: ModuleType) -> None:
    objects = render(helm, *ENABLED)
    (deployment,) = component(objects, "Deployment", "controller")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (operator,) = component(objects, "Deployment", "operator")
    assert container["image"] == operator["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["args"] == ["controller"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PACKETFLOW_PROMETHEUS_URL"] == "http://prom.monitoring:9090"
    assert env["PACKETFLOW_CONTROLLER_METRICS_ADDRESS"] == "0.0.0.0:9466"
    # The values the chart writes are what the controller's settings parse.
    from packetflow.operator.routing.settings import ControllerSettings

    settings = ControllerSettings(**{k.removeprefix("PACKETFLOW_").lower(): v
                                     for k, v in env.items()})
    assert settings.controller_interval_seconds == 15 and settings.scrape_interval_seconds == 15
    assert deployment["spec"]["replicas"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (account,) = component(objects, "ServiceAccount", "controller")
    assert pod["serviceAccountName"] == account["metadata"]["name"] != \
        operator["spec"]["template"]["spec"]["serviceAccountName"]
    (service,) = component(objects, "Service", "controller")
    assert service["spec"]["selector"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    (monitor,) = component(objects, "ServiceMonitor", "controller")
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    listed = render(helm, *ENABLED, "watchNamespaces={team-a,team-b}")
    (container,) = component(listed, "Deployment", "controller")[0]["spec"]["template"][
        "spec"]["containers"]
    assert container["args"] == ["controller", "--namespace", "team-a", "--namespace", "team-b"]


@pytest.mark.parametrize("extra", [(), ("watchNamespaces={team-a,team-b}",)],
                         ids=["all-namespaces", "listed-namespaces"])
def test_controller_rbac_equals_its_permissions(helm: ModuleType,
                                                extra: tuple[str, ...]) -> None:
    objects = render(helm, *ENABLED, *extra)
    roles = [*component(objects, "ClusterRole", "controller"),
             *component(objects, "Role", "controller")]
    assert roles
    for role in roles:
        granted = rule_triples(role["rules"])
        assert granted == declared_permissions(_module()), role["metadata"]  # type: ignore[arg-type]
    bindings = [*component(objects, "ClusterRoleBinding", "controller"),
                *component(objects, "RoleBinding", "controller")]
    (account,) = component(objects, "ServiceAccount", "controller")
    assert len(bindings) == len(roles)
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount",
                                        "name": account["metadata"]["name"],
                                        "namespace": NAMESPACE}]
    # The operator's own role is unchanged by the controller's.
    operator_rules = set().union(*(rule_triples(r["rules"]) for r in
                                   [*component(objects, "ClusterRole", "operator"),
                                    *component(objects, "Role", "operator")]))
    assert ("packetflow.io", "capabilities/scale", "patch") not in operator_rules


def _module() -> SimpleNamespace:
    """The controller's declarations in the shape test_chart's reader takes."""
    return SimpleNamespace(PERMISSIONS=CONTROLLER_PERMISSIONS)


def test_slo_rules_as_prometheus_rule_and_plain_file(helm: ModuleType) -> None:
    objects = render(helm, *ENABLED)
    (rule,) = by_kind(objects, "PrometheusRule")
    assert rule["spec"] == render_rules()
    (config_map,) = component(objects, "ConfigMap", "slo-rules")
    assert config_map["data"]["packetflow-slo.rules.yaml"].strip() == \
        (ROOT / RULES_FILE).read_text().strip()
    assert yaml.safe_load(config_map["data"]["packetflow-slo.rules.yaml"]) == render_rules()
    assert not by_kind(render(helm), "PrometheusRule")


def test_dashboard_queries_only_metrics_that_exist(helm: ModuleType) -> None:
    (config_map,) = component(render(helm, *ENABLED), "ConfigMap", "dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["packetflow.json"])
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Calls per second", "Latency p99 and objective", "Error ratio (failures / calls)",
            "Replicas: serving and decided", "Controller decisions"} <= titles
    known = _exported_names()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"packetflow[a-z0-9_:]*", target["expr"]):
                assert name in known, f"{panel['title']}: {name} is not a metric we export"


def _exported_names() -> set[str]:
    """Every series name the runtime, the controller and the recording rules produce."""
    names: set[str] = set()
    registries = [RuntimeMetrics().registry, ControllerMetrics(CollectorRegistry()).registry]
    from packetflow.feedback import FeedbackService, MemoryFeedbackStore

    FeedbackService(MemoryFeedbackStore(), registries[0])
    for registry in registries:
        for family in registry.collect():
            names.add(family.name)
            names.update(f"{family.name}{suffix}" for suffix in
                         ("_total", "_bucket", "_sum", "_count", "_created"))
    names.update(rule["record"] for group in render_rules()["groups"]
                 for rule in group["rules"] if "record" in rule)
    return names
