"""The gateway: one address for every capability and actor type (``packetflow gateway``).

Pure parts, plain data and an injected clock: :mod:`.balancer` (peak-EWMA, two choices),
:mod:`.outlier` (Envoy-style ejection), :mod:`.budget` (retry and hedge budgets),
:mod:`.hedging` (the hedge delay), :mod:`.policy` (canary split, retry rules),
:mod:`.routing` (discovery snapshots and the live table), :mod:`.routes` (the routes file),
:func:`.kube.routes_from` (routes from Kubernetes objects). The I/O edge: :mod:`.h2` (HTTP/2),
:mod:`.upstream` (connections to backends), :mod:`.proxy` (calls), :mod:`.server`,
:mod:`.kube` (the watch client), :mod:`.cli`.
"""
