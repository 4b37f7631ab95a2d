"""A cleanup(purge=True) in one engine while another engine writes the same session.

The other engine may hold the session in its working set, or have loaded it just before the
purge committed: its append must write nothing and raise SessionPurged. Before the fix it
appended an event to a stream that no longer existed, and every catalog read (find, cleanup,
save_all_active, run_subscribers, even rebuild) failed for good on "events of a session that
never started".
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _helpers import POSTGRESQL, Backend
from conftest import EngineFactory

from sessionledger import RetentionPolicy, SessionEngine, SessionLedgerError, SessionPurged

PURGE_NOW = RetentionPolicy(max_age=0, purge=True)


def purge(engine: SessionEngine, *sids: str) -> None:
    """End `sids` that are not ended yet, and purge every ended session."""
    for sid in sids:
        with contextlib.suppress(SessionLedgerError):
            engine.end(sid)
    assert set(sids) <= set(engine.cleanup(PURGE_NOW).session_ids)


def leftovers(backend: Backend, sid: str) -> tuple[int, int]:
    """(events, snapshots) the store still holds for `sid`."""
    return (backend.sql("SELECT COUNT(*) FROM sl_events WHERE session_id = ?", (sid,))[0][0],
            backend.sql("SELECT COUNT(*) FROM sl_snapshots WHERE session_id = ?", (sid,))[0][0])


def purge_before_next(monkeypatch: pytest.MonkeyPatch, engine: SessionEngine, method: str,
                      purger: SessionEngine, sid: str) -> None:
    """The next call of `engine._store.<method>` first purges `sid` through `purger`."""
    real = getattr(engine._store, method)

    def purge_first(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(engine._store, method, real)
        purge(purger, sid)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine._store, method, purge_first)


def guards(backend: Backend) -> list[str]:
    """The SQLite purge guard triggers the database has."""
    return [name for (name,) in backend.sql(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' ORDER BY name")]


def assert_store_sound(engine_factory: EngineFactory) -> None:
    """A fresh engine reads the catalog and finds every chain sound."""
    fresh = engine_factory()
    fresh.find()
    fresh.rebuild("catalog")
    assert fresh.verify().ok


def test_an_engine_holding_a_purged_session_cannot_write_to_it(
    backend: Backend, engine_factory: EngineFactory,
) -> None:
    holder, purger = engine_factory(), engine_factory()
    sid = holder.create("s", state={"n": 0})
    holder.update(sid, {"n": 1})  # in the holder's working set at version 2
    ended = holder.create("e")
    holder.end(ended)  # ended in the holder's eyes: archive is its next command
    if backend.kind != POSTGRESQL:  # SQLite's guards come with the first purge
        assert guards(backend) == []
    purge(purger, sid, ended)
    if backend.kind != POSTGRESQL:
        assert guards(backend) == ["sl_events_purge_guard", "sl_snapshots_purge_guard"]
    with pytest.raises(SessionPurged):
        holder.update(sid, {"n": 2})
    with pytest.raises(SessionPurged):
        holder.archive(ended)
    with pytest.raises(SessionPurged):
        holder.get(sid)
    assert leftovers(backend, sid) == (0, 0) and leftovers(backend, ended) == (0, 0)
    assert_store_sound(engine_factory)


def test_a_purge_between_load_and_append(
    backend: Backend, engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No working set: the session is read, then purged, then the command appends."""
    writer, purger = engine_factory(max_active_sessions=0), engine_factory()
    sid = writer.create("s", state={"n": 0})
    purge_before_next(monkeypatch, writer, "append", purger, sid)
    with pytest.raises(SessionPurged):
        writer.update(sid, {"n": 1}, idempotency_key="k")  # the multi-statement path too
    assert leftovers(backend, sid) == (0, 0)
    assert backend.sql("SELECT COUNT(*) FROM sl_idempotency")[0][0] == 0
    assert_store_sound(engine_factory)


