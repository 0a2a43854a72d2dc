"""Spec models: the single source of truth for PacketFlow manifests.

The CRDs are generated from these models, the runtime serves what they accept, and every
validation error names the path of the offending field (``spec.requires.a.type``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import orjson
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
        problem = _schema_problem(orjson.dumps(self.json_schema(), option=orjson.OPT_SORT_KEYS))
        if problem:
            raise ValueError(problem)
        return self

    @property
    def required(self) -> bool:
        """A field is required unless it has a default or is marked optional."""
        return not self.optional and "default" not in self.model_fields_set

    def json_schema(self) -> dict[str, Any]:
        """The JSON-Schema property this field stands for (without ``optional``)."""
        return self.model_dump(exclude={"optional"}, exclude_unset=True)


Contract = dict[str, FieldSchema]


@functools.lru_cache(maxsize=4096)
def _schema_problem(schema_json: bytes) -> str:
    """Why a field's JSON Schema is invalid ('' when it is valid). Cached: the operator
    validates every spec of a namespace on start and each resync, and the same field schemas
    recur across manifests; the meta-schema check is most of a spec's validation cost."""
    try:
        Draft202012Validator.check_schema(orjson.loads(schema_json))
    except SchemaError as exc:
        where = ".".join(str(p) for p in exc.path)
        return f"not a valid JSON Schema{' at ' + where if where else ''}: {exc.message}"
    return ""


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


# host:port, with a DNS name, an IPv4 address or a bracketed IPv6 address.
HOST_PORT_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?):[0-9]{1,5}$"


class FederatedImplementation(SpecModel):
    """A capability another organization exports to us, called through our federation
    gateway (which holds the certificates, checks trust, meters and audits)."""

    peer: str = Field(pattern=NAME_PATTERN, description="The peer's name in our Federation")
    capability: str = Field(pattern=NAME_PATTERN,
                            description="The capability's name in the peer's catalog")
    gateway: str | None = Field(
        default=None, pattern=HOST_PORT_PATTERN,
        description="Our federation gateway's local address; unset: "
                    "$PACKETFLOW_FEDERATION_ADDRESS, else 127.0.0.1:8444")




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


IMPLEMENTATION_KINDS = ("python", "builtin", "composition", "image", "mcp", "federated",
                        "planner")


class Implementation(SpecModel):
    """How a capability runs: exactly one of python, builtin, composition, image, mcp,
    federated or planner."""

    python: PythonImplementation | None = None
    builtin: BuiltinImplementation | None = None
    composition: CompositionSpec | None = None
    image: ImageImplementation | None = None
    mcp: McpImplementation | None = None
    federated: FederatedImplementation | None = None
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


# ``namespace/name`` of a ServiceAccount; ``name`` or ``namespace/name`` of a Capability/Actor.
SERVICE_ACCOUNT_REF_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
WORKLOAD_REF_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ACCESS_RULE_KINDS = ("serviceAccount", "namespace", "capability")
MAX_ACCESS_RULES = 64


class AccessRule(SpecModel):
    """Callers one rule names: exactly one of a ServiceAccount, a namespace, or the workload
    of a Capability or Actor (what its compositions and actors call with)."""

    service_account: str | None = Field(
        default=None, alias="serviceAccount", pattern=SERVICE_ACCOUNT_REF_PATTERN,
        description="namespace/name of a ServiceAccount")
    namespace: str | None = Field(default=None, pattern=NAME_PATTERN,
                                  description="Every workload of this namespace")
    capability: str | None = Field(
        default=None, pattern=WORKLOAD_REF_PATTERN,
        description="A Capability's or Actor's pods: name (this namespace) or namespace/name")

    @model_validator(mode="after")
    def _exactly_one(self) -> AccessRule:
        given = [v for v in (self.service_account, self.namespace, self.capability)
                 if v is not None]
        if len(given) != 1:
            raise ValueError(f"exactly one of {', '.join(ACCESS_RULE_KINDS)} is required")
        return self


class Access(SpecModel):
    """Who may call: a caller a ``deny`` rule names is refused whatever ``allow`` says (deny
    overrides); with ``allow`` rules, only callers they name are let in; without any, the
    runtime's default policy decides."""

    allow: list[AccessRule] = Field(default_factory=list, max_length=MAX_ACCESS_RULES)
    deny: list[AccessRule] = Field(default_factory=list, max_length=MAX_ACCESS_RULES)


