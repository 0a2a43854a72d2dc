"""Pure renderers for Federations: a validated Federation -> the federation gateway's
children, and the gateway's own report -> the Federation's status.

A Federation runs as (all named after it, ``<name>-federation...``):

* a ConfigMap with the gateway's config (the Federation manifest, the Secret's and the
  bundles' mount paths in place of their names, and the gateway's settings);
* a Deployment running ``packetflow federation --config``, mounting the identity Secret and
  each peer's bundle ConfigMap as files, which the gateway re-reads when the kubelet updates
  them (rotation without a restart: the config is not part of the pod template's hash);
* a Service for peers (the mTLS port, of ``spec.endpoint.service.type``) and a ClusterIP
  Service for local callers and the operator (imports, /metrics, /status);
* a ClusterIP Service per import, named by its local name and answering the runtime protocol,
  so compositions and actors reach ``globex-translate`` like any other capability;
* with SQLite, a PersistentVolumeClaim for the audit log, never owned by the Federation: an
  audit log outlives the Federation that wrote it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

import yaml

from packetflow.identity.spiffe import Workload
from packetflow.manifests import ManifestError
from packetflow.operator import render as runtime
from packetflow.operator import status as workload
from packetflow.operator.render import (
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_PART_OF,
    MANAGED_BY,
    SPEC_HASH_ANNOTATION,
    spec_hash,
)
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import API_VERSION, Federation

LABEL_FEDERATION: Final = "packetflow.io/federation"
CONFIG_KEY: Final = "config.yaml"
CONFIG_DIR: Final = "/etc/packetflow/federation"
IDENTITY_DIR: Final = "/etc/packetflow/identity"
PEERS_DIR: Final = "/etc/packetflow/peers"
STATE_DIR: Final = "/var/lib/packetflow/federation"
CONTAINER: Final = "federation"
AUDIT_VOLUME: Final = "audit"
# The gateway's /metrics and /status port (the runtime's metrics port number).
STATUS_PATH: Final = "/status"

Manifest = dict[str, Any]


def gateway_name(name: str) -> str:
    """The Deployment, config ConfigMap and peer Service of Federation ``name``."""
    return f"{name}-federation"


def local_service_name(name: str) -> str:
    """The ClusterIP Service for local callers, /metrics and /status."""
    return f"{name}-federation-local"


def audit_claim_name(name: str) -> str:
    """The audit log's PersistentVolumeClaim (SQLite)."""
    return f"{name}-federation-audit"


def selector_labels(name: str) -> dict[str, str]:
    """Labels that pick the gateway's pods."""
    return {LABEL_NAME: "packetflow", LABEL_INSTANCE: name, LABEL_COMPONENT: "federation"}


def child_labels(name: str) -> dict[str, str]:
    """Labels on every child: the selector plus ownership labels."""
    return {**selector_labels(name), LABEL_PART_OF: "packetflow", LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_FEDERATION: name}


def _metadata(name: str, child: str, namespace: str) -> Manifest:
    return {"name": child, "namespace": namespace, "labels": child_labels(name)}


def kubernetes_errors(federation: Federation, source: str) -> list[ManifestError]:
    """What the models allow but a cluster cannot run: files instead of a Secret and
    ConfigMaps (files are for ``packetflow federation`` on a machine)."""
    errors = []
    if federation.spec.identity.secret_name is None:
        errors.append(ManifestError(source, "spec.identity", "on Kubernetes the identity is "
                                    "a Secret: set secretName"))
    for index, peer in enumerate(federation.spec.peers):
        if peer.trust_bundle.config_map_ref is None:
            errors.append(ManifestError(source, f"spec.peers[{index}].trustBundle",
                                        "on Kubernetes a bundle is a ConfigMap key: set "
                                        "configMapRef"))
    return errors


def render_config(federation: Federation, namespace: str,
                  settings: OperatorSettings) -> Manifest:
    """The gateway's config: the Federation with mounted files for its Secret and bundles."""
    spec = federation.spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
    spec["identity"] = {"certFile": f"{IDENTITY_DIR}/tls.crt",
                        "keyFile": f"{IDENTITY_DIR}/tls.key"}
    for peer in spec.get("peers", []):
        peer["trustBundle"] = {"file": f"{PEERS_DIR}/{peer['name']}/ca.crt"}
    gateway = {"listen": f"0.0.0.0:{federation.spec.endpoint.port}",
               "local": f"0.0.0.0:{settings.grpc_port}",
               "metrics_address": f"0.0.0.0:{settings.metrics_port}",
               "state_dir": STATE_DIR, "log_format": "json"}
    document = {"apiVersion": API_VERSION, "kind": "Federation",
                "metadata": {"name": federation.name}, "spec": spec, "gateway": gateway}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(federation.name, gateway_name(federation.name), namespace),
            "data": {CONFIG_KEY: yaml.safe_dump(document, sort_keys=False)}}


