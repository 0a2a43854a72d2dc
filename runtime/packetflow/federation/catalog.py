"""Catalogs: what one peer may see of our exports, and checking contracts across the border.

A catalog entry carries the export's contract in the manifest's form (field -> JSON-Schema
property plus ``optional``), so the importer compiles exactly the checks the exporter runs.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from packetflow.contracts import CompiledContract
from packetflow.spec import (
    Contract,
    FederationExport,
    FederationSpec,
    FieldSchema,
    Pricing,
    RateLimit,
    Sla,
)


@dataclass(frozen=True)
class LocalCapability:
    """What the exporter knows of one of its own capabilities (from its runtime)."""

    name: str
    intent: str
    requires: Contract | None
    provides: Contract | None
    timeout_seconds: float

    @functools.cached_property
    def checks(self) -> tuple[CompiledContract, CompiledContract]:
        """The contract compiled once: (requires, provides)."""
        return CompiledContract.compile(self.requires), CompiledContract.compile(self.provides)


@dataclass(frozen=True)
class CatalogEntry:
    """One export as a peer sees it: the capability's contract and the export's terms."""

    capability: str
    intent: str
    requires: Contract | None
    provides: Contract | None
    timeout_seconds: float
    sla: Sla | None = None
    pricing: Pricing | None = None
    rate_limit: RateLimit | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain data (the wire and the version hash)."""
        return {"capability": self.capability, "intent": self.intent,
                "requires": contract_json(self.requires),
                "provides": contract_json(self.provides),
                "timeoutSeconds": self.timeout_seconds,
                "sla": _dump(self.sla), "pricing": _dump(self.pricing),
                "rateLimit": _dump(self.rate_limit)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CatalogEntry:
        """From :meth:`to_json`; pydantic errors if a peer sent something malformed."""
        return cls(str(data["capability"]), str(data.get("intent", "")),
                   contract_from_json(data.get("requires")),
                   contract_from_json(data.get("provides")),
                   float(data.get("timeoutSeconds", 30.0)),
                   Sla.model_validate(data["sla"]) if data.get("sla") else None,
                   Pricing.model_validate(data["pricing"]) if data.get("pricing") else None,
                   RateLimit.model_validate(data["rateLimit"]) if data.get("rateLimit")
                   else None)


def _dump(model: Any) -> Any:
    return None if model is None else model.model_dump(mode="json", by_alias=True,
                                                       exclude_unset=True)


def contract_json(contract: Contract | None) -> dict[str, Any] | None:
    """A contract as plain data (its manifest form)."""
    if contract is None:
        return None
    return {name: schema.model_dump(mode="json", exclude_unset=True)
            for name, schema in contract.items()}


def contract_from_json(data: Any) -> Contract | None:
    """The inverse of :func:`contract_json`."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError("a contract is an object of field -> schema")
    return {str(name): FieldSchema.model_validate(schema) for name, schema in data.items()}


def contract_from_schema(schema: Mapping[str, Any]) -> Contract | None:
    """The contract a runtime's ``DescribeCapability`` schema stands for (the inverse of
    :func:`packetflow.contracts.contract_schema`): ``None`` for "any object"."""
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return None
    required = set(schema.get("required", ()))
    return {str(name): FieldSchema.model_validate(
                {**prop, **({} if name in required or "default" in prop
                            else {"optional": True})})
            for name, prop in properties.items()}


def exports_to(spec: FederationSpec, peer: str) -> list[FederationExport]:
    """The exports granted to ``peer`` (deny by default: nothing else)."""
    return [export for export in spec.exports if peer in export.to]


def catalog_for(spec: FederationSpec, peer: str,
                local: Mapping[str, LocalCapability]) -> list[CatalogEntry]:
    """What ``peer`` may see: exports granted to it whose capability is running here."""
    entries = []
    for export in exports_to(spec, peer):
        found = local.get(export.capability)
        if found is not None:
            entries.append(CatalogEntry(found.name, found.intent, found.requires,
                                        found.provides, found.timeout_seconds, export.sla,
                                        export.pricing, export.rate_limit))
    return entries


def catalog_version(entries: Iterable[CatalogEntry]) -> str:
    """A short hash of the entries: equal catalogs, equal versions."""
    blob = orjson.dumps([entry.to_json() for entry in entries], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------- compatibility

def _types(schema: FieldSchema) -> set[str] | None:
    kind = schema.type
    if kind is None:
        return None
    return {kind} if isinstance(kind, str) else set(kind)


def _fits(inner: FieldSchema, outer: FieldSchema) -> bool:
    """Whether every value of ``inner``'s type also has ``outer``'s type."""
    inner_types, outer_types = _types(inner), _types(outer)
    if outer_types is None:
        return True
    if inner_types is None:
        return False
    if "number" in outer_types:
        outer_types = outer_types | {"integer"}
    return inner_types <= outer_types


def _type_text(schema: FieldSchema) -> str:
    types = _types(schema)
    return "any type" if types is None else "/".join(sorted(types))


def _present(schema: FieldSchema) -> bool:
    return schema.required or "default" in schema.model_fields_set


def check_compatible(local_requires: Contract | None, local_provides: Contract | None,
                     remote_requires: Contract | None,
                     remote_provides: Contract | None) -> list[tuple[str, str]]:
    """(field path, problem) for each way the local contract and the remote one disagree:
    an input the local side accepts that the remote refuses, or an output the remote may
    return that the local side refuses. Types are compared; other keywords (enum, format...)
    are left to the checks every call runs. An unset contract on either side is not
    checkable here and passes."""
    problems: list[tuple[str, str]] = []
    if local_requires is not None and remote_requires is not None:
        for name, theirs in remote_requires.items():
            ours = local_requires.get(name)
            if theirs.required and (ours is None or not _present(ours)):
                problems.append((f"requires.{name}", "the peer requires this field; the "
                                 "local contract does not"))
        for name, ours in local_requires.items():
            theirs_found = remote_requires.get(name)
            if theirs_found is None:
                problems.append((f"requires.{name}", "the peer's contract has no such field"))
            elif not _fits(ours, theirs_found):
                problems.append((f"requires.{name}", f"local {_type_text(ours)}, the peer "
                                 f"expects {_type_text(theirs_found)}"))
    if local_provides is not None and remote_provides is not None:
        for name, ours in local_provides.items():
            theirs_found = remote_provides.get(name)
            if ours.required and (theirs_found is None or not _present(theirs_found)):
                problems.append((f"provides.{name}", "required locally; the peer does not "
                                 "always return it"))
        for name, theirs in remote_provides.items():
            ours_found = local_provides.get(name)
            if ours_found is None:
                problems.append((f"provides.{name}", "the peer returns it; the local contract "
                                 "does not declare it"))
            elif not _fits(theirs, ours_found):
                problems.append((f"provides.{name}", f"the peer returns "
                                 f"{_type_text(theirs)}, local {_type_text(ours_found)}"))
    return problems
