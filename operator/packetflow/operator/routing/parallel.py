"""Which pipeline steps of a composition could run in parallel, proven from the manifest.

Consecutive top-level ``call`` steps are independent when none reads another's output
(``steps.NAME`` or ``last``, explicitly or as an implicit input), each calls a capability of
this namespace that declares no effects, and their order cannot be observed. The proposal
rewrites them into one ``parallel`` step (branches named after the steps) and later
references ``steps.NAME`` into ``steps.GROUP.NAME``; the rewritten composition must pass the
same load-time checks (``packetflow.composition.check``) or nothing is proposed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jmespath

from packetflow.composition.check import check_composition
from packetflow.composition.model import CompositionSpec, Step
from packetflow.spec import Capability, CapabilitySpec


@dataclass(frozen=True)
class References:
    """What expressions read of the scope: named steps, any step at all, ``last``."""

    steps: frozenset[str] = frozenset()
    any_step: bool = False
    last: bool = False

    def __or__(self, other: References) -> References:
        return References(self.steps | other.steps, self.any_step or other.any_step,
                          self.last or other.last)


def references(expression: str) -> References:
    """The scope an expression reads; anything unclear counts as reading everything."""
    found = References()
    stack: list[Any] = [jmespath.compile(expression).parsed]
    while stack:
        node = stack.pop()
        children = node.get("children", [])
        if node["type"] == "subexpression" and len(children) >= 2 \
                and children[0]["type"] == "field" and children[0].get("value") == "steps" \
                and children[1]["type"] == "field":
            found |= References(steps=frozenset({children[1]["value"]}))
            stack.extend(children[2:])
            continue
        if node["type"] == "field" and node.get("value") == "steps":
            found |= References(any_step=True)
        if node["type"] == "field" and node.get("value") == "last":
            found |= References(last=True)
        stack.extend(child for child in children if isinstance(child, dict))
    return found


def step_references(step: Step) -> References:
    """Everything a step reads: its call's input mapping (none: ``last`` itself) and output."""
    found = References()
    expressions = [*(step.call.input or {}).values()] if step.call is not None else []
    if step.call is not None and step.call.input is None:
        found |= References(last=True)
    if step.output is not None:
        expressions.append(step.output)
    for expression in expressions:
        found |= references(expression)
    return found


@dataclass(frozen=True)
class Grouping:
    """A proposal: the top-level step indexes to join, and the composition it becomes."""

    indexes: tuple[int, ...]
    labels: tuple[str, ...]
    composition: CompositionSpec


def independent_groups(spec: CompositionSpec,
                       peers: Mapping[str, CapabilitySpec]) -> list[tuple[int, ...]]:
    """Runs of consecutive top-level steps that are provably independent (two or more)."""
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    for index, step in enumerate(spec.steps):
        if not _eligible(step, peers):
            _close(current, groups, spec)
            current = []
            continue
        reads = step_references(step)
        labels = {spec.steps[i].label for i in current}
        joins = bool(current) and not reads.any_step and not reads.last \
            and not (reads.steps & labels) and step.label not in labels
        if current and not joins:
            _close(current, groups, spec)
            current = []
        current.append(index)
    _close(current, groups, spec)
    return groups


def _eligible(step: Step, peers: Mapping[str, CapabilitySpec]) -> bool:
    """A local call of a capability with no declared effects (order cannot show)."""
    if step.call is None or step.call.address is not None:
        return False
    target = peers.get(step.call.capability)
    return target is not None and not target.effects


def _close(current: list[int], groups: list[tuple[int, ...]], spec: CompositionSpec) -> None:
    """Keep the run if what follows it does not read ``last`` (its shape would change)."""
    run = list(current)
    while len(run) >= 2:
        after = run[-1] + 1
        if after < len(spec.steps):
            reads_last = step_references(spec.steps[after]).last
        else:
            reads_last = spec.output is None or references(spec.output).last
        if not reads_last:
            groups.append(tuple(run))
            return
        run.pop()  # the last member's output is needed as ``last``: leave it out


def propose(capability: Capability, peers: Mapping[str, CapabilitySpec],
            capabilities: Iterable[Capability] = ()) -> Grouping | None:
    """The first group worth joining, with the composition rewritten; None if none is."""
    spec = capability.spec.implementation.composition
    if spec is None:
        return None
    for indexes in independent_groups(spec, peers):
        rewritten = _rewrite(spec, indexes)
        if rewritten is None:
            continue
        by_name = {c.name: c for c in capabilities}
        if not by_name:
            by_name = {name: _as_capability(name, peer) for name, peer in peers.items()}
        if check_composition(rewritten, by_name, requires=capability.spec.requires):
            continue  # the rewrite would not load: do not propose it
        return Grouping(indexes, tuple(spec.steps[i].label for i in indexes), rewritten)
    return None


def _as_capability(name: str, spec: CapabilitySpec) -> Capability:
    return Capability.model_validate({"apiVersion": "packetflow.io/v1alpha1",
                                      "kind": "Capability", "metadata": {"name": name},
                                      "spec": spec.model_dump(by_alias=True,
                                                              exclude_none=True)})


def _rewrite(spec: CompositionSpec, indexes: tuple[int, ...]) -> CompositionSpec | None:
    """Join the steps at ``indexes`` into one parallel step; point later readers at it."""
    steps = [step.model_dump(by_alias=True, exclude_none=True) for step in spec.steps]
    labels = [spec.steps[i].label for i in indexes]
    taken = {step.label for step in spec.steps}
    group = "parallel_" + "_".join(labels)
    if group in taken or len(group) > 63:
        group = f"parallel_{indexes[0]}"
        if group in taken:
            return None
    branches = {label: {k: v for k, v in steps[i].items() if k != "name"}
                for label, i in zip(labels, indexes, strict=True)}
    pattern = re.compile(r"\bsteps\.(" + "|".join(map(re.escape, labels)) + r")\b")

    def point(value: Any) -> Any:
        if isinstance(value, str):
            return pattern.sub(lambda m: f"steps.{group}.{m.group(1)}", value)
        if isinstance(value, dict):
            return {k: point(v) for k, v in value.items()}
        if isinstance(value, list):
            return [point(v) for v in value]
        return value

    joined = [*steps[:indexes[0]],
              {"name": group, "parallel": {"branches": branches, "join": "all"}},
              *(point(step) for step in steps[indexes[-1] + 1:])]
    data = spec.model_dump(by_alias=True, exclude_none=True)
    data["steps"] = joined
    if spec.output is not None:
        data["output"] = point(spec.output)
    try:
        rewritten = CompositionSpec.model_validate(data)
    except ValueError:
        return None
    # Every reader of a joined step must now read it through the group.
    for step in rewritten.steps[indexes[0] + 1:]:
        if step_references(step).steps & set(labels):
            return None
    return rewritten
