"""Render's children field by field where the broader render tests look at only some fields."""

from __future__ import annotations

from typing import Any

import yaml

from packetflow.manifests import load_text
from packetflow.operator import render
from packetflow.spec import Capability

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
