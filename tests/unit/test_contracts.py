"""Contracts compiled to JSON Schema: defaults, violations with field paths, strictness."""

from __future__ import annotations

from packetflow.contracts import CompiledContract
from packetflow.spec import FieldSchema


def compile_fields(**fields: dict[str, object]) -> CompiledContract:
    return CompiledContract.compile({n: FieldSchema.model_validate(f) for n, f in fields.items()})


def test_defaults_are_filled_and_not_shared() -> None:
    contract = compile_fields(a={"type": "integer"}, tags={"type": "array", "default": []})
    first, errors = contract.check({"a": 1}, "input")
    assert errors == [] and first == {"a": 1, "tags": []}
    first["tags"].append("x")
    second, _ = contract.check({"a": 2}, "input")
    assert second["tags"] == []


def test_violations_name_nested_fields() -> None:
    contract = compile_fields(user={"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0}}})
    _, errors = contract.check({"user": {"age": -1}}, "input")
    assert [(e.field, e.description) for e in errors] == [
        ("input.user.age", "-1 is less than the minimum of 0")]


def test_formats_are_checked() -> None:
    contract = compile_fields(email={"type": "string", "format": "email"},
                              when={"type": "string", "format": "date-time"},
                              site={"type": "string", "format": "uri"})
    good = {"email": "ada@example.org", "when": "2026-11-25T18:00:00Z",
            "site": "https://example.org/x"}
    assert contract.check(good, "input")[1] == []
    _, errors = contract.check({"email": "not-an-email", "when": "yesterday",
                                "site": "not a uri"}, "input")
    assert sorted(e.field for e in errors) == ["input.email", "input.site", "input.when"]


def test_missing_and_unknown_fields() -> None:
    contract = compile_fields(a={}, b={"optional": True})
    _, errors = contract.check({"x": 1, "y": 2}, "output")
    assert sorted(e.field for e in errors) == ["output", "output.a"]
    assert "unknown fields 'x', 'y'" in {e.field: e.description for e in errors}["output"]


def test_absent_contract_accepts_any_object_only() -> None:
    contract = CompiledContract.compile(None)
    assert contract.check({"anything": [1]}, "input") == ({"anything": [1]}, [])
    _, errors = contract.check("text", "output")
    assert [(e.field, e.description) for e in errors] == [
        ("output", "must be a JSON object, got string")]


def test_plain_contracts_take_the_fast_path_with_the_same_verdicts() -> None:
    contract = compile_fields(n={"type": "integer"}, x={"type": "number"}, any={},
                              flag={"type": "boolean", "optional": True})
    assert contract.fast is not None
    assert contract.check({"n": 1, "x": 2.5, "any": [1]}, "input")[1] == []
    # bool is an int in Python but not a JSON integer; 1.0 is a JSON integer.
    assert [e.field for e in contract.check({"n": True, "x": 1, "any": 0}, "input")[1]] == [
        "input.n"]
    assert contract.check({"n": 1.0, "x": 1, "any": None}, "input")[1] == []
    assert [e.field for e in contract.check({"n": 1, "x": "1", "any": 0}, "input")[1]] == [
        "input.x"]
    assert compile_fields(s={"type": "string", "minLength": 2}).fast is None
