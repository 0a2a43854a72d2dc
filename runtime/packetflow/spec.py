"""Spec models: the single source of truth for PacketFlow manifests.

The CRDs are generated from these models, the runtime serves what they accept, and every
validation error names the path of the offending field (``spec.requires.a.type``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
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


def _check_module(value: str) -> str:
    if not MODULE_RE.match(value):
        raise ValueError(f"{value!r} is not a dotted module path")
    return value


class PythonImplementation(SpecModel):
    """A Python function importable in the runtime: ``module:function``, sync or async."""

    module: str = Field(description="Dotted module path, e.g. examples.text")
    function: str = Field(description="Function name in the module")

    _module = field_validator("module")(classmethod(lambda cls, v: _check_module(v)))

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


class SecretKeyRef(SpecModel):
    """A key of a Kubernetes Secret in the manifest's namespace."""

    name: str = Field(min_length=1)
    key: str = Field(min_length=1)


class ValueSource(SpecModel):
    """Where a secret value comes from: an environment variable of the runtime, or a Secret.

    The operator turns a ``secretKeyRef`` into an environment variable of the pod; locally
    (``packetflow dev``) only ``env`` can be resolved.
    """

    env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    secret_key_ref: SecretKeyRef | None = Field(default=None, alias="secretKeyRef")

    @model_validator(mode="after")
    def _exactly_one(self) -> ValueSource:
        if (self.env is None) == (self.secret_key_ref is None):
            raise ValueError("exactly one of env, secretKeyRef is required")
        return self

    @property
    def env_name(self) -> str:
        """The runtime's environment variable holding the value; for a ``secretKeyRef`` the
        operator fills a variable of this derived name from the Secret."""
        if self.env is not None:
            return self.env
        assert self.secret_key_ref is not None
        ref = f"{self.secret_key_ref.name}_{self.secret_key_ref.key}"
        return "PACKETFLOW_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", ref).upper()

    def resolve(self, environ: Mapping[str, str]) -> str:
        """The value, or ``KeyError`` naming the variable that is not set."""
        try:
            return environ[self.env_name]
        except KeyError:
            raise KeyError(f"environment variable {self.env_name} is not set") from None


class McpImplementation(SpecModel):
    """A tool of a remote MCP server (streamable HTTP) served as a capability.

    Its contract comes from the tool's ``inputSchema``/``outputSchema`` unless the manifest
    declares ``requires``/``provides``.
    """

    url: str = Field(pattern=r"^https?://", description="The server's streamable HTTP endpoint")
    tool: str = Field(min_length=1, description="The tool's name on that server")
    headers_from: dict[str, ValueSource] = Field(
        default_factory=dict, alias="headersFrom",
        description="HTTP headers sent to the server (e.g. Authorization), from env or Secrets",
    )


class PlannerModel(SpecModel):
    """A language model that proposes plans (they are checked like any other)."""

    provider: Literal["openai", "anthropic"]
    model: str = Field(min_length=1)
    base_url: str | None = Field(default=None, alias="baseUrl", pattern=r"^https?://",
                                 description="API base URL; default: the provider's own")
    api_key_from: ValueSource | None = Field(default=None, alias="apiKeyFrom")


class PlannerImplementation(SpecModel):
    """Intent in, plan and results out: plans over the capabilities served beside it."""

    capabilities: list[str] = Field(
        default_factory=list, description="What plans may call; empty: every capability here")
    allow_effects: bool = Field(default=False, alias="allowEffects",
                                description="Run plans that call capabilities with effects")
    execute: bool = Field(default=True, description="Run the plan; false: only plan")
    max_steps: int | None = Field(default=None, ge=1, le=8, alias="maxSteps")
    model: PlannerModel | None = None


IMPLEMENTATION_KINDS = ("python", "builtin", "composition", "image", "mcp", "planner")


class Implementation(SpecModel):
    """How a capability runs: exactly one of python, builtin, composition, image, mcp or
    planner."""

    python: PythonImplementation | None = None
    builtin: BuiltinImplementation | None = None
    composition: CompositionSpec | None = None
    image: ImageImplementation | None = None
    mcp: McpImplementation | None = None
    planner: PlannerImplementation | None = None

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

