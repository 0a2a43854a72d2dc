"""A real PostgreSQL server for tests: initdb into a temp dir, pg_ctl on a free loopback port.

Use with ``pytest_plugins = ["tests.support.postgres"]``: the ``postgres`` fixture (session)
starts one server, ``postgres_dsn`` gives each test a database of its own. Tests skip only
when no PostgreSQL server binaries exist (scripts/test.sh installs the Debian package).
A server of a test's own can be crashed (:meth:`PostgresServer.crash`: immediate shutdown,
data kept) and started again on the same port (:meth:`PostgresServer.restart`).
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

_databases = itertools.count(1)


def postgres_bindir() -> Path | None:
    """The newest installed PostgreSQL server's bin directory, if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """A running server: where it listens and how to stop it."""

    bindir: Path
    directory: Path
    port: int
    prefix: list[str]

    def dsn(self, database: str = "postgres") -> str:
        """A libpq connection string to ``database``."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def create_database(self) -> str:
        """A new empty database; returns its DSN."""
        name = f"test_{os.getpid()}_{next(_databases)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def _run(self, *args: str) -> None:
        subprocess.run([*self.prefix, *args], check=True, capture_output=True, timeout=60)

    @classmethod
    def start(cls) -> PostgresServer:
        """initdb and start; as root, the server runs as user ``postgres`` (initdb refuses
        root)."""
        bindir = postgres_bindir()
        if bindir is None:
            pytest.skip("no PostgreSQL server binaries (install the Debian package postgresql)")
        directory = Path(tempfile.mkdtemp(prefix="packetflow-pg-"))
        prefix: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres", "postgres")
            prefix = ["runuser", "-u", "postgres", "--"]
        server = cls(bindir, directory, _free_port(), prefix)
        server._run(str(bindir / "initdb"), "-D", str(directory / "data"), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8", "--no-sync")
        server.restart()
        return server

    def restart(self) -> None:
        """Start the server (again) on its port, with the data it had."""
        # fsync off: a test server's durability is not under test, its speed matters (a crash
        # of the server process alone loses nothing: the operating system keeps its writes).
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.directory / "data"), "-l",
                  str(self.directory / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
                  " -F -c max_connections=300", "start")

    def crash(self) -> None:
        """Immediate shutdown (every backend killed, no checkpoint: recovery on restart),
        keeping the data."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.directory / "data"), "-m",
                  "immediate", "-w", "stop")

    def stop(self) -> None:
        """Stop at once and remove the data directory."""
        try:
            self.crash()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session."""
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_dsn(postgres: PostgresServer) -> str:
    """A fresh database for one test."""
    return postgres.create_database()


@pytest.fixture
def crashable_postgres() -> Iterator[PostgresServer]:
    """A server only this test uses, so it may crash and restart it."""
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()