class ContractedSpec(SpecModel):
    """What callers see of a capability or an actor type: its intent and its contract."""

    intent: str = Field(min_length=1, description="What it is for, in a sentence")
    requires: Contract | None = Field(
        default=None, description="Input fields (an actor's message); unset: any object")
    provides: Contract | None = Field(
        default=None, description="Output fields (an actor's reply); unset: unchecked")
    access: Access | None = Field(
        default=None, description="Who may call it (zero trust); unset: the runtime's "
                                  "default policy (same namespace only, unless changed)")

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


# A canary's workload and Service are named after its Capability plus this (the operator
# renders them, the gateway finds their EndpointSlices by it).
CANARY_SUFFIX = "-canary"


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


class OutlierDetection(SpecModel):
    """When the gateway stops sending calls to a misbehaving endpoint (Envoy's semantics)."""

    consecutive_failures: int = Field(
        default=5, ge=1, alias="consecutiveFailures",
        description="Gateway failures in a row (UNAVAILABLE, connection lost) that eject")
    interval: Duration = Field(
        default="10s", description="How often ejections end and success rates are compared")
    base_ejection_time: Duration = Field(
        default="10s", alias="baseEjectionTime",
        description="First ejection's length; the nth in a row lasts n times as long")
    max_ejection_time: Duration = Field(default="300s", alias="maxEjectionTime")
    max_ejection_percent: int = Field(
        default=50, ge=0, le=100, alias="maxEjectionPercent",
        description="At most this share of a pool is ejected at once (at least one endpoint)")
    success_rate_minimum_hosts: int = Field(
        default=3, ge=1, alias="successRateMinimumHosts",
        description="Success-rate ejection needs this many endpoints with enough calls")
    success_rate_request_volume: int = Field(
        default=20, ge=1, alias="successRateRequestVolume",
        description="Calls an endpoint needs in an interval to count for success rates")
    success_rate_stdev_factor: float = Field(
        default=1.9, gt=0, alias="successRateStdevFactor",
        description="Eject below mean - factor x standard deviation of success rates")


class Retries(SpecModel):
    """Where the gateway may try a call again: bounded by a budget and the caller's deadline."""

    budget_percent: float = Field(
        default=20, ge=0, le=100, alias="budgetPercent",
        description="Retries allowed as a percent of recent calls")
    min_per_second: float = Field(
        default=10, ge=0, alias="minPerSecond",
        description="Retries allowed per second whatever the traffic (low volume)")
    window: Duration = Field(default="10s", description="How far back 'recent' reaches")
    max_attempts: int = Field(default=3, ge=1, le=10, alias="maxAttempts",
                              description="Attempts per call, the first included")


class Hedging(SpecModel):
    """A second attempt for a slow pure call (``effects: []``); the first answer wins."""

    enabled: bool = True
    percentile: float = Field(
        default=95, gt=0, lt=100,
        description="Hedge after this percentile of the capability's recent latency")
    max_percent: float = Field(default=10, ge=0, le=100, alias="maxPercent",
                               description="Hedges allowed as a percent of recent calls")
    min_delay: Duration = Field(default="1ms", alias="minDelay",
                                description="Never hedge sooner than this")


class Traffic(SpecModel):
    """How the gateway treats calls to this capability; every part has defaults."""

    outlier_detection: OutlierDetection = Field(default_factory=OutlierDetection,
                                                alias="outlierDetection")
    retries: Retries = Field(default_factory=Retries)
    hedging: Hedging = Field(default_factory=Hedging)


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
    traffic: Traffic = Field(default_factory=Traffic,
                             description="Gateway policy: outlier ejection, retries, hedging")
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


# ----------------------------------------------------------------------------- federation

# A SPIFFE trust domain name (lower-case letters, digits, '.', '-', '_').
TRUST_DOMAIN_PATTERN = r"^[a-z0-9._-]+$"
CURRENCY_PATTERN = r"^[A-Z]{3}$"


class FederationIdentity(SpecModel):
    """Our gateway's certificate (a SPIFFE ID in our trust domain) and key: a Secret on
    Kubernetes (cert-manager's shape: tls.crt, tls.key), files for ``packetflow federation``."""

    secret_name: str | None = Field(default=None, alias="secretName", pattern=NAME_PATTERN,
                                    description="Secret with tls.crt and tls.key")
    cert_file: str | None = Field(default=None, alias="certFile",
                                  description="Certificate chain file (PEM, leaf first)")
    key_file: str | None = Field(default=None, alias="keyFile",
                                 description="Private key file (PEM)")

    @model_validator(mode="after")
    def _one_source(self) -> FederationIdentity:
        files = (self.cert_file is not None, self.key_file is not None)
        if files[0] != files[1]:
            raise ValueError("certFile and keyFile go together")
        if (self.secret_name is None) == (self.cert_file is None):
            raise ValueError("exactly one of secretName, certFile+keyFile is required")
        return self


