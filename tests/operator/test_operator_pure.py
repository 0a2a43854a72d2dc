"""The operator's pure status and drift logic, case by case with exact results (what mutation
testing showed the broader tests left open)."""

from __future__ import annotations

import datetime
import time
from decimal import Decimal
from typing import Any

import pytest
import yaml

from packetflow.manifests import parse_manifest
from packetflow.operator import render, status
from packetflow.operator.drift import (
    drift_patch,
    is_subset,
    narrow_spec_patch,
    parse_quantity,
)
from packetflow.operator.settings import OperatorSettings
from packetflow.operator.status import Condition, Workload
from packetflow.spec import Actor, Capability

AS_EXPECTED = Condition("Degraded", False, "AsExpected", "")


def deployment(spec: dict[str, Any] | None = None, generation: Any = 2,
               **status_fields: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "echo"}
    if generation is not None:
        metadata["generation"] = generation
    return {"metadata": metadata, "spec": {"replicas": 2} if spec is None else spec,
            "status": status_fields}


SEEN = {"observedGeneration": 2}


@pytest.mark.parametrize(("obj", "expected"), [
    (deployment(), Workload(0, 0, Condition(
        "Ready", False, "Progressing", "Deployment echo has not observed generation 2 yet"),
        AS_EXPECTED)),
    (deployment(observedGeneration=1, readyReplicas=2, updatedReplicas=2), Workload(0, 2, Condition(
        "Ready", False, "Progressing", "Deployment echo has not observed generation 2 yet"),
        AS_EXPECTED)),
    (deployment(generation=None, replicas=2, readyReplicas=2, updatedReplicas=2), Workload(
        2, 2, Condition("Ready", True, "ReplicasReady", "2/2 replicas ready"), AS_EXPECTED)),
    (deployment({"replicas": 0}, **SEEN), Workload(0, 0, Condition(
        "Ready", False, "ScaledToZero", "Deployment echo has 0 replicas"), AS_EXPECTED)),
    (deployment({}, **SEEN, replicas=1, readyReplicas=1, updatedReplicas=1), Workload(
        1, 1, Condition("Ready", True, "ReplicasReady", "1/1 replicas ready"), AS_EXPECTED)),
    (deployment({"replicas": "x"}, **SEEN, readyReplicas=1, updatedReplicas=1), Workload(
        0, 1, Condition("Ready", True, "ReplicasReady", "1/1 replicas ready"), AS_EXPECTED)),
    (deployment(**SEEN, replicas=3, readyReplicas=3, updatedReplicas=1), Workload(
        3, 3, Condition("Ready", False, "Progressing", "3/2 replicas ready, 1 updated"),
        AS_EXPECTED)),
    (deployment(**SEEN, replicas=2, readyReplicas=1, updatedReplicas=2), Workload(
        2, 1, Condition("Ready", False, "Progressing", "1/2 replicas ready, 2 updated"),
        AS_EXPECTED)),
    (deployment(**SEEN, replicas="2", readyReplicas=None, updatedReplicas=None), Workload(
        0, 0, Condition("Ready", False, "Progressing", "0/2 replicas ready, 0 updated"),
        AS_EXPECTED)),
])
def test_deployment_readiness(obj: dict[str, Any], expected: Workload) -> None:
    assert status.assess_deployment(obj) == expected


