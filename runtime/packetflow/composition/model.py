"""The composition manifest: a graph of steps over other capabilities, as pydantic models.

Shape (``spec.implementation.composition``)::

    steps:                       # an implicit pipeline, run in order
      - name: fetch              # optional; defaults to the capability (``-`` -> ``_``) or kind
        call: {capability: http-get, input: {url: input.url}}
        retry: {maxAttempts: 3, backoffSeconds: 0.1}
      - parallel:
          branches: {a: {call: {capability: x}}, b: {pipeline: [...]}}
          join: all              # all | any | {first: N}
          timeoutSeconds: 2      # per branch
          optional: [b]          # with join all: b may fail, its output is then left out
      - conditional:
          when: [{if: "steps.fetch.status == `200`", then: {call: {capability: ok}}}]
          else: {call: {capability: fallback}}
      - mapReduce:
          over: input.urls       # an expression yielding a list
          item: url              # the item's name in the scope (default ``item``)
          map: {call: {capability: fetch, input: {url: url}}}
          concurrency: 8
          reduce: collect        # collect | sum | merge | count | {capability: NAME}
    output: "{title: steps.fetch.title}"   # optional; else the last step's output
    triggers:                    # optional: also run on events, the event as input
      - {schedule: "*/5 * * * *"}                       # cron (UTC), 6 fields: seconds first
      - {completed: {capability: fetch, outcome: failure}, idempotencyKey: input.url}

Every expression is JMESPath, evaluated over a *scope* object:

- ``input``: the composition's input;
- ``steps``: outputs of the steps that already ran, by name (a nested pipeline, branch or map
  item sees the outer steps plus its own; its own names do not leak out);
- ``last``: the output of the previous step (the input, for the first step);
- in a map, the item under its ``item`` name;
- in a step's ``output`` expression, ``result``: that step's raw output.

A ``call`` without ``input`` sends ``last`` (in a map: the item). With ``input``, each field is
an expression; a field whose expression yields ``null`` is left out, so defaults apply.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from packetflow.composition.cron import Cron
from packetflow.validation import checked_jmespath, format_path, validation_errors

COMPOSITION_PATH = "spec.implementation.composition"

# Identifiers, so that ``steps.NAME`` and item names need no quoting in JMESPath.
_IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"
_IDENTIFIER_RE = re.compile(_IDENTIFIER)
# Names the scope already uses; an item variable must not shadow them.
RESERVED_SCOPE_NAMES = frozenset({"input", "steps", "last", "result"})


Expression = Annotated[str, Field(min_length=1), AfterValidator(checked_jmespath)]
"""A JMESPath expression, checked to parse when the manifest loads."""

StepName = Annotated[str, Field(pattern=_IDENTIFIER)]


class CompositionModel(BaseModel):
    """Base of composition models: unknown keys are errors, camelCase keys on the wire."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Retry(CompositionModel):
    """Retry a step on retryable codes with exponential backoff, never past the deadline."""

    max_attempts: int = Field(default=3, ge=1, le=100, alias="maxAttempts")
    backoff_seconds: float = Field(default=0.1, ge=0, le=3600, alias="backoffSeconds",
                                   description="Delay before the second attempt")
    max_backoff_seconds: float = Field(default=10.0, ge=0, le=3600, alias="maxBackoffSeconds")
    jitter: float = Field(default=0.2, ge=0, le=1,
                          description="Fraction of each delay that is randomised away")


# host:port, or a Kubernetes Service (name, name.namespace or its DNS name) whose gRPC port
# is looked up (see composition.resolve).
ADDRESS_PATTERN = r"^[^\s:]+(:[0-9]{1,5})?$"


class Call(CompositionModel):
    """Call one capability, in this runtime or at a remote ``address`` (``host:port`` or a
    Kubernetes Service name)."""

    capability: str = Field(min_length=1)
    address: str | None = Field(
        default=None, pattern=ADDRESS_PATTERN,
        description="host:port or Service name of a remote runtime; unset: local")
    input: dict[str, Expression] | None = Field(
        default=None, description="Input field -> expression over the scope; unset: last output")


class FirstN(CompositionModel):
    """Join a parallel step when ``first`` branches have succeeded."""

    first: int = Field(ge=1)


