"""A Capability's canary: rendered as a second workload ``<name>-canary`` (pure renderers,
real Kubernetes schemas), run by the real operator against the emulator, shown in status."""

from __future__ import annotations

from typing import Any

import httpx
import kubernetes_validate
import yaml

from packetflow.manifests import load_text
from packetflow.operator import render
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import Capability
from tests.operator.api import NS, patch, post
from tests.operator.conftest import OperatorRunner, wait_for
from tests.operator.kube_emulator import CAPABILITIES, ClusterEmulator
from tests.operator.test_operator_emulated import (
    CAPS_PATH,
    DEPLOYMENTS,
    HASH,
    capability,
    children,
    kubelet_reports_ready,
)
from tests.unit.test_crds import crd_errors

SETTINGS = OperatorSettings()
CANARY = {"weight": 10, "replicas": 2, "image": "registry.example/greeter:2.0",
          "implementation": {"builtin": {"name": "transform",
                                         "config": {"expression": "{message: 'v2'}"}}},
          "resources": {"requests": {"cpu": "200m"}}}


def model(**spec: Any) -> Capability:
    (parsed,) = load_text(yaml.safe_dump(capability("greeter", **spec))).capabilities
    return parsed


def by_name(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def test_the_canary_renders_as_a_second_workload_of_the_same_capability() -> None:
    objects = render.desired_children(model(replicas=3, canary=CANARY), NS, SETTINGS)
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30.0", strict=True)
        assert obj["metadata"]["labels"][render.LABEL_CAPABILITY] == "greeter"  # the owner
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("ConfigMap", "greeter-bundle"), ("Service", "greeter"),
        ("ConfigMap", "greeter-canary-bundle"), ("Service", "greeter-canary"),
        ("Deployment", "greeter-canary"), ("Deployment", "greeter")]  # its own workload last
    named = by_name(objects)
    canary = named[("Deployment", "greeter-canary")]
    stable = named[("Deployment", "greeter")]
    pod = canary["spec"]["template"]
    (runtime,) = pod["spec"]["containers"]
    assert canary["spec"]["replicas"] == 2 and stable["spec"]["replicas"] == 3
    assert runtime["image"] == "registry.example/greeter:2.0"
    assert runtime["resources"] == {"requests": {"cpu": "200m"}}
    assert {"name": "bundle", "configMap": {"name": "greeter-canary-bundle"}} in \
        pod["spec"]["volumes"]
    # Each Service selects only its own version's pods.
    stable_selector = named[("Service", "greeter")]["spec"]["selector"]
    canary_selector = named[("Service", "greeter-canary")]["spec"]["selector"]
    assert canary_selector.items() <= pod["metadata"]["labels"].items()
    assert not stable_selector.items() <= pod["metadata"]["labels"].items()
    assert not canary_selector.items() <= stable["spec"]["template"]["metadata"]["labels"].items()
    # The canary serves the same capability name with its own implementation.
    (served,) = load_text(named[("ConfigMap", "greeter-canary-bundle")]["data"]
                          ["bundle.yaml"]).capabilities
    assert served.name == "greeter" and served.spec.implementation.kind == "builtin"
    assert served.spec.implementation.builtin is not None
    assert served.spec.implementation.builtin.name == "transform"
    assert served.spec.canary is None
    assert pod["metadata"]["labels"][render.LABEL_VERSION] == "canary"
    assert render.LABEL_VERSION not in stable["spec"]["template"]["metadata"]["labels"]
    stable_bundle = yaml.safe_load(named[("ConfigMap", "greeter-bundle")]["data"]["bundle.yaml"])
    assert "canary" not in stable_bundle["spec"] and "traffic" not in stable_bundle["spec"]


def test_weights_and_traffic_policy_never_restart_pods() -> None:
    def hashes(**spec: Any) -> dict[str, str]:
        return {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["annotations"][HASH]
                for o in render.desired_children(model(**spec), NS, SETTINGS)
                if o["kind"] == "Deployment"}
    base = hashes(canary=CANARY)
    assert hashes(canary={**CANARY, "weight": 90},
                  traffic={"hedging": {"enabled": False}}) == base
    changed = hashes(canary={**CANARY, "image": "registry.example/greeter:2.1"})
    assert changed["greeter"] == base["greeter"]
    assert changed["greeter-canary"] != base["greeter-canary"]
    assert set(hashes()) == {"greeter"}  # no canary, no second workload