def _volumes(federation: Federation) -> tuple[list[Manifest], list[Manifest]]:
    """(volumes, mounts): config, identity, each peer's bundle, audit state, scratch."""
    name, spec = federation.name, federation.spec
    assert spec.identity.secret_name is not None
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": gateway_name(name)}},
        # No subPath anywhere: subPath mounts never see the kubelet's updates (rotation).
        {"name": "identity", "secret": {"secretName": spec.identity.secret_name, "items": [
            {"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "identity", "mountPath": IDENTITY_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": AUDIT_VOLUME, "mountPath": STATE_DIR},
    ]
    for index, peer in enumerate(spec.peers):
        ref = peer.trust_bundle.config_map_ref
        assert ref is not None
        volumes.append({"name": f"peer-{index}", "configMap": {
            "name": ref.name, "items": [{"key": ref.key, "path": "ca.crt"}]}})
        mounts.append({"name": f"peer-{index}", "mountPath": f"{PEERS_DIR}/{peer.name}",
                       "readOnly": True})
    if spec.audit.store.sqlite is not None:
        volumes.append({"name": AUDIT_VOLUME, "persistentVolumeClaim": {
            "claimName": audit_claim_name(name)}})
    else:
        volumes.append({"name": AUDIT_VOLUME, "emptyDir": {}})
    return volumes, mounts


def _env(federation: Federation) -> list[Manifest]:
    env: list[Manifest] = [
        # Exported capabilities are the Services of their names, in this namespace.
        {"name": "PACKETFLOW_NAMESPACE",
         "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    postgresql = federation.spec.audit.store.postgresql
    if postgresql is not None:
        if postgresql.dsn_from is not None and postgresql.dsn_from.secret_key_ref is not None:
            ref = postgresql.dsn_from.secret_key_ref
            env.append({"name": "PACKETFLOW_FEDERATION_AUDIT_DSN", "valueFrom": {
                "secretKeyRef": {"name": ref.name, "key": ref.key}}})
        elif postgresql.dsn is not None:
            env.append({"name": "PACKETFLOW_FEDERATION_AUDIT_DSN", "value": postgresql.dsn})
    return env


def render_deployment(federation: Federation, namespace: str,
                      settings: OperatorSettings) -> Manifest:
    """The gateway's Deployment; peers, exports and certificates change without a rollout."""
    name, spec = federation.name, federation.spec
    volumes, mounts = _volumes(federation)
    local = settings.grpc_port
    container: Manifest = {
        "name": CONTAINER, "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["federation", "--config", f"{CONFIG_DIR}/{CONFIG_KEY}"],
        "env": _env(federation),
        "ports": [{"name": "federation", "containerPort": spec.endpoint.port,
                   "protocol": "TCP"},
                  {"name": "grpc", "containerPort": local, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": settings.metrics_port,
                   "protocol": "TCP"}],
        # The local port serves grpc.health.v1, as runtime pods do.
        "readinessProbe": {"grpc": {"port": local}, "periodSeconds": 5, "timeoutSeconds": 2,
                           "failureThreshold": 3},
        "livenessProbe": {"grpc": {"port": local}, "initialDelaySeconds": 10,
                          "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3},
        "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }
    template: Manifest = {
        "metadata": {"labels": child_labels(name), "annotations": {}},
        "spec": {
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": math.ceil(settings.grace_seconds) + 5,
            "securityContext": {"runAsNonRoot": True, "runAsUser": settings.run_as_user,
                                "runAsGroup": settings.run_as_user,
                                "fsGroup": settings.run_as_user,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container], "volumes": volumes,
        },
    }
    add_workload_identity(template, federation, settings)
    template["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = spec_hash(template)
    # SQLite: one pod on one volume at a time (ReadWriteOnce), so no surge.
    strategy = {"type": "Recreate"} if spec.audit.store.sqlite is not None else {
        "type": "RollingUpdate"}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(name, gateway_name(name), namespace),
            "spec": {"replicas": spec.replicas, "selector": {"matchLabels":
                                                             selector_labels(name)},
                     "strategy": strategy, "revisionHistoryLimit": 3, "template": template}}


# Zero trust inside the cluster (``mtls_issuer``): the gateway's own workload certificate,
# beside the organization's identity it shows peers.
WORKLOAD_IDENTITY_VOLUME: Final = "workload-identity"


def workload_secret_name(name: str) -> str:
    """The Secret holding the gateway's workload certificate (``<name>-federation-identity``)."""
    return runtime.identity_secret_name(gateway_name(name))


def workload_spiffe_id(namespace: str, settings: OperatorSettings) -> str:
    """The gateway's SPIFFE ID: the namespace's federation ServiceAccount's, which runtime
    pods there trust to name a remote caller (``PACKETFLOW_TRUSTED_FORWARDERS``)."""
    return str(Workload(namespace, runtime.FEDERATION_SERVICE_ACCOUNT).spiffe_id(
        settings.trust_domain))


def workload_dns_names(federation: Federation, namespace: str,
                       settings: OperatorSettings) -> list[str]:
    """The local Service's names and each import's (callers dial imports by name)."""
    names = runtime.service_dns_names(local_service_name(federation.name), namespace, settings)
    for imported in federation.spec.imports:
        names += runtime.service_dns_names(imported.local_name, namespace, settings)
    return names


def render_service_account(namespace: str) -> Manifest:
    """The ServiceAccount every federation gateway of the namespace runs as; no token is
    mounted from it. Shared, so owned by no Federation (the operator creates it if missing)."""
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": runtime.FEDERATION_SERVICE_ACCOUNT, "namespace": namespace,
                         "labels": {LABEL_NAME: "packetflow", LABEL_COMPONENT: "federation",
                                    LABEL_PART_OF: "packetflow",
                                    LABEL_MANAGED_BY: MANAGED_BY}},
            "automountServiceAccountToken": False}


def render_workload_certificate(federation: Federation, namespace: str,
                                settings: OperatorSettings) -> Manifest | None:
    """The cert-manager Certificate of the gateway's workload identity; None without
    ``mtls_issuer`` or with the operator's own authority (it writes the Secret itself)."""
    if settings.mtls_issuer is None or runtime.operator_issued(settings):
        return None
    secret = workload_secret_name(federation.name)
    return {"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": _metadata(federation.name, secret, namespace),
            "spec": runtime.certificate_spec(
                secret, workload_spiffe_id(namespace, settings),
                workload_dns_names(federation, namespace, settings), settings)}


def add_workload_identity(template: Manifest, federation: Federation,
                          settings: OperatorSettings) -> None:
    """With ``mtls_issuer``: the pod runs as the federation ServiceAccount, mounts its
    workload certificate where ``PACKETFLOW_TLS_*`` say, and is probed on the plaintext
    health port (the kubelet presents no certificate)."""
    if settings.mtls_issuer is None:
        return
    pod = template["spec"]
    pod["serviceAccountName"] = runtime.FEDERATION_SERVICE_ACCOUNT
    pod["volumes"].append({"name": WORKLOAD_IDENTITY_VOLUME, "secret": {
        "secretName": workload_secret_name(federation.name), "defaultMode": 0o440}})
    (container,) = pod["containers"]
    container["env"] += runtime.workload_tls_env(settings)
    container["ports"].append({"name": runtime.HEALTH_PORT_NAME,
                               "containerPort": settings.health_port, "protocol": "TCP"})
    container["volumeMounts"].append({"name": WORKLOAD_IDENTITY_VOLUME,
                                      "mountPath": runtime.IDENTITY_DIR, "readOnly": True})
    for probe in ("readinessProbe", "livenessProbe"):
        container[probe]["grpc"] = {"port": settings.health_port}


def render_services(federation: Federation, namespace: str,
                    settings: OperatorSettings) -> list[Manifest]:
    """The peer-facing Service, the local one, and one per import (named by its ``as``)."""
    name = federation.name
    port = federation.spec.endpoint.port
    grpc_port = {"name": "grpc", "port": settings.grpc_port, "targetPort": "grpc",
                 "protocol": "TCP"}
    services = [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": _metadata(name, gateway_name(name), namespace),
         "spec": {"type": federation.spec.endpoint.service.type,
                  "selector": selector_labels(name),
                  "ports": [{"name": "federation", "port": port, "targetPort": "federation",
                             "protocol": "TCP"}]}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": _metadata(name, local_service_name(name), namespace),
         "spec": {"type": "ClusterIP", "selector": selector_labels(name),
                  "ports": [grpc_port, {"name": "metrics", "port": settings.metrics_port,
                                        "targetPort": "metrics", "protocol": "TCP"}]}},
    ]
    for imported in federation.spec.imports:
        services.append({"apiVersion": "v1", "kind": "Service",
                         "metadata": _metadata(name, imported.local_name, namespace),
                         "spec": {"type": "ClusterIP", "selector": selector_labels(name),
                                  "ports": [grpc_port]}})
    return services


def render_audit_claim(federation: Federation, namespace: str,
                       settings: OperatorSettings) -> Manifest | None:
    """The SQLite audit log's volume claim (none with PostgreSQL)."""
    if federation.spec.audit.store.sqlite is None:
        return None
    spec: Manifest = {"accessModes": ["ReadWriteOnce"],
                      "resources": {"requests": {"storage": settings.actor_storage_size}}}
    if settings.actor_storage_class is not None:
        spec["storageClassName"] = settings.actor_storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _metadata(federation.name, audit_claim_name(federation.name),
                                  namespace), "spec": spec}


def desired_children(federation: Federation, namespace: str,
                     settings: OperatorSettings) -> list[Manifest]:
    """Every owned child, in the order applied (config and certificate first, the
    Deployment last)."""
    certificate = render_workload_certificate(federation, namespace, settings)
    return [render_config(federation, namespace, settings),
            *([certificate] if certificate is not None else []),
            *render_services(federation, namespace, settings),
            render_deployment(federation, namespace, settings)]


def status_url(name: str, namespace: str, settings: OperatorSettings) -> str:
    """Where the operator reads the gateway's report."""
    return (f"http://{local_service_name(name)}.{namespace}.{settings.cluster_domain_suffix}:"
            f"{settings.metrics_port}{STATUS_PATH}")


def federation_status(deployment: Mapping[str, Any], report: Mapping[str, Any] | None, *,
                      previous: Sequence[Mapping[str, Any]] | None, generation: int | None,
                      now: str, error: str | None = None) -> dict[str, Any]:
    """The Federation's status from its Deployment and the gateway's /status report (``None``
    when the gateway could not be asked: its last report stays)."""
    assessed = workload.assess_deployment(deployment)
    out: dict[str, Any] = {
        "conditions": workload.stamp_conditions([assessed.ready, assessed.degraded], previous,
                                                generation, now),
        "replicas": assessed.replicas, "readyReplicas": assessed.ready_replicas,
    }
    if report is None:
        if error is not None:
            out["reportError"] = error
        return out
    peers = []
    for peer in report.get("peers", []):
        trust = {dimension: {"score": values["score"], "positive": values["positive"],
                             "negative": values["negative"],
                             "observations": values["observations"],
                             "capped": values["capped"]}
                 for dimension, values in peer.get("trust", {}).items()}
        peers.append({key: value for key, value in {
            "name": peer["name"], "organization": peer.get("organization"),
            "trustDomain": peer.get("trustDomain"), "connected": bool(peer.get("connected")),
            "lastHandshake": peer.get("lastHandshake"),
            "certificateExpiry": peer.get("certificateExpiry"),
            "catalogVersion": peer.get("catalogVersion") or None,
            "trust": trust, "refused": peer.get("refused"), "error": peer.get("error"),
        }.items() if value is not None})
    connected = sum(1 for peer in peers if peer["connected"])
    lowest = min((peer["lowestTrust"]["score"] for peer in report.get("peers", [])),
                 default=None)
    out.update({
        "peers": peers,
        "peersConnected": f"{connected}/{len(peers)}",
        "exports": [{"capability": e["capability"], "calls": e["calls"],
                     "errors": e["errors"], "slaBreaches": e["slaBreaches"]}
                    for e in report.get("exports", [])],
        "imports": [{key: value for key, value in {
            "name": i["name"], "peer": i["peer"], "capability": i["capability"],
            "ready": i["ready"], "problem": i.get("problem"),
            "slaBreaches": i.get("slaBreaches", 0)}.items() if value is not None}
            for i in report.get("imports", [])],
        "audit": {key: value for key, value in report.get("audit", {}).items()
                  if value is not None},
        "reportError": None,
        "reloadError": report.get("reloadError"),
    })
    if lowest is not None:
        out["lowestTrustScore"] = lowest
    return out


def new_breaches(previous: Mapping[str, Any] | None,
                 current: Mapping[str, Any]) -> list[str]:
    """One message per export or import whose SLA breaches grew (what becomes an Event)."""
    def counts(status: Mapping[str, Any] | None) -> dict[str, int]:
        found: dict[str, int] = {}
        for export in (status or {}).get("exports", []) or []:
            found[f"export {export['capability']}"] = int(export.get("slaBreaches", 0))
        for imported in (status or {}).get("imports", []) or []:
            found[f"import {imported['name']}"] = int(imported.get("slaBreaches", 0))
        return found

    before, after = counts(previous), counts(current)
    return [f"{what}: SLA breached ({count - before.get(what, 0)} more window(s), "
            f"{count} in all)" for what, count in after.items()
            if count > before.get(what, 0)]
