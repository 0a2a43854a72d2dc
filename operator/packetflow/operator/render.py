"""Pure renderers: a validated Capability -> the Kubernetes objects that run it.

Nothing here does I/O; every function returns plain dicts, so the rendered state can be
tested (and validated against real Kubernetes schemas) without a cluster. The handlers add
ownerReferences and apply the difference.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import orjson
import yaml

from packetflow.operator.settings import OperatorSettings
from packetflow.spec import API_VERSION, Capability

Manifest = dict[str, Any]

LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_CAPABILITY: Final = "packetflow.io/capability"
MANAGED_BY: Final = "packetflow-operator"
SPEC_HASH_ANNOTATION: Final = "packetflow.io/spec-hash"

BUNDLE_DIR: Final = "/etc/packetflow"
BUNDLE_KEY: Final = "bundle.yaml"
BUNDLE_PATH: Final = f"{BUNDLE_DIR}/{BUNDLE_KEY}"
CONTAINER_NAME: Final = "runtime"

# Implementations the packetflow runtime serves itself; `image` brings its own server.
_RUNTIME_SERVED: Final = ("python", "builtin", "composition")


def selector_labels(name: str) -> dict[str, str]:
    """Labels that pick a capability's runtime pods; immutable once a Deployment exists."""
    return {LABEL_NAME: "packetflow", LABEL_INSTANCE: name, LABEL_COMPONENT: "runtime"}


def child_labels(name: str) -> dict[str, str]:
    """Labels on every child: the selector plus ownership labels the operator watches by."""
    return {**selector_labels(name), LABEL_PART_OF: "packetflow", LABEL_MANAGED_BY: MANAGED_BY,
            LABEL_CAPABILITY: name}


def label_selector(name: str) -> str:
    """The runtime pods' selector as a string (``status.selector``, for the scale subresource)."""
    return ",".join(f"{key}={value}" for key, value in selector_labels(name).items())


def configmap_name(name: str) -> str:
    """Name of the ConfigMap holding the capability's spec bundle."""
    return f"{name}-bundle"


def endpoint(name: str, namespace: str, settings: OperatorSettings) -> str:
    """The in-cluster gRPC address of a capability: ``<name>.<namespace>.svc:<port>``."""
    return f"{name}.{namespace}.{settings.cluster_domain_suffix}:{settings.grpc_port}"


def _bundle_manifest(capability: Capability) -> Manifest:
    return {
        "apiVersion": API_VERSION,
        "kind": "Capability",
        # Only the name: server-side metadata (uid, annotations, managedFields) is not the spec.
        "metadata": {"name": capability.name},
        "spec": capability.spec.model_dump(mode="json", by_alias=True, exclude_unset=True),
    }


def render_bundle(capability: Capability) -> str:
    """The multi-document YAML the runtime loads: exactly this capability's manifest."""
    return yaml.safe_dump(_bundle_manifest(capability), sort_keys=False, allow_unicode=True)


def _metadata(name: str, namespace: str) -> Manifest:
    return {"name": name, "namespace": namespace, "labels": child_labels(name)}


def render_configmap(capability: Capability, namespace: str,
                     settings: OperatorSettings) -> Manifest:
    """The ConfigMap with the spec bundle, mounted read-only into the runtime pods."""
    metadata = _metadata(capability.name, namespace)
    metadata["name"] = configmap_name(capability.name)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata,
            "data": {BUNDLE_KEY: render_bundle(capability)}}


def _runtime_served(capability: Capability) -> bool:
    return capability.spec.implementation.kind in _RUNTIME_SERVED


def _container(capability: Capability, settings: OperatorSettings) -> Manifest:
    image_impl = capability.spec.implementation.image
    grpc_port = image_impl.port if image_impl is not None else settings.grpc_port
    ports: list[Manifest] = [{"name": "grpc", "containerPort": grpc_port, "protocol": "TCP"}]
    container: Manifest = {"name": CONTAINER_NAME}
    if image_impl is not None:
        # A foreign image serves packetflow.v1 itself; the bundle is mounted for it to read.
        container.update(image=image_impl.image, imagePullPolicy=settings.image_pull_policy,
                         env=[{"name": "PACKETFLOW_BUNDLE", "value": BUNDLE_PATH}])
    else:
        ports.append({"name": "metrics", "containerPort": settings.metrics_port,
                      "protocol": "TCP"})
        container.update(
            image=settings.image, imagePullPolicy=settings.image_pull_policy,
            args=["runtime", "--bundle", BUNDLE_PATH,
                  "--address", f"0.0.0.0:{settings.grpc_port}",
                  "--metrics-address", f"0.0.0.0:{settings.metrics_port}"])
    container["ports"] = ports
    # The runtime serves grpc.health.v1, so the kubelet's native gRPC probe needs no exec.
    container["readinessProbe"] = {"grpc": {"port": grpc_port}, "periodSeconds": 5,
                                   "timeoutSeconds": 2, "failureThreshold": 3}
    container["livenessProbe"] = {"grpc": {"port": grpc_port}, "initialDelaySeconds": 10,
                                  "periodSeconds": 10, "timeoutSeconds": 2,
                                  "failureThreshold": 3}
    resources = capability.spec.resources
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
    ]
    return container


def _pod_template(capability: Capability, settings: OperatorSettings) -> Manifest:
    name = capability.name
    return {
        "metadata": {"labels": child_labels(name), "annotations": {}},
        "spec": {
            # Runtime pods never call the Kubernetes API: no token in them.
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": settings.run_as_user,
                "runAsGroup": settings.run_as_user,
                "fsGroup": settings.run_as_user,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [_container(capability, settings)],
            "volumes": [
                {"name": "bundle", "configMap": {"name": configmap_name(name)}},
                {"name": "tmp", "emptyDir": {}},
            ],
        },
    }


def spec_hash(*parts: Any) -> str:
    """A short stable hash of JSON-able values (canonical form: sorted keys)."""
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def render_deployment(capability: Capability, namespace: str,
                      settings: OperatorSettings) -> Manifest:
    """The Deployment running ``packetflow runtime``; replicas only when the spec sets them."""
    name = capability.name
    template = _pod_template(capability, settings)
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
        selector={"matchLabels": selector_labels(name)},
        revisionHistoryLimit=3,
        template=template,
    )
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(name, namespace), "spec": spec}


def render_service(capability: Capability, namespace: str,
                   settings: OperatorSettings) -> Manifest:
    """The ClusterIP Service: named ports ``grpc`` (and ``metrics`` for runtime pods)."""
    ports: list[Manifest] = [{"name": "grpc", "port": settings.grpc_port,
                              "targetPort": "grpc", "protocol": "TCP"}]
    if _runtime_served(capability):
        ports.append({"name": "metrics", "port": settings.metrics_port,
                      "targetPort": "metrics", "protocol": "TCP"})
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(capability.name, namespace),
        "spec": {"type": "ClusterIP", "selector": selector_labels(capability.name),
                 "ports": ports},
    }


def desired_children(capability: Capability, namespace: str,
                     settings: OperatorSettings) -> list[Manifest]:
    """Every child object of a capability, in the order they are applied (bundle first)."""
    return [
        render_configmap(capability, namespace, settings),
        render_service(capability, namespace, settings),
        render_deployment(capability, namespace, settings),
    ]
