"""Pure renderers, drift and status logic: no cluster, real Kubernetes schemas."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from packetflow.manifests import parse_manifest
from packetflow.operator import render, status
from packetflow.operator.client import PLURALS
from packetflow.operator.drift import drift_patch, is_subset, parse_quantity
from packetflow.operator.permissions import AUTHORITY_PERMISSIONS, PERMISSIONS, rbac_rules
from packetflow.operator.reconcile import ChildConflictError, child_patch
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import Capability

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "capabilities.packetflow.io.yaml"
SETTINGS = OperatorSettings()

IMPLEMENTATIONS: dict[str, dict[str, Any]] = {
    "builtin": {"builtin": {"name": "echo"}},
    "python": {"python": {"module": "examples.text", "function": "shout"}},
    "image": {"image": {"image": "registry.example/greeter:1.2", "port": 7000}},
}


def manifest(name: str = "echo", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": {"intent": "Echo what it gets", "requires": ["message"],
                     "implementation": IMPLEMENTATIONS["builtin"], **spec}}


def model(**spec: Any) -> Capability:
    parsed = parse_manifest(manifest(**spec))
    assert isinstance(parsed, Capability), parsed
    return parsed


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_children_are_valid_kubernetes_objects(version: str, impl: str) -> None:
    cap = model(implementation=IMPLEMENTATIONS[impl], replicas=2,
                resources={"requests": {"cpu": "100m", "memory": "128Mi"},
                           "limits": {"memory": "256Mi"}})
    for child in render.desired_children(cap, "team-a", SETTINGS):
        kubernetes_validate.validate(child, version, strict=True)


def test_deployment_runs_the_runtime_securely() -> None:
    deployment = render.render_deployment(model(replicas=3), "team-a", SETTINGS)
    assert deployment["spec"]["replicas"] == 3
    main = container(deployment)
    assert main["image"] == SETTINGS.image
    assert main["args"] == ["runtime", "--bundle", "/etc/packetflow/bundle.yaml",
                            "--address", "0.0.0.0:50051", "--metrics-address", "0.0.0.0:9464"]
    assert [(p["name"], p["containerPort"]) for p in main["ports"]] == [
        ("grpc", 50051), ("metrics", 9464)]
    assert main["readinessProbe"]["grpc"] == {"port": 50051}
    assert main["livenessProbe"]["grpc"] == {"port": 50051}
    assert main["securityContext"] == {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                                       "allowPrivilegeEscalation": False,
                                       "capabilities": {"drop": ["ALL"]}}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["metadata"]["labels"]["app.kubernetes.io/name"] == "packetflow"
    assert deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"] == \
        "packetflow-operator"


def test_runtime_pod_environment_from_the_operator_settings() -> None:
    def env_of(settings: OperatorSettings) -> dict[str, Any]:
        deployment = render.render_deployment(model(), "team-a", settings)
        return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}

    plain = env_of(SETTINGS)
    assert plain["PACKETFLOW_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "PACKETFLOW_TRIGGER_STORE_DSN" not in plain
    assert plain["PACKETFLOW_UNDECLARED_AS_SERVICES"] == "true"
    assert (plain["PACKETFLOW_DRAIN_SECONDS"], plain["PACKETFLOW_GRACE_SECONDS"]) == ("5", "20")
    pod = render.render_deployment(model(), "team-a", SETTINGS)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 30  # drain + grace + margin
    assert "PACKETFLOW_MCP_TOKEN" not in plain
    shared = env_of(OperatorSettings(trigger_store_secret="triggers-pg/dsn",
                                     mcp_token_secret="mcp/token"))
    assert shared["PACKETFLOW_TRIGGER_STORE_DSN"] == {
        "secretKeyRef": {"name": "triggers-pg", "key": "dsn"}}
    assert shared["PACKETFLOW_MCP_TOKEN"] == {"secretKeyRef": {"name": "mcp", "key": "token"}}


def test_replicas_and_resources_only_when_set() -> None:
    deployment = render.render_deployment(model(), "team-a", SETTINGS)
    assert "replicas" not in deployment["spec"]  # an autoscaler owns the count
    assert "resources" not in container(deployment)
    sized = render.render_deployment(model(replicas=0, resources={"limits": {"cpu": "1"}}),
                                     "team-a", SETTINGS)
    assert sized["spec"]["replicas"] == 0
    assert container(sized)["resources"] == {"limits": {"cpu": "1"}}


def test_spec_hash_rolls_pods_only_on_pod_relevant_changes() -> None:
    def pod_hash(cap: Capability, settings: OperatorSettings = SETTINGS) -> str:
        deployment = render.render_deployment(cap, "team-a", settings)
        return str(deployment["spec"]["template"]["metadata"]["annotations"][
            render.SPEC_HASH_ANNOTATION])
    base = pod_hash(model())
    assert base == pod_hash(model())
    assert base != pod_hash(model(intent="Echo, louder"))  # the bundle changed
    assert base != pod_hash(model(), OperatorSettings(image="other:1"))
    assert base == pod_hash(model(replicas=4))  # scaling is not a rollout


def test_bundle_is_exactly_the_capability() -> None:
    cap = model(requires={"message": {"type": "string"}}, effects=["network"], replicas=2)
    configmap = render.render_configmap(cap, "team-a", SETTINGS)
    assert configmap["metadata"]["name"] == "echo-bundle"
    reparsed = parse_manifest(yaml.safe_load(configmap["data"]["bundle.yaml"]))
    assert isinstance(reparsed, Capability)
    assert reparsed.spec == cap.spec and reparsed.name == "echo"


def test_image_implementation_runs_its_own_image() -> None:
    cap = model(implementation=IMPLEMENTATIONS["image"])
    main = container(render.render_deployment(cap, "team-a", SETTINGS))
    assert main["image"] == "registry.example/greeter:1.2" and "args" not in main
    assert main["ports"] == [{"name": "grpc", "containerPort": 7000, "protocol": "TCP"}]
    assert main["readinessProbe"]["grpc"] == {"port": 7000}
    service = render.render_service(cap, "team-a", SETTINGS)
    assert service["spec"]["ports"] == [{"name": "grpc", "port": 50051, "targetPort": "grpc",
                                         "protocol": "TCP"}]


def test_service_has_named_ports_and_the_endpoint_matches() -> None:
    service = render.render_service(model(), "team-a", SETTINGS)
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("grpc", "grpc"), ("metrics", "metrics")]
    assert service["spec"]["selector"] == render.selector_labels("echo")
    assert render.endpoint("echo", "team-a", SETTINGS) == "echo.team-a.svc:50051"


# --- drift --------------------------------------------------------------------------------

def test_live_objects_with_server_defaults_are_in_sync() -> None:
    desired = render.render_deployment(model(resources={"limits": {"cpu": "1000m"}}),
                                       "team-a", SETTINGS)
    live = yaml.safe_load(yaml.safe_dump(desired))
    live["metadata"].update(uid="u", resourceVersion="7", labels={
        **live["metadata"]["labels"], "extra": "kept"})
    live["spec"]["replicas"] = 7  # an autoscaler's choice
    live["spec"]["progressDeadlineSeconds"] = 600
    live["spec"]["template"]["spec"]["containers"][0].update(
        terminationMessagePath="/dev/termination-log",
        resources={"limits": {"cpu": "1"}})  # canonicalised by the API server
    live["status"] = {"replicas": 7}
    assert drift_patch(desired, live) is None

    live["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"
    patch = drift_patch(desired, live)
    assert patch is not None and set(patch) == {"spec"}
    assert "replicas" not in patch["spec"]


def test_quantities_compare_by_value() -> None:
    assert parse_quantity("1Gi") == parse_quantity("1024Mi")
    assert parse_quantity("0.5") == parse_quantity("500m")
    assert parse_quantity("nonsense") is None
    assert is_subset({"resources": {"cpu": "1000m"}}, {"resources": {"cpu": "1"}})
    assert not is_subset({"cpu": "1000m"}, {"cpu": "1"})  # only under resources


# --- status -------------------------------------------------------------------------------

def deployment_with(**status_fields: Any) -> dict[str, Any]:
    return {"metadata": {"name": "echo", "generation": 2},
            "spec": {"replicas": 2}, "status": status_fields}


def test_readiness_follows_the_deployment() -> None:
    fresh = status.assess_deployment(deployment_with())
    assert not fresh.ready.status and fresh.ready.reason == "Progressing"
    rolling = status.assess_deployment(deployment_with(observedGeneration=2, readyReplicas=1,
                                                       updatedReplicas=2, replicas=2))
    assert not rolling.ready.status
    ready = status.assess_deployment(deployment_with(observedGeneration=2, readyReplicas=2,
                                                     updatedReplicas=2, replicas=2))
    assert ready.ready.status and ready.ready_replicas == 2 and not ready.degraded.status
    stuck = status.assess_deployment(deployment_with(observedGeneration=2, conditions=[
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
         "message": "too slow"}]))
    assert stuck.degraded.status and stuck.degraded.message == "too slow"


def test_transition_time_changes_only_when_status_flips() -> None:
    cond = status.Condition("Ready", False, "Progressing", "0/1")
    first = status.stamp_conditions([cond], None, 1, "T1")
    same = status.stamp_conditions([status.Condition("Ready", False, "Progressing", "0/2")],
                                   first, 2, "T2")
    flipped = status.stamp_conditions([status.Condition("Ready", True, "ReplicasReady", "")],
                                      same, 2, "T3")
    assert first[0]["lastTransitionTime"] == "T1" and same[0]["lastTransitionTime"] == "T1"
    assert flipped[0]["lastTransitionTime"] == "T3" and flipped[0]["observedGeneration"] == 2
    assert status.same_status({"conditions": first}, {"conditions": [
        {**first[0], "lastTransitionTime": "T9"}]})


def test_status_is_written_only_when_an_own_field_says_something_new() -> None:
    live = {"conditions": [{"type": "Ready", "status": "False", "reason": "Progressing",
                            "message": "0/1", "lastTransitionTime": "T1"}],
            "replicas": 0, "kopf": {"progress": {}}, "canaryWeight": 10}
    own = status.own_status(live)
    assert "kopf" not in own and "canaryWeight" not in own  # others' fields: never sent back
    same = {"conditions": [{**live["conditions"][0], "lastTransitionTime": "T2"}],
            "replicas": 0}
    assert not status.status_changed(same, live)  # only a transition time differs
    assert status.status_changed({**same, "replicas": 1}, live)
    assert status.status_changed({**same, "endpoint": "e"}, live)  # a field it lacks


def test_workload_view_keeps_what_readiness_needs() -> None:
    deployment = {**deployment_with(observedGeneration=2, readyReplicas=2,
                                    updatedReplicas=2, replicas=2),
                  "apiVersion": "apps/v1", "kind": "Deployment"}
    deployment["spec"]["template"] = {"spec": {"containers": [{"name": "runtime"}]}}
    view = status.workload_view(deployment)
    assert "template" not in view["spec"] and view["spec"]["replicas"] == 2
    assert status.assess_deployment(view) == status.assess_deployment(deployment)
    assert "replicas" not in status.workload_view({"spec": {}})["spec"]  # an HPA owns it


def test_child_patch_owns_adopts_or_refuses() -> None:
    cap = model(replicas=1)
    desired = render.render_service(cap, "team-a", SETTINGS)
    owner = {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability", "name": cap.name,
             "uid": "u1", "controller": True, "blockOwnerDeletion": True}
    ours = {**desired, "metadata": {**desired["metadata"], "ownerReferences": [owner]},
            "spec": {**desired["spec"], "clusterIP": "10.0.0.1"}}
    assert child_patch(desired, ours, "Capability", owner) is None  # defaults are no drift
    edited = {**ours, "spec": {**ours["spec"], "type": "NodePort"}}
    assert child_patch(desired, edited, "Capability", owner) == {"spec": desired["spec"]}
    orphan = {**ours, "metadata": {**desired["metadata"]}}
    adopted = child_patch(desired, orphan, "Capability", owner)
    assert adopted == {"metadata": {"ownerReferences": [owner]}}
    foreign = {**ours, "metadata": {**ours["metadata"], "ownerReferences": [
        {**owner, "uid": "u2"}]}}
    with pytest.raises(ChildConflictError, match="uid u2"):
        child_patch(desired, foreign, "Capability", owner)
    stranger = {**orphan, "metadata": {"name": cap.name, "labels": {"app": "other"}}}
    with pytest.raises(ChildConflictError, match="not managed"):
        child_patch(desired, stranger, "Capability", owner)


# --- permissions, CRD, CLI ----------------------------------------------------------------

def test_permissions_cover_every_call_and_nothing_wild() -> None:
    granted = {(p.api_group, p.resource): set(p.verbs)
               for p in (*PERMISSIONS, *AUTHORITY_PERMISSIONS)}
    for (api_version, _), plural in PLURALS.items():
        group = api_version.rpartition("/")[0]
        if plural in ("events", "capabilities", "actors"):
            continue  # Events are only posted; Capabilities, Actors only read (status: own rule)
        assert {"get", "patch"} <= granted[(group, plural)]
        if plural not in ("capabilities", "actors", "federations"):
            assert "create" in granted[(group, plural)]
        if plural not in ("capabilities", "actors", "federations", "persistentvolumeclaims",
                          "secrets"):
            # (a Federation's audit claim is applied, never watched, and the authority's
            # Secrets are listed on the resync, never watched: see permissions.py)
            assert {"list", "watch"} <= granted[(group, plural)]
    assert granted[("packetflow.io", "capabilities/status")] == {"patch"}
    assert granted[("packetflow.io", "actors/status")] == {"patch"}
    assert granted[("", "events")] == {"create"}
    # The operator's own watches read Capabilities and Actors; it writes only their status.
    assert granted[("packetflow.io", "capabilities")] == {"get", "list", "watch"}
    assert granted[("packetflow.io", "actors")] == {"get", "list", "watch"}
    assert all("*" not in rule["verbs"] and "*" not in rule["resources"]
               for rule in rbac_rules())


@pytest.mark.skipif(not CRD_PATH.exists(), reason="crds/ is not generated yet")
def test_test_manifests_fit_the_crd_schema() -> None:
    crd = yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    # OpenAPI v3.0 (boolean exclusiveMinimum) is closest to JSON Schema draft 4.
    validator = jsonschema.Draft4Validator(schema)
    for impl in IMPLEMENTATIONS.values():
        validator.validate(manifest(implementation=impl, replicas=1))
    # The CRD cannot see into free-form contracts; the operator reports these as Degraded.
    validator.validate(manifest(requires={"a": {"type": "strin"}}))
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(manifest(replicas=-1))


def test_cli_registers_the_operator_command() -> None:
    from packetflow.operator.cli import cmd_operator, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["operator", "--namespace", "a", "--namespace", "b",
                              "--liveness-address", "127.0.0.1:8081"])
    assert args.func is cmd_operator and args.namespace == ["a", "b"]
    assert args.liveness_address == "127.0.0.1:8081"
    assert parser.parse_args(["operator", "--all-namespaces"]).all_namespaces
    with pytest.raises(SystemExit):
        parser.parse_args(["operator", "--namespace", "a", "--all-namespaces"])
