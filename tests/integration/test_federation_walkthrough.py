"""The README's "two organizations on one machine", as a user types it: real processes
(`packetflow federation certs`, `dev` and `federation --config` per organization), on a copy
of demos/federation/ whose fixed ports are swapped for free ones."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "demos" / "federation"
README = ROOT / "README.md"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def packetflow(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "packetflow.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


class Process:
    """A long-running `packetflow` command; its stderr goes to a file."""

    def __init__(self, args: list[str], cwd: Path, log: Path, ready: str) -> None:
        self.log = log
        with log.open("w") as sink:
            self.process = subprocess.Popen([sys.executable, "-m", "packetflow.cli", *args],
                                            cwd=cwd, stderr=sink, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while ready not in log.read_text():
            assert self.process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # polling another process's output, with a deadline

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@pytest.fixture
def example(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the example with every 127.0.0.1 port it names moved to a free one."""
    directory = tmp_path / "federation"
    shutil.copytree(EXAMPLE, directory)
    files = list(directory.rglob("*.yaml"))
    ports = sorted({port for path in files
                    for port in re.findall(r"127\.0\.0\.1:(\d+)", path.read_text())})
    moved = {port: str(free_port()) for port in ports}
    for path in files:
        path.write_text(re.sub(r"127\.0\.0\.1:(\d+)",
                               lambda m: f"127.0.0.1:{moved[m.group(1)]}", path.read_text()))
    return directory, moved


@pytest.mark.timeout(300)  # four servers and eight CLI runs on a loaded 2-core machine
def test_the_readme_walkthrough_works(example: tuple[Path, dict[str, str]]) -> None:
    directory, ports = example
    # The README's commands, with these ports.
    assert "packetflow federation certs --trust-domain acme.example --out acme/certs" \
        in README.read_text()
    acme, globex = directory / "acme", directory / "globex"
    for org in ("acme", "globex"):
        made = packetflow("federation", "certs", "--trust-domain", f"{org}.example", "--out",
                          f"{org}/certs", cwd=directory)
        assert made.returncode == 0, made.stderr
    logs = directory.parent
    running: list[Process] = []
    try:
        running.append(Process(["dev", ".", "--address", f"127.0.0.1:{ports['50061']}",
                                "--metrics-address", ""], globex, logs / "globex-dev.log",
                               "packetflow: serving"))
        running.append(Process(["federation", "--config", "federation.yaml"], globex,
                               logs / "globex-federation.log", "federation gateway globex"))
        running.append(Process(["federation", "--config", "federation.yaml"], acme,
                               logs / "acme-federation.log", "federation gateway acme"))
        local = f"127.0.0.1:{ports['7444']}"
        deadline = time.monotonic() + 60
        while True:  # catalogs are exchanged within a few seconds
            called = packetflow("call", "globex-translate", "--address", local, "--data",
                                '{"text": "hello"}', cwd=directory)
            if called.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert called.returncode == 0, called.stderr
        assert orjson.loads(called.stdout) == {"text": "[fr] hello"}
        running.append(Process(["dev", ".", "--address", f"127.0.0.1:{ports['50051']}",
                                "--metrics-address", ""], acme, logs / "acme-dev.log",
                               "packetflow: serving"))
        composed = packetflow("call", "greet-in-french", "--data", '{"name": "Ada"}',
                              "--wait", "--address", f"127.0.0.1:{ports['50051']}",
                              cwd=directory)
        assert composed.returncode == 0, composed.stderr
        assert orjson.loads(composed.stdout) == {"text": "[fr] Hello Ada"}
        verified = packetflow("audit", "verify", "--config", "globex/federation.yaml",
                              cwd=directory)
        assert verified.returncode == 0, verified.stderr
        assert "chain intact" in verified.stdout
        usage = packetflow("federation", "usage", "--config", "globex/federation.yaml",
                           "--format", "json", cwd=directory)
        assert usage.returncode == 0, usage.stderr
        (line,) = [ln for ln in orjson.loads(usage.stdout)["lines"]
                   if ln["capability"] == "translate"]
        assert (line["direction"], line["peer"], line["model"]) == ("inbound", "acme",
                                                                    "perExecution")
        assert line["ok"] >= 2  # the two calls above, and free SLA probes
        assert line["amount"] == pytest.approx(0.004)
    finally:
        codes = [process.stop() for process in running]
    assert codes == [0] * len(codes)
