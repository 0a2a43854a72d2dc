"""The ``packetflow`` command as a user runs it: a real `dev` process, real calls over gRPC."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.support.processes import START_TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def packetflow(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "packetflow.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


class DevServer:
    """A `packetflow dev` subprocess, the addresses it serves and its stderr (in a file)."""

    def __init__(self, directory: Path, log: Path, *, as_pod: bool = False,
                 start_timeout: float = START_TIMEOUT) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.metrics = f"127.0.0.1:{free_port()}"
        self.log = log
        self.state_dir = log.parent / "state"
        # as_pod: `packetflow runtime --reload`, as the chart's MCP aggregate pod runs it.
        serving = (["runtime", "--bundle", str(directory), "--reload"] if as_pod
                   else ["dev", str(directory)])
        with log.open("w") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "packetflow.cli", *serving, "--address",
                 self.address, "--metrics-address", self.metrics,
                 "--state-dir", str(self.state_dir)],
                cwd=ROOT, stderr=sink, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + start_timeout
        try:
            while "packetflow: serving" not in self.stderr():
                assert self.process.poll() is None, self.stderr()
                assert time.monotonic() < deadline, self.stderr()
                time.sleep(0.05)  # polling another process's output, with a deadline
        except BaseException:
            self.process.kill()  # never left running to haunt a later test
            self.process.wait(timeout=10)
            raise

    def stderr(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=START_TIMEOUT)


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[DevServer]:
    """`packetflow dev` over a copy of examples/ plus one broken manifest."""
    directory = tmp_path / "manifests"
    shutil.copytree(EXAMPLES, directory)
    (directory / "broken.yaml").write_text(
        "apiVersion: packetflow.io/v1alpha1\nkind: Capability\nmetadata: {name: broken}\n"
        "spec:\n  intent: x\n  requires: {a: {type: integr}}\n"
        "  implementation: {builtin: {name: echo}}\n")
    server = DevServer(directory, tmp_path / "dev.log")
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()


def test_dev_serves_valid_manifests_and_reports_invalid(dev: DevServer) -> None:
    assert re.search(r"broken\.yaml:6: spec\.requires\.a\.type: Input should be", dev.stderr())
    result = packetflow("call", "add-numbers", "--data", '{"a": 2, "b": 3}',
                        "--address", dev.address)
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout) == {"sum": 5}
    listing = packetflow("list", "--address", dev.address)
    names = [line.split("\t")[0] for line in listing.stdout.splitlines()]
    assert "add-numbers" in names and "text-stats" in names and "broken" not in names


def test_call_errors_print_code_and_exit_nonzero(dev: DevServer) -> None:
    result = packetflow("call", "add-numbers", "--data", '{"a": "two"}', "--address", dev.address)
    assert result.returncode == 1
    assert result.stderr.startswith("error: INVALID_ARGUMENT: input.a:")
    assert result.stdout == ""
    unknown = packetflow("call", "nope", "--address", dev.address)
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    bad_json = packetflow("call", "add-numbers", "--data", "{oops", "--address", dev.address)
    assert bad_json.returncode == 2 and "--data is not valid JSON" in bad_json.stderr


def test_python_example_streams_progress(dev: DevServer) -> None:
    result = packetflow("call", "text-stats", "--stream", "--address", dev.address, "--data",
                        '{"text": "The cat sat. The cat ran! A dog?", "top": 2}')
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout) == {"words": 8, "sentences": 3,
                                           "top_words": ["cat", "the"]}
    assert "progress: counted words (50%)" in result.stderr


def test_describe_prints_the_contract(dev: DevServer) -> None:
    result = packetflow("describe", "greet", "--address", dev.address)
    described = orjson.loads(result.stdout)
    assert described["requires"]["required"] == ["user"]
    assert described["intent"].startswith("Greet")


def test_metrics_exposition_passes_promtool(dev: DevServer) -> None:
    assert packetflow("call", "echo", "--data", '{"message": "hi"}',
                      "--address", dev.address).returncode == 0
    with urllib.request.urlopen(f"http://{dev.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'packetflow_capability_calls_total{capability="echo",code="OK"} 1.0' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dev_reloads_changed_manifests(dev: DevServer, tmp_path: Path) -> None:
    new = tmp_path / "manifests" / "shout.yaml"
    new.write_text(
        "apiVersion: packetflow.io/v1alpha1\nkind: Capability\nmetadata: {name: shout}\n"
        "spec:\n  intent: Shout\n  requires: {word: {type: string}}\n"
        "  implementation: {builtin: {name: transform, config: {expression: '{loud: word}'}}}\n")
    deadline = time.monotonic() + START_TIMEOUT
    result = packetflow("call", "shout", "--data", '{"word": "hey"}', "--address", dev.address)
    while result.returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # polling a separate process with a deadline
        result = packetflow("call", "shout", "--data", '{"word": "hey"}',
                            "--address", dev.address)
    assert orjson.loads(result.stdout) == {"loud": "hey"}


def test_runtime_with_reload_starts_empty_and_serves_what_arrives(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    server = DevServer(bundle, tmp_path / "runtime.log", as_pod=True)
    try:
        assert "serving nothing" in server.stderr()
        shutil.copy(EXAMPLES / "echo.yaml", bundle / "echo.yaml")
        deadline = time.monotonic() + START_TIMEOUT
        while "echo" not in packetflow("list", "--address", server.address).stdout:
            assert time.monotonic() < deadline, server.stderr()
            time.sleep(0.1)  # polling another process, with a deadline
    finally:
        assert server.stop() == 0


def test_sigterm_stops_cleanly(dev: DevServer) -> None:
    assert dev.stop() == 0


def test_validate_reports_every_error_with_file_and_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: packetflow.io/v1alpha1\nkind: Capability\nmetadata: {name: Bad}\n"
        "spec:\n  intent: ''\n  implementation: {python: {module: no_such_module_x, "
        "function: f}}\n---\napiVersion: v1\nkind: Capability\n")
    result = packetflow("validate", str(bad), str(tmp_path / "missing.yaml"))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert any(f"{bad}:3: metadata.name:" in line for line in lines)
    assert any(f"{bad}:5: spec.intent:" in line for line in lines)
    assert any(f"{bad}:8: apiVersion:" in line for line in lines)
    assert any("missing.yaml: no such file" in line for line in lines)
    good = packetflow("validate", str(EXAMPLES))
    assert good.returncode == 0, good.stderr
    assert re.match(r"ok: \d+ capabilities and 2 actor types valid", good.stdout)


def test_validate_checks_python_imports(tmp_path: Path) -> None:
    manifest = tmp_path / "py.yaml"
    manifest.write_text(
        "apiVersion: packetflow.io/v1alpha1\nkind: Capability\nmetadata: {name: py}\n"
        "spec:\n  intent: x\n  implementation: {python: {module: no_such_module_x, "
        "function: f}}\n")
    result = packetflow("validate", str(manifest))
    assert result.returncode == 1
    assert "spec.implementation.python.module: cannot import 'no_such_module_x'" in result.stderr


def test_validate_checks_actor_handlers(tmp_path: Path) -> None:
    (tmp_path / "agent.py").write_text("def on_message(message, state, ctx):\n"
                                       "    return {}, state\n")
    (tmp_path / "agent.yaml").write_text(
        "apiVersion: packetflow.io/v1alpha1\nkind: Actor\nmetadata: {name: agent}\n"
        "spec:\n  intent: x\n  implementation: {python: {module: agent}}\n"
        "  schedules: [{name: tidy, every: 1h}]\n")
    result = packetflow("validate", str(tmp_path))
    assert result.returncode == 1
    assert "actor agent: spec.schedules[0].name: no handler named 'tidy'" in result.stderr


def test_composition_examples_run_and_show_their_trace(dev: DevServer) -> None:
    result = packetflow("call", "greet-and-analyse", "--trace", "--data", '{"name": "Ada"}',
                        "--address", dev.address)
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout) == {"greeting": "Hello, Ada!", "words": 2}
    trace = orjson.loads(result.stderr)
    assert trace["composition"] == "greet-and-analyse" and trace["outcome"] == "OK"
    assert [(s["name"], s["outcome"], s["inputFields"]) for s in trace["steps"]] == [
        ("greet", "OK", ["user"]), ("text_stats", "OK", ["text"])]
    summed = packetflow("call", "sum-pairs", "--address", dev.address, "--data",
                        '{"pairs": [{"a": 1, "b": 2}, {"a": 3}, {"a": 10, "b": -4}]}')
    assert orjson.loads(summed.stdout) == {"sum": 12}
    short = packetflow("call", "triage-text", "--data", '{"text": "hi"}', "--address", dev.address)
    assert orjson.loads(short.stdout) == {"message": "hi"}


TRIGGERED = """
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: note}
spec:
  intent: Accept any event
  implementation: {builtin: {name: echo}}
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: tick}
spec:
  intent: Every second, pass the schedule event on
  implementation:
    composition:
      steps: [{call: {capability: note}}]
      triggers: [{schedule: "* * * * * *"}]
