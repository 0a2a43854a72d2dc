"""Gateway configuration: pydantic-settings from ``PACKETFLOW_*`` environment, flags on top."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from packetflow.engine import DEFAULT_MAX_PAYLOAD_BYTES
from packetflow.settings import WorkloadTlsSettings


class GatewaySettings(WorkloadTlsSettings):
    """Where the gateway listens, where it finds backends, how it shuts down; with
    ``PACKETFLOW_TLS_*``, mutual TLS towards callers and backends alike."""

    model_config = SettingsConfigDict(env_prefix="PACKETFLOW_", frozen=True)

    address: str = Field(default="127.0.0.1:50051", description="gRPC listen address")
    metrics_address: str | None = Field(
        default="127.0.0.1:9464", description="Prometheus /metrics listen address; empty: off")
    max_payload_bytes: int = Field(
        default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1024,
        description="Largest request or answer payload forwarded (as the runtime's)")
    gateway_routes: Path | None = Field(
        default=None, description="Routes file (local mode), reloaded when it changes")
    gateway_kubernetes: bool = Field(
        default=False, description="Discover backends from Capabilities, Actors and their "
                                   "EndpointSlices through the Kubernetes API")
    gateway_namespaces: list[str] = Field(
        default_factory=list, description="Namespaces served on Kubernetes; empty: all")
    gateway_kube_api: str | None = Field(
        default=None, description="Kubernetes API URL; unset: in-cluster (service account)")
    drain_seconds: float = Field(
        default=0.0, ge=0,
        description="After SIGTERM, report NOT_SERVING this long before refusing new calls")
    grace_seconds: float = Field(default=30.0, ge=0,
                                 description="How long calls in flight may finish on shutdown")
    log_level: str = "INFO"
    log_format: str = Field(default="json", pattern="^(json|text)$")
