"""Pure renderers: a validated Capability or Actor -> the Kubernetes objects that run it.

Nothing here does I/O; every function returns plain dicts, so the rendered state can be
tested (and validated against real Kubernetes schemas) without a cluster. The handlers add
ownerReferences and apply the difference.

A Capability runs as a ConfigMap (its spec bundle), a Deployment and a Service; with
``spec.canary``, a second set ``<name>-canary`` runs the canary's version of it (same
capability name, so callers never know which answered; the gateway splits calls by weight). An
Actor runs as a ConfigMap, a StatefulSet (stable member names for placement), a headless
Service (the members' DNS names) and a Service for clients; with SQLite each pod gets a volume
(a PVC).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any, Final

import orjson
import yaml

from packetflow.access import workload_service_account
from packetflow.composition.resolve import DEFAULT_CLUSTER_DOMAIN, service_fqdn
from packetflow.identity.spiffe import Workload
from packetflow.identity.tokens import AUDIENCE
from packetflow.operator.settings import OperatorSettings
from packetflow.spec import API_VERSION, CANARY_SUFFIX, Actor, Capability, ValueSource

Manifest = dict[str, Any]
Resource = Capability | Actor

LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_CAPABILITY: Final = "packetflow.io/capability"
LABEL_ACTOR: Final = "packetflow.io/actor"
LABEL_VERSION: Final = "packetflow.io/version"
# The label naming a child's owner, per owner kind (orphans are adopted only by their owner).
OWNER_LABELS: Final = {"Capability": LABEL_CAPABILITY, "Actor": LABEL_ACTOR}
MANAGED_BY: Final = "packetflow-operator"
SPEC_HASH_ANNOTATION: Final = "packetflow.io/spec-hash"

BUNDLE_DIR: Final = "/etc/packetflow"
BUNDLE_KEY: Final = "bundle.yaml"
BUNDLE_PATH: Final = f"{BUNDLE_DIR}/{BUNDLE_KEY}"
CONTAINER_NAME: Final = "runtime"
STATE_VOLUME: Final = "state"
MCP_PORT_NAME: Final = "mcp"
# The namespace-wide bundle of every Capability, served as MCP tools by the chart's aggregate.
MCP_BUNDLE_CONFIGMAP: Final = "packetflow-mcp-bundle"
# Zero trust (``mtls_issuer``): the Secret cert-manager keeps, mounted here, and the
# plaintext health port beside the mTLS one.
IDENTITY_DIR: Final = "/etc/packetflow-identity"
IDENTITY_VOLUME: Final = "identity"
HEALTH_PORT_NAME: Final = "health"
# Workload certificates live a day and are renewed 8 hours before they expire; runtime pods
# re-read the files, so renewal needs no restart.
CERTIFICATE_DURATION: Final = "24h"
CERTIFICATE_RENEW_BEFORE: Final = "8h"
# ``mtls_issuer`` naming the operator's own authority instead of a cert-manager issuer.
OPERATOR_ISSUER: Final = "operator"
# The ServiceAccount every federation gateway of a namespace runs as: the workload its
# namespace's runtime pods see calling their exports (it names no caller of its own).
FEDERATION_SERVICE_ACCOUNT: Final = "packetflow-federation"
# ServiceAccount tokens (``tokens``): the runtime's token port, and where callers find the
# projected token for the audience the runtime reviews them for.
TOKEN_PORT_NAME: Final = "token"
TOKEN_VOLUME: Final = "packetflow-token"
TOKEN_DIR: Final = "/var/run/secrets/packetflow"
# Implementations whose pods call other capabilities (steps, tools, actor code).
_CALLING_KINDS: Final = ("composition", "planner")

# Implementations the packetflow runtime serves itself; `image` brings its own server.
_RUNTIME_SERVED: Final = ("python", "builtin", "composition", "mcp", "federated", "planner")
# Pod components: a Capability's Deployment and an Actor's StatefulSet never select each other.
_COMPONENTS: Final = {"Capability": "runtime", "Actor": "actor"}
# Spec fields no runtime reads (the gateway and the routing controller do): left out of the
# bundle, so changing a canary weight or a traffic policy never restarts pods.
_NOT_SERVED: Final = ("canary", "traffic")


def canary_name(name: str) -> str:
    """Name of a Capability's canary workload, Service (and bundle prefix)."""
    return f"{name}{CANARY_SUFFIX}"


def selector_labels(name: str, kind: str = "Capability") -> dict[str, str]:
    """Labels that pick a workload's runtime pods (``name``: the workload's, which is the
    resource's but for a canary); immutable once the workload exists."""
    return {LABEL_NAME: "packetflow", LABEL_INSTANCE: name, LABEL_COMPONENT: _COMPONENTS[kind]}


