"""Every Kubernetes API call the operator makes, declared once: the chart's RBAC is this list.

The Helm chart's test asserts its (Cluster)Role rules equal :data:`PERMISSIONS` exactly, so a
new API call means a new line here and nowhere else. Who makes each call:

* the operator's own watches list and watch Capabilities and Actors (watching.py); Warning
  Events are posted for both (create events). Neither is ever written but its status.
* the operator writes their status through the status subresource, re-reads the owner
  before recreating a deleted child (get), and creates, patches, reads and watches the
  children (configmaps, services, deployments for Capabilities, statefulsets for Actors; the
  ConfigMap ``packetflow-mcp-bundle`` when the MCP aggregate is on). A StatefulSet's
  volumeClaimTemplates make the StatefulSet controller create PVCs: the operator never
  touches persistentvolumeclaims itself. With ``network_policies`` on, a NetworkPolicy
  per Capability and Actor is a child like the others (networkpolicies, same verbs); with
  ``mtls_issuer``, so are its ServiceAccount and cert-manager Certificate (serviceaccounts,
  certificates.cert-manager.io). cert-manager writes the Secret; the operator never reads it,
  except with its own authority (``mtls_issuer: operator``, :data:`AUTHORITY_PERMISSIONS`).

* for a Federation (``federation_handlers``): the same verbs on federations and their status,
  the gateway's ConfigMap, Services and Deployment as above, and the audit log's
  PersistentVolumeClaim (get, create, patch: it is applied, never watched, and outlives the
  Federation, so never deleted either). The identity Secret and the bundle ConfigMaps are
  only mounted into the gateway's pods: the operator never reads them.

Not needed, on purpose: namespaces and CRDs (kopf's scanning is disabled), kopf peering
objects (the operator runs standalone, one replica), delete (children go by ownerReferences,
so no finalizers either), update/PUT (merge patches only). API discovery (``/api``, ``/apis``)
is allowed to every authenticated user by Kubernetes' built-in ``system:discovery`` role.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from packetflow.spec import GROUP


@dataclass(frozen=True)
class Permission:
    """One RBAC rule: an API group, a resource (``plural`` or ``plural/subresource``), verbs."""

    api_group: str
    resource: str
    verbs: tuple[str, ...]


PERMISSIONS: Final[tuple[Permission, ...]] = (
    Permission(GROUP, "capabilities", ("get", "list", "watch")),
    Permission(GROUP, "capabilities/status", ("patch",)),
    Permission(GROUP, "actors", ("get", "list", "watch")),
    Permission(GROUP, "actors/status", ("patch",)),
    Permission("", "configmaps", ("get", "list", "watch", "create", "patch")),
    Permission("", "services", ("get", "list", "watch", "create", "patch")),
    Permission("apps", "deployments", ("get", "list", "watch", "create", "patch")),
    Permission("apps", "statefulsets", ("get", "list", "watch", "create", "patch")),
    Permission("", "events", ("create",)),
    Permission(GROUP, "federations", ("get", "list", "watch", "patch")),
    Permission(GROUP, "federations/status", ("patch",)),
    Permission("", "persistentvolumeclaims", ("get", "create", "patch")),
    Permission("networking.k8s.io", "networkpolicies", ("get", "list", "watch", "create", "patch")),
    Permission("", "serviceaccounts", ("get", "list", "watch", "create", "patch")),
    Permission("cert-manager.io", "certificates", ("get", "list", "watch", "create", "patch")),
)


# Only with ``mtls_issuer: operator`` (the chart grants them then, and only then): the
# operator's own authority reads, creates and patches its Secret (in ``ca_namespace``) and each
# workload's identity Secret, and lists the workload Secrets it manages (by label) on the
# resync to notice deleted ones. Never watch, never delete (owned Secrets go with their owner).
AUTHORITY_PERMISSIONS: Final[tuple[Permission, ...]] = (
    Permission("", "secrets", ("get", "list", "create", "patch")),
)


def rbac_rules() -> list[dict[str, list[str]]]:
    """:data:`PERMISSIONS` as Role/ClusterRole ``rules`` (one rule per resource)."""
    return [{"apiGroups": [p.api_group], "resources": [p.resource], "verbs": list(p.verbs)}
            for p in PERMISSIONS]