def _name_or_object(value: Any) -> str | None:
    # Tags contain "[" so that validation.error_path leaves them out of error paths.
    if isinstance(value, str):
        return "by[name]"
    return "by[object]" if isinstance(value, dict | BaseModel) else None


Join = Annotated[
    Annotated[Literal["all", "any"], Tag("by[name]")] | Annotated[FirstN, Tag("by[object]")],
    Discriminator(_name_or_object, custom_error_type="join",
                  custom_error_message="must be all, any or {first: N}"),
]


class Parallel(CompositionModel):
    """Run branches at once and join them; the output maps branch name -> branch output."""

    branches: dict[str, Step] = Field(min_length=1)
    join: Join = "all"
    timeout_seconds: float | None = Field(default=None, gt=0, le=3600, alias="timeoutSeconds",
                                          description="Per-branch time limit")
    optional: list[str] = Field(default_factory=list,
                                description="Branches whose failure does not fail the join")

    @model_validator(mode="after")
    def _names(self) -> Parallel:
        bad = [name for name in self.branches if not _IDENTIFIER_RE.match(name)]
        if bad:
            raise ValueError(f"branch name {bad[0]!r} must be an identifier")
        unknown = [name for name in self.optional if name not in self.branches]
        if unknown:
            raise ValueError(f"optional names unknown branch {unknown[0]!r}")
        if isinstance(self.join, FirstN) and self.join.first > len(self.branches):
            raise ValueError(f"join first: {self.join.first} but there are only "
                             f"{len(self.branches)} branches")
        return self


class When(CompositionModel):
    """One guarded branch of a conditional."""

    if_: Expression = Field(alias="if")
    then: Step


class Conditional(CompositionModel):
    """Run the first branch whose ``if`` is truthy, else ``else`` (else: output ``{}``)."""

    when: list[When] = Field(min_length=1)
    else_: Step | None = Field(default=None, alias="else")


BuiltinReducer = Literal["collect", "sum", "merge", "count"]


class ReduceCall(CompositionModel):
    """Reduce with a capability, which receives ``{items: [map outputs]}``."""

    capability: str = Field(min_length=1)
    address: str | None = Field(default=None, pattern=ADDRESS_PATTERN)


Reducer = Annotated[
    Annotated[BuiltinReducer, Tag("by[name]")] | Annotated[ReduceCall, Tag("by[object]")],
    Discriminator(_name_or_object, custom_error_type="reducer",
                  custom_error_message="must be collect, sum, merge, count or {capability: NAME}"),
]


class MapReduce(CompositionModel):
    """Run ``map`` for every item of a list, at most ``concurrency`` at once, then reduce.

    Builtin reducers: ``collect`` -> ``{items: [...]}`` in input order; ``sum`` -> field-wise
    sum of numeric fields; ``merge`` -> objects merged in order; ``count`` -> ``{count: n}``.
    """

    over: Expression
    item: StepName = "item"
    map: Step
    concurrency: int = Field(default=8, ge=1, le=10_000)
    reduce: Reducer = "collect"

    @model_validator(mode="after")
    def _item_name(self) -> MapReduce:
        if self.item in RESERVED_SCOPE_NAMES:
            raise ValueError(f"item name {self.item!r} would shadow the scope's {self.item!r}")
        return self


class Completion(CompositionModel):
    """Fire when ``capability`` finishes with the given outcome."""

    capability: str = Field(min_length=1)
    outcome: Literal["success", "failure", "any"] = "success"


class Trigger(CompositionModel):
    """One ``on`` entry: exactly one of ``schedule`` (cron) or ``completed``."""

    schedule: str | None = Field(default=None, description="Cron, 5 or 6 fields, UTC")
    completed: Completion | None = None
    idempotency_key: Expression | None = Field(
        default=None, alias="idempotencyKey",
        description="Expression over the event giving its key; unset: the event's id")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            Cron.parse(value)
        return value

    @model_validator(mode="after")
    def _one(self) -> Trigger:
        if (self.schedule is None) == (self.completed is None):
            raise ValueError("a trigger is exactly one of schedule, completed")
        return self


STEP_KINDS = ("call", "pipeline", "parallel", "conditional", "map_reduce")


