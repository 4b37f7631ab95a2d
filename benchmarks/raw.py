"""The raw floors: the same bytes written and read with the bare DBAPI, nothing else.

The floor table is sessionledger's own `sl_events` DDL (compiled by SQLAlchemy for the dialect)
renamed to `floor_events`, so both sides pay for the same columns, the same AUTOINCREMENT /
BIGSERIAL key and the same unique (session_id, version) index.

SQLite floor: a plain `sqlite3` connection with the engine's PRAGMAs (journal_mode=WAL,
synchronous=FULL|NORMAL); one write is `execute(INSERT)` + `commit()` (Python's implicit BEGIN).
PostgreSQL floor: a psycopg 3 connection in its default (transactional) mode; one write is
`execute(INSERT)` + `commit()`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import psycopg
from sqlalchemy import create_mock_engine
from sqlalchemy.schema import CreateTable

from sessionledger.infrastructure import schema
from sessionledger.infrastructure.codec import EventRow

FLOOR_TABLE = "floor_events"
_COLUMNS = "session_id, version, type, ts, actor, correlation_id, payload, digest"
_INSERT = f"INSERT INTO {FLOOR_TABLE} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_SELECT = (
    f"SELECT version, type, ts, payload, digest FROM {FLOOR_TABLE} "
    "WHERE session_id = ? AND version > ? ORDER BY version"
)


def floor_ddl(dialect: str) -> str:
    """sessionledger's events table DDL for `dialect`, renamed to the floor table."""
    url = "sqlite://" if dialect == "sqlite" else "postgresql+psycopg://"
    compiled_for = create_mock_engine(url, executor=lambda *_: None).dialect
    ddl = str(CreateTable(schema.events).compile(dialect=compiled_for))
    return ddl.replace(schema.events.name, FLOOR_TABLE).strip()


def pragma_readback(conn: Any) -> tuple[str, str]:
    """(journal_mode, synchronous) as SQLite reports them on a DBAPI connection."""
    journal = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    sync = int(conn.execute("PRAGMA synchronous").fetchone()[0])
    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    return journal, names.get(sync, str(sync))


class SqliteFloor:
    """INSERT + COMMIT and SELECT on a plain sqlite3 connection."""

    def __init__(self, path: str, synchronous: str) -> None:
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.conn.isolation_level = None
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={synchronous}")
        self.conn.execute(floor_ddl("sqlite"))
        self.conn.isolation_level = "DEFERRED"  # Python's implicit BEGIN before an INSERT

    def insert(self, row: EventRow) -> None:
        conn = self.conn
        conn.execute(_INSERT, row)
        conn.commit()

    def insert_many(self, rows: Sequence[EventRow]) -> None:
        self.conn.executemany(_INSERT, rows)
        self.conn.commit()

    def select(self, session_id: str) -> list[Any]:
        return self.conn.execute(_SELECT, (session_id, 0)).fetchall()

    def settings(self) -> tuple[str, str]:
        return pragma_readback(self.conn)

    def close(self) -> None:
        self.conn.close()


class PostgresFloor:
    """INSERT + COMMIT and SELECT on a psycopg 3 connection, in `search_path` = the schema.

    Transactional (psycopg's default): a write is BEGIN, INSERT, COMMIT. With autocommit=True a
    write is one round trip (the INSERT commits by itself) and so is a read.
    """

    def __init__(self, conninfo: str, schema_name: str, *, autocommit: bool = False,
                 create: bool = True) -> None:
        self.conn = psycopg.connect(conninfo, options=f"-csearch_path={schema_name}",
                                    autocommit=autocommit)
        if create:
            self.conn.execute(floor_ddl("postgresql"))
            if not autocommit:
                self.conn.commit()
        self._autocommit = autocommit
        self._insert = _INSERT.replace("?", "%s")
        self._select = _SELECT.replace("?", "%s")

    def insert(self, row: EventRow) -> None:
        conn = self.conn
        conn.execute(self._insert, row)
        if not self._autocommit:
            conn.commit()

    def insert_many(self, rows: Sequence[EventRow]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(self._insert, rows)
        if not self._autocommit:
            self.conn.commit()

    def select(self, session_id: str) -> list[Any]:
        rows = self.conn.execute(self._select, (session_id, 0)).fetchall()
        if not self._autocommit:
            self.conn.commit()
        return rows

    def close(self) -> None:
        self.conn.close()
