"""Client commands as a user runs them: quick start-up, payloads from files and pipes, actor
types listed and described. A real ``packetflow dev`` over a copy of ``examples/``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.integration.test_cli import EXAMPLES, ROOT, DevServer, packetflow

# What a client command must never import: the runtime's server side and its heavy deps.
SERVER_SIDE = ("packetflow.engine", "packetflow.spec", "packetflow.server", "packetflow.serve",
               "packetflow.actors", "packetflow.contracts", "packetflow.mcp", "jsonschema",
               "psycopg", "mcp", "torch", "kopf", "pydantic", "yaml")


@pytest.fixture(scope="module")
def examples_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """One `packetflow dev` over the examples for the whole module (read-only use)."""
    base = tmp_path_factory.mktemp("cli-client")
    shutil.copytree(EXAMPLES, base / "manifests")
    server = DevServer(base / "manifests", base / "dev.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("command", [
    ["call", "echo", "--data", '{"message": "hi"}'],
    ["list"],
    ["describe", "customer-support"],
    ["send", "customer-support", "c-1", "--data",
     '{"customer_id": "c-1", "message": "My router is broken"}'],
    ["actors", "list", "customer-support"],
])
def test_client_commands_import_no_server_side(examples_dev: DevServer,
                                               command: list[str]) -> None:
    script = (
        "import sys\n"
        "from packetflow.cli import main\n"
        f"code = main({[*command, '--address', examples_dev.address]!r})\n"
        "loaded = sorted(m for m in sys.modules\n"
        f"                if any(m == s or m.startswith(s + '.') for s in {SERVER_SIDE!r}))\n"
        "print('LOADED', code, loaded)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    last = done.stdout.strip().splitlines()[-1]
    assert last == "LOADED 0 []", (last, done.stderr)


def test_data_from_a_file_and_from_stdin(examples_dev: DevServer, tmp_path: Path) -> None:
    big = "word " * 600_000  # 3 MB: too long for an argument list
    payload = tmp_path / "input.json"
    payload.write_bytes(orjson.dumps({"message": big}))
    from_file = packetflow("call", "echo", "--data", f"@{payload}", "--address",
                           examples_dev.address, "--timeout", "60")
    assert from_file.returncode == 0, from_file.stderr
    assert orjson.loads(from_file.stdout) == {"message": big}

    piped = subprocess.run(
        [sys.executable, "-m", "packetflow.cli", "call", "add-numbers", "--data", "-",
         "--address", examples_dev.address], input='{"a": 4, "b": 5}', capture_output=True,
        text=True, timeout=30, cwd=ROOT)
    assert piped.returncode == 0, piped.stderr
    assert orjson.loads(piped.stdout) == {"sum": 9}


def test_data_errors_name_the_file(examples_dev: DevServer, tmp_path: Path) -> None:
    missing = packetflow("call", "echo", "--data", f"@{tmp_path / 'nope.json'}",
                         "--address", examples_dev.address)
    assert missing.returncode == 2
    assert f"--data @{tmp_path / 'nope.json'}: cannot read" in missing.stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{oops")
    bad = packetflow("send", "customer-support", "x", "--data", f"@{broken}",
                     "--address", examples_dev.address)
    assert bad.returncode == 2
    assert f"--data is not valid JSON ({broken})" in bad.stderr


def test_list_shows_actor_types_beside_capabilities(examples_dev: DevServer) -> None:
    rows = [line.split("\t") for line in
            packetflow("list", "--address", examples_dev.address).stdout.splitlines()]
    kinds = {row[0]: row[1] for row in rows}
    assert kinds["customer-support"] == "actor" and kinds["research-assistant"] == "actor"
    assert kinds["add-numbers"] == "builtin" and kinds["text-stats"] == "python"
    only_actors = packetflow("list", "--kind", "actor", "--address", examples_dev.address)
    assert sorted(line.split("\t")[0] for line in only_actors.stdout.splitlines()) == [
        "customer-support", "research-assistant"]
    only_capabilities = packetflow("list", "--kind", "capability", "--address",
                                   examples_dev.address)
    assert "actor" not in {line.split("\t")[1] for line in only_capabilities.stdout.splitlines()}


def test_describe_an_actor_type_and_an_unknown_name(examples_dev: DevServer) -> None:
    described = packetflow("describe", "customer-support", "--address", examples_dev.address)
    assert described.returncode == 0, described.stderr
    contract = orjson.loads(described.stdout)
    assert contract["kind"] == "actor"
    assert contract["requires"]["required"] == ["customer_id", "message"]
    assert set(contract["provides"]["properties"]) == {
        "response", "action_items", "conversation_summary"}
    unknown = packetflow("describe", "nope", "--address", examples_dev.address)
    assert unknown.returncode == 1
    assert "no capability or actor type 'nope'" in unknown.stderr


async def test_grpc_and_mcp_list_the_same_things(tmp_path: Path) -> None:
    """gRPC (capabilities + actor types) and MCP tools/list name the same set for examples/,
    where no manifest renames or hides its tool."""
    from packetflow.client import RuntimeClient
    from packetflow.mcp.server import McpService
    from packetflow.serve import load_runtime
    from packetflow.server import RuntimeServer
    from packetflow.settings import RuntimeSettings

    sys.path.insert(0, str(EXAMPLES))
    try:
        engine, actors, errors = await load_runtime(
            [EXAMPLES], RuntimeSettings(state_dir=tmp_path, metrics_address=None))
        assert errors == []
        server = await RuntimeServer.start(engine, "127.0.0.1:0", actors)
        try:
            async with RuntimeClient(f"127.0.0.1:{server.port}") as client:
                over_grpc = {c.name for c in await client.list()} | {
                    t.name for t in await client.list_actor_types()}
            over_mcp = {t.name for t in McpService.for_runtime(engine, actors).list_tools()}
            assert over_grpc == over_mcp
            assert {"customer-support", "research-assistant", "echo"} <= over_grpc
        finally:
            await server.stop(grace=0)
            await actors.aclose()
            await engine.aclose()
    finally:
        sys.path.remove(str(EXAMPLES))


def test_graph_of_a_running_runtime_coloured_by_live_traffic(examples_dev: DevServer) -> None:
    import threading

    import grpc

    from packetflow.v1 import runtime_pb2, runtime_pb2_grpc

    stop = threading.Event()

    def traffic() -> None:
        with grpc.insecure_channel(examples_dev.address) as channel:
            stub = runtime_pb2_grpc.CapabilityRuntimeStub(channel)
            while not stop.is_set():
                stub.Invoke(runtime_pb2.InvokeRequest(capability="add-numbers",
                                                      input_json=b'{"a": 1, "b": 2}'))

    caller = threading.Thread(target=traffic)
    caller.start()
    try:
        drawn = packetflow("graph", "--address", examples_dev.address, "--format", "dot",
                           "--metrics-url", f"http://{examples_dev.metrics}/metrics",
                           "--window", "1", timeout=60)
    finally:
        stop.set()
        caller.join(30)
    assert drawn.returncode == 0, drawn.stderr
    lines = drawn.stdout.splitlines()
    add = next(line for line in lines if line.startswith('  "add-numbers" ['))
    assert "/s, 0.0% errors, p99" in add and 'fillcolor="#c8e6c9"' in add  # busy, healthy
    assert '  "sum-pairs" -> "add-numbers" [label="step"];' in lines
    assert '  "research-assistant" -> "text-stats" [label="tool analyze"];' in lines
    echo = next(line for line in lines if line.startswith('  "echo" ['))
    assert 'fillcolor="#eeeeee"' in echo  # no calls in the window


def test_graph_of_manifests_as_svg_and_mermaid() -> None:
    import shutil as which

    mermaid = packetflow("graph", str(EXAMPLES), "--format", "mermaid")
    assert mermaid.returncode == 0 and mermaid.stdout.startswith("flowchart LR")
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("```mermaid\n", 1)[1].split("```", 1)[0]
    assert shown == mermaid.stdout  # the README's picture is what the command draws today
    svg = packetflow("graph", str(EXAMPLES), "--format", "svg")
    if which.which("dot") is None:
        assert svg.returncode == 2 and "Graphviz" in svg.stderr
    else:
        assert svg.returncode == 0, svg.stderr
        assert "<svg" in svg.stdout and "tool analyze" in svg.stdout


def test_sigterm_the_instant_it_is_ready_drains_instead_of_killing(tmp_path: Path) -> None:
    """The signal handlers are installed before `serving` is announced: a SIGTERM that a
    supervisor sends the moment it sees readiness stops the process cleanly (exit 0)."""
    import signal

    (tmp_path / "echo.yaml").write_text(
        "apiVersion: packetflow.io/v1alpha1\nkind: Capability\nmetadata: {name: echo}\n"
        "spec: {intent: x, implementation: {builtin: {name: echo}}}\n")
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "packetflow.cli", "dev", str(tmp_path), "--no-reload",
             "--address", "127.0.0.1:0", "--metrics-address", "", "--state-dir",
             str(tmp_path / "state")], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        for line in proc.stderr:
            if "packetflow: serving" in line:
                proc.send_signal(signal.SIGTERM)
                break
        assert proc.wait(timeout=60) == 0
        proc.stderr.close()
