"""Status helpers exactly: the Warning Event the operator posts and the fields it owns."""

from __future__ import annotations

from packetflow.operator import status


def capability() -> dict[str, object]:
    return {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
            "metadata": {"name": "greeter", "namespace": "team-a", "uid": "u-1"}}


def test_a_warning_event_is_a_core_v1_event_about_the_object() -> None:
    event = status.warning_event(capability(), "InvalidSpec", "bad field",
                                 "2026-01-02T03:04:05Z")
    assert event == {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": "greeter.", "namespace": "team-a"},
        "involvedObject": {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
                           "name": "greeter", "namespace": "team-a", "uid": "u-1"},
        "type": "Warning", "reason": "InvalidSpec", "message": "bad field",
        "source": {"component": "packetflow-operator"},
        "reportingComponent": "packetflow-operator",
        "firstTimestamp": "2026-01-02T03:04:05Z", "lastTimestamp": "2026-01-02T03:04:05Z",
        "count": 1,
    }


def test_a_warning_events_message_is_cut_to_1024_characters() -> None:
    # Kubernetes caps an Event's note at 1 KiB; the rest is cut, not refused.
    fits = "x" * 1024
    assert status.warning_event(capability(), "R", fits, "t")["message"] == fits
    assert status.warning_event(capability(), "R", fits + "y", "t")["message"] == fits


def test_every_field_the_operator_writes_is_its_own_and_nothing_else() -> None:
    written = status.workload_status(
        status.Workload(1, 1, status.Condition(status.READY, True, "R", ""),
                        status.Condition(status.DEGRADED, False, "A", "")),
        endpoint="e:1", selector="s", previous=None, generation=1, now="t", members=["m-0"])
    # What the reconciler adds besides the workload status (see reconcile.py).
    written |= {"observedGeneration": 1, "activeActors": 0, "canary": {"weight": 5}}
    live = {**written, "kopf": {"progress": {}}, "forecast": {"rate": 1.0}}
    assert status.own_status(live) == written
    assert status.own_status(None) == {}


def test_a_workload_view_keeps_name_generation_replicas_and_status_only() -> None:
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": {"name": "greeter", "generation": 3, "uid": "u-2",
                               "labels": {"a": "b"}},
                  "spec": {"replicas": 2, "template": {"spec": {"containers": []}}},
                  "status": {"replicas": 2, "readyReplicas": 1, "observedGeneration": 3}}
    view = status.workload_view(deployment)
    assert view == {"metadata": {"name": "greeter", "generation": 3},
                    "spec": {"replicas": 2},
                    "status": {"replicas": 2, "readyReplicas": 1, "observedGeneration": 3}}
    view["status"]["replicas"] = 0  # a copy: the kept view never changes the live object
    assert deployment["status"]["replicas"] == 2
