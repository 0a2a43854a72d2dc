"""Statistics and server subprocesses shared by the benches."""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import math
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1) of ``values``; no interpolation."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return float(statistics.median(values))


def rounded(value: float, digits: int = 3) -> float:
    """Round for printing: more digits than this is noise on a shared machine."""
    return round(value, digits)


def ratio_figures(name: str, ratios: Sequence[float]) -> dict[str, float | int]:
    """A ratio as every bench reports it: the median of the alternating pairs' ratios, its
    spread (min, max), how much one pair varies (``variation``) and how many pairs there
    were."""
    return {
        name: rounded(median(ratios)),
        f"{name}_min": rounded(min(ratios)),
        f"{name}_max": rounded(max(ratios)),
        f"{name}_variation": rounded(variation(ratios)),
        f"{name}_pairs": len(ratios),
    }


@dataclass
class Pairs:
    """Alternating baseline/subject runs: each pair's rates and the run size they used."""

    baseline: list[float]
    subject: list[float]
    scale: float

    @property
    def ratios(self) -> list[float]:
        """subject / baseline of each pair."""
        return [s / b for s, b in zip(self.subject, self.baseline, strict=True)]


def variation(ratios: Sequence[float]) -> float:
    """How much one pair's ratio varies: median absolute deviation over the median."""
    middle = median(ratios)
    return median([abs(r - middle) for r in ratios]) / middle


async def steady_pairs(pair: Callable[[float], Awaitable[tuple[float, float]]], *,
                       pairs: int, budget_s: float, target: float = 0.10,
                       max_scale: float = 16.0) -> Pairs:
    """Run ``pairs`` alternating pairs (``pair(scale)`` -> (baseline rate, subject rate),
    runs ``scale`` times the base size); while one pair's ratio varies by more than
    ``target`` and the budget allows, start over with runs twice as long. Longer runs average
    out a shared machine's bursts; the last (longest) set is what counts."""
    started = time.perf_counter()
    scale = 1.0
    while True:
        found = Pairs([], [], scale)
        for _ in range(pairs):
            baseline, subject = await pair(scale)
            found.baseline.append(baseline)
            found.subject.append(subject)
        spent = time.perf_counter() - started
        # Doubling the runs doubles the next set's time: stop when that would not fit.
        if (variation(found.ratios) <= target or scale * 2 > max_scale
                or spent * 3 > budget_s):
            return found
        scale *= 2


@contextlib.asynccontextmanager
async def server_process(module: str, kind: str, *extra: str) -> AsyncIterator[int]:
    """Run ``python -m MODULE --serve KIND``; yield the port it prints; stop it on exit.

    The server runs until its stdin closes, which also happens if the bench dies, so no
    server outlives a bench.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, "--serve", kind, *extra,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, cwd=ROOT)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
        if not line.strip().isdigit():
            raise RuntimeError(f"{kind} server did not start (exit code {await proc.wait()})")
        yield int(line)
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def serve_until_stdin_closes(start: Awaitable[tuple[int, Callable[[float], Awaitable[Any]]]]
                                   ) -> None:
    """The server side of :func:`server_process`: start, print the port, serve until stdin
    closes (how the parent stops it; EOF also comes if the parent dies, so no server outlives
    the bench), then stop."""
    port, stop = await start
    print(port, flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await stop(0)


def run_server(main: Coroutine[Any, Any, None], profile: str | None) -> None:
    """Run a server subprocess's ``main``; with ``profile``, under cProfile, stats to that file
    (how per-call costs are found)."""
    if profile is None:
        asyncio.run(main)
        return
    profiler = cProfile.Profile()
    profiler.runcall(asyncio.run, main)
    profiler.dump_stats(profile)


@dataclass
class Run:
    """One timed run: throughput and per-call latencies."""

    calls_per_s: float
    latencies_s: list[float]


def run_summary(prefix: str, runs: Sequence[Run]) -> dict[str, float]:
    """Throughput and p50/p99 of repeated runs, each the median over the repeats' own figures
    (one slow run cannot move them)."""
    return {
        f"{prefix}_calls_per_s": rounded(median([r.calls_per_s for r in runs]), 1),
        f"{prefix}_p50_ms": rounded(median([percentile(r.latencies_s, 0.50) for r in runs]) * 1e3),
        f"{prefix}_p99_ms": rounded(median([percentile(r.latencies_s, 0.99) for r in runs]) * 1e3),
    }


def calls_for(rate: float, multiple: int, *, seconds: float, least: int, most: int) -> int:
    """Calls that take about ``seconds`` at ``rate``, within [least, most], a multiple of
    ``multiple`` (the concurrency, so every worker makes as many)."""
    calls = min(most, max(least, int(rate * seconds)))
    return max(multiple, calls // multiple * multiple)
