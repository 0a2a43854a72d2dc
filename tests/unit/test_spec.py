"""Spec models and manifest loading: good manifests load, bad ones name file, line and path."""

from __future__ import annotations

from pathlib import Path

import pytest

from packetflow.manifests import load_paths, load_text
from packetflow.spec import Capability

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

HEADER = "apiVersion: packetflow.io/v1alpha1\nkind: Capability\nmetadata: {name: cap}\n"


def errors_of(spec_yaml: str) -> list[str]:
    return [f"{e.path}: {e.message}" for e in load_text(HEADER + spec_yaml, "m.yaml").errors]


def test_examples_are_valid() -> None:
    loaded = load_paths([EXAMPLES])
    assert loaded.errors == []
    assert len(loaded.capabilities) >= 3


def test_issue_manifest_loads_with_requiredness() -> None:
    loaded = load_text(HEADER + """spec:
  intent: "Add two integers"
  requires:
    a: {type: integer, description: "first"}
    b: {type: integer, default: 0}
    c: {type: string, optional: true}
  provides: {sum: {type: integer}}
  implementation:
    builtin: {name: transform, config: {expression: "{sum: sum([a, b])}"}}
  effects: [network, state-write]
  timeoutSeconds: 5
  concurrency: 64
""")
    assert loaded.errors == []
    spec = loaded.capabilities[0].spec
    assert spec.requires is not None
    assert [n for n, f in spec.requires.items() if f.required] == ["a"]
    assert spec.requires["c"].json_schema() == {"type": "string"}
    assert spec.implementation.kind == "builtin"
    assert spec.timeout_seconds == 5 and spec.effects == ["network", "state-write"]


def test_short_form_contract_is_untyped_and_required() -> None:
    cap = load_text(HEADER + "spec:\n  intent: x\n  requires: [query, context]\n"
                    "  implementation: {builtin: {name: echo}}\n").capabilities[0]
    assert cap.spec.requires is not None
    assert {n: f.required for n, f in cap.spec.requires.items()} == {"query": True,
                                                                     "context": True}


@pytest.mark.parametrize(("spec", "expected"), [
    ("spec:\n  intent: x\n  requires: {a: {type: integr}}\n  implementation: {builtin: "
     "{name: echo}}\n", "spec.requires.a.type: Input should be 'string'"),
    ("spec:\n  intent: x\n  implementation: {}\n",
     "spec.implementation: exactly one of python, builtin, composition, image, mcp, "
     "federated, planner is required"),
    ("spec:\n  intent: x\n  implementation: {builtin: {name: echo}, image: {image: a}}\n",
     "spec.implementation: exactly one of python, builtin, composition, image, mcp, "
     "federated, planner is required, got builtin, image"),
    ("spec:\n  intent: x\n  implementation: {builtin: {name: nope}}\n",
     "spec.implementation.builtin.name: Input should be 'echo'"),
    ("spec:\n  intent: x\n  implementation: {builtin: {name: echo}}\n  timeoutSeconds: 0\n",
     "spec.timeoutSeconds: Input should be greater than 0"),
    ("spec:\n  intent: x\n  implementation: {builtin: {name: echo}}\n  concurrency: 0\n",
     "spec.concurrency: Input should be greater than or equal to 1"),
    ("spec:\n  intent: x\n  implementation: {builtin: {name: echo}}\n  colour: red\n",
     "spec.colour: unknown field"),
    ("spec:\n  implementation: {builtin: {name: echo}}\n", "spec.intent: field required"),
    ("spec:\n  intent: x\n  requires: {a: {type: string, minLength: -1}}\n"
     "  implementation: {builtin: {name: echo}}\n",
     "spec.requires.a: not a valid JSON Schema at minLength"),
    ("spec:\n  intent: x\n  requires: {a-b: {}}\n  implementation: {builtin: {name: echo}}\n",
     "spec.requires: field name 'a-b' must be an identifier"),
    ("spec:\n  intent: x\n  requires: [a, a]\n  implementation: {builtin: {name: echo}}\n",
     "spec.requires: a short-form contract names a field twice"),
    ("spec:\n  intent: x\n  implementation: {python: {module: 'a..b', function: f}}\n",
     "spec.implementation.python.module: 'a..b' is not a dotted module path"),
    ("spec:\n  intent: x\n  implementation: {builtin: {name: transform, config: "
     "{expression: 'a['}}}\n",
     "spec.implementation.builtin: config.expression: invalid JMESPath expression"),
    ("spec:\n  intent: x\n  implementation: {builtin: {name: echo}}\n  effects: [Network]\n",
     "spec.effects[0]: String should match pattern"),
    ("spec:\n  intent: x\n  implementation: {builtin: {name: echo}}\n  replicas: -1\n",
     "spec.replicas: Input should be greater than or equal to 0"),
    ("spec:\n  intent: x\n  implementation: {builtin: {name: echo}}\n"
     "  resources: {limits: {cpu: lots}}\n", "spec.resources.limits.cpu: String should match"),
])
def test_invalid_spec_errors_name_the_path(spec: str, expected: str) -> None:
    errors = errors_of(spec)
    assert any(e.startswith(expected) for e in errors), errors


