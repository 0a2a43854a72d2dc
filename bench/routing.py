"""``python -m bench routing [--trace FILE.csv]``: this controller's decide() against Knative's
KPA on load traces, in a discrete-event simulation (bench/routing_sim.py).

Each trace is replayed under both policies with the same seed (the same arrivals and service
times draw for draw until their replica counts differ), for several seeds. Per policy: SLO-
violation minutes (minutes whose calls' p99 exceeds the objective, or that drop a call) and
replica-minutes; per seed the ratios ours/KPA, reported as the median with min/max.

Service times: a distribution measured on a real runtime (gRPC ``Invoke`` of the
``text-stats`` example, sequential calls), shipped in bench/traces/service_times.csv and
scaled to ``--service-mean-ms``; ``--measure`` measures it again and rewrites the file.
Traces: CSV ``t_seconds,requests_per_second`` (header optional), piecewise linear; the
shipped ones (diurnal, step, flash crowd, noisy) come from ``--write-traces`` (seeded).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import ROOT, median, rounded
from bench.routing_policies import Controller, Kpa, PrometheusView
from bench.routing_sim import Result, Simulation, Trace
from packetflow.operator.routing.model import Target, Tuning
from packetflow.spec import CapabilitySpec, duration_seconds

TRACES = Path(__file__).resolve().parent / "traces"
SHIPPED = ("diurnal", "step", "flash-crowd", "noisy")
SERVICE_TIMES = TRACES / "service_times.csv"
SEEDS = 3

# The simulated capability, as its manifest would declare it.
SPEC = CapabilitySpec.model_validate({
    "intent": "A capability whose calls take ~100 ms, 8 at a time per replica",
    "implementation": {"builtin": {"name": "echo"}},
    "concurrency": 8,
    "slo": {"latencyP99Ms": 500},
    "scaling": {"minReplicas": 1, "maxReplicas": 40, "scaleDownDelay": "1m"},
})


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and line."""


