"""NetworkPolicies of runtime workloads: rendered purely (checked against the real
Kubernetes schemas), then applied, restored and updated by the real operator on the emulator."""

from __future__ import annotations

from typing import Any

import httpx
import kubernetes_validate
import pytest

from packetflow.manifests import parse_manifest
from packetflow.operator import render
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import Actor, Capability
from tests.operator.api import NS, patch, post
from tests.operator.conftest import OperatorRunner, wait_for
from tests.operator.kube_emulator import ClusterEmulator

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
ON = OperatorSettings(network_policies=True)
POLICIES = "networking.k8s.io/v1/networkpolicies"
POLICIES_PATH = f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies"
ACCESS = {"allow": [{"serviceAccount": "team-b/reporter"}, {"namespace": "team-c"},
                    {"capability": "billing"}, {"capability": "ops/audit"}],
          "deny": [{"serviceAccount": "team-c/intruder"}]}


def capability(name: str = "pay", namespace: str = "team-a", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"intent": "Pay", "implementation": {"builtin": {"name": "echo"}}, **spec}}


def parsed(body: dict[str, Any]) -> Capability | Actor:
    resource = parse_manifest(body)
    assert isinstance(resource, Capability | Actor), resource
    return resource


def actor() -> Actor:
    resource = parse_manifest({
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Actor",
        "metadata": {"name": "cart", "namespace": "team-a"},
        "spec": {"intent": "A cart", "replicas": 1,
                 "access": {"allow": [{"namespace": "shop"}]},
                 "implementation": {"python": {"module": "examples.research",
                                               "class": "ResearchAssistant"}}}})
    assert isinstance(resource, Actor), resource
    return resource


def sources(policy: dict[str, Any], port: str) -> list[dict[str, Any]]:
    (rule,) = [r for r in policy["spec"]["ingress"]
               if {"protocol": "TCP", "port": port} in r["ports"]]
    return list(rule["from"])


def namespace_peer(namespace: str, pods: dict[str, Any] | None = None) -> dict[str, Any]:
    peer: dict[str, Any] = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": namespace}}}
    if pods is not None:
        peer["podSelector"] = pods
    return peer


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_network_policies_are_valid_kubernetes_objects(version: str) -> None:
    settings = OperatorSettings(network_policies=True, mcp_enabled=True,
                                gateway_namespace="pf-system",
                                prometheus_namespace_labels={"team": "monitoring"})
    for resource in (parsed(capability(access=ACCESS)), parsed(capability()), actor(),
                     parsed(capability(implementation={"image": {"image": "x:1",
                                                                 "port": 7000}}))):
        policy = render.render_network_policy(resource, "team-a", settings)
        kubernetes_validate.validate(policy, version, strict=True)


def test_grpc_is_open_to_packetflow_pods_the_gateway_and_whom_access_allows() -> None:
    policy = render.render_network_policy(
        parsed(capability(access=ACCESS)), "team-a",
        OperatorSettings(network_policies=True, gateway_namespace="pf-system"))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    callers = sources(policy, "grpc")
    packetflow_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of":
                                                       "packetflow"}}}
    assert callers[0] == packetflow_pods  # no namespaceSelector: this namespace's only
    assert callers[1] == namespace_peer("pf-system", {
        "matchLabels": {"app.kubernetes.io/part-of": "packetflow"},
        "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In",
                              "values": ["gateway", "mcp-aggregate"]}]})
    # A ServiceAccount's namespace (accounts are told apart by mTLS), a namespace, a
    # Capability's or Actor's pods here and in another namespace. Deny rules open nothing.
    assert callers[2:] == [
        namespace_peer("team-b"), namespace_peer("team-c"),
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "packetflow",
                                         "packetflow.io/capability": "billing"}}},
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "packetflow",
                                         "packetflow.io/actor": "billing"}}},
        namespace_peer("ops", {"matchLabels": {"app.kubernetes.io/name": "packetflow",
                                               "packetflow.io/capability": "audit"}}),
        namespace_peer("ops", {"matchLabels": {"app.kubernetes.io/name": "packetflow",
                                               "packetflow.io/actor": "audit"}})]


def test_without_access_only_packetflow_pods_of_the_namespace_may_call() -> None:
    # The gateway in the workload's own namespace is one of its PacketFlow pods.
    policy = render.render_network_policy(parsed(capability()), "team-a",
                                          OperatorSettings(gateway_namespace="team-a"))
    assert sources(policy, "grpc") == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "packetflow"}}}]


