"""Subscription plumbing: reading the log in global order, tracking positions, waiting for news.

Positions become visible in order (they have holes: purges, rolled-back inserts): on SQLite
writers are serialised by the database lock,
on PostgreSQL every appending transaction holds an advisory lock from its first statement to its
commit (see EventStore.append), so a reader that sees position n has seen every position below
it. A subscriber therefore never skips an event that committed late.

Tracking rows live in the same database as the events. `transaction()` opens one transaction
that locks the subscriber's tracking row; a handler that writes through the connection it is
given commits together with the new position: exactly once.
"""

from __future__ import annotations

import contextlib
import selectors
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from sessionledger.domain.errors import StorageError

from .store import EVENTS_CHANNEL, EventStore, drop_if_broken


def tracked(name: str, position: object) -> int:
    """A tracking row's position, which SQLite may hold as any type (a damaged row): a
    StorageError that says so rather than a ValueError from deep inside a catch-up."""
    if type(position) is int:
        return position
    raise StorageError(
        f"subscriber {name!r} is tracked at {position!r}, not a position: the sl_tracking row "
        "is damaged (delete it to replay that subscriber from the start; "
        "for the catalog, engine.rebuild('catalog'))")

#: one event as a subscriber reads it: (position, session_id, version, type, ts, actor,
#: correlation_id, payload)
FeedRow = tuple[int, str, int, str, int, str | None, str | None, bytes]

_FEED = ("SELECT position, session_id, version, type, ts, actor, correlation_id, payload "
         "FROM sl_events WHERE position > :after AND position <= :upto{types} "
         "ORDER BY position LIMIT :limit")