# What MCP (2025-11-25) allows in a tool name.
MCP_TOOL_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"


class McpExposure(SpecModel):
    """How a capability or actor type appears to MCP clients."""

    expose: bool = Field(default=True, description="Offer it as an MCP tool")
    name: str | None = Field(default=None, pattern=MCP_TOOL_NAME_PATTERN,
                             description="Tool name; default: derived from metadata.name")


DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"
Duration = Annotated[str, Field(pattern=DURATION_PATTERN)]
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration_seconds(text: str) -> float:
    """``"1h30m"`` -> 5400.0; the text already matched ``DURATION_PATTERN``."""
    return sum(float(number) * _UNIT_SECONDS[unit]
               for number, unit in _DURATION_PART_RE.findall(text))


class ContractedSpec(SpecModel):
    """What callers see of a capability or an actor type: its intent and its contract."""

    intent: str = Field(min_length=1, description="What it is for, in a sentence")
    requires: Contract | None = Field(
        default=None, description="Input fields (an actor's message); unset: any object")
    provides: Contract | None = Field(
        default=None, description="Output fields (an actor's reply); unset: unchecked")

    _short_form = field_validator("requires", "provides", mode="before")(
        classmethod(lambda cls, v: _short_form_contract(v))
    )
    _names = field_validator("requires", "provides")(
        classmethod(lambda cls, v: _check_field_names(v))
    )


class Slo(SpecModel):
    """Service-level objectives the routing controller keeps (and alerts are built from)."""

    latency_p99_ms: float | None = Field(
        default=None, gt=0, alias="latencyP99Ms",
        description="99th percentile of call latency, in milliseconds")
    availability: float | None = Field(
        default=None, gt=0, lt=100,
        description="Share of calls that must succeed, in percent (e.g. 99.9)")


class Scaling(SpecModel):
    """Present: the routing controller owns the replica count (leave ``replicas`` out of the
    manifest, as with an HPA, so ``kubectl apply`` does not reset it)."""

    min_replicas: int = Field(default=1, ge=0, alias="minReplicas")
    max_replicas: int = Field(default=10, ge=1, le=1000, alias="maxReplicas")
    target_concurrency: float | None = Field(
        default=None, gt=0, alias="targetConcurrency",
        description="In-flight calls per replica to aim for; unset: learned from metrics")
    scale_down_delay: Duration = Field(
        default="5m", alias="scaleDownDelay",
        description="How long load must stay low before replicas are removed")

    @model_validator(mode="after")
    def _bounds(self) -> Scaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self


class Canary(SpecModel):
    """A second version served beside the stable one (workload ``<name>-canary``); the
    gateway sends it ``weight`` percent of the calls."""

    weight: int = Field(default=0, ge=0, le=100,
                        description="Percent of calls routed to the canary")
    implementation: Implementation | None = Field(
        default=None, description="The canary's implementation; unset: the stable one")
    image: str | None = Field(
        default=None, min_length=1,
        description="Runtime container image of the canary pods; unset: the operator's")
    resources: ResourceRequirements | None = None
    replicas: int = Field(default=1, ge=0, description="Canary runtime pods")
    promote: Literal["manual", "auto"] = Field(
        default="manual",
        description="auto: the routing controller promotes a healthy canary by itself; "
                    "manual: promotion waits for approval")


class Cache(SpecModel):
    """Answer a repeated input from memory: only for capabilities that declare no effects."""

    ttl: Duration = Field(default="60s", description="How long a result is reused")
    max_entries: int = Field(default=10_000, ge=1, le=1_000_000, alias="maxEntries",
                             description="Results kept per runtime process (least recently "
                                         "used go first)")


