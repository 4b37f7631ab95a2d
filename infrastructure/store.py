"""The event store: SQLAlchemy owns URLs, dialects, pooling and the schema; the hot path uses the
DBAPI connection SQLAlchemy hands out.

Why the DBAPI connection and not SQLAlchemy Core on the hot path: on this kind of machine a Core
`execute` + commit costs about 22 µs more than the raw INSERT + COMMIT floor, a DBAPI cursor about
4 µs, and the append target is 20 µs above the floor (benchmarks/ measures both).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import sqlite3
import threading
import time
import traceback
import urllib.parse
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.pool import QueuePool, StaticPool

from sessionledger.domain.errors import CorruptedData, StorageError
from sessionledger.domain.events import stored_version
from sessionledger.domain.values import small_count, utf8_encodable

from . import schema
from .codec import EventRow, StoredEvent, blob

#: one snapshot as stored: (session_id, version, format_version, flags, digest, data, ts)
SnapshotRow = tuple[str, int, int | None, int, bytes, bytes, int]
#: a snapshot as read back: (version, format_version, flags, digest, data)
StoredSnapshot = tuple[int, int | None, int, bytes, bytes]

DEFAULT_URL = "sqlite:///sessionledger.db"
#: pg_advisory_xact_lock key serialising schema creation (any constant; "sl" in ASCII)
_SCHEMA_LOCK_KEY = 0x736C
#: pg_advisory_xact_lock key every appending transaction holds until it commits
_APPEND_LOCK_KEY = 0x736C01
#: PostgreSQL: a purge holds this advisory lock exclusively, a catalog fold shares it (see
#: EventStore.hold_off_purges)
_PURGE_LOCK_KEY = 0x736C02
#: PostgreSQL NOTIFY channel that announces new events to waiting subscribers
EVENTS_CHANNEL = "sl_events"
DURABILITY_PRAGMAS = {"full": "FULL", "normal": "NORMAL"}
_MMAP_BYTES = 256 * 1024 * 1024
_CACHE_KIB = 32 * 1024



#: the message of the SQLite purge guards' RAISE (what append() recognises)
_PURGED = "sessionledger: the session was purged"
#: how long a SQLite statement waits for another connection's lock before "database is locked"
_BUSY_TIMEOUT_MS = 30_000
#: SQLite triggers that refuse events and snapshots of a tombstoned session, made in the
#: transaction of a database's first purge: every append after that purge commits sees them
#: (SQLite re-prepares statements when the schema changes), and a database that never purges
#: never pays for the check. Inside the insert, so inside the append's write lock.
_PURGE_GUARDS = tuple(
    f"CREATE TRIGGER IF NOT EXISTS sl_{table}_purge_guard BEFORE INSERT ON sl_{table} "
    "WHEN EXISTS (SELECT 1 FROM sl_tombstones WHERE session_id = NEW.session_id) "
    f"BEGIN SELECT RAISE(ABORT, '{_PURGED}'); END"
    for table in ("events", "snapshots"))


class VersionConflict(Exception):
    """Another writer stored one of these versions first (internal; the engine decides)."""


class SessionGone(Exception):
    """An append to a session that a cleanup purged meanwhile, perhaps from another engine
    (internal: nothing was written; the engine says SessionPurged)."""


class IdempotencyKeyUsed(Exception):
    """The idempotency key was used before (internal): carries the first command's result."""

    def __init__(self, session_id: str, version: int) -> None:
        super().__init__(session_id, version)
        self.session_id = session_id
        self.version = version


def _set_wal(dbapi_connection: Any) -> None:
    """Put the database in WAL mode. The switch needs the file to itself: while another
    process or thread creates a new database it can be refused at once ("database is locked",
    no busy wait), so it is retried for up to about five seconds. A database already in WAL
    mode (the mode is stored in the file) needs no switch."""
    for attempt in range(100):
        try:
            mode = dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                dbapi_connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or attempt == 99:
                raise
            time.sleep(0.05)


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
            # the path as it is, never parsed as URL text ("a%41.db" is not "aA.db", nor
            # "q?x=1.db" the file "q" with a query)
            parsed = URL.create("sqlite", database=url)
        else:
            try:
                parsed = make_url(url)
            except Exception as error:
                raise StorageError(masked_url_text(f"invalid database URL {url!r}: {error}")
                                   ) from None
            if url.count("@") > 1 and (parsed.password is not None
                                       or "@" in (parsed.host or "")):
                # an '@' in the password, not percent-encoded: the URL splits at the first
                # one and the rest of the password would show as the host, database or query
                # in every message
                raise StorageError("invalid database URL: an '@' after the user part (an '@' "
                                   "in a password must be written %40)")
    elif isinstance(url, URL):
        parsed = url
    else:
        raise StorageError(
            f"a database URL is a str or a sqlalchemy URL, got {type(url).__name__}"
        )
    parts = [parsed.drivername, parsed.username, parsed.password, parsed.host,
             parsed.database, *(str(value) for value in parsed.query.values())]
    text = "".join(part for part in parts if isinstance(part, str))
    if "\x00" in text:
        raise StorageError("the database URL holds a NUL character")
    if not utf8_encodable(text):  # drivers take UTF-8
        raise StorageError("the database URL is not valid Unicode (a lone surrogate, as an "
                           "undecodable file name gives)")
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.host or parsed.username or parsed.password or parsed.port:
            raise StorageError("a SQLite URL names no host or user: sqlite:///relative/file.db, "
                               "sqlite:////absolute/file.db, sqlite:// (in memory) or a bare "
                               "path")
        parsed = _absolute_sqlite(parsed)
    if backend not in ("sqlite", "postgresql"):
        raise StorageError(
            f"unsupported database URL {safe_url(parsed)}: use sqlite:///FILE, sqlite:// "
            "or postgresql+psycopg://USER@HOST/DB"
        )
    return parsed


def _absolute_sqlite(url: URL) -> URL:
    """A SQLite file URL with its path made absolute now: the engine's worker processes (a
    parallel verify) and its later connections open the URL again, and after an os.chdir() a
    relative one named another file (a verify then checked a new, empty database for its
    share of the log and passed). A file: URI's path too."""
    database = url.database
    if not database or database == ":memory:":
        return url
    if database.startswith("file:") and url.query.get("uri") in ("true", "1", "True"):
        path = database[5:]
        if (not path or path.startswith(("/", ":memory:"))
                or url.query.get("mode") == "memory"):
            return url
        # (the directory percent-encoded: the URI's own path is already written so)
        directory = urllib.parse.quote(os.getcwd())
        return url.set(database=f"file:{directory}/{path}")
    return url.set(database=os.path.abspath(database))


