"""Contract violations named exactly: the cases the broader contract tests leave open."""

from __future__ import annotations

from packetflow.contracts import CompiledContract
from packetflow.spec import FieldSchema


def compile_fields(**fields: dict[str, object]) -> CompiledContract:
    return CompiledContract.compile({n: FieldSchema.model_validate(f) for n, f in fields.items()})


def test_a_missing_nested_field_whose_name_holds_a_quote_is_named_whole() -> None:
    # repr("it's") is "it's" in double quotes: splitting the message on ' would name `s"...`.
    contract = compile_fields(doc={"type": "object", "required": ["it's", "plain"]})
    _, errors = contract.check({"doc": {}}, "input")
    assert [(e.field, e.description) for e in errors] == [
        ("input.doc.it's", "required field is missing"),
        ("input.doc.plain", "required field is missing")]


def test_unknown_fields_of_an_object_without_properties_are_named() -> None:
    # additionalProperties false with no `properties`: every key is unknown.
    contract = compile_fields(meta={"type": "object", "additionalProperties": False})
    _, errors = contract.check({"meta": {"x": 1}}, "input")
    assert [(e.field, e.description) for e in errors] == [
        ("input.meta.x", "unknown field 'x'")]
    _, errors = contract.check({"meta": {"y": 1, "x": 2}}, "output")
    assert [(e.field, e.description) for e in errors] == [
        ("output.meta", "unknown fields 'x', 'y'")]