def child_labels(name: str, kind: str = "Capability", workload: str | None = None
                 ) -> dict[str, str]:
    """Labels on every child: its workload's selector plus ownership labels the operator
    watches by (the owner is the resource ``name``)."""
    return {**selector_labels(workload or name, kind), LABEL_PART_OF: "packetflow",
            LABEL_MANAGED_BY: MANAGED_BY, OWNER_LABELS[kind]: name}


def label_selector(name: str, kind: str = "Capability") -> str:
    """The runtime pods' selector as a string (``status.selector``, for the scale subresource)."""
    return ",".join(f"{key}={value}" for key, value in selector_labels(name, kind).items())


def configmap_name(name: str) -> str:
    """Name of the ConfigMap holding the capability's spec bundle."""
    return f"{name}-bundle"


def endpoint(name: str, namespace: str, settings: OperatorSettings) -> str:
    """The in-cluster gRPC address of a capability: ``<name>.<namespace>.svc:<port>``."""
    return f"{name}.{namespace}.{settings.cluster_domain_suffix}:{settings.grpc_port}"


def headless_service_name(name: str) -> str:
    """Name of an Actor's headless Service: its members' DNS names live under it."""
    return f"{name}-headless"


def member_names(name: str, replicas: int) -> list[str]:
    """Pod names of an Actor's StatefulSet: ``<name>-0`` .. ``<name>-<replicas-1>``."""
    return [f"{name}-{ordinal}" for ordinal in range(replicas)]


def _bundle_manifest(resource: Resource) -> Manifest:
    spec = resource.spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
    for key in _NOT_SERVED:
        spec.pop(key, None)
    return {
        "apiVersion": API_VERSION,
        "kind": resource.kind,
        # Only the name: server-side metadata (uid, annotations, managedFields) is not the spec.
        "metadata": {"name": resource.name},
        "spec": spec,
    }


# libyaml's emitter when PyYAML has it: five times faster than the Python one, and the bundle
# is most of the CPU of rendering a Capability (same documents; it escapes a few more
# characters, e.g. emoji, which load back the same).
_SAFE_DUMPER: Final = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def render_bundle(resource: Resource) -> str:
    """The YAML the runtime loads (``--bundle``): exactly this Capability's or Actor's manifest."""
    return yaml.dump(_bundle_manifest(resource), Dumper=_SAFE_DUMPER, sort_keys=False,
                     allow_unicode=True)


def _metadata(name: str, namespace: str, kind: str = "Capability",
              workload: str | None = None) -> Manifest:
    return {"name": workload or name, "namespace": namespace,
            "labels": child_labels(name, kind, workload)}


def render_configmap(resource: Resource, namespace: str, settings: OperatorSettings,
                     workload: str | None = None) -> Manifest:
    """The ConfigMap with the spec bundle, mounted read-only into the runtime pods."""
    metadata = _metadata(resource.name, namespace, resource.kind, workload)
    metadata["name"] = configmap_name(workload or resource.name)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata,
            "data": {BUNDLE_KEY: render_bundle(resource)}}


def _runtime_served(resource: Resource) -> bool:
    return isinstance(resource, Actor) or resource.spec.implementation.kind in _RUNTIME_SERVED


def _mutual_tls(resource: Resource, settings: OperatorSettings) -> bool:
    """Whether the resource's pods serve mutual TLS (a foreign image serves what it serves)."""
    return settings.mtls_issuer is not None and _runtime_served(resource)


def has_workload_identity(resource: Resource, settings: OperatorSettings) -> bool:
    """Whether the resource's pods carry a workload certificate (and serve mutual TLS)."""
    return _mutual_tls(resource, settings)


def operator_issued(settings: OperatorSettings) -> bool:
    """Whether the operator's own authority issues workload certificates (no cert-manager)."""
    return settings.mtls_issuer == OPERATOR_ISSUER


def service_dns_names(name: str, namespace: str, settings: OperatorSettings) -> list[str]:
    """The DNS names of Service ``name``: short, with namespace, with the suffix, and the
    fully qualified one of the cluster domain (what composition steps dial)."""
    return [name, f"{name}.{namespace}", f"{name}.{namespace}.{settings.cluster_domain_suffix}",
            service_fqdn(name, namespace, settings.cluster_domain)]


def certificate_names(resource: Resource, namespace: str,
                      settings: OperatorSettings) -> tuple[str, list[str]]:
    """The SPIFFE ID (``spiffe://<trust domain>/ns/<namespace>/sa/packetflow-<name>``) and
    DNS names (its Service's; an Actor's members too) of the resource's certificate."""
    name = resource.name
    dns = service_dns_names(name, namespace, settings)
    if isinstance(resource, Actor):
        dns.append(f"*.{headless_service_name(name)}.{namespace}."
                   f"{settings.cluster_domain_suffix}")
    spiffe_id = Workload(namespace, workload_service_account(name)).spiffe_id(
        settings.trust_domain)
    return str(spiffe_id), dns