def test_a_batch_leaves_out_a_session_purged_meanwhile(
    backend: Backend, engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    batcher, purger = engine_factory(), engine_factory()
    kept, purged = batcher.create("kept"), batcher.create("purged")
    purge_before_next(monkeypatch, batcher, "append", purger, purged)
    assert batcher.save_all_active() == {kept: 2}
    assert leftovers(backend, purged) == (0, 0)
    assert batcher.get(kept).version == 2
    assert_store_sound(engine_factory)


def test_snapshots_are_not_written_back_for_a_purged_session(
    backend: Backend, engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """rebuild_snapshots() computes a session's snapshots, a purge commits, the rows arrive."""
    rebuilder, purger = engine_factory(), engine_factory()
    sid = rebuilder.create("s", state={"secret": "the purged state"})
    purge_before_next(monkeypatch, rebuilder, "put_snapshots", purger, sid)
    rebuilder.rebuild_snapshots()
    assert leftovers(backend, sid) == (0, 0)
    assert_store_sound(engine_factory)


@contextlib.contextmanager
def purging_transaction(backend: Backend, sid: str) -> Iterator[Callable[[], None]]:
    """A purge of `sid` done by hand and left open, holding what a purge holds (SQLite's write
    lock, and its guard triggers made; PostgreSQL's append ordering lock); yields its commit."""
    if backend.kind == POSTGRESQL:
        import psycopg

        from sessionledger.infrastructure.store import _APPEND_LOCK_KEY

        assert backend.pg_url is not None
        db: Any = psycopg.connect(backend.pg_url, options=f"-csearch_path={backend.pg_schema}")
        db.execute(f"SELECT pg_advisory_xact_lock({_APPEND_LOCK_KEY})")
        param = "%s"
    else:
        assert backend.sqlite_path is not None
        from sessionledger.infrastructure.store import _PURGE_GUARDS

        db = sqlite3.connect(backend.sqlite_path, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        for guard in _PURGE_GUARDS:
            db.execute(guard)
        param = "?"
    try:
        for table in ("sl_events", "sl_snapshots"):
            db.execute(f"DELETE FROM {table} WHERE session_id = {param}", (sid,))
        db.execute("INSERT INTO sl_tombstones (session_id, name, final_status, version, "
                   f"purged_ts) VALUES ({param}, 's', 'COMPLETED', 0, 1)", (sid,))
        yield lambda: db.execute("COMMIT")
    finally:
        db.close()


def test_an_append_waiting_for_a_purge_to_commit(
    backend: Backend, engine_factory: EngineFactory,
) -> None:
    """The append starts while the purge's transaction holds the lock it needs, and goes on
    once the purge commits. On PostgreSQL this is the one-statement append, whose snapshot is
    older than the purge: it must see the purge anyway."""
    writer = engine_factory()
    sid = writer.create("s", state={"n": 0})
    writer.update(sid, {"n": 1})
    assert_refused_after_waiting_for_a_purge(backend, sid, lambda: writer.update(sid, {"n": 2}))
    assert_store_sound(engine_factory)


def assert_refused_after_waiting_for_a_purge(backend: Backend, sid: str,
                                             command: Callable[[], object]) -> None:
    """`command` (an append to `sid`), started while a purge of `sid` holds its lock, waits
    for the purge to commit, then raises SessionPurged and writes nothing."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(command())
        except SessionLedgerError as error:
            outcome.append(error)

    with purging_transaction(backend, sid) as commit:
        thread = threading.Thread(target=run)
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive(), f"the append did not wait for the purge: {outcome}"
        commit()
    thread.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], SessionPurged), outcome
    assert leftovers(backend, sid) == (0, 0)


def test_verify_while_a_session_is_purged(
    backend: Backend, engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """verify() lists the snapshots, then a purge commits, then the walk reads the events: the
    purged session's listed snapshots are no damage (it said "snapshot of a session with no
    events")."""
    from sessionledger.verify import Verifier

    checker, purger = engine_factory(), engine_factory()
    kept = checker.create("kept")
    checker.save(kept)
    sid = checker.create("s")
    checker.save(sid)  # a snapshot at version 2
    real = Verifier._snapshot_versions

    def then_purge(self: Verifier, *args: Any) -> dict[str, list[int]]:
        listed = real(self, *args)
        monkeypatch.setattr(Verifier, "_snapshot_versions", real)
        purge(purger, sid)
        return listed

    monkeypatch.setattr(Verifier, "_snapshot_versions", then_purge)
    report = checker.verify()
    assert report.ok, report.problems
    assert (report.sessions, report.snapshots) == (1, 1)


@pytest.mark.parametrize(("fold", "after"), [
    ("catch_up", "window"), ("rebuild", "window"), ("rebuild", "drop_purged_next"),
])
def test_a_purge_while_the_catalog_folds_the_session(
    backend: Backend, engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
    fold: str, after: str,
) -> None:
    """The catalog has read a window holding a session's events (or a rebuild has dropped the
    purged sessions from its tables); a purge of that session in another engine starts before
    the folded rows are written (swapped in). The catalog must not hold the purged session
    afterwards. On PostgreSQL the purge committed in between and the fold wrote the session's
    row back: find() listed a purged session for good."""
    from sessionledger.infrastructure.catalog_store import CatalogStore

    folder, purger = engine_factory(), engine_factory()
    kept = folder.create("kept")
    sid = folder.create("doomed")
    folder.end(sid)
    if fold == "rebuild":
        folder.find()  # the live catalog is current: the rebuild's own window is the one
    real = getattr(CatalogStore, after)
    purges: list[threading.Thread] = []

    def then_purge(self: CatalogStore, *args: Any) -> Any:
        done = real(self, *args)
        monkeypatch.setattr(CatalogStore, after, real)
        # cleanup()'s purge step itself: its own catch-up, which would wait for the fold's
        # transaction, ran before the fold began (a cleanup in another engine a moment earlier)
        thread = threading.Thread(target=purger._purge, args=(sid, "doomed", "COMPLETED"))
        thread.start()
        purges.append(thread)
        thread.join(timeout=0.5)  # done now, unless the fold's transaction holds it off
        return done

    monkeypatch.setattr(CatalogStore, after, then_purge)
    if fold == "rebuild":
        folder.rebuild("catalog")
    else:
        folder.find()
    assert len(purges) == 1
    purges[0].join(timeout=30)
    assert not purges[0].is_alive()
    assert [s.id for s in folder.find()] == [kept]
    assert [s.id for s in engine_factory().find()] == [kept]
    assert_store_sound(engine_factory)