def test_canary_status_comes_from_the_canary_deployment() -> None:
    with_canary, without = model(canary=CANARY), model()
    live = {"status": {"replicas": 2, "readyReplicas": 1}}
    assert render.canary_status(with_canary, live, None) == \
        {"canary": {"replicas": 2, "readyReplicas": 1, "weight": 10}}
    # Not seen yet: nothing runs.
    assert render.canary_status(with_canary, None, None) == \
        {"canary": {"replicas": 0, "readyReplicas": 0, "weight": 10}}
    # Once spec.canary is gone the status clears it, once.
    assert render.canary_status(without, live, {"canary": {"weight": 10}}) == {"canary": None}
    assert render.canary_status(without, live, {"canary": None}) == {}
    assert render.canary_status(without, live, None) == {}
    assert render.canary_status(None, live, None) == {}


def test_a_canary_gone_from_the_spec_is_scaled_down_once() -> None:
    assert render.retired_canary(model(canary=CANARY), NS, {"canary": {"weight": 10}}) == []
    assert render.retired_canary(model(), NS, None) == []
    (retired,) = render.retired_canary(model(), NS, {"canary": {"weight": 10}})
    assert (retired["kind"], retired["metadata"]["name"]) == ("Deployment", "greeter-canary")
    assert retired["spec"] == {"replicas": 0}
    assert retired["metadata"]["labels"][render.LABEL_CAPABILITY] == "greeter"


def test_the_crd_keeps_room_for_the_canary_suffix() -> None:
    long_name = "x" * 60
    resource = capability(long_name, canary={"weight": 5})
    resource["metadata"]["namespace"] = NS
    errors = crd_errors(resource)
    assert any("at most 56 characters" in message for _, message in errors), errors
    assert not crd_errors(capability(long_name))


async def test_the_operator_runs_the_canary_and_reports_it(
        cluster: ClusterEmulator, kube: httpx.AsyncClient,
        operator_runner: OperatorRunner) -> None:
    await post(kube, CAPS_PATH, capability("greeter", replicas=1, canary=CANARY))
    await children(cluster, "greeter")
    canary = await wait_for(lambda: cluster.live(DEPLOYMENTS, NS, "greeter-canary"),
                            what="the canary Deployment")
    assert canary["spec"]["replicas"] == 2
    assert cluster.live("v1/services", NS, "greeter-canary") is not None
    await kubelet_reports_ready(kube, cluster, "greeter-canary", 2)
    await kubelet_reports_ready(kube, cluster, "greeter", 1)

    def status() -> dict[str, Any]:
        return dict((cluster.live(CAPABILITIES, NS, "greeter") or {}).get("status") or {})

    await wait_for(lambda: status().get("canary") == {"replicas": 2, "readyReplicas": 2,
                                                      "weight": 10}, what="status.canary")
    # The stable workload's status stays the stable one's.
    await wait_for(lambda: status().get("readyReplicas") == 1, what="stable readyReplicas")
    before = cluster.live(DEPLOYMENTS, NS, "greeter")
    await patch(kube, f"{CAPS_PATH}/greeter", {"spec": {"canary": {"weight": 50}}})
    await wait_for(lambda: (status().get("canary") or {}).get("weight") == 50,
                   what="the new weight in status")
    after = cluster.live(DEPLOYMENTS, NS, "greeter")
    assert before is not None and after is not None
    assert after["spec"]["template"] == before["spec"]["template"]  # no rollout
    # Promoted or dropped (the routing controller removes spec.canary): the operator never
    # deletes, it scales the canary down and stops reporting it.
    await patch(kube, f"{CAPS_PATH}/greeter", {"spec": {"canary": None}})
    await wait_for(lambda: (cluster.live(DEPLOYMENTS, NS, "greeter-canary") or {})
                   .get("spec", {}).get("replicas") == 0, what="the canary scaled to 0")
    await wait_for(lambda: "canary" not in status(), what="status.canary cleared")