def identity_secret_name(name: str) -> str:
    """The Secret cert-manager (or the operator's own authority) writes a workload's
    certificate, key and CA into."""
    return f"{name}-identity"


def render_service_account(resource: Resource, namespace: str) -> Manifest:
    """The ServiceAccount the resource's pods run as, ``packetflow-<name>``: the identity
    ``spec.access`` rules name (``capability: <name>``). No token is mounted from it."""
    metadata = _metadata(resource.name, namespace, resource.kind)
    metadata["name"] = workload_service_account(resource.name)
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata,
            "automountServiceAccountToken": False}


def render_certificate(resource: Resource, namespace: str,
                       settings: OperatorSettings) -> Manifest:
    """The cert-manager Certificate of the resource's pods: SPIFFE ID
    ``spiffe://<trust domain>/ns/<namespace>/sa/packetflow-<name>``, DNS names of its
    Service (and an Actor's members), server and client auth, renewed well before expiry."""
    name = resource.name
    spiffe_id, dns = certificate_names(resource, namespace, settings)
    metadata = _metadata(name, namespace, resource.kind)
    metadata["name"] = identity_secret_name(name)
    return {"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": metadata,
            "spec": certificate_spec(identity_secret_name(name), spiffe_id, dns, settings)}


def certificate_spec(secret: str, spiffe_id: str, dns_names: list[str],
                     settings: OperatorSettings) -> Manifest:
    """A cert-manager Certificate's spec: ECDSA P-256, server and client auth, 24 h,
    renewed 8 h before expiry, from the ``mtls_issuer``."""
    assert settings.mtls_issuer is not None
    issuer_kind, _, issuer = settings.mtls_issuer.partition("/")
    return {"secretName": secret,
            "duration": CERTIFICATE_DURATION, "renewBefore": CERTIFICATE_RENEW_BEFORE,
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "usages": ["digital signature", "key encipherment", "server auth", "client auth"],
            "uris": [spiffe_id], "dnsNames": dns_names,
            "issuerRef": {"group": "cert-manager.io", "kind": issuer_kind, "name": issuer}}


def workload_tls_env(settings: OperatorSettings) -> list[Manifest]:
    """Where a workload finds its certificate (``PACKETFLOW_TLS_*``: the Secret's keys under
    ``IDENTITY_DIR``) and serves plaintext health (``PACKETFLOW_HEALTH_ADDRESS``)."""
    return [{"name": f"PACKETFLOW_TLS_{setting}", "value": f"{IDENTITY_DIR}/{key}"}
            for setting, key in (("CERT", "tls.crt"), ("KEY", "tls.key"), ("CA", "ca.crt"))
            ] + [{"name": "PACKETFLOW_HEALTH_ADDRESS",
                  "value": f"0.0.0.0:{settings.health_port}"}]


def _identity_env(settings: OperatorSettings) -> list[Manifest]:
    """Where the runtime finds its certificate, and whose ``packetflow-caller`` it believes
    (the gateway's, the MCP aggregate's; federation gateways name no caller)."""
    forwarders = [{"name": "PACKETFLOW_TRUSTED_FORWARDERS",
                   "value": orjson.dumps(settings.trusted_forwarders).decode()}
                  ] if settings.trusted_forwarders else []
    return [*workload_tls_env(settings), *forwarders]


def _serves_tokens(resource: Resource, settings: OperatorSettings) -> bool:
    """Whether the resource's pods serve the token port (beside mutual TLS)."""
    return settings.tokens and _mutual_tls(resource, settings)


def _calls_others(resource: Resource, settings: OperatorSettings) -> bool:
    """Whether the resource's pods get a projected token to call other capabilities with."""
    return _serves_tokens(resource, settings) and (
        isinstance(resource, Actor) or resource.spec.implementation.kind in _CALLING_KINDS)


def add_token_port(container: Manifest, resource: Resource,
                   settings: OperatorSettings) -> None:
    """With tokens: the runtime's token port (``PACKETFLOW_TOKEN_ADDRESS``, port ``token``),
    and the projected token of callers mounted at ``TOKEN_DIR``."""
    if not _serves_tokens(resource, settings):
        return
    container["env"].append({"name": "PACKETFLOW_TOKEN_ADDRESS",
                             "value": f"0.0.0.0:{settings.token_port}"})
    container["ports"].append({"name": TOKEN_PORT_NAME, "containerPort": settings.token_port,
                               "protocol": "TCP"})
    if _calls_others(resource, settings):
        container["volumeMounts"].append({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR,
                                          "readOnly": True})


