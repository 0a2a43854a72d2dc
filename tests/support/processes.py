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
START_TIMEOUT = 60.0  # a loaded 2-core machine starts a runtime in seconds, not minutes


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
    """``packetflow runtime`` in a subprocess, ready when it announces itself; ``wait=False``
    returns at once (then call :meth:`wait_ready`), so several can start side by side."""

    def __init__(self, bundle: Path, state_dir: Path, log: Path,
                 env: dict[str, str] | None = None, address: str | None = None,
                 args: Sequence[str] = (), wait: bool = True) -> None:
        self.address = address or f"127.0.0.1:{free_port()}"
        self.log = log
        self._start = log.stat().st_size if log.exists() else 0  # a restart appends
        with log.open("a") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "packetflow.cli", "runtime", "--bundle", str(bundle),
                 "--address", self.address, "--metrics-address", "", "--state-dir",
                 str(state_dir), *args], cwd=ROOT, stderr=sink, stdout=subprocess.DEVNULL,
                env={**os.environ, "PACKETFLOW_LOG_LEVEL": "WARNING", **(env or {})})
        if wait:
            self.wait_ready()

    def ready(self) -> bool:
        """Whether it announced itself and accepts connections (fails if it died)."""
        assert self.process.poll() is None, self.log.read_text()
        return "packetflow: serving" in self.log.read_text()[self._start:] \
            and self._listening()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until :meth:`ready`; a process that does not come up is killed."""
        deadline = time.monotonic() + timeout
        try:
            while not self.ready():
                assert time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.05)  # polling another process, with a deadline
        except BaseException:
            self.kill()  # never left running when it did not come up
            raise

    def _listening(self) -> bool:
        host, port = self.address.rsplit(":", 1)
        with socket.socket() as sock:
            return sock.connect_ex((host, int(port))) == 0

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (drain), and reap it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


def gateway_process(routes: Path, log: Path, port: int, metrics: str = "",
                    args: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """``packetflow gateway --routes FILE [args]`` in a subprocess, returned once it announced
    its port (killed if it does not within the start timeout)."""
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "packetflow.cli", "gateway", "--routes", str(routes),
             "--address", f"127.0.0.1:{port}", "--metrics-address", metrics, *args],
            cwd=ROOT, stderr=sink, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while "packetflow: gateway on port" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # polling another process, with a deadline
    except BaseException:
        process.kill()
        process.wait(timeout=10)
        raise
    return process


@pytest.fixture
def processes() -> Iterator[list[RuntimeProcess]]:
    """Runtime processes a test started; any still running at the end are killed."""
    started: list[RuntimeProcess] = []
    yield started
    for process in started:
        if process.process.poll() is None:
            process.kill()