@pytest.mark.parametrize(("conditions", "degraded"), [
    ([{"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "too slow"}],
     Condition("Degraded", True, "ProgressDeadlineExceeded", "too slow")),
    ([{"type": "Progressing", "reason": "ProgressDeadlineExceeded"}],
     Condition("Degraded", True, "ProgressDeadlineExceeded",
               "Deployment echo stopped progressing")),
    ([{"type": "Progressing", "reason": "NewReplicaSetAvailable"}], AS_EXPECTED),
    ([{"type": "ReplicaFailure", "status": "True", "message": "quota"}],
     Condition("Degraded", True, "ReplicaFailure", "quota")),
    ([{"type": "ReplicaFailure", "status": "True"}],
     Condition("Degraded", True, "ReplicaFailure", "Deployment echo cannot create pods")),
    ([{"type": "ReplicaFailure", "status": "False", "message": "fine"}], AS_EXPECTED),
    (None, AS_EXPECTED),
])
def test_deployment_degraded(conditions: Any, degraded: Condition) -> None:
    assert status.assess_deployment(deployment(**SEEN, conditions=conditions)).degraded == \
        degraded


def test_a_deployment_without_a_name_or_status() -> None:
    assessed = status.assess_deployment({"metadata": {"generation": 1}, "spec": None,
                                         "status": None})
    assert assessed.ready.message == "Deployment ? has not observed generation 1 yet"


def statefulset(spec: dict[str, Any] | None = None, generation: Any = 2,
                **status_fields: Any) -> dict[str, Any]:
    obj = deployment(spec, generation, **status_fields)
    obj["metadata"]["name"] = "chat"
    return obj


@pytest.mark.parametrize(("obj", "ready"), [
    (statefulset(observedGeneration=1), Condition(
        "Ready", False, "Progressing", "StatefulSet chat has not observed generation 2 yet")),
    (statefulset(**SEEN, readyReplicas=1), Condition(
        "Ready", False, "Progressing", "1/2 members ready")),
    (statefulset(**SEEN, readyReplicas=2, currentRevision="a", updateRevision="b"), Condition(
        "Ready", False, "Progressing", "2/2 members ready, rolling update in progress")),
    (statefulset(**SEEN, readyReplicas=2, updateRevision="b"), Condition(
        "Ready", True, "ReplicasReady", "2/2 members ready")),
    (statefulset(**SEEN, readyReplicas=2, currentRevision="a"), Condition(
        "Ready", True, "ReplicasReady", "2/2 members ready")),
    (statefulset({}, generation=None, readyReplicas=1), Condition(
        "Ready", True, "ReplicasReady", "1/1 members ready")),
    (statefulset({"replicas": None}, **SEEN, readyReplicas=1), Condition(
        "Ready", True, "ReplicasReady", "1/1 members ready")),
    (statefulset({"replicas": 3}, **SEEN, readyReplicas=4), Condition(
        "Ready", True, "ReplicasReady", "4/3 members ready")),
])
def test_statefulset_readiness(obj: dict[str, Any], ready: Condition) -> None:
    assessed = status.assess_statefulset({**obj, "status": {**obj["status"], "replicas": 2}})
    assert assessed.ready == ready and assessed.degraded == AS_EXPECTED
    assert assessed.replicas == 2
    assert assessed.ready_replicas == obj["status"].get("readyReplicas", 0)


def test_statefulset_without_a_name() -> None:
    assessed = status.assess_statefulset({"metadata": {"generation": 3}})
    assert assessed.ready.message == "StatefulSet ? has not observed generation 3 yet"
    assert (assessed.replicas, assessed.ready_replicas) == (0, 0)


def test_stamped_conditions_and_statuses_are_exact() -> None:
    ready = Condition("Ready", True, "ReplicasReady", "2/2")
    previous = [{"type": "Ready", "status": "True", "lastTransitionTime": "T0"},
                {"type": "Degraded", "status": "True", "lastTransitionTime": "T0"}, "junk"]
    assert status.stamp_conditions([ready, AS_EXPECTED], previous, None, "T1") == [
        {"type": "Ready", "status": "True", "reason": "ReplicasReady", "message": "2/2",
         "lastTransitionTime": "T0"},
        {"type": "Degraded", "status": "False", "reason": "AsExpected", "message": "",
         "lastTransitionTime": "T1"}]
    workload = Workload(3, 2, ready, AS_EXPECTED)
    assert status.workload_status(workload, endpoint="e:1", selector="app=x", previous=None,
                                  generation=4, now="T") == {
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "ReplicasReady", "message": "2/2",
             "lastTransitionTime": "T", "observedGeneration": 4},
            {"type": "Degraded", "status": "False", "reason": "AsExpected", "message": "",
             "lastTransitionTime": "T", "observedGeneration": 4}],
        "replicas": 3, "readyReplicas": 2, "endpoint": "e:1", "selector": "app=x"}
    assert status.failure_status("InvalidSpec", "spec.x: bad", previous=None, generation=None,
                                 now="T") == {"conditions": [
        {"type": "Ready", "status": "False", "reason": "InvalidSpec", "message": "spec.x: bad",
         "lastTransitionTime": "T"},
        {"type": "Degraded", "status": "True", "reason": "InvalidSpec",
         "message": "spec.x: bad", "lastTransitionTime": "T"}]}


