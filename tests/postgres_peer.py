"""A real PostgreSQL for the tests: one server per test session (initdb costs seconds), a fresh
database per test.

Debian's PostgreSQL 15 binaries; initdb refuses root, so the cluster belongs to the ``postgres``
user, in a temporary folder, listening on 127.0.0.1 on a free port and a private socket folder.
It is stopped (``pg_ctl stop -m immediate``) and removed when the session ends, failed or not.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port

BIN = Path("/usr/lib/postgresql/15/bin")
USER = "vesalius"  # the cluster's superuser (trust authentication on loopback only)


def _as_postgres(*command: str) -> subprocess.CompletedProcess[str]:
    wrapper = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*wrapper, *command], check=True, capture_output=True, text=True, timeout=120)


@dataclass
class PostgresPeer:
    folder: Path
    port: int
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -k {self.folder} "
                   "-c shared_buffers=16MB -c fsync=on -c max_connections=60 -c max_wal_size=64MB")
        _as_postgres(str(BIN / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data),
                     "-l", str(self.folder / "server.log"), "-o", options)

    def stop(self, mode: str = "fast") -> None:
        _as_postgres(str(BIN / "pg_ctl"), "stop", "-w", "-D", str(self.data), "-m", mode)

    def restart(self) -> None:
        """What an operator's restart does to connected clients: every session is ended."""
        self.stop("fast")
        self.start()

    def sql(self, statement: str, database: str = "postgres") -> list[tuple[object, ...]]:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as db:
            cursor = db.execute(statement.encode())
            return cursor.fetchall() if cursor.description else []

    def new_database(self) -> str:
        """A fresh, empty database for one test, so it sees no other test's rows: a schema of its
        own in the one database (milliseconds; CREATE DATABASE copies a template)."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        self.sql(f"CREATE SCHEMA {name}")
        return f"{self.url()}?options=-csearch_path%3D{name}"

    def accepting(self) -> bool:
        try:
            self.sql("SELECT 1")
        except Exception:  # psycopg.OperationalError: not accepting connections yet
            return False
        return True

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresPeer]:
    folder = Path(tempfile.mkdtemp(prefix="vesalius-pg-"))
    shutil.chown(folder, "postgres", "postgres") if os.geteuid() == 0 else None
    peer = PostgresPeer(folder, free_port())
    try:
        _as_postgres(str(BIN / "initdb"), "-D", str(peer.data), "-A", "trust", "-U", USER,
                     "--no-sync", "-E", "UTF8", "--locale=C")
        peer.start()
        from tests.peers import wait_for  # (tests.peers imports conftest, which imports this module)

        wait_for(peer.accepting, 30, "PostgreSQL to accept connections", 0.2)
        yield peer
    finally:
        try:
            if (peer.data / "postmaster.pid").exists():
                peer.stop("immediate")
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresPeer) -> str:
    """The URL of a new database on the session's server."""
    return postgres_server.new_database()