---
apiVersion: packetflow.io/v1alpha1
kind: Capability
metadata: {name: after-tick}
spec:
  intent: Run whenever tick succeeded
  implementation:
    composition:
      steps: [{call: {capability: note, input: {tick: traceId}}}]
      triggers: [{completed: {capability: tick}}]
"""


def calls_ok(dev: DevServer, capability: str) -> float:
    """``packetflow_capability_calls_total{capability, code="OK"}`` as scraped now."""
    with urllib.request.urlopen(f"http://{dev.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = rf'packetflow_capability_calls_total{{capability="{capability}",code="OK"}} (\S+)'
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def test_dev_fires_scheduled_and_completion_triggers(tmp_path: Path) -> None:
    directory = tmp_path / "manifests"
    directory.mkdir()
    (directory / "triggers.yaml").write_text(TRIGGERED)
    server = DevServer(directory, tmp_path / "dev.log")
    try:
        deadline = time.monotonic() + 15
        while calls_ok(server, "tick") < 2 or calls_ok(server, "after-tick") < 2:
            assert time.monotonic() < deadline, server.stderr()
            time.sleep(0.1)  # polling another process's metrics, with a deadline
        assert (server.state_dir / "triggers.db").is_file()  # keys are kept durably
    finally:
        assert server.stop() == 0
