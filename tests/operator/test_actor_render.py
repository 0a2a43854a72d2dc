"""Pure renderers for Actors (StatefulSet, Services, bundle), the runtime-pod additions (state
dir, Secrets, MCP) and the MCP aggregate bundle: no cluster, real Kubernetes schemas."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from packetflow.manifests import load_text, parse_manifest
from packetflow.operator import render, status
from packetflow.operator.drift import drift_patch, narrow_spec_patch
from packetflow.operator.reconcile import describe_errors, validate_resource
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import Actor, Capability

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
SETTINGS = OperatorSettings()
MCP = OperatorSettings(mcp_enabled=True, mcp_port=8800)
PG_SECRET = {"secretKeyRef": {"name": "pg-credentials", "key": "dsn"}}
POSTGRESQL = {"postgresql": {"dsnFrom": PG_SECRET}}


def actor_manifest(name: str = "research", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "packetflow.io/v1alpha1", "kind": "Actor",
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": {"intent": "Multi-turn research conversations with memory",
                     "requires": {"query": {"type": "string"}},
                     "provides": {"answer": {"type": "string"}},
                     "initialState": {"research_history": [], "current_focus": None},
                     "implementation": {"python": {"module": "examples.research",
                                                   "class": "ResearchAssistant"}},
                     **spec}}


def actor(**spec: Any) -> Actor:
    parsed = parse_manifest(actor_manifest(**spec))
    assert isinstance(parsed, Actor), parsed
    return parsed


def capability(name: str = "echo", **spec: Any) -> Capability:
    parsed = parse_manifest({
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
        "metadata": {"name": name, "namespace": "team-a"},
        "spec": {"intent": "Echo what it gets", "requires": ["message"],
                 "implementation": {"builtin": {"name": "echo"}}, **spec}})
    assert isinstance(parsed, Capability), parsed
    return parsed


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return dict(only)


def env_of(workload: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(workload)["env"]}


def volumes_of(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}


# --- validity ------------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
@pytest.mark.parametrize("settings", [SETTINGS, MCP], ids=["plain", "mcp"])
def test_actor_children_are_valid_kubernetes_objects(version: str, store: str,
                                                     settings: OperatorSettings) -> None:
    spec: dict[str, Any] = {"store": {"sqlite": {}}, "replicas": 1} if store == "sqlite" else \
        {"store": POSTGRESQL, "replicas": 3}
    act = actor(resources={"requests": {"cpu": "100m"}, "limits": {"memory": "256Mi"}}, **spec)
    children = render.desired_children(act, "team-a", settings)
    assert [c["kind"] for c in children] == ["ConfigMap", "Service", "Service", "StatefulSet"]
    for child in children:
        kubernetes_validate.validate(child, version, strict=True)


def test_rendering_is_deterministic_and_in_sync_with_itself() -> None:
    first = render.desired_children(actor(), "team-a", SETTINGS)
    assert first == render.desired_children(actor(), "team-a", SETTINGS)
    for child in first:
        live = yaml.safe_load(yaml.safe_dump(child))
        assert drift_patch(child, live) is None  # reconciling twice writes nothing


# --- the StatefulSet -----------------------------------------------------------------------

def test_statefulset_members_find_each_other() -> None:
    sts = render.render_statefulset(actor(store=POSTGRESQL, replicas=3), "team-a", SETTINGS)
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert spec["serviceName"] == "research-headless"
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["selector"]["matchLabels"].items() <= \
        spec["template"]["metadata"]["labels"].items()
    env = container(sts)["env"]
    # $(PACKETFLOW_MEMBER_ID) expands only when the variable is defined earlier in the list.
    assert env[0] == {"name": "PACKETFLOW_MEMBER_ID", "valueFrom": {
        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}
    assert env[1] == {"name": "PACKETFLOW_ADVERTISE_ADDRESS",
                      "value": "$(PACKETFLOW_MEMBER_ID).research-headless.team-a.svc:50051"}
    assert env_of(sts)["PACKETFLOW_STATE_DIR"] == SETTINGS.state_dir
    assert render.member_names("research", 3) == ["research-0", "research-1", "research-2"]


def test_statefulset_runs_the_runtime_like_a_capability_deployment() -> None:
    sts = render.render_statefulset(actor(), "team-a", SETTINGS)
    deployment = render.render_deployment(capability(), "team-a", SETTINGS)
    main, cap_main = container(sts), container(deployment)
    assert main["args"] == ["runtime", "--bundle", "/etc/packetflow/bundle.yaml",
                            "--address", "0.0.0.0:50051", "--metrics-address", "0.0.0.0:9464"]
    for key in ("readinessProbe", "livenessProbe", "securityContext", "image", "ports"):
        assert main[key] == cap_main[key], key
    pod, cap_pod = sts["spec"]["template"]["spec"], deployment["spec"]["template"]["spec"]
    assert pod["securityContext"] == cap_pod["securityContext"]
    assert pod["automountServiceAccountToken"] is False


def test_sqlite_gets_a_volume_per_pod() -> None:
    sts = render.render_statefulset(actor(store={"sqlite": {}}), "team-a", SETTINGS)
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == render.STATE_VOLUME
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"],
                             "resources": {"requests": {"storage": "1Gi"}}}
    # The claim provides the volume: the pod template must not declare one of the same name.
    assert render.STATE_VOLUME not in volumes_of(sts)
    assert {"name": "state", "mountPath": "/var/lib/packetflow"} in \
        container(sts)["volumeMounts"]
    sized = render.render_statefulset(
        actor(), "team-a", OperatorSettings(actor_storage_size="5Gi",
                                            actor_storage_class="fast"))
    assert sized["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast"
    assert actor().spec.store.sqlite is not None  # sqlite is the default store


def test_postgresql_gets_scratch_state_and_the_dsn_from_its_secret() -> None:
    sts = render.render_statefulset(actor(store=POSTGRESQL, replicas=2), "team-a", SETTINGS)
    assert "volumeClaimTemplates" not in sts["spec"]
    assert volumes_of(sts)["state"] == {"name": "state", "emptyDir": {}}
    source = actor(store=POSTGRESQL).spec.store.postgresql
    assert source is not None and source.dsn_from is not None
    assert env_of(sts)[source.dsn_from.env_name] == PG_SECRET
    plain = render.render_statefulset(actor(store={"postgresql": {"dsn": "host=db"}}),
                                      "team-a", SETTINGS)
    assert not any("secretKeyRef" in str(v) for v in env_of(plain).values())


def test_every_secret_of_the_manifest_becomes_env() -> None:
    act = actor(store=POSTGRESQL, mcpTools=[
        {"name": "search", "url": "https://tools.example/mcp", "headersFrom": {
            "Authorization": {"secretKeyRef": {"name": "tools", "key": "token"}},
            "X-Plain": {"env": "ALREADY_SET"}}},
        {"name": "echo", "capability": "echo"}])
    env = render.secret_env(act)
    assert [e["name"] for e in env] == sorted(["PACKETFLOW_SECRET_PG_CREDENTIALS_DSN",
                                               "PACKETFLOW_SECRET_TOOLS_TOKEN"])
    assert {"name": "PACKETFLOW_SECRET_TOOLS_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": "tools", "key": "token"}}} in env
    cap = capability(implementation={"mcp": {"url": "https://tools.example/mcp",
                                             "tool": "search", "headersFrom": {
        "Authorization": {"secretKeyRef": {"name": "tools", "key": "token"}}}}})
    deployment = render.render_deployment(cap, "team-a", SETTINGS)
    assert env_of(deployment)["PACKETFLOW_SECRET_TOOLS_TOKEN"] == {
        "secretKeyRef": {"name": "tools", "key": "token"}}
    # mcp implementations run in the runtime: metrics port and Service port too.
    assert [p["name"] for p in render.render_service(cap, "team-a", SETTINGS)["spec"][
        "ports"]] == ["grpc", "metrics"]


def test_scaling_is_not_a_rollout_but_a_spec_change_is() -> None:
    def pod_hash(act: Actor) -> str:
        sts = render.render_statefulset(act, "team-a", SETTINGS)
        return str(sts["spec"]["template"]["metadata"]["annotations"][
            render.SPEC_HASH_ANNOTATION])
    base = pod_hash(actor(store=POSTGRESQL, replicas=2))
    assert base == pod_hash(actor(store=POSTGRESQL, replicas=5))
    assert base != pod_hash(actor(store=POSTGRESQL, replicas=2, idleTimeout="10m"))


# --- Services and bundle -------------------------------------------------------------------

def test_headless_and_client_services() -> None:
    act = actor()
    headless = render.render_headless_service(act, "team-a", SETTINGS)
    client = render.render_service(act, "team-a", SETTINGS)
    assert headless["metadata"]["name"] == "research-headless"
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert client["metadata"]["name"] == "research" and "clusterIP" not in client["spec"]
    for service in (headless, client):
        assert service["spec"]["selector"] == render.selector_labels("research", "Actor")
        assert [p["name"] for p in service["spec"]["ports"]] == ["grpc", "metrics"]
    # An Actor's pods are never selected by a Capability's Service, and the other way round.
    assert render.selector_labels("x", "Actor") != render.selector_labels("x")


def test_bundle_is_exactly_the_actor() -> None:
    act = actor(store=POSTGRESQL, replicas=2, schedules=[{"name": "cleanup", "every": "1h"}])
    configmap = render.render_configmap(act, "team-a", SETTINGS)
    assert configmap["metadata"]["name"] == "research-bundle"
    assert configmap["metadata"]["labels"][render.LABEL_ACTOR] == "research"
    loaded = load_text(configmap["data"]["bundle.yaml"])
    assert not loaded.errors and not loaded.capabilities
    (reparsed,) = loaded.actors
    assert reparsed.spec == act.spec and reparsed.name == "research"


# --- validation: Degraded naming the field -------------------------------------------------

def test_replicas_over_one_with_sqlite_names_spec_replicas() -> None:
    errors = validate_resource(actor_manifest(replicas=2), "team-a/research")
    assert isinstance(errors, list)
    message = describe_errors(errors)
    assert message.startswith("spec.replicas: ") and "postgresql" in message
    assert isinstance(validate_resource(actor_manifest(replicas=2, store=POSTGRESQL), "x"),
                      Actor)


def test_actor_names_leave_room_for_suffixes() -> None:
    errors = validate_resource(actor_manifest(name="a" * 53), "team-a/long")
    assert isinstance(errors, list) and errors[0].path == "metadata.name"
    assert isinstance(validate_resource(actor_manifest(name="a" * 52), "x"), Actor)


def test_other_actor_errors_keep_their_path() -> None:
    errors = validate_resource(actor_manifest(idleTimeout="soon"), "x")
    assert isinstance(errors, list) and errors[0].path == "spec.idleTimeout"


# --- immutable StatefulSet fields ----------------------------------------------------------

def test_only_drifted_spec_fields_are_patched_and_immutable_ones_are_named() -> None:
    desired = render.render_statefulset(actor(), "team-a", SETTINGS)
    live = yaml.safe_load(yaml.safe_dump(desired))
    # What the API server adds to a claim template; sending ours back would be a change.
    live["spec"]["volumeClaimTemplates"][0].update(apiVersion="v1",
                                                    kind="PersistentVolumeClaim",
                                                    status={"phase": "Pending"})
    live["spec"]["replicas"] = 3
    patch, immutable = narrow_spec_patch("StatefulSet", desired, live,
                                         drift_patch(desired, live))
    assert patch == {"spec": {"replicas": 1}} and immutable == []

    moved = render.render_statefulset(actor(store=POSTGRESQL), "team-a", SETTINGS)
    patch, immutable = narrow_spec_patch("StatefulSet", moved, live, drift_patch(moved, live))
    assert patch is not None and "template" in patch["spec"]
    # Dropping the claim templates leaves the key out: no drift, the old claim stays.
    assert immutable == []
    grown = render.render_statefulset(actor(), "team-a",
                                      OperatorSettings(actor_storage_size="9Gi"))
    _, immutable = narrow_spec_patch("StatefulSet", grown, live, drift_patch(grown, live))
    assert immutable == ["spec.volumeClaimTemplates"]


# --- status --------------------------------------------------------------------------------

def statefulset_with(**status_fields: Any) -> dict[str, Any]:
    return {"metadata": {"name": "research", "generation": 2},
            "spec": {"replicas": 2}, "status": status_fields}


def test_readiness_follows_the_statefulset() -> None:
    fresh = status.assess_statefulset(statefulset_with())
    assert not fresh.ready.status and fresh.ready.reason == "Progressing"
    partial = status.assess_statefulset(statefulset_with(observedGeneration=2, replicas=2,
                                                         readyReplicas=1))
    assert not partial.ready.status and "1/2" in partial.ready.message
    rolling = status.assess_statefulset(statefulset_with(
        observedGeneration=2, replicas=2, readyReplicas=2, currentRevision="a",
        updateRevision="b"))
    assert not rolling.ready.status and "rolling" in rolling.ready.message
    ready = status.assess_statefulset(statefulset_with(
        observedGeneration=2, replicas=2, readyReplicas=2, currentRevision="b",
        updateRevision="b"))
    assert ready.ready.status and ready.ready_replicas == 2 and not ready.degraded.status
    written = status.workload_status(ready, endpoint="e", selector="s", previous=None,
                                     generation=2, now="T", members=["research-0",
                                                                      "research-1"])
    assert written["members"] == ["research-0", "research-1"]
    assert "members" not in status.workload_status(ready, endpoint="e", selector="s",
                                                   previous=None, generation=2, now="T")


# --- MCP -----------------------------------------------------------------------------------

def test_capability_pods_keep_state_on_a_scratch_volume() -> None:
    deployment = render.render_deployment(capability(), "team-a", SETTINGS)
    assert env_of(deployment)["PACKETFLOW_STATE_DIR"] == "/var/lib/packetflow"
    assert volumes_of(deployment)["state"] == {"name": "state", "emptyDir": {}}
    image = capability(implementation={"image": {"image": "x/y:1"}})
    assert "state" not in volumes_of(render.render_deployment(image, "team-a", SETTINGS))


def test_mcp_setting_adds_the_flag_and_ports() -> None:
    assert "--mcp-address" not in container(
        render.render_deployment(capability(), "team-a", SETTINGS))["args"]
    for resource in (capability(), actor()):
        children = {(c["kind"], c["metadata"]["name"]): c
                    for c in render.desired_children(resource, "team-a", MCP)}
        workload = children[("Deployment", "echo")] if isinstance(resource, Capability) \
            else children[("StatefulSet", "research")]
        args = container(workload)["args"]
        assert args[args.index("--mcp-address") + 1] == "0.0.0.0:8800"
        assert {"name": "mcp", "containerPort": 8800, "protocol": "TCP"} in \
            container(workload)["ports"]
        service = children[("Service", resource.name)]
        assert {"name": "mcp", "port": 8800, "targetPort": "mcp", "protocol": "TCP"} in \
            service["spec"]["ports"]
    image = capability(implementation={"image": {"image": "x/y:1"}})
    assert "mcp" not in str(render.render_service(image, "team-a", MCP)["spec"]["ports"])


def test_mcp_aggregate_bundle_forwards_to_each_capability() -> None:
    caps = [capability("zeta", mcp={"name": "z_tool"}), capability("alpha"),
            capability("hidden", mcp={"expose": False}),
            capability("foreign", implementation={"image": {"image": "x/y:1"}})]
    configmap = render.render_mcp_bundle(caps, "team-a", SETTINGS)
    assert configmap["metadata"]["name"] == "packetflow-mcp-bundle"
    assert configmap["metadata"]["labels"][render.LABEL_MANAGED_BY] == render.MANAGED_BY
    loaded = load_text(configmap["data"]["bundle.yaml"])
    assert not loaded.errors
    assert [c.name for c in loaded.capabilities] == ["alpha", "foreign", "zeta"]
    by_name = {c.name: c for c in loaded.capabilities}
    zeta = by_name["zeta"]
    assert zeta.spec.mcp.name == "z_tool"
    assert zeta.spec.requires == caps[0].spec.requires and zeta.spec.intent == caps[0].spec.intent
    composition = zeta.spec.implementation.composition
    assert composition is not None
    (step,) = composition.model_dump(mode="json", by_alias=True, exclude_none=True)["steps"]
    assert step["call"] == {"capability": "zeta", "address": "zeta.team-a.svc:50051"}
    assert render.render_mcp_bundle([], "team-a", SETTINGS)["data"] == {"bundle.yaml": ""}