class SubscriptionStore:
    """Positions, tracking and the event feed of durable subscribers, on their own connections
    (never the engine's command connection)."""

    def __init__(self, store: EventStore,
                 commands_lock: threading.RLock | None = None) -> None:
        self.store = store
        self.engine = store.engine
        self.dialect = store.dialect
        #: SQLite: the lock the engine's commands hold, taken before a subscriber's write lock
        #: (see transaction())
        self._commands_lock = commands_lock if store.dialect == "sqlite" else None
        #: .names: the subscribers this thread is running (running_here): a handler that runs
        #: its own subscriber again is refused (PostgreSQL, transactional: it would wait for its
        #: own locked tracking row, where the server sees no deadlock as the holder is idle in
        #: its transaction; at least once: it would deliver the batch under way again)
        self._rows_held = threading.local()

    def after_fork_in_child(self) -> None:
        """In a forked process: no subscriber is run by it."""
        self._rows_held = threading.local()

    @contextlib.contextmanager
    def running_here(self, name: str, refusal: str) -> Iterator[None]:
        """Subscriber `name` marked as run by this thread meanwhile; StorageError ("cannot run
        subscriber ... here: `refusal`") when this thread runs it already (its own handler
        running it again)."""
        held: set[str] = self._rows_held.__dict__.setdefault("names", set())
        if name in held:
            raise StorageError(f"cannot run subscriber {name!r} here: {refusal}")
        try:
            held.add(name)  # (inside: an interrupt right after it left the mark)
            yield
        finally:
            held.discard(name)

    # -- positions -------------------------------------------------------------------------

    def head(self) -> int:
        """The global position of the newest event (0 for an empty log)."""
        rows = self.store.query("SELECT MAX(position) FROM sl_events")
        return int(rows[0][0] or 0)

    def pending(self, position: int) -> int:
        """How many events there are after `position` (a range count on the primary key)."""
        rows = self.store.query("SELECT COUNT(*) FROM sl_events WHERE position > ?",
                                (position,))
        return int(rows[0][0])

    @staticmethod
    def events_between(conn: Connection, after: int, upto: int) -> int:
        """How many events there are with positions in (after, upto], in `conn`'s transaction."""
        return int(conn.execute(sa.text(
            "SELECT COUNT(*) FROM sl_events WHERE position > :a AND position <= :u"),
            {"a": after, "u": upto}).scalar_one())

    def positions(self) -> dict[str, int]:
        """Every tracked subscriber's position."""
        rows = self.store.query("SELECT name, position FROM sl_tracking ORDER BY name")
        return {name: tracked(name, position) for name, position in rows}

    def position(self, name: str) -> int:
        """A subscriber's tracked position (0 when it never ran)."""
        rows = self.store.query("SELECT position FROM sl_tracking WHERE name = ?", (name,))
        return tracked(name, rows[0][0]) if rows else 0

    # -- transactions ----------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, name: str, *, hold_off_purges: bool = False,
                    calls_back: bool = False) -> Iterator[tuple[Connection, int]]:
        """(connection, tracked position) inside one transaction that holds the subscriber's
        tracking row; commits on success, rolls back on any error.

        SQLite takes the database write lock up front (BEGIN IMMEDIATE: no lock upgrade half
        way); PostgreSQL locks the tracking row (SELECT ... FOR UPDATE), so two processes that
        run the same subscriber take turns instead of applying a batch twice.
        `hold_off_purges`: no purge commits while the transaction runs
        (EventStore.hold_off_purges). `calls_back`: the transaction runs code that may call
        the engine (a user's handler): on SQLite it holds the engine's command lock too.
        """
        doing = f"run subscriber {name!r} on"
        if self.dialect == "sqlite":
            # a transactional handler that reads through the engine (find() catches the
            # catalog up): a second write lock on this thread would wait 30 s for the first
            self.store.refuse_waiting_for_itself(f"run subscriber {name!r}")
        # SQLite, code that may call the engine: the engine's command lock first, as commands
        # take it before their write lock. Otherwise a command of another thread waiting for
        # this transaction's write lock holds the engine lock, and a handler reading through
        # the engine (get()) waits for it: both stall until SQLite's 30 s timeout.
        commands_lock = self._commands_lock if calls_back else None
        try:
            with (self.running_here(name, "this thread holds its tracking row in that "
                                          "subscriber's own transaction, and would wait for "
                                          "itself"),
                  commands_lock or contextlib.nullcontext(), self.store.storage_errors(doing),
                  self.store.connection() as conn):
                if self.dialect == "sqlite":
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                    row = self._locked_row(conn, name)
                else:
                    for _ in range(3):
                        conn.execute(sa.text(
                            "INSERT INTO sl_tracking (name, position, updated_ts) "
                            "VALUES (:n, 0, 0) ON CONFLICT (name) DO NOTHING"), {"n": name})
                        row = self._locked_row(conn, name)
                        if row is not None:
                            break
                        # deleted while this waited for its lock (a catalog swap forgets the
                        # rebuild's row): insert it again and lock that, so two engines waiting
                        # here take turns instead of both going on unlocked
                    else:
                        # never unlocked, never from position 0: an exactly-once subscriber
                        # would be handed its whole log again
                        raise StorageError(
                            f"cannot lock the tracking row of subscriber {name!r}: it was "
                            "deleted each time this waited for it (rebuilds racing); try again")
                    if hold_off_purges:
                        self.store.hold_off_purges(conn)
                try:
                    with self.store.holding_write_lock():
                        yield conn, tracked(name, row[0]) if row else 0
                except BaseException:
                    try:
                        conn.rollback()
                    except Exception:
                        # (a connection an interrupt left busy, or one the server dropped): out
                        # of the pool, and the caller gets what happened, not the rollback's error
                        with contextlib.suppress(Exception):
                            conn.invalidate()
                    raise
                conn.commit()
        except BaseException as error:
            if self.dialect == "sqlite" and not isinstance(error, Exception):
                # An interrupt (Ctrl-C) mid-statement: SQLAlchemy invalidates the connection,
                # and sqlite3 leaves a connection whose statement is alive (the interrupted
                # cursor, held by the traceback's frames) open, BEGIN IMMEDIATE and the
                # database's write lock included: every writer waited 30 s, then failed, for
                # as long as the exception was kept (a REPL keeps the last one). Dropping
                # the finished frames' locals finalizes that statement now.
                traceback.clear_frames(error.__traceback__)
            raise

    def locked_position(self, conn: Connection, name: str) -> int:
        """A subscriber's tracked position, read in the transaction of `conn` with its tracking
        row locked until that transaction ends (PostgreSQL: FOR UPDATE; SQLite's write lock,
        which such a transaction holds, does it already): a run of that subscriber in another
        engine waits, and one under way has committed (0: no row)."""
        row = self._locked_row(conn, name)
        return tracked(name, row[0]) if row else 0

    def _locked_row(self, conn: Connection, name: str) -> Any:
        """(position,) of `name`'s tracking row, locked as locked_position() says; None when
        there is no row."""
        lock = "" if self.dialect == "sqlite" else " FOR UPDATE"
        return conn.execute(sa.text(f"SELECT position FROM sl_tracking WHERE name = :n{lock}"),
                            {"n": name}).first()

    def advance(self, conn: Connection, name: str, position: int) -> None:
        """Record `position` for `name` in the transaction of `conn`: forward only. Two
        processes running one at-least-once subscriber both deliver a batch and record its end
        (nothing locks them): the one that records last must not move the position back, or
        both deliver thousands of events again."""
        conn.execute(sa.text(
            "INSERT INTO sl_tracking (name, position, updated_ts) VALUES (:n, :p, :t) "
            "ON CONFLICT (name) DO UPDATE SET position = excluded.position, "
            "updated_ts = excluded.updated_ts WHERE sl_tracking.position < excluded.position"),
            {"n": name, "p": position, "t": time.time_ns() // 1000})

    def advance_now(self, name: str, position: int) -> None:
        """Record `position` for `name` in a transaction of its own."""
        with (self.store.storage_errors(f"run subscriber {name!r} on"),
              self.store.connection() as conn):
            self.advance(conn, name, position)
            conn.commit()

    def forget(self, conn: Connection, name: str) -> None:
        """Drop the tracking row of `name` (in the transaction of `conn`)."""
        conn.execute(sa.text("DELETE FROM sl_tracking WHERE name = :n"), {"n": name})

    # -- the feed --------------------------------------------------------------------------

    def read(
        self, after: int, upto: int, limit: int, types: Sequence[str] | None = None,
        conn: Connection | None = None,
    ) -> list[FeedRow]:
        """Up to `limit` events with positions in (after, upto], in order (of `types` only)."""
        params: dict[str, Any] = {"after": after, "upto": upto, "limit": limit}
        type_filter = ""
        if types is not None:
            names = [f"t{i}" for i in range(len(types))]
            type_filter = f" AND type IN ({', '.join(':' + n for n in names)})"
            params.update(zip(names, types, strict=True))
        statement = sa.text(_FEED.format(types=type_filter))
        with self.store.storage_errors("read events from"):
            if conn is not None:
                return self._fetch(conn, statement, params)
            with self.store.connection() as own:
                return self._fetch(own, statement, params)

    @staticmethod
    def _fetch(conn: Connection, statement: sa.TextClause, params: dict[str, Any]) -> list[Any]:
        # the DBAPI cursor's fetchall gives plain tuples; SQLAlchemy's Row objects cost about a
        # microsecond more per event, a third of what a catalog rebuild may spend on one
        compiled = statement.compile(dialect=conn.dialect)
        positional = compiled.positiontup or []
        args = tuple(params[name] for name in positional) if positional else params
        cursor = conn.connection.cursor()
        try:
            cursor.execute(str(compiled), args)
            return list(cursor.fetchall())
        except Exception as error:
            drop_if_broken(conn, error)
            raise
        finally:
            cursor.close()

    def head_in(self, conn: Connection) -> int:
        """The newest position as the transaction of `conn` sees it."""
        with self.store.storage_errors("read events from"):
            value = conn.execute(sa.text("SELECT MAX(position) FROM sl_events")).scalar()
        return int(value or 0)


#: seconds between attempts to LISTEN again after the listening connection was lost
_LISTEN_RETRY = 1.0


class Waker:
    """Waits until new events may be there: LISTEN/NOTIFY on PostgreSQL, a short poll on
    SQLite (whose writers cannot signal other processes)."""

    def __init__(self, store: EventStore, poll_interval: float = 0.05) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self._fairy: Any = None
        self._listen_again_at = 0.0  # (PostgreSQL, while LISTEN is lost: when to try again)
        if store.dialect == "postgresql":
            self._listen()

    def _listen(self) -> None:
        # (a pool that has no connection to give, or a server that is down, is a StorageError
        # like any other, not SQLAlchemy's own exception)
        with self.store.storage_errors("listen for new events on"):
            fairy = self.store.engine.raw_connection()
            try:
                db = fairy.dbapi_connection
                assert db is not None
                db.autocommit = True
                db.execute(f"LISTEN {EVENTS_CHANNEL}")
            except BaseException:
                fairy.close()
                raise
        self._fairy = fairy

    def wait(self, timeout: float) -> None:
        """Return when news may have arrived, or after `timeout` seconds."""
        if self._fairy is None:
            if self.store.dialect == "postgresql" and time.monotonic() >= self._listen_again_at:
                # LISTEN lost while the server could not be reached: polling every 50 ms for
                # good cost a runner's wake-ups and about 75 idle transactions a second
                self._listen_again_at = time.monotonic() + _LISTEN_RETRY
                with contextlib.suppress(Exception):
                    self._listen()
                if self._fairy is not None:
                    return  # (the caller reads: news may have come meanwhile)
            time.sleep(min(timeout, self.poll_interval))
            return
        db = self._fairy.dbapi_connection
        try:
            # block on the socket, then drain every pending notification without waiting
            # (a selector, not select(): that refuses a descriptor past 1,023, which a process
            # with many files open gives, and every wait then took a new connection)
            with selectors.DefaultSelector() as selector:
                selector.register(db.fileno(), selectors.EVENT_READ)
                ready = selector.select(timeout)
            if ready:
                for _ in db.notifies(timeout=0):
                    pass
        except Exception:
            # a broken listening connection: take a new one, and let the caller read meanwhile
            with contextlib.suppress(Exception):
                self._fairy.invalidate()
            self._fairy = None
            with contextlib.suppress(Exception):
                self._listen()

    def close(self) -> None:
        """Release the listening connection."""
        if self._fairy is not None:
            with contextlib.suppress(Exception):
                self._fairy.invalidate()
            self._fairy = None
