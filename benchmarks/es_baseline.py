"""Plain `eventsourcing` 9.5.6: an Application on `eventsourcing.sqlite`, default JSON transcoder.

About the SQLite settings: `eventsourcing.sqlite` switches a file database to journal_mode=WAL
(SQLiteConnectionPool._create_connection) but never sets `synchronous`, so its connections run at
SQLite's default, which is FULL unless SQLite was compiled otherwise. `EsApp` reads the settings
back from a pooled connection; for durability "normal" it sets PRAGMA synchronous=NORMAL on every
connection of the pool (existing and future), so the three contenders run on the same settings.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from .raw import pragma_readback


class Counter(Aggregate):
    """The simplest aggregate: a name and a step, changed by a decorated event method."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.step = 0

    @event("Stepped")
    def set_step(self, step: int) -> None:
        self.step = step


class EsApp:
    """An eventsourcing Application on one SQLite file at a chosen synchronous setting."""

    def __init__(self, path: str, durability: str = "full") -> None:
        self.app: Application[UUID] = Application(env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": path,
        })
        self._pool: Any = self.app.recorder.datastore.pool  # type: ignore[attr-defined]
        if durability == "normal":
            self._force_synchronous("NORMAL")

    def _force_synchronous(self, value: str) -> None:
        pool = self._pool
        for conn in list(pool._pool) + list(pool._in_use.values()):
            conn._sqlite_conn.execute(f"PRAGMA synchronous={value}")
        create = pool._create_connection

        def create_with_pragma() -> Any:
            conn = create()
            conn._sqlite_conn.execute(f"PRAGMA synchronous={value}")
            return conn

        pool._create_connection = create_with_pragma

    def settings(self) -> tuple[str, str]:
        """(journal_mode, synchronous) read back from a writer connection of the pool."""
        conn = self._pool.get_connection(is_writer=True)
        try:
            return pragma_readback(conn._sqlite_conn)
        finally:
            self._pool.put_connection(conn)

    # -- operations --------------------------------------------------------------------------

    def new_counter(self, events: int = 1) -> Counter:
        """A saved Counter of `events` events (created + events-1 steps, one save)."""
        counter = Counter("bench")
        for step in range(1, events):
            counter.set_step(step)
        self.app.save(counter)
        return counter

    def append(self, counter: Counter, step: int) -> None:
        counter.set_step(step)
        self.app.save(counter)

    def create(self) -> None:
        self.app.save(Counter("bench"))

    def load(self, aggregate_id: UUID) -> Counter:
        loaded: Counter = self.app.repository.get(aggregate_id)
        return loaded

    def close(self) -> None:
        self.app.close()
