"""Render's children field by field where the broader render tests look at only some fields."""

from __future__ import annotations

from typing import Any

import yaml

from packetflow.manifests import load_text
from packetflow.operator import render
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import Capability
from tests.operator.test_actor_render import actor

NS = "team-a"


def capability(name: str = "greeter", **spec: Any) -> Capability:
    manifest = {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
                "metadata": {"name": name},
                "spec": {"intent": "Greet", "implementation": {"builtin": {"name": "echo"}},
                         **spec}}
    (parsed,) = load_text(yaml.safe_dump(manifest)).capabilities
    return parsed


def test_a_retired_canary_is_its_deployment_scaled_to_zero_in_the_namespace() -> None:
    (retired,) = render.retired_canary(capability(), NS, {"canary": {"weight": 10}})
    assert retired == {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "greeter-canary", "namespace": NS,
                     "labels": render.child_labels("greeter", "Capability", "greeter-canary")},
        "spec": {"replicas": 0}}


def test_identity_children_of_an_actor_carry_its_kind_and_namespace() -> None:
    research = actor()
    owned = render.child_labels("research", "Actor")
    account = render.render_service_account(research, NS)
    assert account["metadata"] == {"name": "packetflow-research", "namespace": NS,
                                   "labels": owned}
    certificate = render.render_certificate(research, NS, OperatorSettings(
        mtls_issuer="Issuer/ca", trust_domain="acme.internal"))
    assert certificate["metadata"] == {"name": render.identity_secret_name("research"),
                                       "namespace": NS, "labels": owned}
    policy = render.render_network_policy(research, NS, OperatorSettings())
    assert policy["metadata"] == {"name": "research", "namespace": NS, "labels": owned}


def test_access_to_a_capability_of_the_same_namespace_selects_its_pods_directly() -> None:
    # Written with the namespace or without, a peer at home is a podSelector, no
    # namespaceSelector (which would need the namespace's label).
    for named in (f"{NS}/billing", "billing"):
        policy = render.render_network_policy(
            capability(access={"allow": [{"capability": named}]}), NS, OperatorSettings())
        (ingress, *_) = policy["spec"]["ingress"]
        assert {"podSelector": {"matchLabels": {render.LABEL_NAME: "packetflow",
                                                render.OWNER_LABELS["Capability"]: "billing"}}
                } in ingress["from"]


def test_the_canary_serves_its_own_replicas_without_the_stables_scaling() -> None:
    # The routing controller scales the stable version only; the canary runs spec.canary's
    # fixed replicas, so its bundle carries no scaling (nor the canary section itself).
    greeter = capability(scaling={"minReplicas": 1, "maxReplicas": 3},
                         canary={"weight": 10, "replicas": 2,
                                 "implementation": {"builtin": {"name": "transform", "config": {
                                     "expression": "{message: 'v2'}"}}}})
    children = render.render_canary(greeter, NS, OperatorSettings())
    assert [(c["kind"], c["metadata"]["name"], c["metadata"]["namespace"]) for c in children] \
        == [("ConfigMap", "greeter-canary-bundle", NS), ("Service", "greeter-canary", NS),
            ("Deployment", "greeter-canary", NS)]
    configmap, _, deployment = children
    assert {c["metadata"]["name"]: c["metadata"]["labels"] for c in children} == {
        c["metadata"]["name"]: render.child_labels("greeter", "Capability", "greeter-canary")
        for c in children}
    (served,) = yaml.safe_load_all(configmap["data"][render.BUNDLE_KEY])
    assert set(served["spec"]) == {"intent", "implementation", "replicas"}
    assert served["spec"]["implementation"] == {"builtin": {"name": "transform", "config": {
        "expression": "{message: 'v2'}"}}}
    assert deployment["spec"]["replicas"] == 2


def test_a_planners_model_key_is_a_secret_source() -> None:
    key = {"secretKeyRef": {"name": "llm", "key": "key"}}
    planner = capability(implementation={"planner": {"model": {
        "provider": "openai", "model": "m", "apiKeyFrom": key}}})
    assert [s.model_dump(by_alias=True, exclude_none=True)
            for s in render.secret_sources(planner)] == [key]
    assert render.secret_sources(capability(implementation={"planner": {"model": {
        "provider": "openai", "model": "m"}}})) == []


def test_a_deployment_keeps_three_old_replica_sets_in_the_namespace() -> None:
    deployment = render.render_deployment(capability(), NS, OperatorSettings())
    assert deployment["spec"]["revisionHistoryLimit"] == 3
    assert (deployment["metadata"]["name"], deployment["metadata"]["namespace"]) == (
        "greeter", NS)


def test_every_child_is_in_the_namespace_and_zero_trust_adds_policy_account_and_certificate(
        ) -> None:
    settings = OperatorSettings(network_policies=True, mtls_issuer="Issuer/ca")
    canary = {"weight": 10, "replicas": 1, "implementation": {"builtin": {"name": "echo"}}}
    for resource in (capability(canary=canary), actor()):
        children = render.desired_children(resource, NS, settings)
        assert {c["metadata"]["namespace"] for c in children} == {NS}
        assert [c["kind"] for c in children[:3]] == [
            "NetworkPolicy", "ServiceAccount", "Certificate"]


