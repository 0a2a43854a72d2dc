"""Load-time checks of compositions against the contracts of the capabilities they call.

Pure functions over models: no I/O, no engine. Each problem is a ``CheckError`` whose ``path``
names the manifest field (``spec.implementation.composition.steps[1].call.input.a``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jmespath

from packetflow.composition.model import (
    COMPOSITION_PATH,
    CompositionSpec,
    ReduceCall,
    Step,
    children,
    iter_steps,
)
from packetflow.spec import Capability, Contract, FieldSchema


class CheckError(NamedTuple):
    """One problem: the manifest path at fault and what is wrong."""

    path: str
    message: str


def composition_of(capability: Capability) -> CompositionSpec | None:
    """The capability's composition as a ``CompositionSpec``, or ``None`` if it is not one."""
    return capability.spec.implementation.composition


def check_compositions(capabilities: Iterable[Capability],
                       compositions: Mapping[str, CompositionSpec] | None = None, *,
                       undeclared_remote: bool = False) -> dict[str, list[CheckError]]:
    """Check every composition among ``capabilities``; capability name -> its errors.

    ``compositions`` overrides (or adds) composition specs by capability name; by default they
    are read from the capabilities themselves. With ``undeclared_remote`` a call to a
    capability not among them is a remote call (on Kubernetes: the Service of that name).
    """
    by_name = {cap.name: cap for cap in capabilities}
    specs = {name: spec for name, cap in by_name.items()
             if (spec := composition_of(cap)) is not None}
    specs.update(compositions or {})
    errors: dict[str, list[CheckError]] = {}
    for name, spec in specs.items():
        cap = by_name.get(name)
        found = check_composition(spec, by_name, requires=cap.spec.requires if cap else None,
                                  undeclared_remote=undeclared_remote)
        found.extend(_cycles_from(name, specs))
        if found:
            errors[name] = found
    return errors


def check_composition(spec: CompositionSpec, capabilities: Mapping[str, Capability], *,
                      requires: Contract | None = None, root: str = COMPOSITION_PATH,
                      undeclared_remote: bool = False) -> list[CheckError]:
    """Check one composition: targets exist, mappings fit contracts, references resolve.

    ``requires`` is the composition's own input contract (to type ``input.x`` references).
    """
    checker = _Checker(capabilities, undeclared_remote)
    scope = _Scope(input=requires, steps={}, last=_UNKNOWN)
    checker.pipeline(spec.steps, f"{root}.steps", scope)
    for index, trigger in enumerate(spec.triggers):
        if trigger.completed is not None and trigger.completed.capability not in capabilities:
            checker.error(f"{root}.triggers[{index}].completed.capability",
                          f"trigger waits for capability {trigger.completed.capability!r}, "
                          "which is not declared")
    return checker.errors


# ----------------------------------------------------------------------------- internals

class _Unknown:
    """Marks an output whose contract the checker cannot know (remote, mapped, nested)."""


_UNKNOWN = _Unknown()
Known = Contract | None | _Unknown  # None: any object (no contract declared)


@dataclass
class _Scope:
    input: Known
    steps: dict[str, Known]
    last: Known

    def child(self, last: Known | None = None) -> _Scope:
        return _Scope(self.input, dict(self.steps), self.last if last is None else last)