def read_trace(path: Path) -> Trace:
    """A CSV of ``t_seconds,requests_per_second`` rows (a header line is allowed)."""
    points: list[tuple[float, float]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from None
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 2:
            raise TraceError(f"{path}:{number}: expected t_seconds,requests_per_second, "
                             f"got {len(row)} fields")
        try:
            t, rate = float(row[0]), float(row[1])
        except ValueError:
            if number == 1 and not points:
                continue  # the header
            raise TraceError(f"{path}:{number}: not numbers: {','.join(row)}") from None
        if not (math.isfinite(t) and math.isfinite(rate)) or t < 0 or rate < 0:
            raise TraceError(f"{path}:{number}: t_seconds and requests_per_second must be "
                             "finite and >= 0")
        if points and t < points[-1][0]:
            raise TraceError(f"{path}:{number}: t_seconds {t:g} goes back in time (previous "
                             f"{points[-1][0]:g})")
        points.append((t, rate))
    if len(points) < 2 or points[-1][0] < 60:
        raise TraceError(f"{path}: a trace needs at least two rows spanning a minute or more")
    return Trace(points)


def read_service_times(path: Path, mean_s: float) -> list[float]:
    """The measured distribution, scaled so its mean is ``mean_s``."""
    raw = [float(row[0]) for row in csv.reader(path.read_text().splitlines()[1:]) if row]
    scale = mean_s / (sum(raw) / len(raw))
    return [value * scale for value in raw]


# ------------------------------------------------------------------------------- one run


def bench_spec(options: argparse.Namespace) -> CapabilitySpec:
    """SPEC, with ``--scale-down-delay`` (for both policies) when given."""
    if options.scale_down_delay is None:
        return SPEC
    assert SPEC.scaling is not None
    return SPEC.model_copy(update={"scaling": SPEC.scaling.model_copy(
        update={"scale_down_delay": options.scale_down_delay})})


def simulate(trace: Trace, policy: str, service: list[float], seed: int,
             options: argparse.Namespace) -> Result:
    """Replay ``trace`` under ``policy`` (kpa | controller)."""
    spec = bench_spec(options)
    scaling = spec.scaling
    assert scaling is not None and spec.slo is not None and spec.slo.latency_p99_ms
    sim = Simulation(trace, service, concurrency=SPEC.concurrency,
                     slo_s=SPEC.slo.latency_p99_ms / 1e3, startup_s=options.startup,
                     timeout_s=options.timeout, initial_replicas=_initial(trace, service),
                     seed=seed)
    if policy == "kpa":
        kpa = Kpa(target=scaling.target_concurrency or float(SPEC.concurrency),
                  min_replicas=scaling.min_replicas, max_replicas=scaling.max_replicas,
                  scale_down_delay_s=duration_seconds(scaling.scale_down_delay))
        return sim.run(kpa, tick_s=2.0)
    tuning = Tuning(interval_s=options.interval, startup_s=options.startup)
    controller = Controller(Target("Capability", "bench", spec), tuning,
                            PrometheusView(options.scrape_interval, options.history))
    return sim.run(controller, tick_s=options.interval)


def _initial(trace: Trace, service: list[float]) -> int:
    """Both policies start with what the first minute needs at 70% of the slots (warm)."""
    mean_s = sum(service) / len(service)
    return max(1, math.ceil(trace.mean_rate(0, 60) * mean_s / (0.7 * SPEC.concurrency)))


def compare(name: str, trace: Trace, service: list[float],
            options: argparse.Namespace) -> dict[str, Any]:
    """Both policies on one trace over several seeds: figures and ratios."""
    runs: dict[str, list[Result]] = {"kpa": [], "controller": []}
    started = time.perf_counter()
    for seed in range(options.seeds):
        for policy in ("kpa", "controller"):  # alternate, like every pair in bench/
            runs[policy].append(simulate(trace, policy, service, seed, options))
    violation = [_ratio(c.violation_minutes, k.violation_minutes)
                 for c, k in zip(runs["controller"], runs["kpa"], strict=True)]
    cost = [c.replica_minutes / k.replica_minutes
            for c, k in zip(runs["controller"], runs["kpa"], strict=True)]
    out: dict[str, Any] = {}
    for policy, results in runs.items():
        out[policy] = {
            "violation_minutes": median([r.violation_minutes for r in results]),
            "replica_minutes": rounded(median([r.replica_minutes for r in results]), 1),
            "dropped": median([r.dropped for r in results]),
            "max_replicas": median([r.max_replicas for r in results]),
        }
    out["violation_ratio"] = rounded(median(violation))
    out["violation_ratio_min"] = rounded(min(violation))
    out["violation_ratio_max"] = rounded(max(violation))
    out["cost_ratio"] = rounded(median(cost))
    out["cost_ratio_min"] = rounded(min(cost))
    out["cost_ratio_max"] = rounded(max(cost))
    out["target_met"] = out["violation_ratio"] <= 0.5 and out["cost_ratio"] <= 1.0
    out["minutes"] = int(trace.duration // 60)
    out["calls"] = median([r.calls for r in runs["kpa"]])
    out["seconds"] = rounded(time.perf_counter() - started, 1)
    print(f"{name}: {out}", file=sys.stderr)
    return out


def _ratio(ours: int, theirs: int) -> float:
    """ours/theirs; when the KPA has no violation minute, 0 if neither has (not worse), else
    the count itself over one (a bad sign either way)."""
    if theirs == 0:
        return 0.0 if ours == 0 else float(ours)
    return ours / theirs


# ------------------------------------------------------------------------------- inputs


def write_traces(seed: int = 11) -> None:
    """Generate the shipped synthetic traces (deterministic for ``seed``)."""
    rng = random.Random(seed)
    TRACES.mkdir(exist_ok=True)

    def save(name: str, points: list[tuple[float, float]]) -> None:
        with (TRACES / f"{name}.csv").open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["t_seconds", "requests_per_second"])
            writer.writerows((f"{t:g}", f"{r:.2f}") for t, r in points)

    # Diurnal: four compressed "days" of 10 minutes, a sharp daytime peak, mild noise.
    save("diurnal", [(t, (60 + 440 * ((1 - math.cos(2 * math.pi * t / 600)) / 2) ** 2)
                      * rng.uniform(0.95, 1.05)) for t in range(0, 2401, 10)])
    # Step: the level changes every 5 minutes, up and down, by up to 3x.
    levels = (100, 300, 150, 450, 200, 600, 120, 400)
    step: list[tuple[float, float]] = []
    for index, level in enumerate(levels):
        step += [(index * 300.0, float(level)), (index * 300.0 + 300.0, float(level))]
    save("step", step)
    # Flash crowd: a steady base with four sudden crowds (x5 within 5 s, 1 min, 1 min decay).
    flash: list[tuple[float, float]] = [(0.0, 120.0)]
    for start in (420, 1020, 1560, 2100):
        flash += [(start, 120.0), (start + 5, 600.0), (start + 65, 600.0),
                  (start + 125, 120.0)]
    flash.append((2400.0, 120.0))
    save("flash-crowd", flash)
    # Noisy: a mean-reverting random walk with heavy multiplicative noise every 5 s and
    # short bursts (x2-x3 for 10-30 s, shorter than a pod's start-up) about every 4 minutes.
    level, noisy, burst_until, burst = 250.0, [], -1.0, 1.0
    for t in range(0, 2401, 5):
        level += 0.05 * (250 - level) + rng.gauss(0, 12)
        if t >= burst_until and rng.random() < 0.02:
            burst_until, burst = t + rng.choice((10, 20, 30)), rng.uniform(2.0, 3.0)
        factor = burst if t < burst_until else 1.0
        noisy.append((float(t), max(10.0, level * factor * math.exp(rng.gauss(0, 0.3)))))
    save("noisy", noisy)


def measure_service_times(calls: int = 2000) -> None:
    """Time sequential gRPC ``Invoke`` calls of the ``text-stats`` example on a real runtime
    and write their durations (seconds, sorted) to bench/traces/service_times.csv."""
    sys.path.insert(0, str(ROOT / "examples"))
    from packetflow.client import RuntimeClient
    from packetflow.engine import Engine
    from packetflow.manifests import load_paths
    from packetflow.server import RuntimeServer

    async def measure() -> list[float]:
        loaded = load_paths([ROOT / "examples" / "text-stats.yaml"])
        server = await RuntimeServer.start(Engine(loaded.capabilities), "127.0.0.1:0")
        text = " ".join(f"Sentence {i} has some words in it." for i in range(40))
        durations = []
        try:
            async with RuntimeClient(f"127.0.0.1:{server.port}") as client:
                for _ in range(200):  # warm up
                    await client.invoke("text-stats", {"text": text, "top": 3})
                for _ in range(calls):
                    started = time.perf_counter()
                    await client.invoke("text-stats", {"text": text, "top": 3})
                    durations.append(time.perf_counter() - started)
        finally:
            await server.stop(grace=0)
        return sorted(durations)

    durations = asyncio.run(measure())
    with SERVICE_TIMES.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["seconds"])
        writer.writerows([f"{d:.7f}"] for d in durations)