class Step(CompositionModel):
    """One node of the graph: exactly one of call, pipeline, parallel, conditional, mapReduce."""

    name: StepName | None = None
    call: Call | None = None
    pipeline: list[Step] | None = Field(default=None, min_length=1)
    parallel: Parallel | None = None
    conditional: Conditional | None = None
    map_reduce: MapReduce | None = Field(default=None, alias="mapReduce")
    retry: Retry | None = None
    output: Expression | None = Field(
        default=None, description="Expression over the scope plus ``result``; the step output")

    @model_validator(mode="after")
    def _exactly_one(self) -> Step:
        chosen = [kind for kind in STEP_KINDS if getattr(self, kind) is not None]
        if len(chosen) != 1:
            wire = ", ".join(_wire_kind(kind) for kind in STEP_KINDS)
            raise ValueError(f"a step is exactly one of {wire}"
                             + (f", got {', '.join(map(_wire_kind, chosen))}" if chosen else ""))
        if self.pipeline is not None:
            _check_unique(self.pipeline)
        return self

    @property
    def kind(self) -> str:
        """Which kind of step this is, as spelled in manifests (``mapReduce``)."""
        return _wire_kind(next(kind for kind in STEP_KINDS if getattr(self, kind) is not None))

    @property
    def label(self) -> str:
        """The name outputs are recorded under: ``name``, else the capability, else the kind."""
        if self.name is not None:
            return self.name
        if self.call is not None:
            return self.call.capability.replace("-", "_")
        return self.kind


def _wire_kind(kind: str) -> str:
    return "mapReduce" if kind == "map_reduce" else kind


class CompositionSpec(CompositionModel):
    """``spec.implementation.composition``: a pipeline of steps and an optional output mapping."""

    steps: list[Step] = Field(min_length=1)
    output: Expression | None = Field(
        default=None, description="Expression over the final scope; unset: the last output")
    # Not ``on``: YAML 1.1 (PyYAML, and Kubernetes' YAML->JSON) reads a bare ``on`` key as
    # boolean true, so a manifest could never spell it.
    triggers: list[Trigger] = Field(
        default_factory=list, description="Also run on these events (the event is the input)")

    @model_validator(mode="after")
    def _unique_names(self) -> CompositionSpec:
        # Explicit names must be unique in one pipeline, or a later step would shadow them.
        _check_unique(self.steps)
        return self


def _check_unique(steps: list[Step]) -> None:
    seen: set[str] = set()
    for step in steps:
        if step.name is not None:
            if step.name in seen:
                raise ValueError(f"step name {step.name!r} is used twice in one pipeline")
            seen.add(step.name)


Parallel.model_rebuild()
When.model_rebuild()
Conditional.model_rebuild()
MapReduce.model_rebuild()
Step.model_rebuild()
CompositionSpec.model_rebuild()


def parse_composition(
    data: Any, root: str = COMPOSITION_PATH
) -> CompositionSpec | list[tuple[str, str]]:
    """Validate composition data; return the model or (path, message) per problem.

    Paths are rooted at ``root``, e.g. ``spec.implementation.composition.steps[1].call.input.a``.
    """
    try:
        return CompositionSpec.model_validate(data)
    except ValidationError as exc:
        return [(f"{root}.{format_path(path)}" if path else root, message)
                for path, message in validation_errors(data, exc)]


def iter_steps(steps: list[Step], path: str) -> list[tuple[str, Step]]:
    """Every step under ``steps`` (depth first) with its manifest path."""
    found: list[tuple[str, Step]] = []
    for index, step in enumerate(steps):
        _walk(step, f"{path}[{index}]", found)
    return found


def _walk(step: Step, path: str, found: list[tuple[str, Step]]) -> None:
    found.append((path, step))
    for child_path, child in children(step, path):
        _walk(child, child_path, found)


def children(step: Step, path: str) -> list[tuple[str, Step]]:
    """The direct child steps of ``step`` with their manifest paths."""
    if step.pipeline is not None:
        return [(f"{path}.pipeline[{i}]", s) for i, s in enumerate(step.pipeline)]
    if step.parallel is not None:
        return [(f"{path}.parallel.branches.{n}", s) for n, s in step.parallel.branches.items()]
    if step.conditional is not None:
        out = [(f"{path}.conditional.when[{i}].then", w.then)
               for i, w in enumerate(step.conditional.when)]
        if step.conditional.else_ is not None:
            out.append((f"{path}.conditional.else", step.conditional.else_))
        return out
    if step.map_reduce is not None:
        return [(f"{path}.mapReduce.map", step.map_reduce.map)]
    return []
