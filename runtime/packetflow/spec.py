"""Spec models: the single source of truth for PacketFlow manifests.

The CRDs are generated from these models, the runtime serves what they accept, and every
validation error names the path of the offending field (``spec.requires.a.type``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from packetflow.builtin_configs import BUILTIN_CONFIGS
from packetflow.composition.model import CompositionSpec

API_VERSION = "packetflow.io/v1alpha1"
GROUP = "packetflow.io"
VERSION = "v1alpha1"

JSON_TYPES = ("string", "integer", "number", "boolean", "object", "array", "null")
JsonType = Literal["string", "integer", "number", "boolean", "object", "array", "null"]

# DNS-1123 label: what Kubernetes accepts as a Service name, so one name works everywhere.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_NAME_RE = re.compile(NAME_PATTERN)
IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SpecModel(BaseModel):
    """Base for manifest models: unknown keys are errors, field names are camelCase on the wire."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class FieldSchema(BaseModel):
    """One field of a contract: a JSON-Schema property plus PacketFlow's ``optional`` flag.

    Any other JSON-Schema keyword (``enum``, ``items``, ``minimum``, ``format``...) is kept.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    type: JsonType | list[JsonType] | None = None
    description: str | None = None
    default: Any = None
    optional: bool = False

    @model_validator(mode="after")
    def _check_json_schema(self) -> FieldSchema:
        try:
            Draft202012Validator.check_schema(self.json_schema())
        except SchemaError as exc:
            where = ".".join(str(p) for p in exc.path)
            raise ValueError(f"not a valid JSON Schema{' at ' + where if where else ''}: "
                             f"{exc.message}") from None
        return self

    @property
    def required(self) -> bool:
        """A field is required unless it has a default or is marked optional."""
        return not self.optional and "default" not in self.model_fields_set

    def json_schema(self) -> dict[str, Any]:
        """The JSON-Schema property this field stands for (without ``optional``)."""
        return self.model_dump(exclude={"optional"}, exclude_unset=True)


Contract = dict[str, FieldSchema]


def _short_form_contract(value: Any) -> Any:
    """Accept the seed's short form ``[query, context]``: untyped, required fields."""
    if isinstance(value, list):
        if not all(isinstance(item, str) for item in value):
            raise ValueError("a short-form contract is a list of field names")
        if len(set(value)) != len(value):
            raise ValueError("a short-form contract names a field twice")
        return {name: {} for name in value}
    return value


def _check_field_names(contract: Contract | None) -> Contract | None:
    for name in contract or {}:
        if not IDENTIFIER_RE.match(name):
            raise ValueError(f"field name {name!r} must be an identifier (letters, digits, _)")
    return contract


class PythonImplementation(SpecModel):
    """A Python function importable in the runtime: ``module:function``, sync or async."""

    module: str = Field(description="Dotted module path, e.g. examples.text")
    function: str = Field(description="Function name in the module")

    @field_validator("module")
    @classmethod
    def _module(cls, value: str) -> str:
        if not MODULE_RE.match(value):
            raise ValueError(f"{value!r} is not a dotted module path")
        return value

    @field_validator("function")
    @classmethod
    def _function(cls, value: str) -> str:
        if not IDENTIFIER_RE.match(value):
            raise ValueError(f"{value!r} is not a Python identifier")
        return value


BuiltinName = Literal["echo", "transform", "http", "template"]


class BuiltinImplementation(SpecModel):
    """A capability that ships with PacketFlow, configured by ``config``."""

    name: BuiltinName
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _config_fits_builtin(self) -> BuiltinImplementation:
        # Checked here so `packetflow validate`, `dev` and the operator all reject bad config.
        try:
            BUILTIN_CONFIGS[self.name].model_validate(self.config)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"config{'.' + where if where else ''}: "
                             f"{first['msg'].removeprefix('Value error, ')}") from None
        return self


class ImageImplementation(SpecModel):
    """Any container serving the ``packetflow.v1`` protocol; only the operator can run it."""

    image: str = Field(min_length=1)
    port: int = Field(default=50051, ge=1, le=65535)


IMPLEMENTATION_KINDS = ("python", "builtin", "composition", "image")


class Implementation(SpecModel):
    """How a capability runs: exactly one of python, builtin, composition or image."""

    python: PythonImplementation | None = None
    builtin: BuiltinImplementation | None = None
    composition: CompositionSpec | None = None
    image: ImageImplementation | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Implementation:
        chosen = [kind for kind in IMPLEMENTATION_KINDS if getattr(self, kind) is not None]
        if len(chosen) != 1:
            raise ValueError(
                f"exactly one of {', '.join(IMPLEMENTATION_KINDS)} is required"
                + (f", got {', '.join(chosen)}" if chosen else "")
            )
        return self

    @property
    def kind(self) -> str:
        """Which implementation this is."""
        return next(kind for kind in IMPLEMENTATION_KINDS if getattr(self, kind) is not None)


Quantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?$")]


class ResourceRequirements(SpecModel):
    """Kubernetes container resources, e.g. ``{requests: {cpu: 100m, memory: 128Mi}}``."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


Effect = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*$")]


class CapabilitySpec(SpecModel):
    """What a capability is for, what it needs and returns, and how it runs."""

    intent: str = Field(min_length=1, description="What the capability is for, in a sentence")
    requires: Contract | None = Field(
        default=None, description="Input fields (name -> JSON-Schema property); unset: any object"
    )
    provides: Contract | None = Field(
        default=None, description="Output fields (name -> JSON-Schema property); unset: unchecked"
    )
    implementation: Implementation
    effects: list[Effect] = Field(default_factory=list, description="Declared side effects")
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600, alias="timeoutSeconds")
    concurrency: int = Field(default=64, ge=1, le=100_000,
                             description="Max in-flight calls per runtime process")
    replicas: int | None = Field(
        default=None, ge=0, description="Runtime pods; unset: an autoscaler owns the count"
    )
    resources: ResourceRequirements | None = Field(
        default=None, description="Container resource requests and limits of the runtime pods"
    )

    _short_requires = field_validator("requires", mode="before")(
        classmethod(lambda cls, v: _short_form_contract(v))
    )
    _short_provides = field_validator("provides", mode="before")(
        classmethod(lambda cls, v: _short_form_contract(v))
    )
    _names = field_validator("requires", "provides")(
        classmethod(lambda cls, v: _check_field_names(v))
    )


class ObjectMeta(BaseModel):
    """The part of Kubernetes object metadata PacketFlow reads; the rest is kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(max_length=63)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                f"{value!r} must be lower-case letters, digits and '-', starting and ending "
                "with a letter or digit"
            )
        return value


class Capability(SpecModel):
    """The Capability manifest (``kind: Capability``)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    api_version: Literal["packetflow.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["Capability"]
    metadata: ObjectMeta
    spec: CapabilitySpec

    @property
    def name(self) -> str:
        """The capability's name (``metadata.name``)."""
        return self.metadata.name


MANIFEST_KINDS: dict[str, type[Capability]] = {"Capability": Capability}
