"""The image's install steps, replayed without Docker: build the wheel, install it in a venv.

The Dockerfile runs ``pip wheel --no-deps .`` in a build stage and installs that wheel with its
dependencies into a fresh virtualenv in the final stage. No Docker engine runs here, so this test
does the same in a temporary directory (dependencies come from pip's cache when warm) and checks
what the image would hold.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
# The source roots of the one distribution and where their files land in the wheel.
SOURCE_ROOTS = {
    Path("runtime/packetflow"): "packetflow",
    Path("operator/packetflow/operator"): "packetflow/operator",
    Path("proto/packetflow/v1"): "packetflow/v1",
}


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)  # the venv must stand alone, as in the image
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            env=env, check=False)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(source copy, wheel, venv) made the way the Dockerfile makes them."""
    work = tmp_path_factory.mktemp("image")
    # The build stage sees only what .dockerignore lets through: copy exactly that.
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("proto", "runtime", "operator"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    wheels = work / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", wheels,
         ".", cwd=source)
    (wheel,) = wheels.glob("packetflow-*.whl")
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True, symlinks=True)
    _run(env_dir / "bin" / "python", "-m", "pip", "install", "--quiet", wheel)
    return source, wheel, env_dir


def test_dockerfile_follows_the_steps_tested_here() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    assert len(re.findall(r"^FROM \$\{PYTHON_IMAGE\} AS \w+$", text, re.M)) == 2, "multi-stage"
    assert "pip wheel --no-deps" in text
    assert "python -m venv /opt/packetflow" in text
    assert re.search(r"^USER 10001(:10001)?$", text, re.M), "non-root, numeric uid"
    assert re.search(r'^ENTRYPOINT \["packetflow"\]$', text, re.M)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[:2] == ["# Only what the image build copies: pyproject.toml, README.md, "
                           "proto/, runtime/, operator/.", "*"]


def test_wheel_holds_runtime_operator_and_stubs(built: tuple[Path, Path, Path]) -> None:
    source, wheel, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())
    for stub in ("runtime_pb2.py", "runtime_pb2_grpc.py", "runtime_pb2.pyi",
                 "runtime_pb2_grpc.pyi", "runtime.proto"):
        assert f"packetflow/v1/{stub}" in names, stub
    assert "packetflow/operator/__init__.py" in names
    # Every source module ships: a subpackage missing from pyproject's list fails here.
    for directory, prefix in SOURCE_ROOTS.items():
        for path in (source / directory).rglob("*.py"):
            relative = path.relative_to(source / directory).as_posix()
            if "__pycache__" in relative or (prefix == "packetflow" and relative.startswith(
                    ("operator/", "v1/"))):
                continue
            assert f"{prefix}/{relative}" in names, f"{prefix}/{relative} is not in the wheel"


def test_installed_cli_and_packages_work(built: tuple[Path, Path, Path]) -> None:
    _, _, env_dir = built
    help_text = _run(env_dir / "bin" / "packetflow", "--help").stdout
    assert "usage: packetflow" in help_text
    for command in ("runtime", "call"):
        assert command in help_text, command
    _run(env_dir / "bin" / "python", "-c",
         "import packetflow.operator, packetflow.v1.runtime_pb2_grpc, packetflow.spec")


def test_installed_cli_runs_the_operator(built: tuple[Path, Path, Path]) -> None:
    source, _, env_dir = built
    if not (source / "operator" / "packetflow" / "operator" / "cli.py").is_file():
        pytest.skip("the operator's CLI (operator/packetflow/operator/cli.py) is not written yet")
    help_text = _run(env_dir / "bin" / "packetflow", "operator", "--help").stdout
    # The chart runs exactly these flags.
    for flag in ("--namespace", "--all-namespaces", "--liveness-address"):
        assert flag in help_text, flag
