"""The store's two databases behind one small interface: SQLite in data_dir (the embedded default)
and PostgreSQL (one database that several listeners share; psycopg 3, imported only when a
``postgresql://`` URL is configured).

SQL is written once, with ``?`` placeholders and portable syntax (``ON CONFLICT``, ``GREATEST``,
``RETURNING``); the PostgreSQL connection turns ``?`` into psycopg's ``%s``. What differs beyond
that (JSON building in the listings, DDL) lives in :class:`Dialect` and in the per-dialect
migration files ``node/migrations/<dialect>/NNNN_name.sql`` (``portable/``: SQL both run).
Errors of both libraries come out as :class:`Error` / :class:`OperationalError`, so callers
catch one thing.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger("vesalius.database")

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_FILE = re.compile(r"(\d{4})_(\w+)\.sql")
SCHEMA_MIGRATIONS = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL
)"""
# pg_advisory_xact_lock's key while migrating: listeners starting together migrate one at a time
MIGRATION_LOCK = 0x7665_7361_6C69_7573 & 0x7FFF_FFFF_FFFF_FFFF  # "vesalius"


class Error(Exception):
    """A database error of either backend (the original is its ``__cause__``)."""


class OperationalError(Error):
    """The database cannot do the work now: down or restarting, locked, disk full, I/O error."""


class IntegrityError(Error):
    """A constraint refused the change (a duplicate key, an append-only table)."""


OUTAGE_PAUSE = 2.0  # s a loop waits after the database failed it, before its next unit of work


def pause_after_outage(what: str, err: Error, stop: threading.Event) -> None:
    """A loop's unit of work failed on the database (down, restarting): say so in one line and
    wait, then the loop carries on (its next unit of work reconnects)."""
    log.warning("%s: database unavailable, next try in %.0f s: %s", what, OUTAGE_PAUSE,
                str(err).splitlines()[0] if str(err) else type(err).__name__)
    stop.wait(OUTAGE_PAUSE)


Row = Any  # sqlite3.Row or _PgRow: by column name and by position; dict(row) gives the columns


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


@dataclass(frozen=True)
class Dialect:
    """What the SQL of the two databases cannot share: how a JSON value is built in a query."""

    name: str  # sqlite | postgres: also the folder of its migrations

    def json_object(self, *pairs: str) -> str:
        """A JSON object of 'key', value, ... pairs (SQL expressions)."""
        function = "json_object" if self.name == "sqlite" else "json_build_object"
        return f"{function}({', '.join(pairs)})"

    def json_column(self, column: str) -> str:
        """A TEXT column holding JSON, as a JSON value (nested, not quoted)."""
        return f"json({column})" if self.name == "sqlite" else f"({column})::json"

    def json_array(self, expression: str) -> str:
        """The aggregate JSON array of ``expression`` over the rows ('[]' for none)."""
        if self.name == "sqlite":
            return f"json_group_array({expression})"
        return f"COALESCE(json_agg({expression}), '[]'::json)"

    def as_text(self, expression: str) -> str:
        """A JSON value as its text, as SQLite returns it (psycopg would parse json columns)."""
        return expression if self.name == "sqlite" else f"({expression})::text"


SQLITE = Dialect("sqlite")
POSTGRES = Dialect("postgres")


def is_postgres(locator: str | Path) -> bool:
    return str(locator).startswith(("postgresql://", "postgres://"))


def shown(locator: str | Path) -> str:
    """A locator fit for a log line: a URL's password replaced by ***."""
    text = str(locator)
    if not is_postgres(text):
        return text
    parts = urlsplit(text)
    if parts.password is None:
        return text
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