class _Checker:
    def __init__(self, capabilities: Mapping[str, Capability], undeclared_remote: bool) -> None:
        self.capabilities = capabilities
        self.undeclared_remote = undeclared_remote
        self.errors: list[CheckError] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(CheckError(path, message))

    def pipeline(self, steps: list[Step], path: str, scope: _Scope) -> Known:
        for index, step in enumerate(steps):
            scope.last = self.step(step, f"{path}[{index}]", scope)
            scope.steps[step.label] = scope.last
        return scope.last

    def step(self, step: Step, path: str, scope: _Scope) -> Known:
        """Check ``step``; return what is known about its output."""
        if step.call is not None:
            known = self.call(step, path, scope)
        elif step.pipeline is not None:
            self.pipeline(step.pipeline, f"{path}.pipeline", scope.child())
            known = _UNKNOWN
        elif step.map_reduce is not None:
            mr = step.map_reduce
            self.expression_refs(mr.over, f"{path}.mapReduce.over", scope)
            self.step(mr.map, f"{path}.mapReduce.map", scope.child(_UNKNOWN))
            if isinstance(mr.reduce, ReduceCall) and mr.reduce.address is None:
                self.reducer(mr.reduce.capability, f"{path}.mapReduce.reduce.capability")
            known = _UNKNOWN
        else:
            if step.conditional is not None:
                for index, when in enumerate(step.conditional.when):
                    self.expression_refs(when.if_, f"{path}.conditional.when[{index}].if", scope)
            for child_path, child in children(step, path):
                self.step(child, child_path, scope.child())
            known = _UNKNOWN
        if step.output is not None:
            self.expression_refs(step.output, f"{path}.output", scope)
            return _UNKNOWN
        return known

    def call(self, step: Step, path: str, scope: _Scope) -> Known:
        assert step.call is not None
        call = step.call
        if call.address is not None or (self.undeclared_remote
                                        and call.capability not in self.capabilities):
            for name, expression in (call.input or {}).items():
                self.expression_refs(expression, f"{path}.call.input.{name}", scope)
            return _UNKNOWN  # a remote contract is not known at load time
        target = self.capabilities.get(call.capability)
        if target is None:
            self.error(f"{path}.call.capability", f"step {step.label!r} calls capability "
                       f"{call.capability!r}, which is not declared (set address for a "
                       "remote one)")
            return _UNKNOWN
        requires = target.spec.requires
        if call.input is not None:
            self.mapping(step, call.input, requires, path, scope)
        return target.spec.provides

    def mapping(self, step: Step, mapping: dict[str, str], requires: Contract | None,
                path: str, scope: _Scope) -> None:
        assert step.call is not None  # only calls map an input
        target = step.call.capability
        for name, expression in mapping.items():
            where = f"{path}.call.input.{name}"
            source = self.expression_refs(expression, where, scope)
            if requires is None:
                continue
            wanted = requires.get(name)
            if wanted is None:
                self.error(where, f"step {step.label!r}: {target!r} requires no field {name!r} "
                           f"(it requires {', '.join(sorted(requires)) or 'no fields'})")
                continue
            if isinstance(source, FieldSchema) and not _compatible(source, wanted):
                self.error(where, f"step {step.label!r}: {expression!r} is "
                           f"{_types(source)} but {target!r} requires {name!r} as "
                           f"{_types(wanted)}")
        for name, schema in (requires or {}).items():
            if schema.required and name not in mapping:
                self.error(f"{path}.call.input.{name}",
                           f"step {step.label!r}: required field {name!r} of {target!r} is "
                           "not mapped")

    def reducer(self, name: str, path: str) -> None:
        target = self.capabilities.get(name)
        if target is None and self.undeclared_remote:
            return  # remote: its contract is not known here
        if target is None:
            self.error(path, f"reducer capability {name!r} is not declared")
        elif target.spec.requires is not None and "items" not in target.spec.requires:
            self.error(path, f"reducer capability {name!r} must require an 'items' field")

    def expression_refs(self, expression: str, path: str,
                        scope: _Scope) -> FieldSchema | None:
        """Check a direct reference (``steps.x.f``); return the field it reads, when known."""
        parts = _field_path(jmespath.compile(expression).parsed)
        if not parts:
            return None
        head, *rest = parts
        if head == "steps" and rest:
            if rest[0] not in scope.steps:
                self.error(path, f"{expression!r} refers to step {rest[0]!r}, which does not "
                           "run before this point")
                return None
            return _field_of(scope.steps[rest[0]], rest[1:], expression, path, self)
        if head == "input":
            return _field_of(scope.input, rest, expression, path, self)
        if head == "last":
            return _field_of(scope.last, rest, expression, path, self)
        return None


def _field_of(known: Known, rest: list[str], expression: str, path: str,
              checker: _Checker) -> FieldSchema | None:
    if len(rest) != 1 or not isinstance(known, dict):
        return None  # unknown contract, a whole object, or a nested path: not checked
    found = known.get(rest[0])
    if found is None:
        checker.error(path, f"{expression!r}: no field {rest[0]!r} there (it provides "
                      f"{', '.join(sorted(known)) or 'no fields'})")
    return found


def _field_path(node: Any) -> list[str]:
    """``steps.a.b`` -> ``['steps', 'a', 'b']``; anything but a plain field path -> ``[]``."""
    if node["type"] == "field":
        return [str(node["value"])]
    if node["type"] == "subexpression":
        parts: list[str] = []
        for child in node["children"]:
            sub = _field_path(child)
            if not sub:
                return []
            parts.extend(sub)
        return parts
    return []


def _type_set(schema: FieldSchema) -> set[str] | None:
    if schema.type is None:
        return None
    return {schema.type} if isinstance(schema.type, str) else set(schema.type)


def _compatible(source: FieldSchema, wanted: FieldSchema) -> bool:
    """Whether every value of ``source``'s type can be a value of ``wanted``'s type."""
    have, want = _type_set(source), _type_set(wanted)
    if have is None or want is None:
        return True  # untyped: anything goes
    if "number" in want:
        want = want | {"integer"}
    if source.optional or "default" in source.model_fields_set:
        # An absent output field maps to null, which the executor leaves out.
        have = have - {"null"}
    return have <= want


def _types(schema: FieldSchema) -> str:
    # Asked only of typed fields: an untyped one is compatible with anything.
    return " or ".join(sorted(_type_set(schema) or ()))


def _cycles_from(name: str, specs: Mapping[str, CompositionSpec]) -> list[CheckError]:
    """Cycles through ``name``: a call path that leads back to it, reported at the first call."""
    errors: list[CheckError] = []
    for path, callee in _local_calls(specs[name]):
        trail = _path_back(callee, name, specs, [name, callee], set())
        if trail is not None:
            errors.append(CheckError(path, "cycle: " + " -> ".join(trail)))
    return errors


def _path_back(current: str, goal: str, specs: Mapping[str, CompositionSpec],
               trail: list[str], seen: set[str]) -> list[str] | None:
    if current == goal:
        return trail
    if current in seen or current not in specs:
        return None
    seen.add(current)
    for _, callee in _local_calls(specs[current]):
        found = _path_back(callee, goal, specs, [*trail, callee], seen)
        if found is not None:
            return found
    return None


def _local_calls(spec: CompositionSpec) -> list[tuple[str, str]]:
    """(path, capability) of every local call and reducer in a composition."""
    calls: list[tuple[str, str]] = []
    for path, step in iter_steps(spec.steps, f"{COMPOSITION_PATH}.steps"):
        if step.call is not None and step.call.address is None:
            calls.append((f"{path}.call.capability", step.call.capability))
        if (step.map_reduce is not None and isinstance(step.map_reduce.reduce, ReduceCall)
                and step.map_reduce.reduce.address is None):
            calls.append((f"{path}.mapReduce.reduce.capability",
                          step.map_reduce.reduce.capability))
    return calls
