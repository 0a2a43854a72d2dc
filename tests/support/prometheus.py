"""A real Prometheus server for tests: the Debian package's binary, a temp data dir, a free
loopback port, scraping the given targets every second.

Skips (with the reason) only when no ``prometheus`` binary exists; scripts/test.sh installs it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest
import yaml


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PrometheusServer:
    """A running Prometheus: its URL, and how to stop it."""

    process: subprocess.Popen[bytes]
    url: str
    directory: Path
    log: BinaryIO

    @classmethod
    def start(cls, targets: Sequence[str], *, scrape_interval: str = "1s",
              rule_files: Sequence[Path] = ()) -> PrometheusServer:
        """Start scraping ``targets`` (host:port of /metrics) and wait until it is ready."""
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("no prometheus binary (install the Debian package prometheus)")
        directory = Path(tempfile.mkdtemp(prefix="packetflow-prom-"))
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": "packetflow", "scrape_timeout": "1s",
                                "static_configs": [{"targets": list(targets)}]}],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = (directory / "prometheus.log").open("wb")
        process = subprocess.Popen(
            [binary, f"--config.file={directory / 'prometheus.yml'}",
             f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        server = cls(process, f"http://127.0.0.1:{port}", directory, log)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError("prometheus did not start: "
                                   + (directory / "prometheus.log").read_text()[-2000:])
            time.sleep(0.1)  # polling another process, with a deadline

    def stop(self) -> None:
        """Stop the server and remove its data."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)