class CapabilitySpec(ContractedSpec):
    """What a capability is for, what it needs and returns, and how it runs."""

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
    mcp: McpExposure = Field(default_factory=McpExposure,
                             description="How the capability appears as an MCP tool")
    slo: Slo | None = Field(default=None, description="Objectives the routing controller keeps")
    scaling: Scaling | None = Field(
        default=None, description="Present: the routing controller sets the replica count")
    canary: Canary | None = Field(default=None, description="A weighted second version")
    cache: Cache | None = Field(
        default=None, description="Reuse results of repeated inputs (needs effects: [])")

    @field_validator("cache")
    @classmethod
    def _cache_needs_no_effects(cls, value: Cache | None, info: ValidationInfo) -> Cache | None:
        # A field validator (``effects`` is validated first), so the error names spec.cache.
        effects = info.data.get("effects") or []
        if value is not None and effects:
            raise ValueError("a capability that declares effects cannot be cached (effects: "
                             f"{', '.join(effects)})")
        return value


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


class ManifestModel(SpecModel):
    """A whole manifest: ``apiVersion``, ``kind``, ``metadata`` and a ``spec``."""

    # Kubernetes adds status, managedFields...; they are not ours to refuse.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    api_version: Literal["packetflow.io/v1alpha1"] = Field(alias="apiVersion")
    metadata: ObjectMeta

    @property
    def name(self) -> str:
        """The manifest's name (``metadata.name``): how callers address it."""
        return self.metadata.name


class Capability(ManifestModel):
    """The Capability manifest (``kind: Capability``)."""

    kind: Literal["Capability"]
    spec: CapabilitySpec


# --------------------------------------------------------------------------------- actors


class ActorPythonImplementation(SpecModel):
    """Actor handlers in a Python module: a ``class`` with the handler methods, or (without
    ``class``) module-level functions ``on_start``, ``on_message``, ``on_idle`` and schedules.
    """

    module: str = Field(description="Dotted module path, e.g. examples.research")
    class_: str | None = Field(default=None, alias="class",
                               description="Class whose instances handle one actor each")

    _module = field_validator("module")(classmethod(lambda cls, v: _check_module(v)))

    @field_validator("class_")
    @classmethod
    def _class(cls, value: str | None) -> str | None:
        if value is not None and not IDENTIFIER_RE.match(value):
            raise ValueError(f"{value!r} is not a Python identifier")
        return value


class ActorImplementation(SpecModel):
    """How an actor type runs (Python only for now)."""

    python: ActorPythonImplementation


class SqliteStore(SpecModel):
    """SQLite in WAL mode: the embedded default, local to one process (or one pod's volume)."""

    path: str | None = Field(default=None,
                             description="Database file; default: <state dir>/<actor type>.db")


class PostgresStore(SpecModel):
    """A PostgreSQL database shared by every replica: needed for ``replicas > 1``."""

    dsn: str | None = Field(default=None, description="libpq connection string (no secrets)")
    dsn_from: ValueSource | None = Field(default=None, alias="dsnFrom")

    @model_validator(mode="after")
    def _exactly_one(self) -> PostgresStore:
        if (self.dsn is None) == (self.dsn_from is None):
            raise ValueError("exactly one of dsn, dsnFrom is required")
        return self


class ActorStore(SpecModel):
    """Where an actor type keeps state, memory and reminders: exactly one of sqlite, postgresql."""

    sqlite: SqliteStore | None = None
    postgresql: PostgresStore | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ActorStore:
        if (self.sqlite is None) == (self.postgresql is None):
            raise ValueError("exactly one of sqlite, postgresql is required")
        return self


class ActorMemory(SpecModel):
    """The conversation memory: an append-only log per actor, with retention."""

    retention: Duration = Field(default="30d", description="Entries older than this are swept")
    max_messages: int = Field(default=10_000, ge=1, alias="maxMessages",
                              description="Per actor; the oldest beyond it are compacted away")
    semantic_search: bool = Field(
        default=False, alias="semanticSearch",
        description="Embedding search when the embeddings extra is installed; BM25 otherwise")


class ActorSchedule(SpecModel):
    """A durable schedule per actor: the handler method ``name`` runs ``every`` period."""

    name: str = Field(description="Handler name (a method of the class, or a module function)")
    every: Duration

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not IDENTIFIER_RE.match(value):
            raise ValueError(f"{value!r} is not a Python identifier")
        return value