class Connection:
    """One connection of one thread, in autocommit between explicit transactions."""

    dialect: Dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        raise NotImplementedError

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Cursor:
        raise NotImplementedError

    def insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run an INSERT and return the ``id`` of the row it added."""
        return int(self.execute(f"{sql} RETURNING id", params).fetchall()[0][0])

    def script(self, sql: str) -> None:
        """Several statements without parameters (a migration), inside the open transaction."""
        raise NotImplementedError

    def begin(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        raise NotImplementedError

    def lock_schema(self) -> None:
        """Inside a transaction: hold off every other node's migrations until it ends."""

    @property
    def broken(self) -> bool:
        """The connection is lost (the server restarted): drop it and open a new one."""
        return False

    def close(self) -> None:
        raise NotImplementedError

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        self.begin()
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        self.commit()


# --- SQLite ------------------------------------------------------------------------------------

def _translated_sqlite(err: sqlite3.Error) -> Error:
    if isinstance(err, sqlite3.OperationalError):
        return OperationalError(str(err))
    if isinstance(err, sqlite3.IntegrityError):
        return IntegrityError(str(err))
    return Error(str(err))


def _greatest(*values: Any) -> Any:
    """PostgreSQL's GREATEST for SQLite: the largest non-NULL argument."""
    present = [v for v in values if v is not None]
    return max(present) if present else None


class SqliteConnection(Connection):
    """WAL, synchronous=FULL: a commit is on disk when it returns."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        try:
            self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.create_function("greatest", -1, _greatest, deterministic=True)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as err:
            raise _translated_sqlite(err) from err

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        try:
            return self.db.execute(sql, params)
        except sqlite3.Error as err:
            raise _translated_sqlite(err) from err

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Cursor:
        try:
            return self.db.executemany(sql, rows)
        except sqlite3.Error as err:
            raise _translated_sqlite(err) from err

    def script(self, sql: str) -> None:
        # executescript would commit the open transaction: statement by statement instead
        # (sqlite3.complete_statement keeps a trigger's BEGIN ... END together)
        statement = ""
        for piece in sql.split(";"):
            statement += piece + ";"
            if sqlite3.complete_statement(statement):
                if statement.strip(" \n;") and _code(statement):
                    self.execute(statement)
                statement = ""

    def begin(self) -> None:
        self.execute("BEGIN IMMEDIATE")  # the write lock now: no transaction waits halfway

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.execute("ROLLBACK")

    def close(self) -> None:
        self.db.close()


def _code(statement: str) -> bool:
    """Whether a statement holds more than comments."""
    return any(line.split("--", 1)[0].strip(" ;") for line in statement.splitlines())


# --- PostgreSQL --------------------------------------------------------------------------------

_LITERAL = re.compile(r"('(?:[^']|'')*')")


@lru_cache(maxsize=512)
def to_pyformat(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s``, literal ``%`` doubled (``LIKE '%x%'``); a ``?``
    inside a string literal stays."""
    parts = _LITERAL.split(sql)
    return "".join(part.replace("%", "%%") if i % 2 else part.replace("%", "%%").replace("?", "%s")
                   for i, part in enumerate(parts))


class _PgRow(tuple):  # type: ignore[type-arg]
    """A row by position and by column name, as sqlite3.Row."""

    _index: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


def _pg_rows(cursor: Any) -> Any:
    """psycopg row factory making _PgRow."""
    index = {column.name: i for i, column in enumerate(cursor.description or ())}

    def make(values: Sequence[Any]) -> _PgRow:
        row = _PgRow(values)
        row._index = index
        return row

    return make


