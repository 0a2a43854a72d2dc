"""What the planner knows of a capability: its contract as typed fields, and its words.

Built from the same ``Capability`` models the engine serves (or from a remote runtime's
``DescribeCapability``), so a plan is made over exactly the contracts the checker enforces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from packetflow.planner.text import split_identifier, terms
from packetflow.spec import Capability, Contract, FieldSchema


@dataclass(frozen=True)
class FieldInfo:
    """One contract field as the search sees it."""

    name: str
    types: frozenset[str] | None  # None: untyped
    item_types: frozenset[str] | None
    description: str
    enum: tuple[Any, ...] | None
    format: str | None
    required: bool
    words: frozenset[str]  # terms of the name and description

    @classmethod
    def of(cls, name: str, schema: FieldSchema) -> FieldInfo:
        """From a contract field."""
        extra = schema.model_extra or {}
        items = extra.get("items")
        item_type = items.get("type") if isinstance(items, dict) else None
        description = schema.description or ""
        enum = extra.get("enum")
        return cls(name, _types(schema.type), _types(item_type), description,
                   tuple(enum) if isinstance(enum, list) else None,
                   extra.get("format") if isinstance(extra.get("format"), str) else None,
                   schema.required,
                   frozenset(terms(f"{split_identifier(name)} {description}")))


def _types(value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset([value] if isinstance(value, str) else value)


@dataclass(frozen=True)
class CapabilityInfo:
    """A capability the planner may use: contract fields, effects and descriptive terms."""

    name: str
    intent: str
    requires: tuple[FieldInfo, ...] | None  # None: any object (cannot be wired by type)
    provides: tuple[FieldInfo, ...] | None
    effects: tuple[str, ...]
    capability: Capability
    words: frozenset[str]
    head: frozenset[str]  # terms of the name and intent: they choose the capability
    document: str  # the text retrieval ranks (name and intent weigh double)

    @classmethod
    def of(cls, capability: Capability) -> CapabilityInfo:
        """From a served capability."""
        spec = capability.spec
        requires = _fields(spec.requires)
        provides = _fields(spec.provides)
        field_text = " ".join(
            f"{split_identifier(f.name)} {f.description} "
            + " ".join(str(v) for v in f.enum or ())
            for f in (*(requires or ()), *(provides or ())))
        head = f"{split_identifier(capability.name)} {spec.intent}"
        document = " ".join(terms(f"{head} {head} {field_text}"))
        return cls(capability.name, spec.intent, requires, provides, tuple(spec.effects),
                   capability, frozenset(document.split()), frozenset(terms(head)), document)


def _fields(contract: Contract | None) -> tuple[FieldInfo, ...] | None:
    if contract is None:
        return None
    return tuple(FieldInfo.of(name, schema) for name, schema in contract.items())


def catalog_of(capabilities: Iterable[Capability], allowed: Iterable[str] = (),
               exclude: Iterable[str] = (),
               info: Callable[[Capability], CapabilityInfo] = CapabilityInfo.of
               ) -> list[CapabilityInfo]:
    """The capabilities a plan may use: ``allowed`` (all when empty) less ``exclude``, less
    planners (a plan never calls a planner) and capabilities without declared contracts;
    ``info`` describes one (a caller may remember them)."""
    wanted = set(allowed)
    excluded = set(exclude)
    return [info(cap) for cap in capabilities
            if (not wanted or cap.name in wanted) and cap.name not in excluded
            and getattr(cap.spec.implementation, "planner", None) is None
            and cap.spec.requires is not None and cap.spec.provides is not None]
