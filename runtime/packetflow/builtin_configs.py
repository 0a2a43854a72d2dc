"""Configuration models of the builtin capabilities, checked when a manifest loads."""

from __future__ import annotations

import re
import string
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from packetflow.validation import checked_jmespath


class BuiltinConfig(BaseModel):
    """Base of builtin configs: unknown keys are errors; camelCase keys on the wire."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class EchoConfig(BuiltinConfig):
    """``echo`` returns its input unchanged; it takes no configuration."""


class TransformConfig(BuiltinConfig):
    """``transform`` evaluates a JMESPath expression over the input; the result is the output."""

    expression: str = Field(min_length=1, description="JMESPath expression yielding an object")

    @field_validator("expression")
    @classmethod
    def _parses(cls, value: str) -> str:
        return checked_jmespath(value)


class FieldTemplate(string.Template):
    """``${name}`` or ``${user.name}``: a string template whose names may walk into objects."""

    idpattern = r"[_a-zA-Z][_a-zA-Z0-9]*(?:\.[_a-zA-Z0-9]+)*"
    flags = re.ASCII


def _check_template(value: str) -> str:
    template = FieldTemplate(value)
    if not template.is_valid():
        raise ValueError(f"invalid template {value!r}: use $name or ${{name}}; write $$ for '$'")
    return value


class TemplateConfig(BuiltinConfig):
    """``template`` renders a string template over the input into one output field."""

    template: str
    output: str = Field(default="text", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                        description="Output field that receives the rendered string")

    _valid = field_validator("template")(classmethod(lambda cls, v: _check_template(v)))


HttpMethod = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]


class HttpConfig(BuiltinConfig):
    """``http`` makes one request; the URL may template input fields; hosts are allow-listed."""

    url: str = Field(description="URL, may contain ${field} placeholders")
    method: HttpMethod = "GET"
    allowed_hosts: list[str] = Field(alias="allowedHosts", min_length=1,
                                     description="Hosts (host or host:port) the call may reach")
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: float = Field(default=10.0, gt=0, le=600, alias="timeoutSeconds")
    send_input: bool = Field(default=False, alias="sendInput",
                             description="Send the input as the JSON request body")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        _check_template(value)
        if not value.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _literal_host_allowed(self) -> HttpConfig:
        # urlsplit, not split("/"): the authority also ends at "?" or "#", so that
        # "http://evil.com?@allowed.com/" is seen as evil.com. The http builtin checks the
        # rendered URL again before every request; this check only fails bad manifests early.
        parts = urlsplit(self.url)
        if "$" not in parts.netloc:
            authority = effective_authority(parts.scheme, parts.hostname or "", parts.port)
            if not host_allowed(authority, self.allowed_hosts):
                raise ValueError(f"url host {authority!r} is not in allowedHosts")
        return self


_DEFAULT_PORTS = {"http": 80, "https": 443}


def effective_authority(scheme: str, host: str, port: int | None) -> str:
    """``host:port`` a URL connects to: default port filled in, IPv6 literals bracketed."""
    host = host.lower().strip("[]")
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port if port is not None else _DEFAULT_PORTS.get(scheme.lower(), 0)}"


def host_allowed(authority: str, allowed: list[str]) -> bool:
    """Whether ``host`` or ``host:port`` is allowed by a list of ``host`` / ``host:port``.

    An entry without a port allows every port of that host; ``[::1]`` style IPv6 works.
    """
    host = authority.rsplit("@", 1)[-1].lower()
    bare, sep, port = host.rpartition(":")
    if not (sep and port.isdigit() and (bare.endswith("]") or ":" not in bare)):
        bare = host  # no port: a bare host, or an unbracketed IPv6 literal
    return any(entry.lower() in (host, bare) for entry in allowed)


BUILTIN_CONFIGS: dict[str, type[BuiltinConfig]] = {
    "echo": EchoConfig,
    "transform": TransformConfig,
    "template": TemplateConfig,
    "http": HttpConfig,
}