# ------------------------------------------------------------------------------- entry


def parser() -> argparse.ArgumentParser:
    """The bench's own flags (after ``python -m bench routing``)."""
    p = argparse.ArgumentParser(prog="python -m bench routing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, action="append",
                   help="CSV t_seconds,requests_per_second (repeatable); default: the "
                        "shipped traces")
    p.add_argument("--seeds", type=int, default=SEEDS, help="seeds per trace (default %(default)s)")
    p.add_argument("--startup", type=float, default=10.0,
                   help="pod start-up seconds (default %(default)s)")
    p.add_argument("--scrape-interval", type=int, default=15,
                   help="Prometheus scrape interval, seconds (default %(default)s)")
    p.add_argument("--interval", type=float, default=15.0,
                   help="the controller's tick, seconds (default %(default)s)")
    p.add_argument("--history", type=int, default=3600,
                   help="seconds of history the controller queries (default %(default)s)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="a queued call is dropped after this many seconds (default %(default)s)")
    p.add_argument("--scale-down-delay", metavar="DURATION",
                   help="override the manifest's scaleDownDelay (1m) for both policies, "
                        "e.g. 0s (Knative's default)")
    p.add_argument("--service-mean-ms", type=float, default=100.0,
                   help="mean service time the measured distribution is scaled to")
    p.add_argument("--measure", action="store_true",
                   help="measure the service-time distribution again and rewrite it")
    p.add_argument("--write-traces", action="store_true",
                   help="regenerate the shipped synthetic traces")
    return p


def run(argv: Sequence[str] = ()) -> dict[str, Any]:
    """Compare both policies on each trace; the JSON figures."""
    options = parser().parse_args(list(argv))
    if options.write_traces:
        write_traces()
    if options.measure:
        measure_service_times()
    service = read_service_times(SERVICE_TIMES, options.service_mean_ms / 1e3)
    paths = options.trace or [TRACES / f"{name}.csv" for name in SHIPPED]
    figures: dict[str, Any] = {
        "startup_s": options.startup, "scrape_interval_s": options.scrape_interval,
        "controller_interval_s": options.interval, "seeds": options.seeds,
        "service_mean_ms": options.service_mean_ms,
        "scale_down_delay": bench_spec(options).scaling.scale_down_delay,  # type: ignore
        "slo_p99_ms": SPEC.slo.latency_p99_ms if SPEC.slo else None,
    }
    met = True
    for path in paths:
        result = compare(path.stem, read_trace(path), service, options)
        figures[path.stem] = result
        met = met and result["target_met"]
    figures["target_met"] = met
    return figures
