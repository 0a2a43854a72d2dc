"""Every Kubernetes API call the routing controller makes, declared once: the chart's
controller (Cluster)Role is this list, and a chart test checks they are equal.

* list Capabilities and Actors (each tick; no watch: the controller polls, like an HPA);
* patch their ``scale`` subresource (replicas, as an HPA writes a Deployment's);
* patch a Capability's spec (``spec.canary.weight`` and approved changes);
* patch their ``status`` subresource (recommendations, history, conditions);
* create Events (every decision, with its reason).

Not needed: get (the list carries each object), watch, delete, update, any child object.
"""

from __future__ import annotations

from typing import Final

from packetflow.operator.permissions import Permission
from packetflow.spec import GROUP

CONTROLLER_PERMISSIONS: Final[tuple[Permission, ...]] = (
    Permission(GROUP, "capabilities", ("list", "patch")),
    Permission(GROUP, "capabilities/scale", ("patch",)),
    Permission(GROUP, "capabilities/status", ("patch",)),
    Permission(GROUP, "actors", ("list",)),
    Permission(GROUP, "actors/scale", ("patch",)),
    Permission(GROUP, "actors/status", ("patch",)),
    Permission("", "events", ("create",)),
)