def test_the_cluster_default_policy_opens_grpc_to_every_namespace_without_allow_rules() -> None:
    settings = OperatorSettings(default_policy="cluster")
    opened = sources(render.render_network_policy(parsed(capability()), "team-a", settings),
                     "grpc")
    assert opened[-1] == {"namespaceSelector": {}}
    ruled = sources(render.render_network_policy(parsed(capability(access=ACCESS)), "team-a",
                                                 settings), "grpc")
    assert {"namespaceSelector": {}} not in ruled  # allow rules decide, not the default


def test_metrics_are_open_to_the_prometheus_selector_only() -> None:
    settings = OperatorSettings(prometheus_namespace_labels={"team": "monitoring"},
                                prometheus_pod_labels={"app": "prom"})
    policy = render.render_network_policy(parsed(capability()), "team-a", settings)
    assert sources(policy, "metrics") == [{
        "namespaceSelector": {"matchLabels": {"team": "monitoring"}},
        "podSelector": {"matchLabels": {"app": "prom"}}}]
    assert [port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]] \
        == ["grpc", "metrics"]


def test_mcp_is_guarded_like_grpc_and_a_foreign_image_gets_grpc_only() -> None:
    settings = OperatorSettings(mcp_enabled=True)
    policy = render.render_network_policy(parsed(capability()), "team-a", settings)
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": "grpc"},
                                                     {"protocol": "TCP", "port": "mcp"}]
    image = parsed(capability(implementation={"image": {"image": "x:1", "port": 7000}}))
    (only,) = render.render_network_policy(image, "team-a", settings)["spec"]["ingress"]
    assert only["ports"] == [{"protocol": "TCP", "port": "grpc"}]


def test_the_policy_selects_the_workloads_pods_and_its_canarys() -> None:
    cap = parsed(capability(canary={"image": "x:2", "weight": 10}))
    policy = render.render_network_policy(cap, "team-a", ON)
    selector = policy["spec"]["podSelector"]["matchLabels"]
    children = render.desired_children(cap, "team-a", ON)
    deployments = [c for c in children if c["kind"] == "Deployment"]
    assert [d["metadata"]["name"] for d in deployments] == ["pay-canary", "pay"]
    for deployment in deployments:
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    cart = actor()
    (statefulset,) = [c for c in render.desired_children(cart, "team-a", ON)
                      if c["kind"] == "StatefulSet"]
    actor_selector = render.render_network_policy(cart, "team-a", ON)["spec"]["podSelector"]
    assert actor_selector["matchLabels"].items() \
        <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()


def test_network_policies_are_rendered_first_and_only_when_on() -> None:
    cap = parsed(capability())
    assert [c["kind"] for c in render.desired_children(cap, "team-a", ON)] == [
        "NetworkPolicy", "ConfigMap", "Service", "Deployment"]
    assert "NetworkPolicy" not in [c["kind"] for c in render.desired_children(
        cap, "team-a", OperatorSettings())]


async def test_the_operator_applies_restores_and_updates_network_policies(
        cluster: ClusterEmulator, kube: httpx.AsyncClient) -> None:
    runner = OperatorRunner([NS], network_policies=True)
    await runner.start()
    try:
        created = await post(kube, f"/apis/packetflow.io/v1alpha1/namespaces/{NS}/"
                             "capabilities", capability("pay", NS, access=ACCESS))
        policy = await wait_for(lambda: cluster.live(POLICIES, NS, "pay"),
                                what="the NetworkPolicy")
        (owner,) = policy["metadata"]["ownerReferences"]
        assert owner["uid"] == created["metadata"]["uid"] and owner["controller"] is True
        assert namespace_peer("team-b") in sources(policy, "grpc")
        # Deleted by hand: put back (the operator watches its NetworkPolicies).
        assert (await kube.delete(f"{POLICIES_PATH}/pay")).status_code < 300
        back = await wait_for(lambda: cluster.live(POLICIES, NS, "pay"),
                              what="the NetworkPolicy to come back")
        assert back["metadata"]["uid"] != policy["metadata"]["uid"]
        # spec.access changed: the policy follows.
        await patch(kube, f"/apis/packetflow.io/v1alpha1/namespaces/{NS}/capabilities/pay",
                    {"spec": {"access": {"allow": [{"namespace": "team-z"}]}}})
        await wait_for(lambda: namespace_peer("team-z") in sources(
            cluster.live(POLICIES, NS, "pay") or {"spec": {"ingress": [
                {"ports": [{"protocol": "TCP", "port": "grpc"}], "from": []}]}}, "grpc"),
            timeout=30, what="the NetworkPolicy to follow spec.access")
        assert namespace_peer("team-b") not in sources(
            cluster.live(POLICIES, NS, "pay") or {}, "grpc")
    finally:
        await runner.stop()
