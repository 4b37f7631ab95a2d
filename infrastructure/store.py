"""The event store: SQLAlchemy owns URLs, dialects, pooling and the schema; the hot path uses the
DBAPI connection SQLAlchemy hands out.

Why the DBAPI connection and not SQLAlchemy Core on the hot path: on this kind of machine a Core
`execute` + commit costs about 22 µs more than the raw INSERT + COMMIT floor, a DBAPI cursor about
4 µs, and the append target is 20 µs above the floor (benchmarks/ measures both).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool, StaticPool

from sessionledger.domain.errors import StorageError

from . import schema
from .codec import EventRow, StoredEvent

DEFAULT_URL = "sqlite:///sessionledger.db"
#: pg_advisory_xact_lock key serialising schema creation (any constant; "sl" in ASCII)
_SCHEMA_LOCK_KEY = 0x736C
DURABILITY_PRAGMAS = {"full": "FULL", "normal": "NORMAL"}



class VersionConflict(Exception):
    """Another writer stored one of these versions first (internal; the engine decides)."""


class IdempotencyKeyUsed(Exception):
    """The idempotency key was used before (internal): carries the first command's result."""

    def __init__(self, session_id: str, version: int) -> None:
        super().__init__(session_id, version)
        self.session_id = session_id
        self.version = version


def resolve_url(url: str | URL | None) -> URL:
    """A SQLAlchemy URL from an argument, $SESSIONLEDGER_URL, or the default SQLite file.

    A bare path ("sessions.db") means a SQLite file; "postgresql://" means psycopg 3.
    """
    if url is None:
        url = os.environ.get("SESSIONLEDGER_URL") or DEFAULT_URL
    if isinstance(url, str):
        if "://" not in url:
            if not url.strip():
                raise StorageError("empty database URL")
            url = "sqlite:///" + url
        try:
            parsed = make_url(url)
        except Exception as error:
            raise StorageError(f"invalid database URL {url!r}: {error}") from None
    else:
        parsed = url
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StorageError(
            f"unsupported database URL {safe_url(parsed)}: use sqlite:///FILE, sqlite:// "
            "or postgresql+psycopg://USER@HOST/DB"
        )
    return parsed


def one_line(error: BaseException) -> str:
    """A driver's message on one line (psycopg's span several)."""
    return " ".join(str(error).split())


def safe_url(url: URL) -> str:
    """The URL with its password hidden, for messages."""
    return url.render_as_string(hide_password=True)


