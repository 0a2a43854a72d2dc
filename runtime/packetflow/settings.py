"""Runtime configuration: pydantic-settings from ``PACKETFLOW_*`` environment, flags on top."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from packetflow.engine import DEFAULT_MAX_PAYLOAD_BYTES
from packetflow.identity.workload import WorkloadIdentity


class WorkloadTlsSettings(BaseSettings):
    """A workload's identity files (``PACKETFLOW_TLS_*``): all three or none."""

    model_config = SettingsConfigDict(env_prefix="PACKETFLOW_", frozen=True)

    tls_cert: Path | None = Field(
        default=None, description="Zero trust: this workload's certificate chain (PEM, its "
                                  "SPIFFE ID in the URI SAN); with tls_key and tls_ca, gRPC "
                                  "speaks mutual TLS only and every call is authorized")
    tls_key: Path | None = Field(default=None, description="The certificate's private key")
    tls_ca: Path | None = Field(
        default=None, description="The cluster trust domain's authorities (PEM bundle)")
    health_address: str | None = Field(
        default=None, description="Plaintext grpc.health.v1 only, beside an mTLS gRPC port "
                                  "(for the kubelet's gRPC probes); unset: none")
    token_address: str | None = Field(
        default=None, description="With the TLS files: a second gRPC port (TLS, no client "
                                  "certificate) where callers prove themselves with a "
                                  "projected ServiceAccount token (audience packetflow), "
                                  "checked by TokenReview; unset: none")
    token_review_api: str | None = Field(
        default=None, description="The Kubernetes API that reviews tokens; unset: in-cluster "
                                  "(the pod's own ServiceAccount must be "
                                  "allowed to create tokenreviews)")

    def workload_identity(self, base: Path | None = None) -> WorkloadIdentity | None:
        """The identity the three files give (relative paths against ``base``), or None when
        they are unset; :class:`~packetflow.identity.x509.BundleError` names the file at
        fault."""
        if self.tls_cert is None or self.tls_key is None or self.tls_ca is None:
            return None
        cert, key, ca = (base / path if base is not None else path
                         for path in (self.tls_cert, self.tls_key, self.tls_ca))
        return WorkloadIdentity(cert, key, ca)

    @model_validator(mode="after")
    def _tls_files_together(self) -> Self:
        given = [self.tls_cert is not None, self.tls_key is not None, self.tls_ca is not None]
        if any(given) and not all(given):
            raise ValueError("tls_cert, tls_key and tls_ca go together (PACKETFLOW_TLS_CERT, "
                             "PACKETFLOW_TLS_KEY, PACKETFLOW_TLS_CA)")
        if self.token_address is not None and not all(given):
            raise ValueError("token_address (PACKETFLOW_TOKEN_ADDRESS) needs the TLS files: "
                             "tokens travel over TLS with this workload's certificate")
        return self


class RuntimeSettings(WorkloadTlsSettings):
    """How a runtime process listens, limits and shuts down."""

    model_config = SettingsConfigDict(env_prefix="PACKETFLOW_", frozen=True)

    address: str = Field(default="127.0.0.1:50051", description="gRPC listen address")
    metrics_address: str | None = Field(
        default="127.0.0.1:9464", description="Prometheus /metrics listen address; empty: off")
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, ge=1024)
    drain_seconds: float = Field(
        default=0.0, ge=0,
        description="After SIGTERM, report NOT_SERVING this long before refusing new calls "
                    "(lets load balancers notice); pods use a few seconds")
    grace_seconds: float = Field(default=30.0, ge=0,
                                 description="How long in-flight calls may finish on shutdown")
    mcp_address: str | None = Field(
        default=None, description="MCP streamable HTTP listen address (path /mcp); unset: off")
    mcp_token: str | None = Field(
        default=None, repr=False,
        description="Bearer token MCP clients must send (from a Secret); unset: no auth")
    mcp_token_review: bool = Field(
        default=False,
        description="With the TLS files: an MCP client without a client certificate may "
                    "prove itself with a projected ServiceAccount token (Authorization: "
                    "Bearer, audience packetflow) checked by TokenReview at "
                    "token_review_api; not with mcp_token (both are bearer tokens)")
    undeclared_as_services: bool = Field(
        default=False,
        description="A composition step naming a capability this runtime does not serve "
                    "calls the Kubernetes Service of that name (the operator sets this: each "
                    "pod serves one capability)")
    trigger_store_dsn: str | None = Field(
        default=None,
        description="PostgreSQL for trigger idempotency keys shared by every replica (a "
                    "schedule then fires once per cluster, not per pod); unset: SQLite "
                    "under state_dir")
    trigger_lease_seconds: float = Field(
        default=30.0, gt=0,
        description="How long a triggered run's claim lasts unless its process renews it: a "
                    "run cut short by a crash is taken over and run again after this")
    feedback_store_dsn: str | None = Field(
        default=None,
        description="PostgreSQL for user feedback shared by every replica; unset: SQLite "
                    "under state_dir")
    state_dir: Path = Field(
        default=Path(".packetflow"),
        description="Where durable local state lives (SQLite: trigger idempotency keys, actors)")
    member_id: str | None = Field(
        default=None, description="This runtime's id among actor placement members (a pod's "
                                  "name); unset: host name and process id")
    advertise_address: str | None = Field(
        default=None, description="gRPC address other members reach this runtime at, for "
                                  "forwarding actor messages; unset: the listen address")
    default_policy: Literal["namespace", "cluster", "deny"] = Field(
        default="namespace",
        description="Who may call a capability or actor type without spec.access: namespace "
                    "(its own namespace's workloads), cluster (any of the trust domain), deny")
    trusted_forwarders: list[str] = Field(
        default_factory=list,
        description="SPIFFE IDs (the gateway's, the MCP aggregate's) whose packetflow-caller "
                    "metadata names the caller; from anyone else it is ignored")
    forward_caller: bool = Field(
        default=False, description="This process forwards calls for others (the MCP "
                                   "aggregate): its remote calls name their caller")
    log_level: str = "INFO"
    log_format: str = Field(default="json", pattern="^(json|text)$")

    @model_validator(mode="after")
    def _one_kind_of_mcp_token(self) -> Self:
        if self.mcp_token_review and self.tls_cert is None:
            raise ValueError("mcp_token_review (PACKETFLOW_MCP_TOKEN_REVIEW) needs the TLS "
                             "files: ServiceAccount tokens travel over HTTPS only")
        if self.mcp_token_review and self.mcp_token:
            raise ValueError("mcp_token (PACKETFLOW_MCP_TOKEN, a shared secret) and "
                             "mcp_token_review (PACKETFLOW_MCP_TOKEN_REVIEW, ServiceAccount "
                             "tokens) both use Authorization: Bearer: set one")
        return self
