"""Statistics and server subprocesses shared by the benches."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import statistics
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

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
