"""Real ``packetflow`` processes for tests: the CLI run to completion, and ``runtime`` servers
(a pytest plugin: the ``processes`` fixture kills what a test left running)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nobody listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def packetflow(*args: str, timeout: float = 30,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``packetflow ARGS`` to completion, as a user would."""
    return subprocess.run([sys.executable, "-m", "packetflow.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env=None if env is None else {**os.environ, **env})


class RuntimeProcess:
    """``packetflow runtime`` in a subprocess, ready when it announces itself."""

    def __init__(self, bundle: Path, state_dir: Path, log: Path,
                 env: dict[str, str] | None = None, address: str | None = None,
                 args: Sequence[str] = ()) -> None:
        self.address = address or f"127.0.0.1:{free_port()}"
        self.log = log
        start = log.stat().st_size if log.exists() else 0  # a restart appends to the same log
        with log.open("a") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "packetflow.cli", "runtime", "--bundle", str(bundle),
                 "--address", self.address, "--metrics-address", "", "--state-dir",
                 str(state_dir), *args], cwd=ROOT, stderr=sink, stdout=subprocess.DEVNULL,
                env={**os.environ, "PACKETFLOW_LOG_LEVEL": "WARNING", **(env or {})})
        deadline = time.monotonic() + 60
        try:
            while "packetflow: serving" not in log.read_text()[start:] or not self._listening():
                assert self.process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)  # polling another process, with a deadline
        except BaseException:
            self.kill()  # never left running when it did not come up
            raise

    def _listening(self) -> bool:
        host, port = self.address.rsplit(":", 1)
        with socket.socket() as sock:
            return sock.connect_ex((host, int(port))) == 0

    def kill(self) -> None:
        """SIGKILL, and wait for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, and wait for it to exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


@pytest.fixture
def processes() -> Iterator[list[RuntimeProcess]]:
    """Runtime processes a test started; any still running at the end are killed."""
    started: list[RuntimeProcess] = []
    yield started
    for process in started:
        if process.process.poll() is None:
            process.kill()
