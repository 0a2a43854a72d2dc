"""The routes file of a local gateway (``packetflow gateway --routes FILE``).

```yaml
capabilities:
  echo: [127.0.0.1:50061, 127.0.0.1:50062]        # short form: the backends
  greet:
    backends: [127.0.0.1:50061, 127.0.0.1:50062]
    canary: {backends: [127.0.0.1:50071], weight: 10}
    traffic: {hedging: {enabled: false}}          # a Capability's spec.traffic
    identity: team-a/packetflow-greet             # under mutual TLS: who the backends are
actors:
  research-assistant:
    members: {node-a: 127.0.0.1:50061}            # PACKETFLOW_MEMBER_ID -> address
    identity: spiffe://cluster.local/ns/team-a/sa/packetflow-research-assistant
```

``identity`` (optional; stable and canary backends alike): with the gateway's TLS files, a
backend whose certificate names another workload is refused before any call reaches it. A
``namespace/service-account`` is of the gateway's own trust domain. Without it, any workload
of that trust domain is accepted.

A capability's effects (which decide retries and hedging) come from its backends
(DescribeCapability). Errors name the file, line and field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, Field, ValidationError, model_validator

from packetflow.gateway.routing import (
    ActorBackends,
    CapabilityBackends,
    Routes,
    expected_identity,
)
from packetflow.manifests import ManifestError, node_line
from packetflow.spec import NAME_PATTERN, SpecModel, Traffic
from packetflow.validation import format_path, validation_errors

# host:port, [v6]:port, or unix:PATH.
_ADDRESS_RE = re.compile(r"^(unix:.+|\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}|[^:\s\[\]/]+:[0-9]{1,5})$")


def _address(value: str) -> str:
    if not _ADDRESS_RE.match(value):
        raise ValueError(f"{value!r} is not host:port, [v6]:port or unix:PATH")
    return value


def _identity(value: str) -> str:
    expected_identity(value, "trust-domain.check")  # SpiffeIdError (a ValueError) says why
    return value


Address = Annotated[str, AfterValidator(_address)]
Identity = Annotated[str, AfterValidator(_identity)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class CanaryRoutes(SpecModel):
    """The canary version's backends and its share of calls."""

    backends: list[Address] = Field(default_factory=list)
    weight: int = Field(default=0, ge=0, le=100, description="Percent of calls")


class CapabilityRoutes(SpecModel):
    """Where a capability is served; a bare list is its backends."""

    backends: list[Address] = Field(default_factory=list)
    canary: CanaryRoutes | None = None
    traffic: Traffic = Field(default_factory=Traffic)
    identity: Identity | None = Field(
        default=None, description="Who the backends must be: a SPIFFE ID or "
                                  "namespace/service-account (the gateway's trust domain)")

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        return {"backends": value} if isinstance(value, list) else value


class ActorRoutes(SpecModel):
    """An actor type's members: member id -> address (a bare list: ids are the addresses)."""

    members: dict[str, Address] | list[Address]
    identity: Identity | None = Field(
        default=None, description="Who the members must be (as a capability's identity)")


class RoutesFile(SpecModel):
    """The whole file."""

    capabilities: dict[Name, CapabilityRoutes] = Field(default_factory=dict)
    actors: dict[Name, ActorRoutes] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_namespace(self) -> RoutesFile:
        both = sorted(set(self.capabilities) & set(self.actors))
        if both:
            raise ValueError(f"{', '.join(both)}: a name is a capability or an actor type, "
                             "not both")
        return self


class RoutesError(Exception):
    """A routes file that cannot be used, with every problem found."""

    def __init__(self, errors: list[ManifestError]) -> None:
        super().__init__("; ".join(map(str, errors)))
        self.errors = errors


def routes_of(parsed: RoutesFile) -> Routes:
    """The snapshot a parsed file describes."""
    capabilities = {
        name: CapabilityBackends(
            name, tuple(entry.backends),
            tuple(entry.canary.backends) if entry.canary else (),
            entry.canary.weight if entry.canary else 0, entry.traffic,
            identity=entry.identity)
        for name, entry in parsed.capabilities.items()}
    actors = {
        name: ActorBackends(name, tuple(sorted(
            entry.members.items() if isinstance(entry.members, dict)
            else ((address, address) for address in entry.members))), entry.identity)
        for name, entry in parsed.actors.items()}
    return Routes(capabilities, actors)


def parse_routes(text: str, source: str) -> Routes:
    """Parse a routes file's text; RoutesError names the file, line and field."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text) if node is not None else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RoutesError([ManifestError(source, "", f"invalid YAML: {problem}",
                                         mark.line + 1 if mark is not None else None)]) \
            from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RoutesError([ManifestError(source, "", "a routes file is a mapping with "
                                                     "capabilities and actors")])
    try:
        return routes_of(RoutesFile.model_validate(data))
    except ValidationError as exc:
        raise RoutesError([ManifestError(source, format_path(path), message,
                                         node_line(node, path))
                           for path, message in validation_errors(data, exc)]) from None


def load_routes(path: Path) -> Routes:
    """Read and parse a routes file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RoutesError([ManifestError(str(path), "", f"cannot read: {exc}")]) from None
    return parse_routes(text, str(path))