def one_line(error: BaseException) -> str:
    """A driver's message on one line (psycopg's span several)."""
    return " ".join(str(error).split())


def _secret_key(key: str) -> bool:
    """True for a URL query parameter that holds a secret: libpq's password and sslpassword,
    and any other name with "pass" in it (a misspelt ?passwd= is printed back by the driver's
    "invalid connection option" and would show the password)."""
    return "pass" in key.lower()


def safe_url(url: URL) -> str:
    """The URL with its password hidden (the user part's, and one given as a query parameter),
    for messages."""
    secret = [key for key in url.query if _secret_key(key)]
    if not secret:
        return url.render_as_string(hide_password=True)
    hidden = url.update_query_dict(dict.fromkeys(secret, "***"))
    return hidden.render_as_string(hide_password=True).replace("=%2A%2A%2A", "=***")


def masked_url_text(text: str) -> str:
    """URL text that may not parse, for a message: whatever stands where a password would
    (user:PASSWORD@, password=...) hidden."""
    # (to the text's last '@': a password may hold '@', '/', '?' or '#' not percent-encoded,
    # and a parser's message after the URL may repeat part of it; too much hidden is harmless)
    text = re.sub(r"(://[^/?#@:]*:).*@", r"\1***@", text)
    return re.sub(r"(\w*pass\w*=)[^&;\s'\"]*", r"\1***", text, flags=re.IGNORECASE)


@contextlib.contextmanager
def secure_delete(conn: Connection, mode: str) -> Iterator[None]:
    """SQLite's secure_delete set to `mode` ("ON", "FAST") on `conn` meanwhile, then put back
    as it was (the connection goes back to a pool; the build's default varies: Debian's zeroes
    freed pages, others do not). Other dialects: nothing."""
    if conn.dialect.name != "sqlite":
        yield
        return
    previous = conn.exec_driver_sql("PRAGMA secure_delete").scalar_one()
    conn.exec_driver_sql(f"PRAGMA secure_delete={mode}")
    try:
        yield
    finally:
        if not conn.invalidated:  # (an interrupt invalidates it: the interrupt, not a
            # "Can't reconnect until invalid transaction is rolled back", reaches the caller)
            conn.exec_driver_sql(f"PRAGMA secure_delete={int(previous)}")


def columns(rows: Sequence[Sequence[Any]]) -> tuple[list[Any], ...]:
    """`rows` as one list per column: the parameters of a PostgreSQL insert over arrays
    (unnest), which writes many rows in one statement where executemany would pipeline them
    (psycopg), and a failure then logged "error ignored terminating Pipeline"."""
    return tuple(list(column) for column in zip(*rows, strict=True))


def drop_if_broken(conn: Connection, error: BaseException) -> None:
    """After `error` from a read on `conn`'s raw driver cursor (which SQLAlchemy does not see):
    when it means the connection is gone (the dialect's own test), tell SQLAlchemy, so the pool
    discards it instead of resetting it (a ROLLBACK on a lost connection, which its pool logs
    as an ERROR with a traceback)."""
    raw = getattr(conn.connection, "dbapi_connection", None)
    gone = getattr(raw, "closed", False) or getattr(raw, "broken", False)
    if gone or (isinstance(error, conn.dialect.loaded_dbapi.Error)
                and conn.dialect.is_disconnect(error, raw, None)):
        conn.invalidate()


#: the logging_name of the stores' pools (their logger: sqlalchemy.pool.impl.<Pool>.sessionledger)
_POOL_LOGGING_NAME = "sessionledger"
#: every PostgreSQL connection's isolation level, whatever the server's default
_READ_COMMITTED = "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED"


