"""The SLO burn-rate rules: generated from code, valid, and firing when (and only when) a
capability burns its budget, as ``promtool test rules`` evaluates them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from packetflow.operator.routing.slo import RULES_FILE, ObjectiveMetrics, rules_text
from packetflow.spec import Slo

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / RULES_FILE


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return found


def test_committed_rules_are_generated() -> None:
    assert RULES.read_text() == rules_text(), \
        f"run `python -m packetflow.operator.routing.slo > {RULES_FILE}`"


def test_rules_pass_promtool_check() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def calls(namespace: str, capability: str, code: str, per_minute: int) -> dict[str, str]:
    return {"series": f'packetflow_capability_calls_total{{namespace="{namespace}",'
                      f'capability="{capability}",code="{code}"}}',
            "values": f"0+{per_minute}x180"}


def bucket(namespace: str, capability: str, le: str, per_minute: int) -> dict[str, str]:
    return {"series": f'packetflow_capability_call_duration_seconds_bucket{{'
                      f'namespace="{namespace}",capability="{capability}",le="{le}"}}',
            "values": f"0+{per_minute}x180"}


def objective(name: str, labels: str, value: str) -> dict[str, str]:
    return {"series": f"{name}{{{labels}}}", "values": f"{value}x180"}


def test_burn_rate_alerts_fire_for_the_capability_that_burns(tmp_path: Path) -> None:
    team = 'namespace="team-a",capability="checkout"'
    calm = 'namespace="team-a",capability="search"'
    series: list[dict[str, Any]] = [
        # checkout: 2% of calls fail against a 99.9% objective (20x the budget)...
        calls("team-a", "checkout", "OK", 980), calls("team-a", "checkout", "INTERNAL", 20),
        objective("packetflow_slo_availability_objective", team, "0.999"),
        # ...and 10% are slower than its 50 ms objective (10x a p99's 1%).
        bucket("team-a", "checkout", "0.05", 900), bucket("team-a", "checkout", "+Inf", 1000),
        {"series": f"packetflow_capability_call_duration_seconds_count{{{team}}}",
         "values": "0+1000x180"},
        objective("packetflow_slo_latency_bucket", team + ',le="0.05"', "1"),
        # search: 0.01% errors, everything fast.
        calls("team-a", "search", "OK", 9999), calls("team-a", "search", "UNAVAILABLE", 1),
        objective("packetflow_slo_availability_objective", calm, "0.999"),
        bucket("team-a", "search", "0.05", 1000), bucket("team-a", "search", "+Inf", 1000),
        {"series": f"packetflow_capability_call_duration_seconds_count{{{calm}}}",
         "values": "0+1000x180"},
        objective("packetflow_slo_latency_bucket", calm + ',le="0.05"', "1"),
        # legacy: failing, but it declares no objective: no alert.
        calls("team-a", "legacy", "OK", 50), calls("team-a", "legacy", "INTERNAL", 50),
    ]
    fired = {"exp_labels": {"severity": "page", "namespace": "team-a",
                            "capability": "checkout"}}
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                {"eval_time": "70m", "alertname": "PacketFlowErrorBudgetBurn",
                 "exp_alerts": [{**fired, "exp_annotations": {
                     "summary": "checkout in team-a burns its availability error budget",
                     "description": "Multi-window burn rate: 14.4x over 1h and 5m, 6.0x over "
                                    "6h and 30m."}}]},
                {"eval_time": "70m", "alertname": "PacketFlowLatencyBudgetBurn",
                 "exp_alerts": [{**fired, "exp_annotations": {
                     "summary": "checkout in team-a is slower than its latency objective "
                                "too often",
                     "description": "Multi-window burn rate: 14.4x over 1h and 5m, 6.0x over "
                                    "6h and 30m."}}]},
                # Not before the long window has seen the burn (and the 2m "for").
                {"eval_time": "1m", "alertname": "PacketFlowErrorBudgetBurn", "exp_alerts": []},
            ],
            "promql_expr_test": [{
                "expr": "packetflow:slo_errors:ratio_rate1h",
                "eval_time": "70m",
                "exp_samples": [
                    {"labels": "packetflow:slo_errors:ratio_rate1h{" + team + "}",
                     "value": 0.02},
                    {"labels": 'packetflow:slo_errors:ratio_rate1h{namespace="team-a",'
                               'capability="legacy"}', "value": 0.5},
                    {"labels": "packetflow:slo_errors:ratio_rate1h{" + calm + "}",
                     "value": 9.999999999999999e-05},  # float, as promtool computes it
                ]}],
        }],
    }
    path = tmp_path / "slo_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_objectives_are_exported_with_the_bucket_that_judges_latency() -> None:
    registry = CollectorRegistry()
    objectives = ObjectiveMetrics(registry)
    objectives.set("team-a", "checkout", Slo(latencyP99Ms=75, availability=99.5))
    text = generate_latest(registry).decode()
    assert 'packetflow_slo_availability_objective{capability="checkout",namespace="team-a"} ' \
           '0.995' in text
    # 75 ms falls between buckets: the 50 ms bucket judges it (never more lenient).
    assert 'packetflow_slo_latency_bucket{capability="checkout",le="0.05",namespace="team-a"}' \
           ' 1.0' in text
    objectives.set("team-a", "checkout", Slo(availability=99.0))
    text = generate_latest(registry).decode()
    assert "packetflow_slo_latency_bucket{" not in text
    objectives.set("team-a", "checkout", None)
    assert "packetflow_slo_availability_objective{" not in generate_latest(registry).decode()
