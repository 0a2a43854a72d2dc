"""A plan becomes a Capability manifest in exactly the composition schema, and is checked.

Whoever made the plan (the built-in search, a language model, the cache), it goes through
:func:`checked_plan`: the manifest models and the same load-time composition checks the
engine runs (capabilities exist, required fields mapped, types compatible, no cycles,
expressions parse), against only the capabilities the plan may use. Nothing else is ever
offered or executed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from packetflow.actors.bm25 import tokenize
from packetflow.composition.check import CheckError, check_compositions
from packetflow.composition.model import COMPOSITION_PATH, CompositionSpec, iter_steps
from packetflow.planner.search import JSON_TYPES, CandidatePlan
from packetflow.planner.text import STOPWORDS
from packetflow.spec import API_VERSION, Capability
from packetflow.validation import format_path, validation_errors

INTENT_ANNOTATION = "packetflow.io/intent"
PLANNER_ANNOTATION = "packetflow.io/planner"
MAX_NAME = 63


@dataclass
class CheckedPlan:
    """A plan that passed every check: its manifest (plain data) and models."""

    manifest: dict[str, Any]
    capability: Capability
    composition: CompositionSpec
    planner: str
    calls: list[str]  # capabilities called, in manifest order
    effects: dict[str, list[str]]  # capability called -> the effects it declares
    explanation: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The manifest's name."""
        return self.capability.name


class PlanRejected(Exception):
    """A plan failed the checks; ``errors`` are (path, message) pairs naming manifest fields."""

    def __init__(self, errors: Sequence[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {message}" for path, message in errors))
        self.errors = list(errors)


def plan_name(intent: str, data_fields: Sequence[str]) -> str:
    """A DNS-label name from the intent's first words and a digest of intent and fields."""
    digest = hashlib.sha256(("\n".join([intent, *sorted(data_fields)])).encode()).hexdigest()
    words = "-".join(re.sub(r"[^a-z0-9]", "", w) for w in tokenize(intent)
                     if w not in STOPWORDS)
    words = re.sub(r"-+", "-", words).strip("-")[: MAX_NAME - len("plan--") - 8].strip("-")
    return f"plan-{words + '-' if words else ''}{digest[:8]}"


def input_contract(data: Mapping[str, Any]) -> dict[str, Any]:
    """A ``requires`` contract for the input the user gave: each field typed by its value."""
    return {name: {"type": JSON_TYPES.get(type(value), "object")} for name, value in data.items()
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)}


def composition_of(plan: CandidatePlan) -> dict[str, Any]:
    """The composition (manifest data) of a searched plan."""
    calls = [{"call": {"capability": step.capability.name,
                       "input": {b.field: b.source.expression for b in step.bindings}}}
             for step in plan.steps]
    if plan.form == "parallel":
        return {"steps": [{"name": "together", "parallel": {"branches": {
            step.label: call for step, call in zip(plan.steps, calls, strict=True)}}}]}
    return {"steps": calls}


def manifest_for(intent: str, data: Mapping[str, Any], composition: Mapping[str, Any],
                 provides: Mapping[str, Any] | None, effects: Sequence[str],
                 planner: str) -> dict[str, Any]:
    """The Capability manifest (plain data) a plan is: save it and ``kubectl apply`` it."""
    spec: dict[str, Any] = {"intent": intent, "requires": input_contract(data)}
    if provides is not None:
        spec["provides"] = dict(provides)
    spec["implementation"] = {"composition": dict(composition)}
    if effects:
        spec["effects"] = sorted(set(effects))
    return {"apiVersion": API_VERSION, "kind": "Capability",
            "metadata": {"name": plan_name(intent, list(data)),
                         "annotations": {INTENT_ANNOTATION: intent[:1000],
                                         PLANNER_ANNOTATION: planner}},
            "spec": spec}


def provides_of(plan: CandidatePlan) -> dict[str, Any] | None:
    """The plan's output contract: the last step's, or one object per parallel branch."""
    if plan.form == "parallel":
        return {step.label: {"type": "object"} for step in plan.steps}
    return provides_data(plan.steps[-1].capability.capability)


def provides_data(capability: Capability) -> dict[str, Any] | None:
    """A capability's ``provides`` as manifest data (what a plan ending in it provides)."""
    dumped: dict[str, Any] = capability.model_dump(mode="json", by_alias=True,
                                                   exclude_unset=True)["spec"]
    provides: dict[str, Any] | None = dumped.get("provides")
    return provides


def checked_plan(manifest: Mapping[str, Any], allowed: Mapping[str, Capability],
                 planner: str) -> CheckedPlan:
    """Validate a plan's manifest and composition against ``allowed``; raise PlanRejected
    naming every problem (what a model is told to repair)."""
    try:
        capability = Capability.model_validate(manifest)
    except ValidationError as exc:
        raise PlanRejected([(format_path(path), message)
                            for path, message in validation_errors(dict(manifest), exc)]
                           ) from None
    composition = capability.spec.implementation.composition
    if composition is None:
        raise PlanRejected([("spec.implementation", "a plan is a composition")])
    if capability.name in allowed:
        raise PlanRejected([("metadata.name", f"{capability.name!r} is already a capability")])
    found = check_compositions([capability, *allowed.values()]).get(capability.name, [])
    calls = called(composition)
    # The checker accepts remote calls (address); a plan may only use what it was given.
    found.extend(CheckError(path, f"a plan may only call the capabilities it was given; "
                                  f"{name!r} is not one of them")
                 for path, name in _remote_calls(composition))
    if found:
        raise PlanRejected([(e.path, e.message) for e in found])
    effects = {name: list(allowed[name].spec.effects) for name in calls
               if allowed[name].spec.effects}
    return CheckedPlan(dict(manifest), capability, composition, planner, calls, effects)


def called(composition: CompositionSpec) -> list[str]:
    """Every capability the composition calls (steps and reducers), first call first."""
    names: list[str] = []
    for _, step in iter_steps(composition.steps, COMPOSITION_PATH):
        if step.call is not None:
            names.append(step.call.capability)
        if step.map_reduce is not None and not isinstance(step.map_reduce.reduce, str):
            names.append(step.map_reduce.reduce.capability)
    return list(dict.fromkeys(names))


def _remote_calls(composition: CompositionSpec) -> list[tuple[str, str]]:
    found = []
    for path, step in iter_steps(composition.steps, f"{COMPOSITION_PATH}.steps"):
        if step.call is not None and step.call.address is not None:
            found.append((f"{path}.call.address", step.call.capability))
    return found


def effects_gate(plan: CheckedPlan, allow_effects: bool) -> str:
    """Why the plan may not run ("" when it may): effects need explicit permission."""
    if not plan.effects or allow_effects:
        return ""
    used = ", ".join(f"{name} ({', '.join(effects)})" for name, effects in plan.effects.items())
    return (f"the plan calls capabilities with effects: {used}; it runs only with "
            "--allow-effects (allowEffects: true)")
