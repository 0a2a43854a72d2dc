"""``packetflow federation --config FILE``: a Federation manifest, plus a ``gateway:`` section
of settings (``PACKETFLOW_FEDERATION_*`` variables win over it); relative paths resolve
against the file's directory. Runtimes loading the same file see a Federation and leave it
to the gateway (the ``gateway:`` key is not part of the manifest)::

    apiVersion: packetflow.io/v1alpha1
    kind: Federation
    metadata: {name: partners}
    spec: {organization: acme, trustDomain: acme.example, identity: {certFile: ...}, ...}
    gateway:
      listen: 127.0.0.1:8443          # peers, mutual TLS (TLS 1.3)
      local: 127.0.0.1:8444           # local callers: imports as capabilities (plaintext)
      runtime: 127.0.0.1:50051        # where exported capabilities run
      workload: {tls_cert: ..., tls_key: ..., tls_ca: ...}   # mTLS towards runtimes
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from packetflow.manifests import ManifestError, parse_document, validate_model
from packetflow.settings import WorkloadTlsSettings
from packetflow.spec import HOST_PORT_PATTERN, NAME_PATTERN, Federation, FederationSpec


class FederationSettings(BaseSettings):
    """How a federation gateway runs."""

    model_config = SettingsConfigDict(env_prefix="PACKETFLOW_FEDERATION_", frozen=True,
                                      extra="forbid")

    federation: FederationSpec = Field(description="The Federation's spec")
    name: str = Field(default="federation", pattern=NAME_PATTERN,
                      description="The Federation's name (metadata.name)")
    listen: str = Field(default="127.0.0.1:8443", pattern=HOST_PORT_PATTERN,
                        description="Peer-facing mutual TLS (TLS 1.3) address")
    local: str = Field(default="127.0.0.1:8444", pattern=HOST_PORT_PATTERN,
                       description="Plaintext address serving imports to local callers")
    runtime: str | None = Field(
        default=None, description="host:port where exported capabilities run (`packetflow "
                                  "dev`); unset: the Kubernetes Service named after each")
    workload: WorkloadTlsSettings = Field(
        default_factory=WorkloadTlsSettings,
        description="Zero trust inside the cluster: the gateway's own workload identity "
                    "(tls_cert, tls_key, tls_ca; unless the file sets them, "
                    "PACKETFLOW_TLS_CERT, _KEY and _CA, as for `packetflow gateway`), "
                    "presented on every connection to local runtimes, never the "
                    "federation identity; unset: plaintext towards them")
    metrics_address: str | None = Field(
        default="127.0.0.1:9465", description="/metrics and /status (JSON); empty: off")
    state_dir: Path = Field(default=Path(".packetflow/federation"),
                            description="SQLite audit log and state (unless PostgreSQL)")
    audit_dsn: str | None = Field(default=None, repr=False,
                                  description="PostgreSQL DSN of the audit log when "
                                              "federation.audit.store.postgresql is set")
    catalog_refresh_seconds: float = Field(default=10.0, gt=0,
                                           description="How often peers' catalogs are read")
    reload_seconds: float = Field(default=1.0, gt=0,
                                  description="How often the config and certificates are "
                                              "checked for changes")
    log_level: str = "INFO"
    log_format: str = Field(default="json", pattern="^(json|text)$")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment wins over the file (the file comes in as init arguments)."""
        return env_settings, init_settings


class ConfigError(Exception):
    """The config file is unreadable or invalid; ``errors`` name field and line."""

    def __init__(self, errors: list[ManifestError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


def load_settings(path: Path) -> FederationSettings:
    """Read ``path``; :class:`ConfigError` names each bad field with its line."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError([ManifestError(source, "", f"cannot read: {exc.strerror}")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError([ManifestError(source, "", f"invalid YAML: {exc}",
                                         mark.line + 1 if mark else None)]) from None
    manifest = parse_document(data, source, node)
    if isinstance(manifest, list):
        raise ConfigError(manifest)
    if not isinstance(manifest, Federation):
        raise ConfigError([ManifestError(source, "kind", f"a Federation, not a {manifest.kind}")])
    gateway = data.get("gateway") or {}
    if not isinstance(gateway, dict):
        raise ConfigError([ManifestError(source, "gateway", "a mapping of settings")])
    gateway_node = _child(node, "gateway")
    try:
        return FederationSettings(**gateway, federation=manifest.spec, name=manifest.name)
    except ValidationError as exc:
        # Validated again without the environment, for errors that name the file's lines.
        found = validate_model(FederationSettings, {**gateway, "federation": manifest.spec,
                                                    "name": manifest.name},
                               source, gateway_node)
        raise ConfigError([replace(e, path=f"gateway.{e.path}") for e in found]
                          if isinstance(found, list) else [
            ManifestError("PACKETFLOW_FEDERATION_* environment", "", str(exc))]) from None


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for name, value in node.value:
            if getattr(name, "value", None) == key:
                found: yaml.Node = value
                return found
    return None


def resolve(base: Path, path: str | Path) -> Path:
    """``path`` relative to the config file's directory ``base`` (absolute paths stay)."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else base / candidate
