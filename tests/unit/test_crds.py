"""The CRDs: generated from the spec models, committed up to date, structural, and validating.

No API server runs here, so custom resources are checked against the CRD's openAPIV3Schema
with a JSON-Schema validator (plus the CEL rules, evaluated with cel-python when installed),
and the verdicts are compared with the pydantic models' own.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft4Validator
from pydantic import BaseModel, ValidationError

try:  # cel-python evaluates the CRD's CEL rules (x-kubernetes-validations) as the API server would
    import celpy
except ImportError:  # pragma: no cover - only where the test extra lacks it
    celpy = None

from packetflow.operator.crds import (
    crd_files,
    render_actor_crd,
    render_capability_crd,
    render_crds,
    structural_schema,
)
from packetflow.spec import Actor, Capability

ROOT = Path(__file__).resolve().parents[2]
CRD_DIRS = (ROOT / "crds", ROOT / "charts" / "packetflow" / "crds")
K8S_VERSION = "1.30"
REGENERATE = "run `python scripts/gen_crds.py` and commit crds/ and charts/packetflow/crds/"

# The only places where user data is free-form (and status, for kopf's own bookkeeping).
FREE_FORM_PATHS = {
    "spec.requires",
    "spec.provides",
    "spec.implementation.builtin.config",
    "spec.implementation.composition",
    "spec.canary.implementation.builtin.config",
    "spec.canary.implementation.composition",
    "status",
    # The routing controller's: a merge patch of the spec, and its own memory.
    "status.recommendations[].change",
    "status.routing.state",
}


def capability_schema() -> dict[str, Any]:
    schema: dict[str, Any] = render_capability_crd()["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"]
    return schema


# ---------------------------------------------------------------- generated and committed


@pytest.mark.parametrize("directory", CRD_DIRS, ids=lambda d: str(d.relative_to(ROOT)))
def test_committed_crds_match_the_models(directory: Path) -> None:
    expected = crd_files()
    committed = {p.name: p.read_text() for p in directory.glob("*.yaml")}
    assert sorted(committed) == sorted(expected), REGENERATE
    for name, text in expected.items():
        assert committed[name] == text, f"{directory.name}/{name} is stale: {REGENERATE}"


def test_gen_crds_check_mode_agrees() -> None:
    spec = importlib.util.spec_from_file_location("gen_crds", ROOT / "scripts" / "gen_crds.py")
    assert spec is not None and spec.loader is not None
    gen_crds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_crds)
    assert gen_crds.stale_files(crd_files()) == [], REGENERATE


def test_generation_is_deterministic() -> None:
    assert crd_files() == crd_files()
    for text in crd_files().values():
        assert yaml.safe_load(text) in render_crds()


# ---------------------------------------------------------------- shape of the CRD


@pytest.mark.parametrize("crd", render_crds(), ids=lambda c: c["metadata"]["name"])
def test_crd_is_valid_kubernetes(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def test_capability_names_and_subresources() -> None:
    crd = render_capability_crd()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "capabilities.packetflow.io"
    assert spec["group"] == "packetflow.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "Capability", "listKind": "CapabilityList", "plural": "capabilities",
        "singular": "capability", "shortNames": ["cap"], "categories": ["packetflow"],
    }
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {
        "status": {},
        "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                  "labelSelectorPath": ".status.selector"},
    }
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns)[:3] == ["Ready", "Replicas", "Intent"] and list(columns)[-1] == "Age"
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Replicas"] == {"name": "Replicas", "type": "integer",
                                   "jsonPath": ".status.replicas"}
    assert columns["Intent"]["jsonPath"] == ".spec.intent"
    assert columns["Age"] == {"name": "Age", "type": "date",
                              "jsonPath": ".metadata.creationTimestamp"}


def _walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")


def test_schema_is_structural() -> None:
    """Every node typed or explicitly free-form (only where allowed); no unions, no refs."""
    for path, node in _walk(capability_schema()):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "not", "$defs", "title"} & set(node), path
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert path in FREE_FORM_PATHS, f"{path} preserves unknown fields"
        else:
            assert node.get("type") in {"object", "array", "string", "integer", "number",
                                        "boolean"}, f"{path} has no type"
        if node.get("type") == "array":
            assert "items" in node, path
    preserved = {p for p, n in _walk(capability_schema())
                 if n.get("x-kubernetes-preserve-unknown-fields")}
    assert preserved == FREE_FORM_PATHS


def test_schema_carries_the_models_constraints() -> None:
    props = capability_schema()["properties"]["spec"]["properties"]
    assert set(capability_schema()["properties"]["spec"]["required"]) == {"intent",
                                                                          "implementation"}
    assert props["intent"]["minLength"] == 1
    assert props["replicas"] == {"description": props["replicas"]["description"],
                                 "type": "integer", "minimum": 0}
    assert (props["timeoutSeconds"]["minimum"], props["timeoutSeconds"]["exclusiveMinimum"],
            props["timeoutSeconds"]["maximum"]) == (0, True, 3600)
    assert props["concurrency"]["minimum"] == 1
    impl = props["implementation"]
    assert impl["properties"]["builtin"]["properties"]["name"]["enum"] == [
        "echo", "transform", "http", "template"]
    assert impl["x-kubernetes-validations"][0]["message"].startswith("exactly one of")
    assert "pattern" in impl["properties"]["python"]["properties"]["module"]
    status = capability_schema()["properties"]["status"]["properties"]
    assert set(status) >= {"conditions", "observedGeneration", "replicas", "readyReplicas",
                           "endpoint", "selector"}
    condition = status["conditions"]["items"]["properties"]
    assert set(condition) == {"type", "status", "reason", "message", "lastTransitionTime",
                              "observedGeneration"}


def test_cel_rules_compile() -> None:
    if celpy is None:
        pytest.skip("cel-python is not installed: CEL rules cannot be compiled")
    rules = [rule for _, node in _walk(capability_schema())
             for rule in node.get("x-kubernetes-validations", [])]
    assert rules, "the CRD declares no CEL rule"
    for rule in rules:
        celpy.Environment().compile(rule["rule"])
        assert rule["message"]


# ---------------------------------------------------------------- custom resources


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Reject unknown fields, as the API server does under kubectl's default strict validation."""
    out = copy.deepcopy(schema)
    for path, node in _walk(out):
        # metadata is ObjectMeta, validated by the API server itself beyond name restrictions.
        if path != "metadata" and ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
    return out


