"""``packetflow plan`` as a user runs it: a real ``dev`` process serving the examples and the
evaluation toolbox, the command in its own process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import yaml

from packetflow.manifests import load_text
from tests.integration.test_cli import EXAMPLES, ROOT, DevServer
from tests.support.planner import TOOLBOX

INTENT = "summarise this text and translate the summary to French"
TEXT = {"text": "The cat is on the mat. The dog sleeps."}


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    directory = tmp_path_factory.mktemp("planner") / "manifests"
    shutil.copytree(EXAMPLES, directory)
    shutil.copy(TOOLBOX, directory / "toolbox.yaml")
    # BM25 only: loading the embedding model would cost the first plan seconds here.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PACKETFLOW_PLANNER_EMBEDDINGS", "false")
        # 52 capabilities to load on a busy machine: more time than the default.
        server = DevServer(directory, directory.parent / "dev.log", start_timeout=120)
    try:
        yield server
    finally:
        server.stop()


def plan(dev: DevServer, *args: str, stdin: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "packetflow.cli", "plan", *args,
                           "--address", dev.address], input=stdin, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_the_printed_plan_is_an_appliable_manifest_with_reasons(dev: DevServer,
                                                                tmp_path: Path) -> None:
    data = tmp_path / "input.json"
    data.write_bytes(orjson.dumps(TEXT))
    done = plan(dev, INTENT, "--data", f"@{data}", "--explain")
    assert done.returncode == 0, done.stderr
    assert "# summarize-text (goal): covers 'summarise', 'text'" in done.stdout
    assert "#   target_language <- 'fr' from the intent" in done.stdout
    loaded = load_text(done.stdout)  # comments and all: what `kubectl apply -f` reads
    assert not loaded.errors and [c.spec.implementation.kind for c in loaded.capabilities] == [
        "composition"]


def test_execute_prints_results_trace_and_the_trace_id_to_rate(dev: DevServer) -> None:
    done = plan(dev, INTENT, "--data", "-", "--execute", stdin=orjson.dumps(TEXT).decode())
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"translation": "le chat est sur le tapis.",
                                         "language": "fr"}
    assert "progress: translate-text: done" in done.stderr
    trace_id = done.stderr.split("trace id: ")[1].split()[0]
    rated = subprocess.run([sys.executable, "-m", "packetflow.cli", "feedback", trace_id,
                            "--score", "0.9", "--address", dev.address],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert rated.returncode == 0 and "(planner)" in rated.stdout, rated.stderr


def test_json_output_effects_and_refusals(dev: DevServer) -> None:
    done = plan(dev, "send this text by email to the given address", "--execute", "--json",
                "--data", '{"text": "hi", "to": "bob@example.com"}')
    assert done.returncode == 3, done.stderr  # shown, not run
    shown = orjson.loads(done.stdout)
    assert not shown["executed"] and "--allow-effects" in shown["blocked"]
    assert yaml.safe_load(yaml.safe_dump(shown["plan"]))["spec"]["effects"] == ["email"]
    nothing = plan(dev, "book a flight to Paris")
    assert nothing.returncode == 1
    assert "FAILED_PRECONDITION: no plan for this intent" in nothing.stderr