def test_same_status_ignores_only_transition_times() -> None:
    base = {"replicas": 1, "conditions": [{"type": "Ready", "status": "True",
                                           "lastTransitionTime": "T1"}]}
    assert status.same_status(base, {**base, "conditions": [
        {"type": "Ready", "status": "True", "lastTransitionTime": "T2"}]})
    assert not status.same_status(base, {**base, "replicas": 2})
    assert not status.same_status(base, {**base, "conditions": [
        {"type": "Ready", "status": "False", "lastTransitionTime": "T1"}]})
    assert status.same_status(None, {"conditions": None})
    assert not status.same_status(None, base)


def test_now_is_an_rfc3339_utc_second(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # UTC+9: a local time would be nine hours off
    time.tzset()
    try:
        before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        now = datetime.datetime.strptime(status.now_rfc3339(), "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.UTC)
        after = datetime.datetime.now(datetime.UTC)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert before <= now <= after


def test_objects_with_nothing_in_them() -> None:
    for assess in (status.assess_deployment, status.assess_statefulset):
        assessed = assess({})
        assert (assessed.replicas, assessed.ready_replicas) == (0, 0)
        assert assessed.degraded == AS_EXPECTED


def test_statuses_keep_transition_times_and_generations() -> None:
    ready = Condition("Ready", True, "ReplicasReady", "1/1")
    previous = [{"type": "Ready", "status": "True", "lastTransitionTime": "T0"},
                {"type": "Degraded", "status": "True", "lastTransitionTime": "T0"}]
    written = status.workload_status(Workload(1, 1, ready, AS_EXPECTED), endpoint="e",
                                     selector="s", previous=previous, generation=3, now="T1")
    assert [(c["lastTransitionTime"], c["observedGeneration"]) for c in
            written["conditions"]] == [("T0", 3), ("T1", 3)]
    failed = status.failure_status("Conflict", "taken", previous=previous, generation=5,
                                   now="T2")
    assert [(c["status"], c["lastTransitionTime"], c["observedGeneration"])
            for c in failed["conditions"]] == [("False", "T2", 5), ("True", "T0", 5)]


# --------------------------------------------------------------------------------- drift

@pytest.mark.parametrize(("value", "number"), [
    ("500m", Decimal("0.5")), ("1k", Decimal(1000)), ("1M", Decimal(10) ** 6),
    ("2G", 2 * Decimal(10) ** 9), ("1T", Decimal(10) ** 12), ("1P", Decimal(10) ** 15),
    ("1E", Decimal(10) ** 18), ("1Ki", Decimal(1024)), ("1Mi", Decimal(2) ** 20),
    ("1Gi", Decimal(2) ** 30), ("1Ti", Decimal(2) ** 40), ("1Pi", Decimal(2) ** 50),
    ("1Ei", Decimal(2) ** 60), (" 3 ", Decimal(3)), ("1e3", Decimal(1000)),
    ("+1.5", Decimal("1.5")), (2, Decimal(2)), (0.25, Decimal("0.25")),
    (True, None), (None, None), ("1Xi", None), ("1.2.3", None), ("", None),
])
def test_quantities(value: Any, number: Decimal | None) -> None:
    assert parse_quantity(value) == number


def test_subset_rules() -> None:
    assert is_subset({"a": 1}, {"a": 1, "b": 2})
    assert not is_subset({"a": 1}, {"b": 1})
    assert not is_subset({"a": 1}, [("a", 1)])
    assert not is_subset({"a": 1}, {"a": 1.0})  # same value, another JSON type
    assert not is_subset({"a": True}, {"a": 1})
    assert is_subset([1, {"x": 1}], [1, {"x": 1, "y": 2}])
    assert not is_subset([1], [1, 2]) and not is_subset([1, 2], [1]) and not is_subset([1], "1")
    assert not is_subset([1, 2], [1, 3])
    # Under `resources` (at any depth) quantities compare by value; elsewhere they do not.
    assert is_subset({"resources": {"limits": {"memory": "1Gi"}}},
                     {"resources": {"limits": {"memory": "1024Mi"}}})
    assert is_subset({"resources": [{"cpu": "1000m"}]}, {"resources": [{"cpu": "1"}]})
    assert not is_subset({"resources": {"cpu": "1"}}, {"resources": {"cpu": "2"}})
    assert not is_subset({"resources": {"cpu": "lots"}}, {"resources": {"cpu": "lots!"}})
    assert not is_subset({"memory": "1Gi"}, {"memory": "1024Mi"})


def test_drift_patch_writes_only_what_drifted() -> None:
    desired = {"apiVersion": "v1", "kind": "Service", "status": {"x": 1},
               "metadata": {"name": "s", "labels": {"a": "1"}, "annotations": {"b": "2"}},
               "spec": {"port": 1}, "data": {"k": "v"}}
    live = {"apiVersion": "v2", "kind": "Other", "status": {"x": 2},
            "metadata": {"name": "s", "labels": {"a": "1", "c": "3"},
                         "annotations": {"b": "2"}},
            "spec": {"port": 1, "extra": True}, "data": {"k": "v"}}
    assert drift_patch(desired, live) is None
    live["metadata"]["labels"] = {"a": "0"}
    live["metadata"]["annotations"] = None
    live["data"] = {"k": "changed"}
    assert drift_patch(desired, live) == {
        "metadata": {"labels": {"a": "1"}, "annotations": {"b": "2"}}, "data": {"k": "v"}}
    assert drift_patch({"metadata": {"labels": {}}, "spec": {}}, {"spec": {}}) is None
    assert drift_patch({"spec": {"a": 1}}, {}) == {"spec": {"a": 1}}
    assert drift_patch({"metadata": {"labels": {"a": "1"}}}, {}) == {
        "metadata": {"labels": {"a": "1"}}}  # a live object without metadata at all


def test_narrowed_statefulset_patches() -> None:
    desired = {"spec": {"replicas": 2, "serviceName": "h", "selector": {"a": "1"},
                        "volumeClaimTemplates": [{"size": "1Gi"}],
                        "podManagementPolicy": "Parallel", "template": {"x": 1}}}
    live = {"spec": {"replicas": 1, "serviceName": "h", "selector": {"a": "1"},
                     "volumeClaimTemplates": [{"size": "1Gi", "default": True}],
                     "podManagementPolicy": "Parallel", "template": {"x": 1}}}
    patch = drift_patch(desired, live)
    assert narrow_spec_patch("StatefulSet", desired, live, patch) == (
        {"spec": {"replicas": 2}}, [])
    # Other kinds and patches without spec pass through untouched.
    assert narrow_spec_patch("Deployment", desired, live, patch) == (patch, [])
    assert narrow_spec_patch("StatefulSet", desired, live, None) == (None, [])
    assert narrow_spec_patch("StatefulSet", desired, live, {"metadata": {"a": 1}}) == (
        {"metadata": {"a": 1}}, [])
    moved = {"spec": {**desired["spec"], "serviceName": "g", "selector": {"a": "2"},
                      "podManagementPolicy": "OrderedReady",
                      "volumeClaimTemplates": [{"size": "2Gi"}]}}
    narrowed, immutable = narrow_spec_patch("StatefulSet", moved, live, drift_patch(moved, live))
    assert immutable == ["spec.serviceName", "spec.selector", "spec.volumeClaimTemplates",
                         "spec.podManagementPolicy"]
    assert narrowed is not None and set(narrowed["spec"]) == {
        "replicas", "serviceName", "selector", "volumeClaimTemplates", "podManagementPolicy"}
    # Only metadata drifted besides a spec already in sync: the spec key is dropped.
    synced = {"spec": dict(live["spec"])}
    assert narrow_spec_patch("StatefulSet", synced, live, {
        "spec": synced["spec"], "metadata": {"labels": {"a": "1"}}}) == (
        {"metadata": {"labels": {"a": "1"}}}, [])
    assert narrow_spec_patch("StatefulSet", synced, live, {"spec": synced["spec"]}) == (
        None, [])


# ------------------------------------------------------------------------- MCP aggregate

def test_mcp_aggregate_bundle_exactly() -> None:
    spec: dict[str, Any] = {"intent": "Grüße senden", "requires": {"name": {"type": "string"}},
            "provides": {"text": {"type": "string"}}, "effects": ["network"],
            "timeoutSeconds": 7, "mcp": {"name": "greet_tool"},
            "implementation": {"builtin": {"name": "echo"}}}
    # Pod settings stay with the capability's own pods: only the contract is forwarded.
    greet = parse_manifest({"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
                            "metadata": {"name": "greet", "namespace": "ns"},
                            "spec": {**spec, "concurrency": 3, "replicas": 2}})
    assert isinstance(greet, Capability)
    configmap = render.render_mcp_bundle([greet], "ns", OperatorSettings())
    text = configmap.pop("data")["bundle.yaml"]
    assert configmap == {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "packetflow-mcp-bundle", "namespace": "ns", "labels": {
            "app.kubernetes.io/name": "packetflow",
            "app.kubernetes.io/component": "mcp-aggregate",
            "app.kubernetes.io/part-of": "packetflow",
            "app.kubernetes.io/managed-by": "packetflow-operator"}}}
    assert "Grüße senden" in text  # written as is, not escaped
    assert text.startswith("apiVersion: packetflow.io/v1alpha1\nkind: Capability\n")
    assert yaml.safe_load(text) == {
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
        "metadata": {"name": "greet"},
        "spec": {**{k: v for k, v in spec.items() if k != "implementation"},
                 "implementation": {"composition": {"steps": [{"call": {
                     "capability": "greet", "address": "greet.ns.svc:50051"}}]}}}}
    # The fields keep the manifest's order (intent first), as a person would write them.
    assert text.index("intent:") < text.index("requires:") < text.index("implementation:")


def test_label_selectors_pick_the_runtime_pods() -> None:
    assert render.label_selector("echo") == (
        "app.kubernetes.io/name=packetflow,app.kubernetes.io/instance=echo,"
        "app.kubernetes.io/component=runtime")
    assert render.label_selector("chat", "Actor").endswith(
        "app.kubernetes.io/instance=chat,app.kubernetes.io/component=actor")


ACTOR_LABELS = {"app.kubernetes.io/name": "packetflow", "app.kubernetes.io/instance": "chat",
                "app.kubernetes.io/component": "actor", "app.kubernetes.io/part-of": "packetflow",
                "app.kubernetes.io/managed-by": "packetflow-operator",
                "packetflow.io/actor": "chat"}


def chat_actor() -> Actor:
    chat = parse_manifest({"apiVersion": "packetflow.io/v1alpha1", "kind": "Actor",
                           "metadata": {"name": "chat", "namespace": "ns"},
                           "spec": {"intent": "Talk",
                                    "implementation": {"python": {"module": "m", "class": "C"}},
                                    "store": {"postgresql": {"dsn": "host=db"}}}})
    assert isinstance(chat, Actor)
    return chat


def test_headless_service_metadata_names_the_actor() -> None:
    assert render.render_headless_service(chat_actor(), "ns", OperatorSettings())[
        "metadata"] == {"name": "chat-headless", "namespace": "ns", "labels": ACTOR_LABELS}


def test_statefulset_of_an_actor_with_a_shared_store_and_mcp() -> None:
    settings = OperatorSettings(mcp_enabled=True, mcp_port=8800)
    sts = render.render_statefulset(chat_actor(), "ns", settings)
    assert sts["metadata"] == {"name": "chat", "namespace": "ns", "labels": ACTOR_LABELS}
    assert sts["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    assert sts["spec"]["revisionHistoryLimit"] == 3
    pod = sts["spec"]["template"]["spec"]
    assert {"name": "state", "emptyDir": {}} in pod["volumes"]  # scratch: state is in the DB
    assert pod["containers"][0]["args"] == [
        "runtime", "--bundle", "/etc/packetflow/bundle.yaml", "--address", "0.0.0.0:50051",
        "--metrics-address", "0.0.0.0:9464", "--mcp-address", "0.0.0.0:8800"]
    # The pods roll when the pod template changes (another image), not only the bundle.
    hashes = {render.render_statefulset(chat_actor(), "ns", OperatorSettings(image=image))[
        "spec"]["template"]["metadata"]["annotations"]["packetflow.io/spec-hash"]
        for image in ("a:1", "a:2", "a:2")}
    assert len(hashes) == 2