def _cel_errors(schema: dict[str, Any], data: Any, path: str) -> list[tuple[str, str]]:
    if celpy is None:
        return []
    errors: list[tuple[str, str]] = []
    for rule in schema.get("x-kubernetes-validations", []):
        env = celpy.Environment()
        program = env.program(env.compile(rule["rule"]))
        if not bool(program.evaluate({"self": celpy.json_to_cel(data)})):
            errors.append((path, rule["message"]))
    if isinstance(data, dict):
        for name, value in data.items():
            child = schema.get("properties", {}).get(name) or schema.get("additionalProperties")
            if isinstance(child, dict):
                errors += _cel_errors(child, value, f"{path}.{name}" if path else name)
    if isinstance(data, list) and "items" in schema:
        for index, value in enumerate(data):
            errors += _cel_errors(schema["items"], value, f"{path}[{index}]")
    return errors


def crd_errors(resource: dict[str, Any], *, cel: bool = True,
               schema: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(path, message) of everything the API server would reject in ``resource``."""
    schema = schema if schema is not None else capability_schema()
    validator = Draft4Validator(_strict(schema))
    errors = [
        (".".join(str(p) for p in error.absolute_path), error.message)
        for error in validator.iter_errors(resource)
    ]
    if cel and not errors:  # the API server runs CEL rules only on schema-valid objects
        errors += _cel_errors(schema, resource, "")
    return errors


def model_accepts(resource: dict[str, Any]) -> bool:
    try:
        Capability.model_validate(resource)
    except ValidationError:
        return False
    return True


def capability(name: str = "sample", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"intent": "Say it back",
                            "implementation": {"builtin": {"name": "echo"}}}
    return {"apiVersion": "packetflow.io/v1alpha1", "kind": "Capability",
            "metadata": {"name": name, "namespace": "default"}, "spec": {**base, **spec}}


GOOD = {
    "minimal-builtin": capability(),
    "python": capability(implementation={"python": {"module": "examples.text",
                                                    "function": "analyze"}}),
    "image": capability(implementation={"image": {"image": "ghcr.io/acme/ranker:1.2",
                                                  "port": 9000}}),
    "composition": capability(implementation={"composition": {"steps": [
        {"call": {"capability": "echo"}}]}}),
    "transform-config": capability(implementation={
        "builtin": {"name": "transform", "config": {"expression": "{sum: sum([a, b])}"}}}),
    "contracts": capability(
        requires={"user": {"type": "object", "properties": {"name": {"type": "string"}},
                           "required": ["name"]},
                  "top": {"type": "integer", "minimum": 1, "default": 3}},
        provides={"text": {"type": "string"}, "note": {"type": "string", "optional": True}},
    ),
    "short-form-contracts": capability(requires=["query", "context"], provides=["answer"]),
    "replicas-and-resources": capability(
        replicas=3, timeoutSeconds=2.5, concurrency=8, effects=["network", "writes-db"],
        resources={"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
    ),
    "autoscaled-zero": capability(replicas=0),
    "with-status": {**capability(), "status": {
        "observedGeneration": 2, "replicas": 1, "readyReplicas": 1,
        "endpoint": "sample.default.svc:50051", "selector": "app.kubernetes.io/instance=sample",
        "conditions": [{"type": "Ready", "status": "True", "reason": "DeploymentReady",
                        "message": "1/1 ready", "lastTransitionTime": "2025-01-01T00:00:00Z",
                        "observedGeneration": 2}],
        "kopf": {"progress": {}},  # kopf's bookkeeping survives (unknown fields preserved)
    }},
}


def _without(key: str) -> dict[str, Any]:
    resource = capability()
    del resource["spec"][key]
    return resource


# name -> (resource, path of the error, a word of its message)
BAD: dict[str, tuple[dict[str, Any], str, str]] = {
    "no-intent": (_without("intent"), "spec", "intent"),
    "no-implementation": (_without("implementation"), "spec", "implementation"),
    "empty-intent": (capability(intent=""), "spec.intent", "non-empty"),
    "two-implementations": (
        capability(implementation={"builtin": {"name": "echo"},
                                   "python": {"module": "m", "function": "f"}}),
        "spec.implementation", "exactly one"),
    "no-implementation-kind": (capability(implementation={}), "spec.implementation",
                               "exactly one"),
    "unknown-builtin": (capability(implementation={"builtin": {"name": "teleport"}}),
                        "spec.implementation.builtin.name", "teleport"),
    "builtin-without-name": (capability(implementation={"builtin": {"config": {}}}),
                             "spec.implementation.builtin", "name"),
    "python-bad-module": (
        capability(implementation={"python": {"module": "not a module", "function": "f"}}),
        "spec.implementation.python.module", "does not match"),
    "image-port-range": (capability(implementation={"image": {"image": "x", "port": 70000}}),
                         "spec.implementation.image.port", "70000"),
    "negative-replicas": (capability(replicas=-1), "spec.replicas", "-1"),
    "fractional-replicas": (capability(replicas=1.5), "spec.replicas", "integer"),
    "zero-timeout": (capability(timeoutSeconds=0), "spec.timeoutSeconds", "0"),
    "huge-timeout": (capability(timeoutSeconds=7200), "spec.timeoutSeconds", "7200"),
    "zero-concurrency": (capability(concurrency=0), "spec.concurrency", "0"),
    "bad-effect": (capability(effects=["Writes DB"]), "spec.effects.0", "does not match"),
    "bad-quantity": (capability(resources={"requests": {"cpu": "lots"}}),
                     "spec.resources.requests.cpu", "does not match"),
    "unknown-resources-key": (capability(resources={"minimum": {"cpu": "1"}}),
                              "spec.resources", "minimum"),
    "unknown-spec-field": (capability(replica=2), "spec", "replica"),
    "bad-name": (capability(name="Not_A_DNS_Label"), "metadata.name", "does not match"),
    "long-name": (capability(name="a" * 64), "metadata.name", "too long"),
}

# Bad for the API server only: the models never see status.
STATUS_BAD = {
    "condition-status": ({**capability(), "status": {"conditions": [
        {"type": "Ready", "status": "Maybe"}]}}, "status.conditions.0.status", "Maybe"),
    "condition-without-type": ({**capability(), "status": {"conditions": [
        {"status": "True"}]}}, "status.conditions.0", "type"),
    "negative-ready": ({**capability(), "status": {"readyReplicas": -1}},
                       "status.readyReplicas", "-1"),
}


def example_manifests() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(document, dict) and document.get("kind") == "Capability":
                found.append((f"{path.name}#{index}", document))
    return found


@pytest.mark.parametrize("resource", GOOD.values(), ids=list(GOOD))
def test_good_capabilities_pass_the_crd_and_the_models(resource: dict[str, Any]) -> None:
    assert crd_errors(resource) == []
    assert model_accepts({k: v for k, v in resource.items() if k != "status"})


@pytest.mark.parametrize(("resource", "path", "word"), BAD.values(), ids=list(BAD))
def test_bad_capabilities_fail_with_a_path(resource: dict[str, Any], path: str,
                                           word: str) -> None:
    if word == "exactly one" and celpy is None:
        pytest.skip("cel-python is not installed: CEL rules cannot be evaluated")
    errors = crd_errors(resource)
    assert errors, "the CRD accepted it"
    assert any(p == path and word in message for p, message in errors), errors
    assert not model_accepts(resource), "the models accept what the CRD rejects"


@pytest.mark.parametrize(("resource", "path", "word"), STATUS_BAD.values(), ids=list(STATUS_BAD))
def test_bad_status_fails_with_a_path(resource: dict[str, Any], path: str, word: str) -> None:
    errors = crd_errors(resource)
    assert any(p == path and word in message for p, message in errors), errors


def test_examples_pass_the_crd() -> None:
    examples = example_manifests()
    if not examples:
        pytest.skip("examples/ holds no Capability manifests yet")
    for where, document in examples:
        assert crd_errors(document) == [], where
        assert model_accepts(document), where


def test_left_to_the_models_is_documented() -> None:
    """What a structural schema cannot express passes the CRD; the models (operator) reject it."""
    for resource in (
        capability(implementation={"builtin": {"name": "transform", "config": {}}}),
        capability(requires={"a": {"type": "no-such-type"}}),
        capability(requires="not a contract"),
    ):
        assert crd_errors(resource) == []
        assert not model_accepts(resource)


def test_generator_refuses_what_is_not_structural() -> None:
    """A new union field in a model must get an explicit schema, never a silent guess."""

    class Union(BaseModel):
        value: int | str

    class Untyped(BaseModel):
        value: Any

    with pytest.raises(ValueError, match=r"^value: a union of 2 types"):
        structural_schema(Union)
    with pytest.raises(ValueError, match=r"^value: untyped"):
        structural_schema(Untyped)
    assert structural_schema(Union, replace={("value",): {"x-kubernetes-int-or-string": True}})[
        "properties"]["value"] == {"x-kubernetes-int-or-string": True}


# ---------------------------------------------------------------- the Actor CRD

ACTOR_FREE_FORM_PATHS = {"spec.requires", "spec.provides", "spec.initialState", "status",
                         "status.recommendations[].change", "status.routing.state"}


def actor_schema() -> dict[str, Any]:
    schema: dict[str, Any] = render_actor_crd()["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"]
    return schema


def actor(name: str = "research", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"intent": "Remember the conversation",
                            "implementation": {"python": {"module": "examples.research",
                                                          "class": "ResearchAssistant"}}}
    return {"apiVersion": "packetflow.io/v1alpha1", "kind": "Actor",
            "metadata": {"name": name, "namespace": "default"}, "spec": {**base, **spec}}


def actor_model_accepts(resource: dict[str, Any]) -> bool:
    try:
        Actor.model_validate(resource)
    except ValidationError:
        return False
    return True


PG_FROM_SECRET = {"postgresql": {"dsnFrom": {"secretKeyRef": {"name": "pg", "key": "dsn"}}}}
GOOD_ACTORS = {
    "minimal": actor(),
    "the-issue-example": actor(
        requires={"query": {"type": "string"}}, provides={"answer": {"type": "string"}},
        initialState={"research_history": [], "current_focus": None},
        store={"sqlite": {}}, memory={"retention": "30d", "maxMessages": 10000,
                                      "semanticSearch": True},
        idleTimeout="5m", schedules=[{"name": "cleanup_old_research", "every": "1h"}],
        replicas=1),
    "postgresql-replicas": actor(store=PG_FROM_SECRET, replicas=3, maxActive=500,
                                 timeoutSeconds=5),
    "dsn-inline": actor(store={"postgresql": {"dsn": "host=db dbname=actors"}}),
    "mcp-tools": actor(mcpTools=[
        {"name": "search", "url": "https://tools.example/mcp", "tool": "web_search",
         "headersFrom": {"Authorization": {"secretKeyRef": {"name": "t", "key": "token"}}}},
        {"name": "echo", "capability": "echo"}], mcp={"expose": True, "name": "research"}),
    "module-functions": actor(implementation={"python": {"module": "examples.support"}}),
}

BAD_ACTORS: dict[str, tuple[dict[str, Any], str, str]] = {
    "replicas-with-sqlite": (actor(replicas=2), "spec.replicas", "shared store"),
    "replicas-with-default-store": (actor(replicas=2, store={"sqlite": {"path": "/x.db"}}),
                                    "spec.replicas", "shared store"),
    "zero-replicas": (actor(replicas=0), "spec.replicas", "0"),
    "two-stores": (actor(store={"sqlite": {}, **PG_FROM_SECRET}), "spec.store",
                   "exactly one"),
    "dsn-twice": (actor(store={"postgresql": {"dsn": "x", "dsnFrom": {"env": "DSN"}}}),
                  "spec.store.postgresql", "exactly one"),
    "value-source-twice": (actor(store={"postgresql": {"dsnFrom": {
        "env": "DSN", "secretKeyRef": {"name": "a", "key": "b"}}}}),
        "spec.store.postgresql.dsnFrom", "exactly one"),
    "tool-both-ways": (actor(mcpTools=[{"name": "x", "capability": "c", "url": "http://h"}]),
                       "spec.mcpTools[0]", "exactly one"),
    "bad-duration": (actor(idleTimeout="soon"), "spec.idleTimeout", "does not match"),
    "bad-class": (actor(implementation={"python": {"module": "m", "class": "not a class"}}),
                  "spec.implementation.python.class", "does not match"),
    "no-implementation": (actor(implementation={}), "spec.implementation", "python"),
    "long-name": (actor(name="a" * 53), "metadata.name", "too long"),
}


def test_actor_crd_names_and_subresources() -> None:
    crd = render_actor_crd()
    assert crd["metadata"]["name"] == "actors.packetflow.io"
    assert crd["spec"]["names"]["kind"] == "Actor"
    assert crd["spec"]["names"]["shortNames"] == ["act"]
    (version,) = crd["spec"]["versions"]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    status = actor_schema()["properties"]["status"]["properties"]
    assert set(status) >= {"conditions", "observedGeneration", "replicas", "readyReplicas",
                           "members", "activeActors", "endpoint", "selector"}


def test_actor_schema_is_structural() -> None:
    preserved = set()
    for path, node in _walk(actor_schema()):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "not", "$defs", "title"} & set(node), path
        if node.get("x-kubernetes-preserve-unknown-fields"):
            preserved.add(path)
        else:
            assert node.get("type") in {"object", "array", "string", "integer", "number",
                                        "boolean"}, f"{path} has no type"
    assert preserved == ACTOR_FREE_FORM_PATHS


def test_actor_cel_rules_compile() -> None:
    if celpy is None:
        pytest.skip("cel-python is not installed: CEL rules cannot be compiled")
    rules = [rule for _, node in _walk(actor_schema())
             for rule in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 6
    for rule in rules:
        celpy.Environment().compile(rule["rule"])


@pytest.mark.parametrize("resource", GOOD_ACTORS.values(), ids=list(GOOD_ACTORS))
def test_good_actors_pass_the_crd_and_the_models(resource: dict[str, Any]) -> None:
    assert crd_errors(resource, schema=actor_schema()) == []
    assert actor_model_accepts(resource)


@pytest.mark.parametrize(("resource", "path", "word"), BAD_ACTORS.values(), ids=list(BAD_ACTORS))
def test_bad_actors_fail_with_a_path(resource: dict[str, Any], path: str, word: str) -> None:
    errors = crd_errors(resource, schema=actor_schema())
    if not errors and celpy is None:
        pytest.skip("cel-python is not installed: CEL rules cannot be evaluated")
    if path == "spec.replicas" and errors and errors[0][0] == "spec":
        # The rule sits on spec; its fieldPath (.replicas) is where the API server reports it.
        rule = actor_schema()["properties"]["spec"]["x-kubernetes-validations"][0]
        assert rule["fieldPath"] == ".replicas"
        errors = [("spec.replicas", message) for _, message in errors]
    assert any(p == path and word in message for p, message in errors), errors
    if path != "metadata.name":  # the operator, not the model, limits Actor name length
        assert not actor_model_accepts(resource), "the models accept what the CRD rejects"


def test_examples_actors_pass_the_crd() -> None:
    found = [(f"{path.name}#{index}", document)
             for path in sorted((ROOT / "examples").rglob("*.yaml"))
             for index, document in enumerate(yaml.safe_load_all(path.read_text()))
             if isinstance(document, dict) and document.get("kind") == "Actor"]
    if not found:
        pytest.skip("examples/ holds no Actor manifests yet")
    for where, document in found:
        assert crd_errors(document, schema=actor_schema()) == [], where
