"""Contracts compiled to JSON Schema: defaults, violations with field paths, strictness."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from packetflow.contracts import CompiledContract, contract_schema
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


def test_schemas_are_exact() -> None:
    assert contract_schema(None) == {"type": "object"}
    contract = compile_fields(a={"type": "integer"}, b={"default": 1}, c={"optional": True})
    assert contract.schema == {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"default": 1}, "c": {}},
        "required": ["a"], "additionalProperties": False}
    assert contract.required == {"a"}


def test_nested_defaults_are_copied_deeply() -> None:
    contract = compile_fields(opts={"type": "object", "default": {"tags": []}})
    first, _ = contract.check({}, "input")
    first["opts"]["tags"].append("x")
    assert contract.check({}, "input")[0] == {"opts": {"tags": []}}


def test_violations_are_worded_exactly() -> None:
    contract = compile_fields(a={"type": "integer"}, flag={"const": False, "optional": True})
    cases: list[tuple[Any, list[tuple[str, str]]]] = [
        ({"x": 1}, [("input.a", "required field is missing"), ("input.x", "unknown field 'x'")]),
        ({"a": 1, "x": 2}, [("input.x", "unknown field 'x'")]),
        ({"a": 1, "y": 2, "x": 3}, [("input", "unknown fields 'x', 'y'")]),
        ({"a": 1, "flag": True}, [("input.flag", "False was expected")]),
    ]
    for value, expected in cases:
        assert [(e.field, e.description) for e in contract.check(value, "input")[1]] == \
            expected, value


@pytest.mark.parametrize(("value", "name"), [
    ([], "array"), ("s", "string"), (True, "boolean"), (1, "integer"), (1.5, "number"),
    (None, "null"), ((1,), "tuple")])
def test_non_objects_are_named_by_their_json_type(value: Any, name: str) -> None:
    _, errors = CompiledContract.compile(None).check(value, "output")
    assert [(e.field, e.description) for e in errors] == [
        ("output", f"must be a JSON object, got {name}")]


class _Unused:
    """Stands in for the jsonschema validator: a value on the fast path never reaches it."""

    def iter_errors(self, value: Any) -> Any:
        raise AssertionError(f"{value!r} went through jsonschema")


def without_validator(contract: CompiledContract) -> CompiledContract:
    return dataclasses.replace(contract, validator=_Unused())  # type: ignore[arg-type]


def test_valid_plain_values_never_reach_jsonschema() -> None:
    contract = without_validator(compile_fields(
        n={"type": "integer", "description": "a count", "default": 0}, flag={"type": "boolean"},
        x={"type": "number"}, any={}, opt={"type": "string", "optional": True}))
    assert contract.fast is not None  # type, description and default are all plain
    assert contract.check({"flag": True, "x": 1, "any": [1]}, "input") == (
        {"flag": True, "x": 1, "any": [1], "n": 0}, [])
    assert contract.check({"n": 2, "flag": False, "x": 2.5, "any": None, "opt": "s"},
                          "input")[1] == []
    assert without_validator(CompiledContract.compile(None)).check({"k": 1}, "input") == (
        {"k": 1}, [])


def test_the_fast_path_lets_no_invalid_value_through() -> None:
    contract = compile_fields(n={"type": "integer"}, flag={"type": "boolean", "optional": True})
    for bad in ({"flag": True}, {"n": 1, "zzz": 1}, {"n": "1"}, {"n": True}, {"n": 1, "flag": 1}):
        assert contract.check(bad, "input")[1], bad


def test_exactly_the_required_fields_take_the_fast_path() -> None:
    contract = without_validator(compile_fields(a={"type": "integer"}))
    assert contract.check({"a": 1}, "input") == ({"a": 1}, [])


def test_unknown_fields_of_a_nested_object_are_named_under_it() -> None:
    contract = compile_fields(user={"type": "object", "properties": {"name": {}},
                                    "additionalProperties": False})
    _, errors = contract.check({"user": {"x": 1, "y": 2}}, "input")
    assert [(e.field, e.description) for e in errors] == [
        ("input.user", "unknown fields 'x', 'y'")]
