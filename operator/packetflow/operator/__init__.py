"""The PacketFlow Kubernetes operator: kopf handlers, pure renderers, controllers."""