class McpToolRef(SpecModel):
    """A tool an actor may call with ``ctx.tools.call(name, args)``: a local capability, or a
    tool of a remote MCP server."""

    name: str = Field(pattern=MCP_TOOL_NAME_PATTERN, description="The name the actor calls")
    capability: str | None = Field(default=None, description="A capability in the runtime")
    url: str | None = Field(default=None, pattern=r"^https?://",
                            description="A remote MCP server's streamable HTTP endpoint")
    tool: str | None = Field(default=None, description="The remote tool; default: name")
    headers_from: dict[str, ValueSource] = Field(default_factory=dict, alias="headersFrom")

    @model_validator(mode="after")
    def _exactly_one(self) -> McpToolRef:
        if (self.capability is None) == (self.url is None):
            raise ValueError("exactly one of capability, url is required")
        if self.capability is not None and (self.tool is not None or self.headers_from):
            raise ValueError("tool and headersFrom belong to a remote (url) tool")
        return self


class ActorSpec(ContractedSpec):
    """An actor type: its message contract, initial state, handlers, store and lifecycle."""

    initial_state: dict[str, Any] = Field(default_factory=dict, alias="initialState")
    implementation: ActorImplementation
    store: ActorStore = Field(default_factory=lambda: ActorStore(sqlite=SqliteStore()))
    memory: ActorMemory = Field(default_factory=ActorMemory)
    idle_timeout: Duration = Field(default="5m", alias="idleTimeout",
                                   description="Deactivate after this long without messages")
    max_active: int = Field(default=10_000, ge=1, alias="maxActive",
                            description="Active actors per process; least recently used "
                                        "are passivated first")
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600, alias="timeoutSeconds",
                                   description="Deadline of one turn")
    schedules: list[ActorSchedule] = Field(default_factory=list)
    mcp_tools: list[McpToolRef] = Field(default_factory=list, alias="mcpTools")
    mcp: McpExposure = Field(default_factory=McpExposure)
    effects: list[Effect] = Field(default_factory=list, description="Declared side effects")
    replicas: int = Field(default=1, ge=1, description="Runtime pods (a StatefulSet)")
    resources: ResourceRequirements | None = None
    slo: Slo | None = Field(default=None, description="Objectives the routing controller keeps")
    scaling: Scaling | None = Field(
        default=None, description="Present: the routing controller sets the replica count")

    @field_validator("replicas")
    @classmethod
    def _shared_store_for_replicas(cls, value: int, info: ValidationInfo) -> int:
        # A field validator (``store`` is validated first), so the error names spec.replicas.
        store = info.data.get("store")
        if value > 1 and store is not None and store.sqlite is not None:
            raise ValueError("replicas > 1 needs a shared store: set store.postgresql "
                             "(SQLite lives on one pod's volume)")
        return value

    @field_validator("scaling")
    @classmethod
    def _shared_store_for_scaling(cls, value: Scaling | None,
                                  info: ValidationInfo) -> Scaling | None:
        store = info.data.get("store")
        if value is not None and store is not None and store.sqlite is not None \
                and value.max_replicas > 1:
            raise ValueError("maxReplicas > 1 needs a shared store: set store.postgresql "
                             "(SQLite lives on one pod's volume)")
        if value is not None and value.min_replicas < 1:
            raise ValueError("an actor type needs minReplicas >= 1 (placement needs a member)")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> ActorSpec:
        names = [schedule.name for schedule in self.schedules]
        if len(set(names)) != len(names):
            raise ValueError("schedules: each name may appear once")
        tools = [tool.name for tool in self.mcp_tools]
        if len(set(tools)) != len(tools):
            raise ValueError("mcpTools: each name may appear once")
        return self


class Actor(ManifestModel):
    """The Actor manifest (``kind: Actor``)."""

    kind: Literal["Actor"]
    spec: ActorSpec


Manifest = Capability | Actor
MANIFEST_KINDS: dict[str, type[Capability] | type[Actor]] = {
    "Capability": Capability, "Actor": Actor}
