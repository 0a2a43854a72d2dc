"""Real ``packetflow`` processes for tests: a runtime in a subprocess, ready when it says so."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RuntimeProcess:
    """``packetflow runtime`` in a subprocess; ``wait=False`` returns at once (then call
    :meth:`wait_ready`), so several can start side by side."""

    def __init__(self, bundle: Path, state_dir: Path, log: Path,
                 env: dict[str, str] | None = None, address: str | None = None,
                 wait: bool = True) -> None:
        self.address = address or f"127.0.0.1:{free_port()}"
        self.log = log
        self._start = log.stat().st_size if log.exists() else 0  # a restart appends
        with log.open("a") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "packetflow.cli", "runtime", "--bundle", str(bundle),
                 "--address", self.address, "--metrics-address", "", "--state-dir",
                 str(state_dir)], cwd=ROOT, stderr=sink, stdout=subprocess.DEVNULL,
                env={**os.environ, "PACKETFLOW_LOG_LEVEL": "WARNING", **(env or {})})
        if wait:
            self.wait_ready()

    def ready(self) -> bool:
        """Whether it announced itself and accepts connections (fails if it died)."""
        assert self.process.poll() is None, self.log.read_text()
        return "packetflow: serving" in self.log.read_text()[self._start:] \
            and self._listening()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until :meth:`ready`."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)  # polling another process, with a deadline

    def _listening(self) -> bool:
        host, port = self.address.rsplit(":", 1)
        with socket.socket() as sock:
            return sock.connect_ex((host, int(port))) == 0

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (drain), and reap it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)