class EventStore:
    """Appends and reads session events on SQLite or PostgreSQL."""

    def __init__(self, url: str | URL | None = None, durability: str = "full") -> None:
        self.url = resolve_url(url)
        self.dialect = self.url.get_backend_name()
        self._lock = threading.RLock()
        self._closed = False
        self.engine = self._create_engine(durability)
        self._begin = "BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN"
        with self._storage_errors("open"):
            self._create_schema()
            self._connect()
        self._integrity_error: type[Exception] = self.engine.dialect.loaded_dbapi.IntegrityError
        self._dbapi_error: type[Exception] = self.engine.dialect.loaded_dbapi.Error
        self._sql = _Statements(self.dialect)

    # -- set-up ------------------------------------------------------------------------------

    def _create_engine(self, durability: str) -> sa.Engine:
        url = self.url
        try:
            if self.dialect == "sqlite":
                memory = url.database in (None, "", ":memory:")
                engine = sa.create_engine(
                    url,
                    poolclass=StaticPool if memory else NullPool,
                    connect_args={"check_same_thread": False, "timeout": 30.0},
                )
                sync = DURABILITY_PRAGMAS[durability]

                @sa_event.listens_for(engine, "connect")
                def _pragmas(dbapi_connection: Any, _record: Any) -> None:
                    previous = dbapi_connection.isolation_level
                    dbapi_connection.isolation_level = None
                    dbapi_connection.execute("PRAGMA journal_mode=WAL")
                    dbapi_connection.execute(f"PRAGMA synchronous={sync}")
                    dbapi_connection.isolation_level = previous

            else:
                engine = sa.create_engine(url, connect_args={"connect_timeout": 10},
                                          pool_size=2)
        except StorageError:
            raise
        except Exception as error:
            raise StorageError(f"cannot use database {safe_url(url)}: {error}") from None
        return engine

    def _connect(self) -> None:
        """Take the connection the hot path uses for the store's life (re-taken if it breaks)."""
        self._fairy = self.engine.raw_connection()
        # the driver's own connection (sqlite3 / psycopg), typed loosely: the two differ
        self._db: Any = cast(Any, self._fairy.dbapi_connection)
        if self.dialect == "sqlite":
            # explicit BEGIN IMMEDIATE / COMMIT: take the write lock up front, never mid-way
            self._db.isolation_level = None
        else:
            # reads run in autocommit (one round trip, no idle-in-transaction); writes BEGIN
            self._db.autocommit = True

    def _reconnect_if_broken(self) -> None:
        # A PostgreSQL server restart or a dropped TCP connection leaves psycopg's connection
        # closed; take a fresh one so the next call works again.
        if self.dialect == "postgresql" and self._db.closed:
            with contextlib.suppress(Exception):
                self._fairy.invalidate()
            with self._storage_errors("reconnect to"):
                self._connect()

    def _create_schema(self) -> None:
        # Several processes may open a new database at once: the creation runs under the
        # database's write lock (SQLite) or an advisory lock (PostgreSQL), so one creates and
        # the others find the tables made.
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                             {"key": _SCHEMA_LOCK_KEY})
            schema.metadata.create_all(conn, checkfirst=True)
            row = conn.execute(
                sa.select(schema.meta.c.value).where(schema.meta.c.key == "schema_version")
            ).first()
            if row is None:
                conn.execute(schema.meta.insert().values(
                    key="schema_version", value=str(schema.SCHEMA_VERSION)))
            elif int(row[0]) > schema.SCHEMA_VERSION:
                raise StorageError(
                    f"database {safe_url(self.url)} has schema version {row[0]}, newer "
                    f"than this release reads ({schema.SCHEMA_VERSION}): upgrade sessionledger"
                )
            conn.commit()

    @contextlib.contextmanager
    def _storage_errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except (sa.exc.SQLAlchemyError, OSError) as error:
            original = getattr(error, "orig", None) or error
            raise StorageError(
                f"cannot {doing} database {safe_url(self.url)}: {one_line(original)}"
            ) from None

    def close(self) -> None:
        """Release the connection and the engine's pool."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(Exception):
                self._fairy.close()
            self.engine.dispose()

    # -- writing -----------------------------------------------------------------------------

    def append(
        self,
        rows: Sequence[EventRow],
        idempotency: tuple[str, str, str, int] | None = None,
    ) -> None:
        """Write `rows` (and an idempotency key) in one transaction; `rows` may be empty (a
        keyed command that changed nothing still records its key and result).

        Raises VersionConflict when another writer stored one of the versions first, and
        IdempotencyKeyUsed (with the first result) when the key (scope, key) was used before.
        """
        with self._lock:
            db = self._db
            self._check_open()
            try:
                db.execute(self._begin)
                if idempotency is not None:
                    try:
                        db.execute(self._sql.insert_idempotency, idempotency)
                    except self._integrity_error:
                        db.execute("ROLLBACK")
                        used = self.idempotent_result(idempotency[0], idempotency[1])
                        if used is None:  # pragma: no cover - the key row cannot vanish
                            raise
                        raise IdempotencyKeyUsed(*used) from None
                try:
                    if len(rows) == 1:
                        db.execute(self._sql.insert_event, rows[0])
                    elif rows:
                        db.cursor().executemany(self._sql.insert_event, rows)
                except self._integrity_error:
                    db.execute("ROLLBACK")
                    raise VersionConflict from None
                db.execute("COMMIT")
            except (VersionConflict, IdempotencyKeyUsed):
                raise
            except BaseException as error:
                self._rollback_quietly()
                if isinstance(error, self._dbapi_error):
                    self._reconnect_if_broken()
                    raise StorageError(
                        f"write to {safe_url(self.url)} failed: {one_line(error)}"
                    ) from None
                raise

    def _rollback_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self._db.execute("ROLLBACK")

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the engine is closed")

    # -- reading -----------------------------------------------------------------------------

    def _fetchall(self, sql: str, params: Sequence[Any]) -> list[Any]:
        with self._lock:
            self._check_open()
            try:
                rows: list[Any] = self._db.execute(sql, params).fetchall()
            except self._dbapi_error as error:
                self._reconnect_if_broken()
                raise StorageError(
                    f"read from {safe_url(self.url)} failed: {one_line(error)}"
                ) from None
            return rows

    def stream(self, session_id: str, after: int = 0, upto: int | None = None) -> list[StoredEvent]:
        """The stored events of versions in (after, upto] in version order: (version, type, ts,
        actor, correlation_id, payload, digest)."""
        if upto is None:
            return self._fetchall(self._sql.stream, (session_id, after))
        return self._fetchall(self._sql.stream_upto, (session_id, after, upto))

    def latest_version(self, session_id: str) -> int:
        """The highest stored version of a session (0 when it has none)."""
        rows = self._fetchall(self._sql.latest_version, (session_id,))
        return int(rows[0][0] or 0) if rows else 0

    def idempotent_result(self, scope: str, key: str) -> tuple[str, int] | None:
        """(session_id, version) the first command with this key produced, if any."""
        rows = self._fetchall(self._sql.select_idempotency, (scope, key))
        return (rows[0][0], rows[0][1]) if rows else None

    def started_sessions(self) -> list[tuple[str, int, bytes]]:
        """(session_id, ts, payload) of every SessionStarted event, newest first."""
        return self._fetchall(self._sql.started, ())


class _Statements:
    """The hot-path SQL, written once and adapted to the DBAPI's parameter style."""

    def __init__(self, dialect: str) -> None:
        cols = "session_id, version, type, ts, actor, correlation_id, payload, digest"
        stream_cols = "version, type, ts, actor, correlation_id, payload, digest"
        statements = {
            "insert_event": f"INSERT INTO sl_events ({cols}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            "insert_idempotency": (
                "INSERT INTO sl_idempotency (scope, key, session_id, version) VALUES (?, ?, ?, ?)"
            ),
            "select_idempotency": (
                "SELECT session_id, version FROM sl_idempotency WHERE scope = ? AND key = ?"
            ),
            "stream": (
                f"SELECT {stream_cols} FROM sl_events "
                "WHERE session_id = ? AND version > ? ORDER BY version"
            ),
            "stream_upto": (
                f"SELECT {stream_cols} FROM sl_events "
                "WHERE session_id = ? AND version > ? AND version <= ? ORDER BY version"
            ),
            "latest_version": "SELECT MAX(version) FROM sl_events WHERE session_id = ?",
            "started": (
                "SELECT session_id, ts, payload FROM sl_events "
                "WHERE version = 1 ORDER BY position DESC"
            ),
        }
        for name, sql in statements.items():
            setattr(self, name, sql if dialect == "sqlite" else sql.replace("?", "%s"))

    insert_event: str
    insert_idempotency: str
    select_idempotency: str
    stream: str
    stream_upto: str
    latest_version: str
    started: str
