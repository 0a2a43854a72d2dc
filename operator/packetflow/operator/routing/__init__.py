"""The routing controller: SLO-driven replicas, canary weights and recommendations.

``decide`` (pure, plain data in and out) is the same code in the cluster
(:mod:`.loop` reading Prometheus, writing Kubernetes) and in ``python -m bench routing``.
"""