def test_errors_carry_file_and_line() -> None:
    text = HEADER + "spec:\n  intent: x\n  requires:\n    a: {type: integr}\n" \
        "  implementation: {builtin: {name: echo}}\n"
    (error,) = load_text(text, "caps/add.yaml").errors
    assert str(error).startswith("caps/add.yaml:7: spec.requires.a.type: ")


def test_envelope_errors() -> None:
    assert [str(e) for e in load_text("- a\n- b\n", "f.yaml").errors] == [
        "f.yaml:1: a manifest is a mapping"]
    (wrong_api,) = load_text("apiVersion: v1\nkind: Capability\n", "f.yaml").errors
    assert wrong_api.path == "apiVersion" and wrong_api.line == 1
    (wrong_kind,) = load_text("apiVersion: packetflow.io/v1alpha1\nkind: Pod\n", "f.yaml").errors
    assert wrong_kind.path == "kind" and "Capability" in wrong_kind.message
    (bad_yaml,) = load_text("a: [\n", "f.yaml").errors
    assert bad_yaml.message.startswith("invalid YAML") and bad_yaml.line == 2


def test_multi_document_keeps_valid_ones(tmp_path: Path) -> None:
    good = HEADER + "spec:\n  intent: x\n  implementation: {builtin: {name: echo}}\n"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "both.yaml").write_text(good + "---\n" + good.replace("cap}", "Cap}"))
    (tmp_path / "dup.yml").write_text(good)
    (tmp_path / "notes.txt").write_text("ignored")
    loaded = load_paths([tmp_path])
    assert [c.name for c in loaded.capabilities] == ["cap"]
    messages = [str(e) for e in loaded.errors]
    assert any("metadata.name" in m and "'Cap'" in m for m in messages)
    assert any("already declared in" in m for m in messages)


def test_status_and_unknown_top_level_fields_are_ignored() -> None:
    cap = Capability.model_validate({
        "apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
        "metadata": {"name": "c", "uid": "123", "resourceVersion": "1"},
        "spec": {"intent": "x", "implementation": {"builtin": {"name": "echo"}}},
        "status": {"conditions": []}})
    assert cap.name == "c"


def test_slo_scaling_and_canary_load() -> None:
    loaded = load_text(HEADER + """spec:
  intent: x
  implementation: {builtin: {name: echo}}
  slo: {latencyP99Ms: 50, availability: 99.9}
  scaling: {minReplicas: 2, maxReplicas: 20, targetConcurrency: 8, scaleDownDelay: 5m}
  canary: {weight: 10, promote: auto, implementation: {builtin: {name: template,
           config: {template: hi}}}}
""")
    assert loaded.errors == []
    spec = loaded.capabilities[0].spec
    assert spec.slo is not None and spec.slo.latency_p99_ms == 50
    assert spec.scaling is not None and spec.scaling.max_replicas == 20
    assert spec.canary is not None and spec.canary.weight == 10
    assert spec.canary.implementation is not None
    assert spec.canary.implementation.kind == "builtin"


@pytest.mark.parametrize(("spec", "expected"), [
    ("  scaling: {minReplicas: 5, maxReplicas: 2}\n",
     "spec.scaling: minReplicas must not exceed maxReplicas"),
    ("  canary: {weight: 101}\n", "spec.canary.weight: Input should be less than or equal"),
    ("  slo: {availability: 100}\n", "spec.slo.availability: Input should be less than 100"),
    ("  canary: {implementation: {}}\n", "spec.canary.implementation: exactly one"),
])
def test_bad_routing_fields_name_the_field(spec: str, expected: str) -> None:
    found = errors_of("spec:\n  intent: x\n  implementation: {builtin: {name: echo}}\n" + spec)
    assert any(error.startswith(expected) for error in found), found


def test_actor_scaling_beyond_one_needs_a_shared_store() -> None:
    header = "apiVersion: packetflow.io/v1alpha1\nkind: Actor\nmetadata: {name: a}\n"
    found = load_text(header + """spec:
  intent: x
  implementation: {python: {module: m}}
  scaling: {maxReplicas: 3}
""", "a.yaml").errors
    assert [e.path for e in found] == ["spec.scaling"]
    assert "shared store" in found[0].message
