"""CLI start-up: ``packetflow call echo`` against a running runtime, as a whole command.

- ``cli_ratio``: wall time of the ``packetflow call`` console script / wall time of a minimal
  Python script making the same call with the generated stub (``grpc`` + ``runtime_pb2_grpc``,
  nothing of PacketFlow's). Both are new processes of the same interpreter and virtualenv, so
  the ratio is what the CLI adds to the least any Python client must pay. Target <= 1.5.
- Runs alternate (script, CLI, script, CLI, ...), each side of a pair ``REPEATS`` commands;
  the ratio is the median of the pairs' ratios, with the spread (min/max) beside it.
  About 45 s.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import ROOT, START_TIMEOUT, median, ratio_figures, rounded

PAIRS = 15
REPEATS = 3  # runs per side of a pair: one process start alone varies too much on 2 cores
MESSAGE = '{"message": "hi"}'
ECHO = """\
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: echo}
spec:
  intent: Return the message it is given
  implementation: {builtin: {name: echo}}
"""
MINIMAL_CLIENT = """\
import sys
import grpc
from packetflow.v1 import runtime_pb2, runtime_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = runtime_pb2_grpc.CapabilityRuntimeStub(channel)
    reply = stub.Invoke(runtime_pb2.InvokeRequest(capability="echo",
                                                  input_json=sys.argv[2].encode()), timeout=30)
print(reply.output_json.decode())
"""


@contextlib.contextmanager
def dev_server(directory: Path) -> Iterator[str]:
    """``packetflow dev`` serving the echo manifest; yields its gRPC address."""
    (directory / "echo.yaml").write_text(ECHO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "packetflow.cli", "dev", str(directory), "--no-reload",
         "--address", "127.0.0.1:0", "--metrics-address", "", "--state-dir",
         str(directory / "state")], stderr=subprocess.PIPE, text=True, cwd=directory)
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                raise RuntimeError(f"packetflow dev exited ({proc.wait()})")
            if found := re.search(r"on port (\d+)", line):
                yield f"127.0.0.1:{found.group(1)}"
                return
        raise RuntimeError("packetflow dev did not start in time")
    finally:
        proc.terminate()
        proc.wait(30)


def timed(command: list[str], repeats: int = 1) -> float:
    """Mean wall seconds of ``repeats`` runs of ``command``; each must echo the message."""
    started = time.perf_counter()
    for _ in range(repeats):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        if done.returncode != 0 or '"hi"' not in done.stdout:
            raise RuntimeError(f"{command[0]} failed: {done.stderr.strip()}")
    return (time.perf_counter() - started) / repeats


def run() -> dict[str, Any]:
    """The bench's figures: ``cli_ratio`` and both sides' median wall times."""
    packetflow = str(Path(sys.executable).with_name("packetflow"))
    with tempfile.TemporaryDirectory() as temp, dev_server(Path(temp)) as address:
        script = Path(temp) / "minimal_client.py"
        script.write_text(MINIMAL_CLIENT)
        minimal = [sys.executable, str(script), address, MESSAGE]
        cli = [packetflow, "call", "echo", "--address", address, "--data", MESSAGE]
        timed(minimal), timed(cli)  # warm the page cache and the server
        ratios, minimal_s, cli_s = [], [], []
        for _ in range(PAIRS):
            minimal_s.append(timed(minimal, REPEATS))
            cli_s.append(timed(cli, REPEATS))
            ratios.append(cli_s[-1] / minimal_s[-1])
    return {**ratio_figures("cli_ratio", ratios),
            "minimal_client_s": rounded(median(minimal_s)), "cli_call_s": rounded(median(cli_s))}
