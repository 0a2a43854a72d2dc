"""SLO burn-rate alerts that work from a static chart: objectives as metrics, generic rules.

A chart cannot template one rule per Capability (it does not know them), and the controller
rendering rules per namespace would need write access to monitoring objects and the
Prometheus Operator. Instead the controller exports each declared objective as a metric
(:class:`ObjectiveMetrics`), and one generic rules file (:func:`render_rules`) joins the
runtime's series with them by ``namespace`` and ``capability``: recording rules per window,
then the multi-window, multi-burn-rate alerts of the SRE workbook (page: 14.4x over 1h and 5m,
6x over 6h and 30m; ticket: 3x over 1d and 2h, 1x over 3d and 6h). The same file is the
chart's PrometheusRule and a plain Prometheus rules file.

Latency objectives become "calls slower than the objective": the controller names the
histogram bucket at (or just under) each objective with ``packetflow_slo_latency_bucket``,
whose ``le`` label selects it; the budget is 1% (a p99 objective).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Final

import yaml
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.utils import floatToGoString

from packetflow.metrics import LATENCY_BUCKETS
from packetflow.spec import Slo

CALLS: Final = "packetflow_capability_calls_total"
BUCKET: Final = "packetflow_capability_call_duration_seconds_bucket"
COUNT: Final = "packetflow_capability_call_duration_seconds_count"
FAILURES: Final = "INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED"
AVAILABILITY: Final = "packetflow_slo_availability_objective"
LATENCY: Final = "packetflow_slo_latency_objective_seconds"
LATENCY_BUCKET: Final = "packetflow_slo_latency_bucket"
LATENCY_BUDGET: Final = 0.01  # a p99 objective lets 1% of calls be slower
BY: Final = "namespace, capability"
# (severity, burn rate, long window, short window, for)
ALERT_WINDOWS: Final = (
    ("page", 14.4, "1h", "5m", "2m"),
    ("page", 6.0, "6h", "30m", "15m"),
    ("ticket", 3.0, "1d", "2h", "1h"),
    ("ticket", 1.0, "3d", "6h", "3h"),
)
WINDOWS: Final = ("5m", "30m", "1h", "2h", "6h", "1d", "3d")
RULES_FILE: Final = "charts/packetflow/rules/packetflow-slo.rules.yaml"


def objective_bucket(latency_s: float) -> str:
    """The ``le`` of the largest histogram bucket within the objective (as exposed)."""
    within = [b for b in LATENCY_BUCKETS if b <= latency_s + 1e-12]
    label: str = floatToGoString(within[-1] if within else LATENCY_BUCKETS[0])  # type: ignore[no-untyped-call]
    return label


class ObjectiveMetrics:
    """The declared objectives of every Capability the controller sees, as gauges."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["namespace", "capability"]
        self.availability = Gauge(AVAILABILITY, "Declared availability objective (0..1).",
                                  labels, registry=registry)
        self.latency = Gauge(LATENCY, "Declared p99 latency objective, seconds.", labels,
                             registry=registry)
        self.bucket = Gauge(LATENCY_BUCKET, "1 on the duration bucket that judges the "
                            "latency objective (its le label).", [*labels, "le"],
                            registry=registry)
        self._buckets: dict[tuple[str, str], str] = {}

    def set(self, namespace: str, capability: str, slo: Slo | None) -> None:
        """Export (or withdraw) one capability's objectives."""
        key = (namespace, capability)
        for gauge in (self.availability, self.latency):
            with contextlib.suppress(KeyError):
                gauge.remove(*key)
        if (le := self._buckets.pop(key, None)) is not None:
            self.bucket.remove(*key, le)
        if slo is not None and slo.availability is not None:
            self.availability.labels(*key).set(slo.availability / 100)
        if slo is not None and slo.latency_p99_ms is not None:
            seconds = slo.latency_p99_ms / 1e3
            self.latency.labels(*key).set(seconds)
            self._buckets[key] = objective_bucket(seconds)
            self.bucket.labels(*key, self._buckets[key]).set(1)


def _recording(window: str) -> list[dict[str, Any]]:
    errors = (f"sum by ({BY}) (rate({CALLS}{{code=~\"{FAILURES}\"}}[{window}]))\n"
              f"/ sum by ({BY}) (rate({CALLS}[{window}]))")
    good = (f"sum by ({BY}) (\n  sum by ({BY}, le) (rate({BUCKET}[{window}]))\n"
            f"  * on ({BY}, le) group_left() {LATENCY_BUCKET}\n)")
    slow = f"1 - (\n{good}\n/ sum by ({BY}) (rate({COUNT}[{window}]))\n)"
    return [{"record": f"packetflow:slo_errors:ratio_rate{window}", "expr": errors},
            {"record": f"packetflow:slo_slow_calls:ratio_rate{window}", "expr": slow}]


def _alerts() -> list[dict[str, Any]]:
    alerts = []
    for name, series, objective, summary in (
        ("PacketFlowErrorBudgetBurn", "slo_errors", f"(1 - {AVAILABILITY})",
         "{{ $labels.capability }} in {{ $labels.namespace }} burns its availability error "
         "budget"),
        ("PacketFlowLatencyBudgetBurn", "slo_slow_calls",
         f"({LATENCY_BUDGET} * max by ({BY}) ({LATENCY_BUCKET}))",
         "{{ $labels.capability }} in {{ $labels.namespace }} is slower than its latency "
         "objective too often"),
    ):
        for severity in ("page", "ticket"):
            clauses = []
            for level, burn, long, short, _ in ALERT_WINDOWS:
                if level != severity:
                    continue
                budget = f"on ({BY}) group_left() ({burn} * {objective})"
                clauses.append(
                    f"(\n  packetflow:{series}:ratio_rate{long} > {budget}\nand\n"
                    f"  packetflow:{series}:ratio_rate{short} > {budget}\n)")
            waits = [w for level, _, _, _, w in ALERT_WINDOWS if level == severity]
            alerts.append({
                "alert": name if severity == "page" else f"{name}Slow",
                "expr": "\nor\n".join(clauses),
                "for": waits[0],
                "labels": {"severity": severity},
                "annotations": {
                    "summary": summary,
                    "description": "Multi-window burn rate: "
                                   + ", ".join(f"{burn}x over {long} and {short}"
                                               for level, burn, long, short, _ in ALERT_WINDOWS
                                               if level == severity) + ".",
                },
            })
    return alerts


def render_rules() -> dict[str, Any]:
    """The rules file: recording rules per window, then the burn-rate alerts."""
    return {"groups": [
        {"name": "packetflow-slo-recording", "interval": "30s",
         "rules": [rule for window in WINDOWS for rule in _recording(window)]},
        {"name": "packetflow-slo-alerts", "rules": _alerts()},
    ]}


class _Dumper(yaml.SafeDumper):
    """Multi-line PromQL as literal blocks, so the file reads like PromQL."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def rules_text() -> str:
    """The rules file as committed (YAML with a header)."""
    header = ("# Generated by `python -m packetflow.operator.routing.slo` from "
              "packetflow.operator.routing.slo: do not edit.\n")
    return header + yaml.dump(render_rules(), Dumper=_Dumper, sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(rules_text())