class PostgresConnection(Connection):
    """psycopg 3 in autocommit between the store's explicit transactions (no idle transaction
    holds locks); synchronous_commit stays on, so a commit is on the server's disk when it returns."""

    dialect = POSTGRES

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            from vesalius.node.checks import ConfigError

            raise ConfigError("database.url: a PostgreSQL store needs psycopg: pip install "
                              "'vesalius[postgres]'") from None

        self._psycopg = psycopg
        try:
            self.db = psycopg.connect(url, autocommit=True, row_factory=_pg_rows, connect_timeout=10,
                                      application_name="vesalius")
        except psycopg.Error as err:
            raise self._translated(err) from err
        if self.execute("SHOW synchronous_commit").fetchone()[0] == "off":  # a server set up for speed
            self.execute("SET synchronous_commit = on")  # an acknowledged instance's row is on disk

    def _translated(self, err: Exception) -> Error:
        errors = self._psycopg.errors
        if isinstance(err, self._psycopg.OperationalError | errors.LockNotAvailable
                      | errors.DiskFull | errors.InsufficientResources):
            return OperationalError(str(err))
        if isinstance(err, self._psycopg.IntegrityError | errors.RaiseException):
            return IntegrityError(str(err))
        return Error(str(err))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        try:
            cursor: Cursor = self.db.execute(to_pyformat(sql), tuple(params))
            return cursor
        except self._psycopg.Error as err:
            raise self._translated(err) from err

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Cursor:
        try:
            cursor = self.db.cursor()
            cursor.executemany(to_pyformat(sql), [tuple(r) for r in rows])
            return cursor
        except self._psycopg.Error as err:
            raise self._translated(err) from err

    def script(self, sql: str) -> None:
        try:
            self.db.execute(sql.encode())  # no parameters: several statements in one go
        except self._psycopg.Error as err:
            raise self._translated(err) from err

    def begin(self) -> None:
        self.execute("BEGIN")

    def rollback(self) -> None:
        if not self.broken:
            self.execute("ROLLBACK")

    def lock_schema(self) -> None:
        self.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))

    @property
    def broken(self) -> bool:
        return bool(self.db.broken or self.db.closed)

    def close(self) -> None:
        self.db.close()


def connect(locator: str | Path) -> Connection:
    """A new connection: a ``postgresql://`` URL, or the path of a SQLite file."""
    if is_postgres(locator):
        return PostgresConnection(str(locator))
    return SqliteConnection(Path(locator))


# --- migrations -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(dialect: Dialect) -> list[Migration]:
    """The numbered migrations of a dialect, in order: ``migrations/<dialect>/NNNN_name.sql``, and
    ``migrations/portable/NNNN_name.sql`` for those whose SQL both databases run as written
    (ALTER TABLE ... ADD COLUMN, CREATE TABLE with TEXT / BIGINT / DOUBLE PRECISION columns)."""
    found: dict[int, Migration] = {}
    for path in [*(MIGRATIONS / dialect.name).glob("*.sql"), *(MIGRATIONS / "portable").glob("*.sql")]:
        match = MIGRATION_FILE.fullmatch(path.name)
        if match is None:
            raise ValueError(f"{path}: a migration is named NNNN_name.sql")
        if int(match[1]) in found:
            raise ValueError(f"{path}: migration {match[1]} exists twice")
        found[int(match[1])] = Migration(int(match[1]), match[2], path.read_text())
    if sorted(found) != list(range(1, len(found) + 1)):
        raise ValueError(f"{MIGRATIONS}: migrations are numbered 0001, 0002, ... without gaps")
    return [found[v] for v in sorted(found)]


def applied_versions(db: Connection) -> set[int]:
    return {int(r[0]) for r in db.execute("SELECT version FROM schema_migrations")}


def migrate(db: Connection, before: dict[int, Any] | None = None) -> list[int]:
    """Apply the migrations this database lacks, all in one transaction (on PostgreSQL under an
    advisory lock, so listeners starting together migrate once); returns the versions applied.
    ``before``: Python steps run just before a version's SQL, inside the same transaction."""
    applied: list[int] = []
    with db.transaction():
        db.lock_schema()
        db.script(SCHEMA_MIGRATIONS)
        done = applied_versions(db)
        for migration in migrations(db.dialect):
            if migration.version in done:
                continue
            step = (before or {}).get(migration.version)
            if step is not None:
                step(db)
            db.script(migration.sql)
            db.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?,?,?)",
                       (migration.version, migration.name, time.time()))
            applied.append(migration.version)
    return applied