def add_token_volumes(pod: Manifest, resource: Resource, settings: OperatorSettings) -> None:
    """With tokens: the pod's own API token (its TokenReviews; the chart's ClusterRole lets
    the account create nothing else) and, for callers, the projected ``packetflow`` token."""
    if not _serves_tokens(resource, settings):
        return
    pod["automountServiceAccountToken"] = True
    if _calls_others(resource, settings):
        pod["volumes"].append({"name": TOKEN_VOLUME, "projected": {"sources": [
            {"serviceAccountToken": {"audience": AUDIENCE,
                                     "expirationSeconds": settings.token_expiration_seconds,
                                     "path": "token"}}]}})


def secret_sources(resource: Resource) -> list[ValueSource]:
    """Every value the manifest takes from a Secret (``secretKeyRef``), in manifest order."""
    sources: list[ValueSource] = []
    if isinstance(resource, Capability):
        mcp = resource.spec.implementation.mcp
        if mcp is not None:
            sources.extend(mcp.headers_from.values())
        planner = resource.spec.implementation.planner
        if planner is not None and planner.model is not None \
                and planner.model.api_key_from is not None:
            sources.append(planner.model.api_key_from)
    else:
        postgresql = resource.spec.store.postgresql
        if postgresql is not None and postgresql.dsn_from is not None:
            sources.append(postgresql.dsn_from)
        for tool in resource.spec.mcp_tools:
            sources.extend(tool.headers_from.values())
    return [source for source in sources if source.secret_key_ref is not None]