class _InterruptsRaisedOn(logging.Filter):
    """Drops a pool's record of an interrupt (KeyboardInterrupt, SystemExit): SQLAlchemy logs
    one that lands while a connection goes back to the pool (its reset, its close) as an ERROR
    with a traceback, then raises it on, so a Ctrl-C in a verify or a timeline printed a
    traceback beside the CLI's one line. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        kind = record.exc_info[0] if record.exc_info else None
        return kind is None or issubclass(kind, Exception)


for _pool_class in (QueuePool, StaticPool):
    logging.getLogger(f"{_pool_class.__module__}.{_pool_class.__name__}.{_POOL_LOGGING_NAME}"
                      ).addFilter(_InterruptsRaisedOn())


#: the most connections one engine opens to a PostgreSQL server
PG_MAX_CONNECTIONS = 32


#: the stores open in this process, for the fork handler below
_open_stores: weakref.WeakSet[EventStore] = weakref.WeakSet()
#: in a forked process, what the stores had from the parent: kept, never used, never released
#: (a finalizer would reset or close a connection the parent still uses)
_inherited: list[Any] = []


def _after_fork_in_child() -> None:
    for store in list(_open_stores):
        try:
            store.after_fork_in_child()
        except Exception as error:  # logged: an at-fork handler has nobody to raise to
            logging.getLogger("sessionledger").warning(
                "after a fork, the store of %s could not make this process's own connections "
                "(it must not be used here): %s", safe_url(store.url), one_line(error))


class _ConnectOnUse:
    """The store's connection until its next use, which connects anew: in a forked process
    (connecting in the fork handler would cost every child a connection, used or not), and
    after an error or an interrupt left the old one closed or busy (_drop_if_unusable)."""

    def __init__(self, store: EventStore) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        store = self._store
        if store._db is self:  # (a caller may hold this object: it connects once)
            with store.storage_errors("reconnect to"):
                store._connect()
        return getattr(store._db, name)


class EventStore:
    """Appends and reads session events on SQLite or PostgreSQL.

    An open store survives a fork (a pre-fork server such as gunicorn --preload, Celery's
    prefork pool, multiprocessing's fork start method): the new process connects anew and never
    uses, closes or finalizes a connection of its parent (one server connection used by two
    processes mixes their replies; a SQLite connection used across a fork loses writes). The
    fork must happen while no other thread is inside the store: a connection that thread was
    using is left as it was.
    """

    def __init__(self, url: str | URL | None = None, durability: str = "full") -> None:
        self.url = resolve_url(url)
        self.dialect = self.url.get_backend_name()
        self._lock = threading.RLock()
        #: an in-memory SQLite database is one connection for every thread (StaticPool): every
        #: use of it holds the store's lock (connection(), scans), and commands hold that same
        #: lock (SessionWriter takes commands_lock), so there is one lock and no order to keep
        self.single_connection = self.dialect == "sqlite" and self.url.database in (
            None, "", ":memory:")
        #: the lock an engine's commands hold while they read, decide and write
        self.commands_lock = self._lock if self.single_connection else threading.RLock()
        self._closed = False
        #: per thread: >0 while it holds SQLite's write lock on another connection (a
        #: transactional subscriber's batch), see holding_write_lock()
        self._write_lock_held = threading.local()
        #: SQLite: the driver connections open now (by id), which a forked process closes
        self._sqlite_connections: dict[int, sqlite3.Connection] = {}
        self.engine = self._create_engine(durability)
        if self.dialect == "sqlite":
            # take the write lock up front, never mid-way (no upgrade deadlocks)
            self._begin = "BEGIN IMMEDIATE"
            self._commit = "COMMIT"
        else:
            # one round trip each: the lock that orders positions, and the wake-up of listeners
            self._begin = f"BEGIN; SELECT pg_advisory_xact_lock({_APPEND_LOCK_KEY})"
            self._commit = f"NOTIFY {EVENTS_CHANNEL}; COMMIT"
        with self.storage_errors("open"):
            self._create_schema()
            self._connect()
        self._integrity_error: type[Exception] = self.engine.dialect.loaded_dbapi.IntegrityError
        self._dbapi_error: type[Exception] = self.engine.dialect.loaded_dbapi.Error
        self._sql = _Statements(self.dialect)
        _open_stores.add(self)

    # -- set-up ------------------------------------------------------------------------------

    def _create_engine(self, durability: str) -> sa.Engine:
        url = self.url
        try:
            if self.dialect == "sqlite":
                engine = sa.create_engine(
                    url,
                    # a file database keeps a few connections for subscribers and scans (a new
                    # sqlite3 connection with its PRAGMAs costs about a millisecond)
                    poolclass=StaticPool if self.single_connection else QueuePool,
                    connect_args={"check_same_thread": False,
                                  "timeout": _BUSY_TIMEOUT_MS / 1000},
                    # no cap beyond the 5 kept: a call that holds a connection and needs a
                    # second (find() inside a timeline() loop) in many threads at once waited
                    # 30 s for connections the others held, then failed; a SQLite connection is
                    # a file handle, not a server's process
                    **({} if self.single_connection else {"max_overflow": -1}),
                    pool_logging_name=_POOL_LOGGING_NAME,
                )
                sync = DURABILITY_PRAGMAS[durability]
                opened = self._sqlite_connections

                @sa_event.listens_for(engine, "connect")
                def _pragmas(dbapi_connection: Any, _record: Any) -> None:
                    opened[id(dbapi_connection)] = dbapi_connection
                    previous = dbapi_connection.isolation_level
                    dbapi_connection.isolation_level = None
                    _set_wal(dbapi_connection)
                    dbapi_connection.execute(f"PRAGMA synchronous={sync}")
                    # reads of a large file: memory-mapped pages and a 32 MiB page cache (the
                    # default 2 MiB made cold loads 1.5x slower on a 1M-event file than on a
                    # small one; benchmarks/scale.py)
                    dbapi_connection.execute(f"PRAGMA mmap_size={_MMAP_BYTES}")
                    dbapi_connection.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
                    dbapi_connection.isolation_level = previous

                @sa_event.listens_for(engine, "close")
                def _closed(dbapi_connection: Any, _record: Any) -> None:
                    opened.pop(id(dbapi_connection), None)

            else:
                # pre_ping: a pooled connection the server dropped while it was idle (a restart,
                # a failover) is replaced at checkout instead of failing the call that gets it;
                # one round trip per checkout, and checkouts are off the command path (scans,
                # subscriber batches, purges: commands use the store's own connection)
                # at most PG_MAX_CONNECTIONS: a server's connections are few and shared by
                # every engine process (PostgreSQL's default max_connections is 100), but a
                # call may hold one and need another (a transactional handler's find()), so
                # threads get room before they wait on each other (30 s, then StorageError)
                engine = sa.create_engine(url, connect_args={"connect_timeout": 10},
                                          pool_size=2, max_overflow=PG_MAX_CONNECTIONS - 2,
                                          pool_pre_ping=True,
                                          pool_logging_name=_POOL_LOGGING_NAME)

                @sa_event.listens_for(engine, "connect")
                def _read_committed(dbapi_connection: Any, _record: Any) -> None:
                    # The purge and append checks (a tombstone, the stream's last version) read
                    # after waiting for the append lock and must see what committed during the
                    # wait: READ COMMITTED. A server default of REPEATABLE READ (ALTER DATABASE
                    # ... SET default_transaction_isolation) let an append write into a session
                    # purged during its wait, and SERIALIZABLE failed one command in four with
                    # a serialization error. Set for the connection's whole life, so explicit
                    # BEGINs (the hot path's) get it too.
                    autocommit = dbapi_connection.autocommit
                    dbapi_connection.autocommit = True
                    try:
                        cursor = dbapi_connection.cursor()
                        cursor.execute(_READ_COMMITTED)
                        cursor.close()
                    finally:
                        dbapi_connection.autocommit = autocommit
        except StorageError:
            raise
        except Exception as error:
            hint = (" (install the PostgreSQL driver: pip install 'sessionledger[postgres]')"
                    if isinstance(error, ModuleNotFoundError) and self.dialect == "postgresql"
                    else "")
            raise StorageError(f"cannot use database {safe_url(url)}: {one_line(error)}{hint}"
                               ) from None
        return engine

    def _connect(self) -> None:
        """Take the connection the hot path uses for the store's life (re-taken if it breaks)."""
        self._fairy: Any = self.engine.raw_connection()
        # the driver's own connection (sqlite3 / psycopg), typed loosely: the two differ
        self._db: Any = cast(Any, self._fairy.dbapi_connection)
        if self.dialect == "sqlite":
            # explicit BEGIN IMMEDIATE / COMMIT: take the write lock up front, never mid-way
            self._db.isolation_level = None
        else:
            # reads run in autocommit (one round trip, no idle-in-transaction); writes BEGIN
            self._db.autocommit = True

    def _create_schema(self) -> None:
        # Fast path: a database at this schema version has every table already.
        if self._stored_schema_version() == schema.SCHEMA_VERSION:
            return
        # Several processes may open a new database at once: the creation runs under the
        # database's write lock (SQLite) or an advisory lock (PostgreSQL), so one creates and
        # the others find the tables made. An older schema gets the tables it lacks.
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
            if row is not None and self._schema_number(row[0]) > schema.SCHEMA_VERSION:
                raise StorageError(
                    f"database {safe_url(self.url)} has schema version {row[0]}, newer "
                    f"than this release reads ({schema.SCHEMA_VERSION}): upgrade sessionledger"
                )
            conn.execute(schema.meta.delete().where(schema.meta.c.key == "schema_version"))
            conn.execute(schema.meta.insert().values(
                key="schema_version", value=str(schema.SCHEMA_VERSION)))
            conn.commit()

    def _stored_schema_version(self) -> int | None:
        """The schema version the database records (None: no sl_meta table or no row)."""
        try:
            with self.engine.connect() as conn:
                value = conn.execute(sa.text(
                    "SELECT value FROM sl_meta WHERE key = 'schema_version'")).scalar()
        except sa.exc.DBAPIError as error:
            if isinstance(error, sa.exc.ProgrammingError | sa.exc.OperationalError) and (
                "sl_meta" in str(error)
            ):
                # a new database. The driver's frames hold the error that holds them: cleared,
                # or that cycle kept the opening engine (its frame is their caller) until the
                # garbage collector's next pass, connections and all, when dropped unclosed
                traceback.clear_frames(error.__traceback__)
                return None
            raise
        return None if value is None else self._schema_number(value)

    def _schema_number(self, value: object) -> int:
        number = small_count(str(value))
        if number is None:
            raise StorageError(
                f"database {safe_url(self.url)} records schema version {str(value)[:40]!r}, "
                "which is not a schema version: not a sessionledger database, or a damaged one")
        return number

    @contextlib.contextmanager
    def storage_errors(self, doing: str) -> Iterator[None]:
        """Turn driver and SQLAlchemy errors in the block into one-line StorageErrors:
        "cannot {doing} database {url}: {what the driver said}"."""
        # the driver's own errors too (once it is loaded): reads on a raw DBAPI cursor raise
        # those, psycopg's AdminShutdown when the server drops the connection
        driver_error = getattr(self, "_dbapi_error", None)
        caught = (sa.exc.SQLAlchemyError, OSError, *((driver_error,) if driver_error else ()))
        try:
            yield
        except StorageError:
            raise
        except caught as error:
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
            # (a _ConnectOnUse: forked, or abandoned after an interrupt, never used since)
            if not isinstance(self._fairy, _ConnectOnUse):
                with contextlib.suppress(Exception):
                    self._fairy.close()
            self.engine.dispose()
        _open_stores.discard(self)

    def _in_memory_uri(self) -> bool:
        """A SQLite URI of an in-memory database shared by the store's connections
        (file:name?mode=memory&cache=shared): it lives in them, so a fork copies it with
        them, and closing them would free it."""
        database = self.url.database or ""
        return self.dialect == "sqlite" and database.startswith("file:") and (
            "mode=memory" in database or self.url.query.get("mode") == "memory"
            or database.startswith("file::memory:"))

    def after_fork_in_child(self) -> None:
        """In a forked process (os.register_at_fork): fresh locks (one another thread of the
        parent held stays held for good), and connections of this process's own. An in-memory
        SQLite database was copied with the process: it keeps its connections."""
        for lock in {id(self._lock): self._lock, id(self.commands_lock): self.commands_lock
                     }.values():
            lock._at_fork_reinit()  # type: ignore[attr-defined]
        self._write_lock_held = threading.local()
        if self.single_connection or self._closed or self._in_memory_uri():
            return
        _inherited.append((self._fairy, self.engine.pool))
        if self.dialect == "sqlite":
            # SQLite keeps one lock state per file and process, which connections opened
            # here would share with inherited ones still open: such a process took no lock
            # of its own, and once the parent closed its last connection, SQLite deleted the
            # write-ahead log this process was writing to (every write since lost). Closing
            # an idle inherited connection touches nothing of the parent's.
            for connection in list(self._sqlite_connections.values()):
                if not connection.in_transaction:
                    with contextlib.suppress(Exception):
                        connection.close()
            self._sqlite_connections.clear()
        # the pool starts empty; the parent's connections are dropped unclosed (psycopg does
        # not end a connection that another process made when it is collected) and kept
        self.engine.dispose(close=False)
        self._fairy = self._db = _ConnectOnUse(self)

    # -- writing -----------------------------------------------------------------------------

    def append(
        self,
        rows: Sequence[EventRow],
        idempotency: tuple[str, str, str, int] | None = None,
        snapshots: Sequence[SnapshotRow] = (),
    ) -> int:
        """Write `rows`, an idempotency key and snapshots in one transaction; return the global
        position of the last row (0 when `rows` is empty: a keyed command that changed nothing
        still records its key and result).

        Raises VersionConflict when another writer stored one of the versions first, and
        IdempotencyKeyUsed (with the first result) when the key (scope, key) was used before.
        On PostgreSQL the transaction holds an advisory lock from its first statement to its
        commit, so global positions are committed in order (a reader never sees position n+1
        before n) and a NOTIFY wakes waiting subscribers.
        """
        sql = self._sql
        self.refuse_waiting_for_itself("write")
        with self._lock:
            db = self._db
            self.check_open()
            if self.dialect == "postgresql" and len(rows) == 1 and idempotency is None and (
                not snapshots
            ):
                return self._append_one_statement(db, rows[0])
            try:
                db.execute(self._begin)
                if idempotency is not None:
                    try:
                        db.execute(sql.insert_idempotency, idempotency)
                    except self._integrity_error:
                        db.execute("ROLLBACK")
                        used = self.idempotent_result(idempotency[0], idempotency[1])
                        if used is None:  # pragma: no cover - the key row cannot vanish
                            raise
                        raise IdempotencyKeyUsed(*used) from None
                try:
                    position = self._insert_rows(db, rows)
                except self._integrity_error as error:
                    db.execute("ROLLBACK")
                    if _PURGED in str(error):
                        raise SessionGone from None
                    raise VersionConflict from None
                except SessionGone:
                    db.execute("ROLLBACK")
                    raise
                if snapshots:
                    self._upsert_snapshots(db, snapshots)
                db.execute(self._commit if rows else "COMMIT")
                return position
            except (VersionConflict, IdempotencyKeyUsed, SessionGone):
                raise
            except BaseException as error:
                self._rollback_quietly()
                self._drop_if_unusable()
                if isinstance(error, self._dbapi_error):
                    raise StorageError(
                        f"write to {safe_url(self.url)} failed: {one_line(error)}"
                    ) from None
                raise

    def _insert_rows(self, db: Any, rows: Sequence[EventRow]) -> int:
        """Insert the events of an append (in its transaction); the last one's position (0:
        none). SessionGone when a session of theirs was purged; the driver's IntegrityError
        when a version is taken (or, on SQLite, the purge guard refuses)."""
        sql = self._sql
        if len(rows) == 1:
            return self._insert_one(db, rows[0])
        if not rows:
            return 0
        if self.dialect == "postgresql":
            # one statement over arrays, not executemany: psycopg pipelines that, and a lost
            # race (a unique violation) aborted the pipeline with a logged "error ignored
            # terminating Pipeline" warning each time
            cursor = db.execute(sql.insert_events_many, columns(rows))
        else:  # (SQLite's purge guard is a trigger: the plain insert)
            cursor = db.cursor()
            cursor.executemany(sql.insert_event, rows)
        if cursor.rowcount != len(rows):
            raise SessionGone
        return int(db.execute(sql.last_position).fetchone()[0])

    def _upsert_snapshots(self, db: Any, snapshots: Sequence[SnapshotRow]) -> None:
        """Write snapshots in an append's transaction. A purged session's are not written back
        (rebuild_snapshots racing a cleanup in another engine): PostgreSQL skips them, SQLite's
        guard refuses them (SessionGone, the transaction rolled back)."""
        try:
            if self.dialect == "sqlite":
                db.cursor().executemany(self._sql.upsert_snapshot, snapshots)
            else:
                # one statement over arrays: psycopg pipelines executemany, and a connection
                # lost meanwhile logged "error ignored terminating Pipeline" (a snapshot of a
                # purged session is skipped by the statement's tombstone check)
                db.execute(self._sql.upsert_snapshots_many, columns(snapshots))
        except self._integrity_error as error:
            if _PURGED not in str(error):
                raise
            db.execute("ROLLBACK")
            raise SessionGone from None

    def _append_one_statement(self, db: Any, row: EventRow) -> int:
        """The common PostgreSQL append (one event, no key, no snapshot) as one statement in
        its own implicit transaction: one round trip instead of three (BEGIN + lock, INSERT,
        NOTIFY + COMMIT; measured about 60 µs less per command). The statement takes the
        ordering lock before it inserts, and holds it, and the NOTIFY, until it commits."""
        # the event before it, locked (FOR KEY SHARE) once the ordering lock is held: the
        # statement reads from a snapshot taken before it waited for the lock, and a row lock
        # sees what a purge committed meanwhile (the row is gone: nothing is inserted)
        try:
            inserted = db.execute(self._sql.append_one,
                                  (row[0], row[1] - 1, *row, row[1])).fetchone()
        except self._integrity_error:
            raise VersionConflict from None
        except self._dbapi_error as error:
            self._drop_if_unusable()
            raise StorageError(
                f"write to {safe_url(self.url)} failed: {one_line(error)}"
            ) from None
        except BaseException:  # an interrupt
            self._drop_if_unusable()
            raise
        if inserted is None:
            raise SessionGone
        return int(inserted[0])

    def _drop_if_unusable(self) -> bool:
        """After an error or an interrupt on the PostgreSQL connection of the hot path: when it
        is closed (a server restart, a dropped TCP connection) or busy (a result never read:
        an interrupt mid-statement, or a connection the server terminated mid-result), every
        later call on it would fail ("another command is already in progress", for good). It
        is dropped, and the next use connects anew. True when it was dropped."""
        if self.dialect != "postgresql" or isinstance(self._db, _ConnectOnUse):
            return False
        try:
            unusable = bool(self._db.closed) or (
                self._db.info.transaction_status.name in ("ACTIVE", "UNKNOWN"))
        except Exception:
            unusable = True
        if unusable:
            with contextlib.suppress(Exception):
                self._fairy.invalidate()
            self._fairy = self._db = _ConnectOnUse(self)
        return unusable

    def _insert_one(self, db: Any, row: EventRow) -> int:
        """Insert one event; SessionGone when its session was purged (on SQLite the purge
        guard's IntegrityError, see append())."""
        if self.dialect == "sqlite":
            return int(db.execute(self._sql.insert_event, row).lastrowid)
        inserted = db.execute(self._sql.insert_event_returning, (*row, row[0])).fetchone()
        if inserted is None:
            raise SessionGone
        return int(inserted[0])

    def purge(
        self, session_id: str, name: str, final_status: str, micros: int,
        also: Callable[[Connection], None] | None = None, version: int | None = None,
    ) -> bool:
        """Delete a session's events, snapshots and idempotency keys (but the key of its create)
        for good and leave a tombstone, in one transaction (`also` runs in it: read models drop
        their rows).

        SQLite: with secure_delete on, whatever SQLite build this is, so the freed space is
        zeroed; the WAL keeps the old pages until a checkpoint (see checkpoint()).
        Returns True when this call purged it, False when a tombstone was there already or,
        with `version`, when the session is no longer at that version (another engine wrote
        to it since the caller decided: the decision is stale, nothing is deleted).
        """
        self.refuse_waiting_for_itself("purge")
        with (self.storage_errors("purge a session in"), self.connection() as conn,
              secure_delete(conn, "ON")):
            if self.dialect == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                for guard in _PURGE_GUARDS:  # no-ops once they exist
                    conn.exec_driver_sql(guard)
            else:
                # first the purge lock: a catalog fold under way finishes before this purge
                # deletes anything (hold_off_purges); appends are not held up meanwhile
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PURGE_LOCK_KEY})")
                # the appends' ordering lock: an append that commits first is deleted with the
                # rest; one that waited sees the tombstone (its next statements read after the
                # lock) or finds the event before it gone (append_one's row lock)
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_APPEND_LOCK_KEY})")
            # read under the locks appends take: an archive that committed after the caller
            # read the session is seen here
            latest = conn.execute(sa.text(
                "SELECT MAX(version) FROM sl_events WHERE session_id = :sid"),
                {"sid": session_id}).scalar()
            if version is not None and latest != version:
                conn.rollback()
                return False
            for table in ("sl_events", "sl_snapshots"):
                conn.execute(sa.text(f"DELETE FROM {table} WHERE session_id = :sid"),
                             {"sid": session_id})
            # the session's own keys, whose scope is its id: a range of the primary key (by
            # session_id, which has no index, every purge read the whole table, holding the
            # append lock on PostgreSQL). A create's key (scope "create") stays: a create
            # retried after the purge returns the purged id, as the first did, not a new session
            conn.execute(sa.text("DELETE FROM sl_idempotency WHERE scope = :sid"),
                         {"sid": session_id})
            tombstoned = conn.execute(sa.text(
                "INSERT INTO sl_tombstones (session_id, name, final_status, version, purged_ts) "
                "VALUES (:sid, :name, :status, :version, :ts) "
                "ON CONFLICT (session_id) DO NOTHING"),
                {"sid": session_id, "name": name, "status": final_status,
                 "version": latest if type(latest) is int else 0, "ts": micros})
            if also is not None:
                also(conn)
            conn.commit()
            # False: another engine purged it first (its tombstone stands)
            return bool(tombstoned.rowcount)

    def hold_off_purges(self, conn: Connection) -> None:
        """Keep purges out until the transaction of `conn` ends (PostgreSQL; SQLite's write
        lock, which such a transaction holds, does it already).

        For a read model that reads events and then writes rows of their sessions in one
        transaction (the catalog): at READ COMMITTED a purge committing in between would have
        its deletion of the session's row undone by the write. Purges wait for such
        transactions, and those wait for a purge under way; appends wait for neither."""
        if self.dialect == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock_shared({_PURGE_LOCK_KEY})")

    def checkpoint(self) -> None:
        """SQLite: copy the WAL into the database file and empty it (best effort: a reader in
        another connection can hold it), so that pages a purge freed and zeroed leave no older
        copy in the WAL. PostgreSQL: nothing (its own VACUUM reclaims deleted rows)."""
        if self.dialect != "sqlite":
            return
        with self.storage_errors("checkpoint"), self.connection() as conn:
            # Without waiting: a TRUNCATE checkpoint holds the write lock while it waits for
            # readers, so with the usual 30 s busy timeout every writer of every process stood
            # still while another process read a long scan. With none, SQLite copies what it
            # can at once (as a PASSIVE checkpoint does) when a reader is in the way.
            conn.exec_driver_sql("PRAGMA busy_timeout = 0")
            try:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                if not conn.invalidated:  # (as in secure_delete)
                    conn.exec_driver_sql(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")

    def tombstone(self, session_id: str) -> tuple[str, str, int] | None:
        """(name, final status, purged_ts) of a purged session, if it was purged."""
        rows = self.query(
            "SELECT name, final_status, purged_ts FROM sl_tombstones WHERE session_id = ?",
            (session_id,))
        return (rows[0][0], rows[0][1], int(rows[0][2])) if rows else None

    def put_snapshots(self, snapshots: Sequence[SnapshotRow]) -> None:
        """Write (or replace) snapshots in their own transaction."""
        self.append((), None, snapshots)

    def _rollback_quietly(self) -> None:
        """ROLLBACK, whatever it raises; an interrupt (a second Ctrl-C) that lands in it is
        raised after the rollback ran: left undone, SQLite's connection kept its BEGIN
        IMMEDIATE, holding the database's write lock while idle, and failed the next command
        ("cannot start a transaction within a transaction")."""
        interrupted: BaseException | None = None
        for _ in range(3):
            try:
                with contextlib.suppress(Exception):
                    self._db.execute("ROLLBACK")
                break
            except BaseException as interrupt:
                interrupted = interrupt
        if interrupted is not None:
            raise interrupted

    @contextlib.contextmanager
    def holding_write_lock(self) -> Iterator[None]:
        """Mark this thread as holding SQLite's write lock on a connection of its own (a
        subscriber's transaction), so that a write through the store from it fails at once
        instead of waiting 30 s for itself (a transactional handler issuing a command).
        Nothing on PostgreSQL, where such a write runs in its own transaction."""
        if self.dialect != "sqlite":
            yield
            return
        held = self._write_lock_held
        held.depth = getattr(held, "depth", 0) + 1
        try:
            yield
        finally:
            held.depth -= 1

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        """A pooled SQLAlchemy connection. On an in-memory database, the one connection, with
        the store's lock held meanwhile: a second thread's transaction interleaved with the
        commands on it ("cannot start a transaction within a transaction", lost commits, a
        crash)."""
        with self._one_user():
            # a closed in-memory engine would otherwise connect to a new, empty database
            self.check_open()
            with self.engine.connect() as conn:
                try:
                    yield conn
                except BaseException:
                    self._invalidate_if_in_transaction(conn)
                    raise

    def _invalidate_if_in_transaction(self, conn: Connection) -> None:
        """After an error or an interrupt in a connection() block: a driver connection still
        in a transaction is not put back in the pool. SQLAlchemy marks a transaction done even
        when its COMMIT raised (an interrupt in it, a failed commit), then skips the rollback
        and the pool's reset: the connection went back holding BEGIN IMMEDIATE (SQLite: every
        writer of every process "database is locked") or idle in transaction with its row and
        advisory locks (PostgreSQL)."""
        if conn.invalidated or self.single_connection:
            return
        raw = getattr(conn.connection, "dbapi_connection", None)
        try:
            if self.dialect == "sqlite":
                open_transaction = bool(raw.in_transaction)  # type: ignore[union-attr]
            else:
                open_transaction = raw.info.transaction_status.name != "IDLE"  # type: ignore[union-attr]
        except Exception:
            open_transaction = True
        if open_transaction:
            with contextlib.suppress(Exception):
                conn.invalidate()

    def _one_user(self) -> contextlib.AbstractContextManager[Any]:
        return self._lock if self.single_connection else contextlib.nullcontext()

    def holds_write_lock_here(self) -> bool:
        """True inside holding_write_lock() on this thread (SQLite)."""
        return bool(getattr(self._write_lock_held, "depth", 0))

    def refuse_waiting_for_itself(self, doing: str) -> None:
        """StorageError now when this thread holds SQLite's write lock on another connection
        (see holding_write_lock): `doing` would wait 30 s for that lock, then fail."""
        if self.holds_write_lock_here():
            raise StorageError(
                f"cannot {doing} here: this thread holds the SQLite database's write lock in a "
                "transactional subscriber's transaction, and would wait for itself. Write "
                "through the connection the handler gets, or use an at-least-once subscriber")

    def check_open(self) -> None:
        """StorageError once the store is closed."""
        if self._closed:
            raise StorageError("the engine is closed")

    # -- reading -----------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one read statement written with qmark (`?`) parameters, on the engine's
        connection (short reads; for long scans use scan())."""
        return self._fetchall(self._sql.adapt(sql), params)

    def scan_batches(self, sql: str, params: Sequence[Any] = (), batch: int = 2000
                     ) -> Generator[Sequence[Any], None, None]:
        """scan(), a batch of rows at a time (StorageError now, not at the first batch, once
        the store is closed)."""
        self.check_open()
        return self._scan_batches(sql, params, batch)

    def scan(self, sql: str, params: Sequence[Any] = (), batch: int = 2000) -> Iterator[Any]:
        """Stream the rows of one read statement (qmark parameters) in batches, on a connection
        of its own so a long scan never holds up commands. Constant memory."""
        # the batches flattened in C: a generator resumed per row cost 0.15 µs of verify's 5
        return itertools.chain.from_iterable(self.scan_batches(sql, params, batch))

    def _scan_batches(self, sql: str, params: Sequence[Any], batch: int
                      ) -> Generator[Sequence[Any], None, None]:
        if self.single_connection:
            # an in-memory database: one connection, whose lock a scan would hold across its
            # yields, and a scan handed to another thread could never release it (every call
            # of every thread then waited for good). Its rows are read at once instead: they
            # are in this process's memory already.
            with self._one_user():
                batches = list(self._scan_batches_on_own(sql, params, batch))
            yield from batches
            return
        yield from self._scan_batches_on_own(sql, params, batch)

    def _scan_batches_on_own(self, sql: str, params: Sequence[Any], batch: int
                             ) -> Iterator[Sequence[Any]]:
        with self.storage_errors("read from"):
            fairy = self.engine.raw_connection()
        try:
            # psycopg's plain cursor would fetch the whole result at once: a server-side
            # (named) cursor streams it; sqlite3 cursors step through the result lazily
            cursor = (fairy.cursor() if self.dialect == "sqlite"
                      else fairy.cursor(name=f"sl_scan_{threading.get_ident()}"))
            try:
                cursor.execute(self._sql.adapt(sql), tuple(params))
                while True:
                    rows = cursor.fetchmany(batch)
                    if not rows:
                        return
                    yield rows
            except self._dbapi_error as error:
                raise StorageError(
                    f"read from {safe_url(self.url)} failed: {one_line(error)}"
                ) from None
            finally:
                with contextlib.suppress(Exception):  # a lost connection cannot close it
                    cursor.close()
        finally:
            if self.dialect == "postgresql" and getattr(fairy.dbapi_connection, "closed", True):
                # lost (a server restart, a dropped TCP connection): out of the pool, so the
                # next scan gets a live one instead of failing on this one again
                fairy.invalidate()
            else:
                try:
                    fairy.rollback()
                except Exception:
                    # lost while idle (a terminated backend), found by this rollback: out of
                    # the pool too (its reset would fail again and log an ERROR traceback)
                    with contextlib.suppress(Exception):
                        fairy.invalidate()
            fairy.close()

    def _fetchall(self, sql: str, params: Sequence[Any]) -> list[Any]:
        with self._lock:
            self.check_open()
            for attempt in (1, 2):
                try:
                    rows: list[Any] = self._db.execute(sql, params).fetchall()
                    return rows
                except BaseException as error:
                    if not isinstance(error, self._dbapi_error):
                        if not isinstance(error, Exception):  # an interrupt
                            self._drop_if_unusable()
                        raise
                    lost = self._drop_if_unusable()
                    if not (lost and attempt == 1):
                        raise StorageError(
                            f"read from {safe_url(self.url)} failed: {one_line(error)}"
                        ) from None
                    # a read on a connection the server dropped while it was idle: again,
                    # once, on the new one (a read has nothing to undo; writes never retry)
            raise AssertionError("unreachable")  # pragma: no cover

    def stream(self, session_id: str, after: int = 0, upto: int | None = None) -> list[StoredEvent]:
        """The stored events of versions in (after, upto] in version order: (version, type, ts,
        actor, correlation_id, payload, digest)."""
        if upto is None:
            return self._fetchall(self._sql.stream, (session_id, after))
        return self._fetchall(self._sql.stream_upto, (session_id, after, upto))

    def latest_snapshot(self, session_id: str, upto: int | None = None) -> StoredSnapshot | None:
        """The snapshot of the highest version (at or below `upto`), if any."""
        if upto is None:
            rows = self._fetchall(self._sql.latest_snapshot, (session_id,))
        else:
            rows = self._fetchall(self._sql.latest_snapshot_upto, (session_id, upto))
        if not rows:
            return None
        version, format_version, flags, digest, data = rows[0]
        return version, format_version, flags, blob(digest), blob(data)

    def snapshot_and_stream(
        self, session_id: str, upto: int | None = None
    ) -> tuple[StoredSnapshot | None, list[StoredEvent]]:
        """What a load reads: the latest snapshot (at or below `upto`), and the events from
        that snapshot's own version on (from version 1 when there is none), up to `upto`.

        One round trip on PostgreSQL, where each costs a network hop (measured: a cold 10-event
        load went from 345 to 284 µs against a 1-SELECT floor of 150 to 190 µs); two statements
        on SQLite, where a statement is a function call and the UNION query is no faster (13.7
        against 13.0 µs for a snapshot and 5 events).
        """
        if self.dialect == "sqlite":
            latest = self.latest_snapshot(session_id, upto)
            # a version that is not a number (a damaged row: SQLite keeps any type in any
            # column) reads every event; the repository then skips that snapshot
            start = latest[0] - 1 if latest and type(latest[0]) is int else 0
            return latest, self.stream(session_id, start, upto)
        if upto is None:
            rows = self._fetchall(self._sql.load, (session_id, session_id))
        else:
            rows = self._fetchall(self._sql.load_upto, (session_id, upto, session_id, upto))
        snapshot: StoredSnapshot | None = None
        events: list[StoredEvent] = []
        for kind, version, event_type, micros, actor, correlation, data, digest, fmt, flags in (
            rows
        ):
            if kind == 0:
                snapshot = (version, fmt, flags, blob(digest), blob(data))
            else:
                events.append((version, event_type, micros, actor, correlation, data, digest))
        return snapshot, events

    def snapshot_versions(self, session_id: str) -> list[int]:
        """The versions at which the session has snapshots, ascending (a damaged row whose
        version is not a number is left out: SQLite keeps any type in any column)."""
        rows = self._fetchall(self._sql.snapshot_versions, (session_id,))
        return [row[0] for row in rows if type(row[0]) is int]

    def session_ids(self) -> list[str]:
        """Every session with events, oldest first."""
        return [row[0] for row in self._fetchall(self._sql.session_ids, ())]

    def newest_session_ids(self, limit: int) -> list[str]:
        """The `limit` most recently created sessions, newest first."""
        return [row[0] for row in self._fetchall(self._sql.newest_session_ids, (limit,))]

    def latest_version(self, session_id: str) -> int:
        """The highest stored version of a session (0 when it has none)."""
        rows = self._fetchall(self._sql.latest_version, (session_id,))
        value = rows[0][0] if rows else None
        return 0 if value is None else stored_version(session_id, value)

    def idempotent_result(self, scope: str, key: str) -> tuple[str, int] | None:
        """(session_id, version) the first command with this key produced, if any."""
        rows = self._fetchall(self._sql.select_idempotency, (scope, key))
        if not rows:
            return None
        session_id, version = rows[0]
        if type(version) is not int:  # SQLite keeps any type in any column
            raise CorruptedData(session_id, None, f"the record of idempotency key {key!r} "
                                                  f"holds version {version!r}, not a number")
        return session_id, version


class _Statements:
    """The hot-path SQL, written once and adapted to the DBAPI's parameter style."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        cols = "session_id, version, type, ts, actor, correlation_id, payload, digest"
        stream_cols = "version, type, ts, actor, correlation_id, payload, digest"
        snapshot_cols = "session_id, version, format_version, flags, digest, data, ts"
        snapshot_read = "version, format_version, flags, digest, data"
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
            "snapshot_versions": (
                "SELECT version FROM sl_snapshots WHERE session_id = ? ORDER BY version"
            ),
            "session_ids": "SELECT session_id FROM sl_events WHERE version = 1 ORDER BY position",
            "newest_session_ids": (
                "SELECT session_id FROM sl_events WHERE version = 1 ORDER BY position DESC "
                "LIMIT ?"
            ),
            "last_position": (
                "SELECT last_insert_rowid()" if dialect == "sqlite" else "SELECT lastval()"
            ),
            "latest_snapshot": (
                f"SELECT {snapshot_read} FROM sl_snapshots WHERE session_id = ? "
                "ORDER BY version DESC LIMIT 1"
            ),
            "latest_snapshot_upto": (
                f"SELECT {snapshot_read} FROM sl_snapshots WHERE session_id = ? AND version <= ? "
                "ORDER BY version DESC LIMIT 1"
            ),
        }
        # A load in one round trip (PostgreSQL): the latest snapshot (at or below a version) and
        # the events from its version on (every event when there is none), as one result:
        # kind 0 is the snapshot row, kind 1 the events.
        for name, upto in (("load", ""), ("load_upto", " AND version <= ?")):
            statements[name] = (
                "WITH snap AS (SELECT version, format_version, flags, digest, data "
                f"FROM sl_snapshots WHERE session_id = ?{upto} ORDER BY version DESC LIMIT 1) "
                "SELECT 0 AS kind, version, CAST(NULL AS TEXT), CAST(NULL AS BIGINT), "
                "CAST(NULL AS TEXT), CAST(NULL AS TEXT), data, digest, format_version, flags "
                "FROM snap UNION ALL "
                "SELECT 1, version, type, ts, actor, correlation_id, payload, digest, "
                "CAST(NULL AS SMALLINT), CAST(NULL AS SMALLINT) FROM sl_events "
                "WHERE session_id = ? AND version >= COALESCE((SELECT version FROM snap), 1)"
                f"{upto} ORDER BY 1, 2"
            )
        for name, sql in statements.items():
            setattr(self, name, self.adapt(sql))
        # Appends to a session refuse a tombstoned one: a cleanup in another engine may have
        # purged it since this engine read it. On PostgreSQL each insert checks, after the
        # ordering lock (which a purge takes too), so the purge's commit is seen. On SQLite a
        # check in the insert cost 4-5 µs an append (alternating runs, durability normal):
        # triggers check instead, made by the database's first purge (_PURGE_GUARDS), so a
        # database that never purges pays nothing.
        on_conflict = (
            "ON CONFLICT (session_id, version) DO UPDATE SET "
            "format_version = excluded.format_version, flags = excluded.flags, "
            "digest = excluded.digest, data = excluded.data, ts = excluded.ts")
        if dialect == "sqlite":
            self.upsert_snapshot = (f"INSERT INTO sl_snapshots ({snapshot_cols}) "
                                    f"VALUES (?, ?, ?, ?, ?, ?, ?) {on_conflict}")
        else:
            # one event, inserting nothing for a tombstoned session (the session id is passed
            # again at the end: EventStore._insert_one)
            events = ", ".join(["%s"] * 8)
            no_tombstone = "WHERE NOT EXISTS (SELECT 1 FROM sl_tombstones WHERE session_id = %s)"
            self.insert_event_returning = (
                f"INSERT INTO sl_events ({cols}) SELECT {events} {no_tombstone} "
                "RETURNING position")
            # several events in one statement, inserted (and numbered) in the order given
            self.insert_events_many = (
                f"INSERT INTO sl_events ({cols}) SELECT {cols} FROM unnest("
                "%s::varchar[], %s::int[], %s::varchar[], %s::bigint[], %s::varchar[], "
                "%s::varchar[], %s::bytea[], %s::bytea[]) WITH ORDINALITY "
                f"AS u({cols}, ordinal) WHERE NOT EXISTS (SELECT 1 FROM sl_tombstones t "
                "WHERE t.session_id = u.session_id) ORDER BY ordinal")
            # the snapshots of an append in one statement over arrays (as its events: no
            # executemany)
            self.upsert_snapshots_many = (
                f"INSERT INTO sl_snapshots ({snapshot_cols}) SELECT {snapshot_cols} FROM "
                "unnest(%s::varchar[], %s::int[], %s::smallint[], %s::smallint[], "
                f"%s::bytea[], %s::bytea[], %s::bigint[]) AS u({snapshot_cols}) "
                "WHERE NOT EXISTS (SELECT 1 FROM sl_tombstones t "
                f"WHERE t.session_id = u.session_id) {on_conflict}")
            self.append_one = (
                "WITH ordered AS (SELECT pg_advisory_xact_lock("
                f"{_APPEND_LOCK_KEY}), pg_notify('{EVENTS_CHANNEL}', '')), "
                "previous AS (SELECT 1 FROM sl_events e, ordered "
                "WHERE e.session_id = %s AND e.version = %s FOR KEY SHARE OF e) "
                f"INSERT INTO sl_events ({cols}) SELECT {events} FROM ordered "
                "WHERE %s = 1 OR EXISTS (SELECT 1 FROM previous) RETURNING position"
            )

    def adapt(self, sql: str) -> str:
        """qmark parameters as the dialect's DBAPI wants them."""
        return sql if self.dialect == "sqlite" else sql.replace("?", "%s")

    insert_event: str
    insert_idempotency: str
    select_idempotency: str
    stream: str
    stream_upto: str
    latest_version: str
    last_position: str
    snapshot_versions: str
    session_ids: str
    insert_event_returning: str
    append_one: str
    upsert_snapshot: str  # SQLite's (executemany)
    upsert_snapshots_many: str  # PostgreSQL's
    latest_snapshot: str
    latest_snapshot_upto: str
    newest_session_ids: str
    load: str
    load_upto: str


os.register_at_fork(after_in_child=_after_fork_in_child)
