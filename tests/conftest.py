"""Shared fixtures: where the test data lives, and free loopback ports."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    path = Path(os.environ.get("VESALIUS_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not (path / "README.md").exists():
        raise RuntimeError(f"test data not found at {path}; set VESALIUS_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A real PostgreSQL, one server per session (tests/postgres_peer.py); the store's tests run on both
from tests.postgres_peer import postgres_server  # noqa: E402, F401  (a fixture)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """The ``[database] url`` of a store under test, once per backend: "" (SQLite in data_dir)
    and a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return ""
    return str(request.getfixturevalue("postgres_server").new_database())