def secret_env(resource: Resource) -> list[Manifest]:
    """Environment variables filled from Secrets, named as the runtime looks them up
    (:attr:`ValueSource.env_name`); one per distinct variable, sorted for a stable hash."""
    env: dict[str, Manifest] = {}
    for source in secret_sources(resource):
        ref = source.secret_key_ref
        assert ref is not None
        env.setdefault(source.env_name, {
            "name": source.env_name,
            "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return [env[name] for name in sorted(env)]


def _settings_secret_env(settings: OperatorSettings) -> list[Manifest]:
    """Runtime variables the operator's settings fill from Secrets ('name/key')."""
    env: list[Manifest] = []
    for variable, secret in (("PACKETFLOW_MCP_TOKEN", settings.mcp_token_secret),
                             ("PACKETFLOW_TRIGGER_STORE_DSN", settings.trigger_store_secret)):
        if secret is not None:
            name, key = secret.split("/", 1)
            env.append({"name": variable,
                        "valueFrom": {"secretKeyRef": {"name": name, "key": key}}})
    return env


def cluster_domain_env(settings: OperatorSettings) -> list[Manifest]:
    """``PACKETFLOW_CLUSTER_DOMAIN`` when the cluster's domain is not the default one (so
    pods of clusters with the default one keep their template, hence their rollout)."""
    return [] if settings.cluster_domain == DEFAULT_CLUSTER_DOMAIN else [
        {"name": "PACKETFLOW_CLUSTER_DOMAIN", "value": settings.cluster_domain}]


def _runtime_args(settings: OperatorSettings) -> list[str]:
    args = ["runtime", "--bundle", BUNDLE_PATH,
            "--address", f"0.0.0.0:{settings.grpc_port}",
            "--metrics-address", f"0.0.0.0:{settings.metrics_port}"]
    if settings.mcp_enabled:
        args += ["--mcp-address", f"0.0.0.0:{settings.mcp_port}"]
    return args


def _container(resource: Resource, settings: OperatorSettings,
               env: list[Manifest] | None = None, image: str | None = None) -> Manifest:
    image_impl = resource.spec.implementation.image if isinstance(resource, Capability) \
        else None
    grpc_port = image_impl.port if image_impl is not None else settings.grpc_port
    ports: list[Manifest] = [{"name": "grpc", "containerPort": grpc_port, "protocol": "TCP"}]
    container: Manifest = {"name": CONTAINER_NAME}
    mounts: list[Manifest] = []
    if image_impl is not None:
        # A foreign image serves packetflow.v1 itself; the bundle is mounted for it to read.
        container.update(image=image_impl.image, imagePullPolicy=settings.image_pull_policy,
                         env=[{"name": "PACKETFLOW_BUNDLE", "value": BUNDLE_PATH}])
    else:
        ports.append({"name": "metrics", "containerPort": settings.metrics_port,
                      "protocol": "TCP"})
        if settings.mcp_enabled:
            ports.append({"name": MCP_PORT_NAME, "containerPort": settings.mcp_port,
                          "protocol": "TCP"})
        container.update(
            image=image or settings.image, imagePullPolicy=settings.image_pull_policy,
            args=_runtime_args(settings),
            # The root filesystem is read-only: durable local state (trigger idempotency keys,
            # SQLite actor stores) goes to a mounted volume.
            env=[*(env or []), {"name": "PACKETFLOW_STATE_DIR", "value": settings.state_dir},
                 # Remote steps name Services without a namespace: theirs is the pod's own
                 # (the service-account token, which would also tell it, is not mounted).
                 {"name": "PACKETFLOW_NAMESPACE",
                  "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                 # A pod serves one capability: the others a composition calls are Services.
                 {"name": "PACKETFLOW_UNDECLARED_AS_SERVICES", "value": "true"},
                 {"name": "PACKETFLOW_DRAIN_SECONDS", "value": f"{settings.drain_seconds:g}"},
                 {"name": "PACKETFLOW_GRACE_SECONDS", "value": f"{settings.grace_seconds:g}"},
                 {"name": "PACKETFLOW_DEFAULT_POLICY", "value": settings.default_policy},
                 *secret_env(resource), *_settings_secret_env(settings),
                 *cluster_domain_env(settings)])
        mounts.append({"name": STATE_VOLUME, "mountPath": settings.state_dir})
    probe_port = grpc_port
    if _mutual_tls(resource, settings):
        container["env"] += _identity_env(settings)
        ports.append({"name": HEALTH_PORT_NAME, "containerPort": settings.health_port,
                      "protocol": "TCP"})
        mounts.append({"name": IDENTITY_VOLUME, "mountPath": IDENTITY_DIR, "readOnly": True})
        probe_port = settings.health_port  # the kubelet presents no client certificate
    container["ports"] = ports
    # The runtime serves grpc.health.v1, so the kubelet's native gRPC probe needs no exec.
    container["readinessProbe"] = {"grpc": {"port": probe_port}, "periodSeconds": 5,
                                   "timeoutSeconds": 2, "failureThreshold": 3}
    container["livenessProbe"] = {"grpc": {"port": probe_port}, "initialDelaySeconds": 10,
                                  "periodSeconds": 10, "timeoutSeconds": 2,
                                  "failureThreshold": 3}
    resources = resource.spec.resources
    if resources is not None and (resources.requests or resources.limits):
        container["resources"] = {key: dict(value) for key, value in
                                  (("requests", resources.requests), ("limits", resources.limits))
                                  if value}
    container["securityContext"] = {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    container["volumeMounts"] = [
        {"name": "bundle", "mountPath": BUNDLE_DIR, "readOnly": True},
        # The root filesystem is read-only; Python and gRPC still want a scratch directory.
        {"name": "tmp", "mountPath": "/tmp"},
        *mounts,
    ]
    add_token_port(container, resource, settings)
    return container


def _pod_template(resource: Resource, settings: OperatorSettings,
                  env: list[Manifest] | None = None,
                  state_volume: Manifest | None = None, workload: str | None = None,
                  image: str | None = None) -> Manifest:
    """The runtime pod; ``state_volume`` is None when the state dir is a claim template."""
    name = resource.name
    volumes: list[Manifest] = [
        {"name": "bundle", "configMap": {"name": configmap_name(workload or name)}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if state_volume is not None and _runtime_served(resource):
        volumes.append({"name": STATE_VOLUME, **state_volume})
    identity: Manifest = {}
    if _mutual_tls(resource, settings):
        # Read by the runtime's group only (fsGroup); cert-manager renews it in place.
        volumes.append({"name": IDENTITY_VOLUME, "secret": {
            "secretName": identity_secret_name(name), "defaultMode": 0o440}})
        identity["serviceAccountName"] = workload_service_account(name)
    template: Manifest = {
        "metadata": {"labels": child_labels(name, resource.kind, workload), "annotations": {}},
        "spec": {
            # Runtime pods never call the Kubernetes API: no token in them.
            "automountServiceAccountToken": False,
            **identity,
            "enableServiceLinks": False,
            # SIGKILL must not cut the drain and the in-flight calls' grace short.
            "terminationGracePeriodSeconds": math.ceil(settings.drain_seconds
                                                       + settings.grace_seconds) + 5,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": settings.run_as_user,
                "runAsGroup": settings.run_as_user,
                "fsGroup": settings.run_as_user,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [_container(resource, settings, env, image)],
            "volumes": volumes,
        },
    }
    add_token_volumes(template["spec"], resource, settings)
    return template


def spec_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able values (canonical form: sorted keys)."""
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def render_deployment(capability: Capability, namespace: str, settings: OperatorSettings,
                      workload: str | None = None, image: str | None = None) -> Manifest:
    """The Deployment running ``packetflow runtime``; replicas only when the spec sets them.
    (``workload`` and ``image``: a canary's name and image.)"""
    name = capability.name
    # Capability pods keep only trigger idempotency keys: pod-local scratch is enough.
    template = _pod_template(capability, settings, state_volume={"emptyDir": {}},
                             workload=workload, image=image)
    # The bundle is a file in a ConfigMap: changing it does not restart pods by itself, so its
    # hash (with the template's) goes on the template and every spec change rolls the pods.
    # Except replicas: scaling (kubectl scale, an HPA on the scale subresource) is no rollout.
    bundle = _bundle_manifest(capability)
    bundle["spec"].pop("replicas", None)
    template["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = spec_hash(bundle, template)
    spec: Manifest = {}
    if capability.spec.replicas is not None:
        # Unset means an autoscaler owns the count: never write it, or we would fight it.
        spec["replicas"] = capability.spec.replicas
    spec.update(
        selector={"matchLabels": selector_labels(workload or name)},
        revisionHistoryLimit=3,
        template=template,
    )
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(name, namespace, workload=workload), "spec": spec}


def _service_ports(resource: Resource, settings: OperatorSettings) -> list[Manifest]:
    ports: list[Manifest] = [{"name": "grpc", "port": settings.grpc_port,
                              "targetPort": "grpc", "protocol": "TCP"}]
    if _runtime_served(resource):
        ports.append({"name": "metrics", "port": settings.metrics_port,
                      "targetPort": "metrics", "protocol": "TCP"})
        if settings.mcp_enabled:
            ports.append({"name": MCP_PORT_NAME, "port": settings.mcp_port,
                          "targetPort": MCP_PORT_NAME, "protocol": "TCP"})
    if _serves_tokens(resource, settings):
        ports.append({"name": TOKEN_PORT_NAME, "port": settings.token_port,
                      "targetPort": TOKEN_PORT_NAME, "protocol": "TCP"})
    return ports


def render_service(resource: Resource, namespace: str, settings: OperatorSettings,
                   workload: str | None = None) -> Manifest:
    """The ClusterIP Service for clients: named ports ``grpc`` (and ``metrics``, plus ``mcp``
    when enabled, for runtime pods)."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(resource.name, namespace, resource.kind, workload),
        "spec": {"type": "ClusterIP",
                 "selector": selector_labels(workload or resource.name, resource.kind),
                 "ports": _service_ports(resource, settings)},
    }


def render_headless_service(actor: Actor, namespace: str,
                            settings: OperatorSettings) -> Manifest:
    """The headless Service of an Actor's StatefulSet: one DNS name per member pod.

    Not-ready members are published too: placement and forwarding between members must work
    while a member starts (its readiness may wait on the others).
    """
    metadata = _metadata(actor.name, namespace, "Actor")
    metadata["name"] = headless_service_name(actor.name)
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": metadata,
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": selector_labels(actor.name, "Actor"),
                 "ports": _service_ports(actor, settings)},
    }


def _volume_claim_template(settings: OperatorSettings) -> Manifest:
    spec: Manifest = {"accessModes": ["ReadWriteOnce"],
                      "resources": {"requests": {"storage": settings.actor_storage_size}}}
    if settings.actor_storage_class is not None:
        spec["storageClassName"] = settings.actor_storage_class
    return {"metadata": {"name": STATE_VOLUME}, "spec": spec}


def render_statefulset(actor: Actor, namespace: str, settings: OperatorSettings) -> Manifest:
    """The StatefulSet running an Actor's members: stable names, one volume each for SQLite."""
    name = actor.name
    headless = headless_service_name(name)
    env: list[Manifest] = [
        # Placement hashes actor ids over members by these names, and members forward
        # messages to each other at these addresses.
        {"name": "PACKETFLOW_MEMBER_ID",
         "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
        {"name": "PACKETFLOW_ADVERTISE_ADDRESS",
         "value": f"$(PACKETFLOW_MEMBER_ID).{headless}.{namespace}."
                  f"{settings.cluster_domain_suffix}:{settings.grpc_port}"},
    ]
    sqlite = actor.spec.store.sqlite is not None
    # SQLite lives on the pod's own volume; PostgreSQL needs only scratch (read-only root).
    template = _pod_template(actor, settings, env,
                             state_volume=None if sqlite else {"emptyDir": {}})
    bundle = _bundle_manifest(actor)
    bundle["spec"].pop("replicas", None)
    template["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = spec_hash(bundle, template)
    spec: Manifest = {
        "replicas": actor.spec.replicas,
        "serviceName": headless,
        "selector": {"matchLabels": selector_labels(name, "Actor")},
        # Members place actors by hashing over the live members: no reason to start them one
        # by one, and a stuck member-0 must not block the others.
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "RollingUpdate"},
        "revisionHistoryLimit": 3,
        "template": template,
    }
    if sqlite:
        spec["volumeClaimTemplates"] = [_volume_claim_template(settings)]
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": _metadata(name, namespace, "Actor"), "spec": spec}


def canary_capability(capability: Capability) -> Capability | None:
    """What the canary pods serve: the Capability with ``spec.canary``'s implementation,
    resources and replicas (its own name: callers call one capability); None without one."""
    canary = capability.spec.canary
    if canary is None:
        return None
    spec = capability.spec.model_dump(mode="json", by_alias=True, exclude_unset=True,
                                      exclude={"canary", "scaling"})
    overrides = canary.model_dump(mode="json", by_alias=True, exclude_none=True,
                                  include={"implementation", "resources"})
    spec.update(overrides, replicas=canary.replicas)
    return Capability.model_validate({"apiVersion": API_VERSION, "kind": "Capability",
                                      "metadata": {"name": capability.name}, "spec": spec})


def render_canary(capability: Capability, namespace: str,
                  settings: OperatorSettings) -> list[Manifest]:
    """The canary's ConfigMap, Service and Deployment (``<name>-canary``), or nothing. Its
    pods carry ``packetflow.io/version: canary`` (for per-version series in Prometheus)."""
    served = canary_capability(capability)
    if served is None or capability.spec.canary is None:
        return []
    workload = canary_name(capability.name)
    deployment = render_deployment(served, namespace, settings, workload,
                                   capability.spec.canary.image)
    deployment["spec"]["template"]["metadata"]["labels"][LABEL_VERSION] = "canary"
    return [render_configmap(served, namespace, settings, workload),
            render_service(served, namespace, settings, workload), deployment]


def retired_canary(resource: Resource, namespace: str,
                   previous: Mapping[str, Any] | None) -> list[Manifest]:
    """What scales a canary down once ``spec.canary`` is gone (promoted or dropped): its
    Deployment at 0 replicas, while ``status.canary`` still says it ran. The operator never
    deletes children, and a patch of a missing workload is no error (create nothing)."""
    if not isinstance(resource, Capability) or resource.spec.canary is not None \
            or not (previous or {}).get("canary"):
        return []
    workload = canary_name(resource.name)
    return [{"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": _metadata(resource.name, namespace, workload=workload),
             "spec": {"replicas": 0}}]


def canary_status(resource: Resource | None, canary_live: Mapping[str, Any] | None,
                  previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """``status.canary`` (replicas, readyReplicas, weight) from the canary's Deployment as
    last seen, or its removal once ``spec.canary`` is gone; ``{}`` when there is nothing to
    say (not a Capability, or no canary now or before)."""
    if not isinstance(resource, Capability):
        return {}
    canary = resource.spec.canary
    if canary is None:
        return {"canary": None} if (previous or {}).get("canary") else {}
    observed = (canary_live or {}).get("status") or {}
    return {"canary": {"replicas": int(observed.get("replicas") or 0),
                       "readyReplicas": int(observed.get("readyReplicas") or 0),
                       "weight": canary.weight}}


# The namespace label every Kubernetes >= 1.22 sets on every namespace (its own name).
NAMESPACE_NAME_LABEL: Final = "kubernetes.io/metadata.name"
# Chart pods that call every runtime workload (gateway, MCP aggregate): by component.
_CALLING_COMPONENTS: Final = ("gateway", "mcp-aggregate")


def _namespace_peer(namespace: str, pods: Manifest | None = None) -> Manifest:
    peer: Manifest = {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}}}
    if pods is not None:
        peer["podSelector"] = pods
    return peer


def _access_peers(resource: Resource, namespace: str) -> list[Manifest]:
    """The pods ``spec.access.allow`` names, as far as a NetworkPolicy can tell them apart:
    a ServiceAccount's whole namespace (pods are not selected by account; mutual TLS tells
    accounts apart), a namespace, a Capability's or Actor's pods."""
    access = resource.spec.access
    peers: list[Manifest] = []
    for rule in access.allow if access is not None else ():
        if rule.namespace is not None:
            peers.append(_namespace_peer(rule.namespace))
        elif rule.service_account is not None:
            peers.append(_namespace_peer(rule.service_account.split("/", 1)[0]))
        elif rule.capability is not None:
            home, _, name = rule.capability.rpartition("/")
            for owner_label in OWNER_LABELS.values():
                pods = {"matchLabels": {LABEL_NAME: "packetflow", owner_label: name}}
                peers.append(_namespace_peer(home, pods) if home and home != namespace
                             else {"podSelector": pods})
    return peers


def render_network_policy(resource: Resource, namespace: str,
                          settings: OperatorSettings) -> Manifest:
    """The NetworkPolicy of a Capability's or Actor's pods (its canary's too): ingress to
    gRPC (and MCP) from the namespace's PacketFlow pods, the chart's gateway and MCP
    aggregate, and the callers ``spec.access.allow`` names (without any, every namespace when
    the default policy is ``cluster``); to metrics from Prometheus only.
    Everything else is dropped; ``deny`` rules and accounts are enforced by the runtime."""
    component = {"key": LABEL_COMPONENT, "operator": "In", "values": list(_CALLING_COMPONENTS)}
    callers: list[Manifest] = [{"podSelector": {"matchLabels": {LABEL_PART_OF: "packetflow"}}}]
    for home in dict.fromkeys(filter(None, (settings.gateway_namespace,
                                            settings.mcp_aggregate_namespace))):
        if home != namespace:
            callers.append(_namespace_peer(home, {
                "matchLabels": {LABEL_PART_OF: "packetflow"}, "matchExpressions": [component]}))
    callers.extend(peer for peer in _access_peers(resource, namespace) if peer not in callers)
    access = resource.spec.access
    if settings.default_policy == "cluster" and not (access is not None and access.allow):
        # The default admits any workload of the trust domain: so does the network.
        callers.append({"namespaceSelector": {}})
    served = [{"protocol": "TCP", "port": "grpc"}]
    if _runtime_served(resource) and settings.mcp_enabled:
        served.append({"protocol": "TCP", "port": MCP_PORT_NAME})
    if _serves_tokens(resource, settings):
        served.append({"protocol": "TCP", "port": TOKEN_PORT_NAME})
    ingress: list[Manifest] = [{"from": callers, "ports": served}]
    if _runtime_served(resource):
        ingress.append({"from": [{"namespaceSelector": {"matchLabels": dict(
                            settings.prometheus_namespace_labels)},
                                  "podSelector": {"matchLabels": dict(
                                      settings.prometheus_pod_labels)}}],
                        "ports": [{"protocol": "TCP", "port": "metrics"}]})
    kind = resource.kind
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _metadata(resource.name, namespace, kind),
        "spec": {"podSelector": {"matchLabels": {
                     LABEL_NAME: "packetflow", LABEL_COMPONENT: _COMPONENTS[kind],
                     OWNER_LABELS[kind]: resource.name}},
                 "policyTypes": ["Ingress"], "ingress": ingress},
    }


def desired_children(resource: Resource, namespace: str,
                     settings: OperatorSettings) -> list[Manifest]:
    """Every child object of a Capability or Actor, in the order they are applied (its
    NetworkPolicy, ServiceAccount and Certificate, if any, and the bundle first, the
    resource's own workload last so its pods start guarded and find all they mount)."""
    zero_trust = [render_network_policy(resource, namespace, settings)] \
        if settings.network_policies else []
    if _mutual_tls(resource, settings):
        # The operator's own authority writes the Secret itself (authority.py).
        zero_trust += [render_service_account(resource, namespace)] if operator_issued(
            settings) else [render_service_account(resource, namespace),
                            render_certificate(resource, namespace, settings)]
    if isinstance(resource, Actor):
        return [
            *zero_trust,
            render_configmap(resource, namespace, settings),
            render_headless_service(resource, namespace, settings),
            render_service(resource, namespace, settings),
            render_statefulset(resource, namespace, settings),
        ]
    return [
        *zero_trust,
        render_configmap(resource, namespace, settings),
        render_service(resource, namespace, settings),
        *render_canary(resource, namespace, settings),
        render_deployment(resource, namespace, settings),
    ]


WORKLOAD_KINDS: Final = {"Capability": "Deployment", "Actor": "StatefulSet"}


def _mcp_proxy(capability: Capability, namespace: str, settings: OperatorSettings) -> Manifest:
    """A Capability that forwards every call to ``capability``'s Service: same name, intent,
    contract and MCP exposure, so the aggregate lists the same tool and the work runs in the
    capability's own pods (with its limits and metrics)."""
    spec = capability.spec.model_dump(mode="json", by_alias=True, exclude_unset=True,
                                      include={"intent", "requires", "provides", "effects",
                                               "timeout_seconds", "mcp"})
    spec["implementation"] = {"composition": {"steps": [{"call": {
        "capability": capability.name, "address": endpoint(capability.name, namespace,
                                                           settings)}}]}}
    return {"apiVersion": API_VERSION, "kind": "Capability",
            "metadata": {"name": capability.name}, "spec": spec}


def render_mcp_bundle(capabilities: list[Capability], namespace: str,
                      settings: OperatorSettings) -> Manifest:
    """The namespace's ConfigMap ``packetflow-mcp-bundle``: a forwarding manifest per
    Capability (sorted by name) that the chart's aggregate MCP Deployment serves."""
    exposed = sorted((c for c in capabilities if c.spec.mcp.expose), key=lambda c: c.name)
    documents = [_mcp_proxy(c, namespace, settings) for c in exposed]
    text = yaml.safe_dump_all(documents, sort_keys=False, allow_unicode=True) if documents \
        else ""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": MCP_BUNDLE_CONFIGMAP, "namespace": namespace,
                         "labels": {LABEL_NAME: "packetflow", LABEL_COMPONENT: "mcp-aggregate",
                                    LABEL_PART_OF: "packetflow",
                                    LABEL_MANAGED_BY: MANAGED_BY}},
            "data": {BUNDLE_KEY: text}}
