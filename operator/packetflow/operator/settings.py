"""Operator configuration: pydantic-settings from ``PACKETFLOW_*`` environment, flags on top."""

from __future__ import annotations

from typing import Annotated, Self

from pydantic import AfterValidator, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from packetflow.access import DefaultPolicy
from packetflow.composition.resolve import DEFAULT_CLUSTER_DOMAIN
from packetflow.identity.spiffe import TRUST_DOMAIN_PATTERN, SpiffeId
from packetflow.spec import NAME_PATTERN

DEFAULT_IMAGE = "ghcr.io/packetflow/packetflow:0.1.0"
# Certificates are renewed 8 hours before expiry, by the resync: it must come well before.
MAX_RENEWAL_RESYNC_SECONDS = 3600.0


def _spiffe_id(text: str) -> str:
    """``text`` if it is a SpiffeId."""
    SpiffeId.parse(text)  # a SpiffeIdError (a ValueError) names the rule it breaks
    return text

class OperatorSettings(BaseSettings):
    """What the operator renders (image, ports, pod security) and how it runs."""

    model_config = SettingsConfigDict(env_prefix="PACKETFLOW_", frozen=True, extra="ignore")

    image: str = Field(default=DEFAULT_IMAGE, min_length=1,
                       description="Image of the runtime pods (the packetflow image)")
    image_pull_policy: str = Field(default="IfNotPresent",
                                   pattern="^(Always|IfNotPresent|Never)$")
    grpc_port: int = Field(default=50051, ge=1, le=65535, description="Runtime gRPC port")
    metrics_port: int = Field(default=9464, ge=1, le=65535, description="Runtime metrics port")
    run_as_user: int = Field(
        default=10001, ge=1,
        description="UID of runtime pods; numeric so the kubelet can verify runAsNonRoot")
    state_dir: str = Field(
        default="/var/lib/packetflow", pattern="^/",
        description="Where runtime pods keep durable local state (PACKETFLOW_STATE_DIR): "
                    "trigger idempotency keys, SQLite actor stores")
    actor_storage_size: str = Field(
        default="1Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$",
        description="Size of the volume each SQLite Actor pod gets (a PVC per pod)")
    actor_storage_class: str | None = Field(
        default=None, description="StorageClass of those volumes; unset: the cluster default")
    mcp_enabled: bool = Field(
        default=False, description="Runtime pods also serve MCP (streamable HTTP at /mcp) on "
                                   "mcp_port, and their Services get a port named mcp")
    mcp_port: int = Field(default=8765, ge=1, le=65535, description="Runtime MCP port")
    mcp_aggregate_namespace: str | None = Field(
        default=None, pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Keep the ConfigMap packetflow-mcp-bundle in this namespace: every "
                    "Capability there, served as MCP tools by one aggregate Deployment (the "
                    "chart's mcp.aggregate); unset: no aggregate")
    mcp_token_secret: str | None = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[-._a-zA-Z0-9]+$",
        description="Secret 'name/key' holding the bearer token MCP clients must send: runtime "
                    "pods get it as PACKETFLOW_MCP_TOKEN; unset: MCP is unauthenticated")
    drain_seconds: float = Field(
        default=5.0, ge=0,
        description="Runtime pods report NOT_SERVING this long after SIGTERM before refusing "
                    "calls, so Service endpoints drop them first (PACKETFLOW_DRAIN_SECONDS)")
    grace_seconds: float = Field(
        default=20.0, ge=0,
        description="After the drain, how long in-flight calls may finish "
                    "(PACKETFLOW_GRACE_SECONDS); the pods' termination grace period covers "
                    "drain + grace")
    trigger_store_secret: str | None = Field(
        default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[-._a-zA-Z0-9]+$",
        description="Secret 'name/key' (in each resource's namespace) holding a PostgreSQL "
                    "DSN: runtime pods get it as PACKETFLOW_TRIGGER_STORE_DSN, so replicas "
                    "share trigger keys and a schedule fires once, not once per pod")
    default_policy: DefaultPolicy = Field(
        default="namespace",
        description="Runtime pods' PACKETFLOW_DEFAULT_POLICY: who may call a Capability or "
                    "Actor without spec.access (namespace, cluster, deny)")
    mtls_issuer: str | None = Field(
        default=None,
        pattern=r"^((Issuer|ClusterIssuer)/[a-z0-9]([-a-z0-9.]*[a-z0-9])?|operator)$",
        description="Zero trust: the cert-manager issuer ('Issuer/name' or "
                    "'ClusterIssuer/name') of runtime pods' certificates, or 'operator': the "
                    "operator's own authority (ca_namespace/ca_secret). Each Capability and "
                    "Actor gets a ServiceAccount packetflow-<name> and a certificate for "
                    "spiffe://<trust_domain>/ns/<namespace>/sa/packetflow-<name>; its pods "
                    "serve mutual TLS only; unset: plaintext")
    ca_namespace: str | None = Field(
        default=None, pattern=NAME_PATTERN,
        description="With mtls_issuer 'operator': the namespace of the authority's Secret "
                    "(the chart's release namespace)")
    ca_secret: str = Field(
        default="packetflow-ca", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="With mtls_issuer 'operator': the authority's Secret, made once, reused")
    operator_identities: list[Annotated[str, Field(
            pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]] = Field(
        default_factory=list,
        description="With mtls_issuer 'operator': ServiceAccounts 'namespace/name' (each "
                    "also a Service of that name) the operator issues a certificate into "
                    "Secret <name>-identity for: the chart's gateway and MCP aggregate")
    trust_domain: str = Field(
        default="cluster.local", pattern=TRUST_DOMAIN_PATTERN,
        description="The cluster's SPIFFE trust domain (with mtls_issuer)")
    trusted_forwarders: list[Annotated[str, AfterValidator(_spiffe_id)]] = Field(
        default_factory=list,
        description="With mtls_issuer: SPIFFE IDs runtime pods believe packetflow-caller "
                    "from (PACKETFLOW_TRUSTED_FORWARDERS: the chart's gateway and MCP "
                    "aggregate)")
    health_port: int = Field(
        default=8086, ge=1, le=65535,
        description="With mtls_issuer: plaintext grpc.health.v1 for the kubelet's probes "
                    "(they cannot present a certificate)")
    tokens: bool = Field(
        default=False,
        description="With mtls_issuer: runtime pods also accept callers proving themselves "
                    "with a projected ServiceAccount token (audience packetflow) on "
                    "token_port (PACKETFLOW_TOKEN_ADDRESS, checked by TokenReview), and pods "
                    "that call other capabilities (compositions, planners, Actors) get such "
                    "a token mounted")
    token_port: int = Field(default=50052, ge=1, le=65535,
                            description="With tokens: the runtime's token port")
    token_expiration_seconds: int = Field(
        default=3600, ge=600, le=86400,
        description="With tokens: lifetime of the projected tokens callers get (the kubelet "
                    "renews them at 80 %; the API server's minimum is 600)")
    network_policies: bool = Field(
        default=False,
        description="Render a NetworkPolicy per Capability and Actor: gRPC and MCP ports open "
                    "to the namespace's PacketFlow pods, the gateway, the MCP aggregate and "
                    "the callers spec.access allows; metrics to Prometheus only")
    gateway_namespace: str | None = Field(
        default=None, pattern=NAME_PATTERN,
        description="Namespace of the chart's gateway: its pods may call every runtime "
                    "workload's gRPC port; unset: only a gateway in the workload's namespace")
    prometheus_namespace_labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels of the namespaces Prometheus runs in (a NetworkPolicy "
                    "namespaceSelector); empty: any namespace")
    prometheus_pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/name": "prometheus"},
        description="Labels of the Prometheus pods that may scrape the metrics port")
    federation_status_url: str | None = Field(
        default=None,
        description="Where the operator reads a federation gateway's /status; placeholders "
                    "{name}, {namespace}, {service}, {port}; unset: "
                    "http://{service}.{namespace}.<cluster_domain_suffix>:{port}/status "
                    "(out of the cluster, e.g. the API server's service proxy)")
    cluster_domain_suffix: str = Field(
        default="svc", description="Suffix of in-cluster endpoints: <name>.<namespace>.<suffix>")
    cluster_domain: str = Field(
        default=DEFAULT_CLUSTER_DOMAIN, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="The cluster's DNS domain (the chart's clusterDomain): certificates name "
                    "<name>.<namespace>.svc.<cluster_domain>, and runtime pods resolve "
                    "Services under it (PACKETFLOW_CLUSTER_DOMAIN)")
    retry_delay_seconds: float = Field(
        default=5.0, gt=0, description="Delay before a failed reconcile is retried")
    status_wait_seconds: float = Field(
        default=2.0, ge=0,
        description="How long a status write may wait while other resources' children are "
                    "being written (children first when many arrive at once); 0: never waits")
    resync_seconds: float = Field(
        default=300.0, ge=0,
        description="Reconcile every resource this often even without events, healing what "
                    "a missed watch event or a failed child-event handler left; 0: off")
    liveness_address: str | None = Field(
        default="0.0.0.0:8080",
        description="host:port of kopf's liveness endpoint (/healthz); empty: off")
    operator_metrics_address: str | None = Field(
        default="0.0.0.0:9465",
        description="host:port of the operator's Prometheus /metrics; empty: off")
    log_format: str = Field(default="json", pattern="^(json|plain|full)$")
    verbose: bool = False

    @model_validator(mode="after")
    def _tokens_need_tls(self) -> Self:
        if self.tokens and self.mtls_issuer is None:
            raise ValueError("tokens: the token port serves TLS with the workload's "
                             "certificate, so it needs mtls_issuer (PACKETFLOW_MTLS_ISSUER)")
        if self.mtls_issuer == "operator":
            if self.ca_namespace is None:
                raise ValueError("mtls_issuer 'operator' needs ca_namespace "
                                 "(PACKETFLOW_CA_NAMESPACE): where the authority's Secret is")
            if not 0 < self.resync_seconds <= MAX_RENEWAL_RESYNC_SECONDS:
                raise ValueError("mtls_issuer 'operator' renews certificates on the resync: "
                                 "resync_seconds must be between 0 (excluded) and "
                                 f"{MAX_RENEWAL_RESYNC_SECONDS:g}")
        return self