def test_a_foreign_image_gets_the_pull_policy_the_bundle_path_and_tcp_ports() -> None:
    settings = OperatorSettings()
    foreign = capability(implementation={"image": {"image": "registry.example/x:1",
                                                   "port": 9000}})
    deployment = render.render_deployment(foreign, NS, settings)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["imagePullPolicy"] == settings.image_pull_policy
    assert container["env"] == [{"name": "PACKETFLOW_BUNDLE", "value": render.BUNDLE_PATH}]
    for resource in (foreign, capability()):
        (container,) = render.render_deployment(resource, NS, settings)[
            "spec"]["template"]["spec"]["containers"]
        assert [port["protocol"] for port in container["ports"]] == ["TCP"] * len(
            container["ports"])
        service = render.render_service(resource, NS, settings)
        assert service["spec"]["type"] == "ClusterIP"
        assert [port["protocol"] for port in service["spec"]["ports"]] == ["TCP"] * len(
            service["spec"]["ports"])


def test_the_bundle_reads_like_the_manifest() -> None:
    # Field order as written and non-ASCII text as is (kubectl describe shows it).
    text = render.render_bundle(capability(intent="Grüße"))
    assert text.index("intent: Grüße") < text.index("implementation:")


def test_runtime_pods_are_hardened_probed_and_mount_the_bundle_read_only() -> None:
    settings = OperatorSettings(mtls_issuer="Issuer/ca")
    template = render.render_deployment(capability(), NS, settings)["spec"]["template"]
    pod = template["spec"]
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["imagePullPolicy"] == settings.image_pull_policy
    assert container["volumeMounts"][:2] == [
        {"name": "bundle", "mountPath": render.BUNDLE_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"}]
    probe = container["readinessProbe"]
    assert (probe["periodSeconds"], probe["timeoutSeconds"], probe["failureThreshold"]) == (
        5, 2, 3)
    probe = container["livenessProbe"]
    assert (probe["initialDelaySeconds"], probe["periodSeconds"], probe["timeoutSeconds"],
            probe["failureThreshold"]) == (10, 10, 2, 3)
    env = {item["name"] for item in container["env"]}
    # Mutual TLS adds its variables to the runtime's own, not instead of them.
    assert {"PACKETFLOW_DEFAULT_POLICY", "PACKETFLOW_TLS_CERT"} <= env
    default = next(e for e in container["env"] if e["name"] == "PACKETFLOW_DEFAULT_POLICY")
    assert default["value"] == settings.default_policy


def test_the_bundle_is_the_manifests_spec_as_written_in_camel_case() -> None:
    # Only the fields the manifest sets, under their manifest (camelCase) names: the runtime and
    # `kubectl describe` read the same words as the author wrote.
    spec = {"intent": "Greet", "implementation": {"builtin": {"name": "echo"}},
            "timeoutSeconds": 5.0, "scaling": {"minReplicas": 2, "maxReplicas": 4}}
    (served,) = yaml.safe_load_all(render.render_bundle(capability(**spec)))
    assert served == {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
                      "metadata": {"name": "greeter"}, "spec": spec}


def test_the_spec_hash_is_sixteen_hex_digits_whatever_the_key_order() -> None:
    assert render.spec_hash({"a": 1, "b": [1, 2]}) == render.spec_hash({"b": [1, 2], "a": 1})
    assert render.spec_hash({"a": 1}) != render.spec_hash({"a": 2})
    digest = render.spec_hash({"a": 1})
    assert len(digest) == 16 and set(digest) <= set("0123456789abcdef")


def test_key_order_in_the_manifest_is_no_spec_change_for_the_pods() -> None:
    # The same contract written in another field order: the pods' hash stays, no rollout.
    def annotation(provides: dict[str, Any]) -> str:
        manifest = {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
                    "metadata": {"name": "greeter"},
                    "spec": {"intent": "Greet", "provides": provides,
                             "implementation": {"builtin": {"name": "echo"}}}}
        (greeter,) = load_text(yaml.safe_dump(manifest, sort_keys=False)).capabilities
        template = render.render_deployment(greeter, NS, OperatorSettings())["spec"][
            "template"]
        value: str = template["metadata"]["annotations"][render.SPEC_HASH_ANNOTATION]
        return value

    first = annotation({"greeting": {"type": "string"}, "words": {"type": "integer"}})
    assert annotation({"words": {"type": "integer"}, "greeting": {"type": "string"}}) == first
    assert annotation({"greeting": {"type": "string"}, "words": {"type": "number"}}) != first
    assert len(first) == 16


def test_labels_default_to_a_capabilitys() -> None:
    assert render.child_labels("greeter") == render.child_labels("greeter", "Capability") == {
        render.LABEL_NAME: "packetflow", render.LABEL_INSTANCE: "greeter",
        render.LABEL_COMPONENT: "runtime", render.LABEL_PART_OF: "packetflow",
        render.LABEL_MANAGED_BY: render.MANAGED_BY, render.LABEL_CAPABILITY: "greeter"}


def test_runtime_pods_learn_the_cluster_domain_only_when_it_is_not_the_default() -> None:
    def env(settings: OperatorSettings) -> list[dict[str, Any]]:
        (container,) = render.render_deployment(capability(), NS, settings)["spec"][
            "template"]["spec"]["containers"]
        return [item for item in container["env"] if "CLUSTER_DOMAIN" in item["name"]]

    # The default domain leaves the template (hence the pods) as they were.
    assert env(OperatorSettings()) == []
    assert env(OperatorSettings(cluster_domain="corp.example")) == [
        {"name": "PACKETFLOW_CLUSTER_DOMAIN", "value": "corp.example"}]