class ConfigMapKeyRef(SpecModel):
    """A key of a ConfigMap in the manifest's namespace."""

    name: str = Field(pattern=NAME_PATTERN)
    key: str = Field(default="ca.crt", min_length=1)


class TrustBundleSource(SpecModel):
    """A peer's CA certificates (PEM): a ConfigMap key on Kubernetes, a file locally."""

    config_map_ref: ConfigMapKeyRef | None = Field(default=None, alias="configMapRef")
    file: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> TrustBundleSource:
        if (self.config_map_ref is None) == (self.file is None):
            raise ValueError("exactly one of configMapRef, file is required")
        return self


class FederationService(SpecModel):
    """How the gateway's peer-facing port is exposed."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"


class FederationEndpoint(SpecModel):
    """Where peers reach our gateway."""

    port: int = Field(default=8443, ge=1, le=65535, description="mTLS port for peers")
    service: FederationService = Field(default_factory=FederationService)


class FederationPeer(SpecModel):
    """Another organization: who it is, where its gateway is, which CAs vouch for it."""

    name: str = Field(pattern=NAME_PATTERN, description="How exports and imports name it")
    organization: str = Field(min_length=1)
    trust_domain: str = Field(alias="trustDomain", pattern=TRUST_DOMAIN_PATTERN)
    endpoint: str = Field(pattern=HOST_PORT_PATTERN, description="Its gateway, host:port")
    trust_bundle: TrustBundleSource = Field(
        alias="trustBundle", description="Authenticates this peer's trust domain only")


class RateLimit(SpecModel):
    """A token bucket per peer: ``perMinute`` calls on average, ``burst`` at once."""

    per_minute: float = Field(alias="perMinute", gt=0)
    burst: int | None = Field(default=None, ge=1,
                              description="Bucket size; unset: a tenth of perMinute (>= 1)")


class Subscription(SpecModel):
    """A fixed fee per month (prorated over an invoice's period), optionally with an
    allowance of calls and a price per call beyond it."""

    per_month: float = Field(alias="perMonth", ge=0)
    included_calls: int | None = Field(default=None, alias="includedCalls", ge=0)
    overage_per_execution: float = Field(default=0.0, alias="overagePerExecution", ge=0)


class RevenueShare(SpecModel):
    """A share of the revenue each call reports in a number field of its output."""

    percent: float = Field(gt=0, le=100)
    field: str = Field(pattern=IDENTIFIER_RE.pattern,
                       description="Output field holding the call's revenue")


class Pricing(SpecModel):
    """What an export costs its importers: exactly one of perExecution, subscription,
    revenueShare."""

    per_execution: float | None = Field(default=None, alias="perExecution", ge=0,
                                        description="Price of one successful call")
    subscription: Subscription | None = None
    revenue_share: RevenueShare | None = Field(default=None, alias="revenueShare")
    currency: str = Field(default="USD", pattern=CURRENCY_PATTERN)

    @model_validator(mode="after")
    def _exactly_one(self) -> Pricing:
        chosen = [self.per_execution, self.subscription, self.revenue_share]
        if sum(value is not None for value in chosen) != 1:
            raise ValueError("exactly one of perExecution, subscription, revenueShare "
                             "is required")
        return self


class SlaProbe(SpecModel):
    """An input importers call the export with now and then, to measure availability and
    latency independent of real traffic."""

    input: dict[str, Any] = Field(default_factory=dict)
    every: Duration = "30s"


class Sla(SpecModel):
    """What the exporter promises; both sides measure it per importer over ``window``."""

    latency_p99_ms: float | None = Field(default=None, alias="latencyP99Ms", gt=0)
    availability: float | None = Field(default=None, gt=0, lt=100,
                                       description="Percent of calls that succeed")
    window: Duration = Field(default="5m", description="Evaluation window")
    probe: SlaProbe | None = None


class FederationExport(SpecModel):
    """A local capability opened to named peers (every other capability stays closed)."""

    capability: str = Field(pattern=NAME_PATTERN)
    to: list[str] = Field(min_length=1, description="Peer names")
    rate_limit: RateLimit | None = Field(default=None, alias="rateLimit")
    pricing: Pricing | None = None
    sla: Sla | None = None


class FederationImport(SpecModel):
    """A peer's exported capability served here under a local name."""

    peer: str = Field(pattern=NAME_PATTERN)
    capability: str = Field(pattern=NAME_PATTERN)
    as_: str | None = Field(default=None, alias="as", pattern=NAME_PATTERN,
                            description="Local name; default: <peer>-<capability>")

    @property
    def local_name(self) -> str:
        """The name local callers use."""
        return self.as_ or f"{self.peer}-{self.capability}"


class TrustPolicy(SpecModel):
    """Beta reputation per peer and dimension, decaying with ``halfLife``; below
    ``minimumScore`` on any dimension, calls to and from the peer are refused."""

    minimum_score: float = Field(default=0.5, alias="minimumScore", ge=0, le=1)
    half_life: Duration = Field(default="72h", alias="halfLife")
    initial_score: float = Field(default=0.9, alias="initialScore", gt=0, lt=1,
                                 description="Score of a peer without evidence (the prior)")
    prior_weight: float = Field(default=10.0, alias="priorWeight", gt=0,
                                description="How many observations the prior counts as")
    evidence_window: Duration = Field(default="1m", alias="evidenceWindow")
    max_evidence_per_window: int = Field(
        default=20, alias="maxEvidencePerWindow", ge=1,
        description="Positive and negative observations counted per peer, dimension and "
                    "window, each: flooding cheap calls cannot inflate a score")

    @model_validator(mode="after")
    def _new_peers_pass(self) -> TrustPolicy:
        if self.initial_score < self.minimum_score:
            raise ValueError("initialScore below minimumScore would refuse every new peer")
        return self


class AuditStore(ActorStore):
    """Where the audit log lives: exactly one of sqlite (a volume), postgresql (shared)."""


class AuditPolicy(SpecModel):
    """The hash-chained audit log of every federated call and policy decision."""

    retention: Duration = Field(default="400d", description="Records older are pruned")
    store: AuditStore = Field(default_factory=lambda: AuditStore(sqlite=SqliteStore()))


class FederationSpec(SpecModel):
    """Who we are, whom we federate with, what we open to them and what we use of theirs."""

    organization: str = Field(pattern=NAME_PATTERN)
    trust_domain: str = Field(alias="trustDomain", pattern=TRUST_DOMAIN_PATTERN)
    identity: FederationIdentity
    endpoint: FederationEndpoint = Field(default_factory=FederationEndpoint)
    peers: list[FederationPeer] = Field(default_factory=list)
    exports: list[FederationExport] = Field(default_factory=list)
    imports: list[FederationImport] = Field(default_factory=list)
    trust: TrustPolicy = Field(default_factory=TrustPolicy)
    audit: AuditPolicy = Field(default_factory=AuditPolicy)
    replicas: int = Field(default=1, ge=1, description="Gateway pods")

    @field_validator("replicas")
    @classmethod
    def _shared_audit(cls, value: int, info: ValidationInfo) -> int:
        audit = info.data.get("audit")
        if value > 1 and audit is not None and audit.store.sqlite is not None:
            raise ValueError("replicas > 1 needs a shared audit log: set "
                             "audit.store.postgresql")
        return value

    @model_validator(mode="after")
    def _references(self) -> FederationSpec:
        names = [peer.name for peer in self.peers]
        domains = [peer.trust_domain for peer in self.peers]
        if len(set(names)) != len(names):
            raise ValueError("peers: each name may appear once")
        if len(set(domains)) != len(domains) or self.trust_domain in domains:
            raise ValueError("peers: each trust domain (ours included) may appear once: a "
                             "bundle vouches for one trust domain")
        for index, export in enumerate(self.exports):
            unknown = sorted(set(export.to) - set(names))
            if unknown:
                raise ValueError(f"exports[{index}].to: unknown peer {unknown[0]!r}")
        exported = [export.capability for export in self.exports]
        if len(set(exported)) != len(exported):
            raise ValueError("exports: each capability may appear once")
        for index, imported in enumerate(self.imports):
            if imported.peer not in names:
                raise ValueError(f"imports[{index}].peer: unknown peer {imported.peer!r}")
        local = [imported.local_name for imported in self.imports]
        if len(set(local)) != len(local):
            raise ValueError("imports: each local name (as) may appear once")
        return self


class Federation(ManifestModel):
    """The Federation manifest (``kind: Federation``): run by a federation gateway."""

    kind: Literal["Federation"]
    spec: FederationSpec


Manifest = Capability | Actor
MANIFEST_KINDS: dict[str, type[Capability] | type[Actor] | type[Federation]] = {
    "Capability": Capability, "Actor": Actor, "Federation": Federation}
