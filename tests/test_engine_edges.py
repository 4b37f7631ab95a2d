"""Less common uses of an engine found by review: close() with a background runner, an
interrupt out of a hook, two engines rebuilding the catalog at once."""

from __future__ import annotations

import time

import pytest
from _helpers import Backend
from conftest import EngineFactory

from sessionledger import (
    ProjectionOutdated,
    SessionEngine,
    SessionEvent,
    StorageError,
    SubscriberFailed,
)


def test_close_stops_the_background_runner(engine_factory: EngineFactory) -> None:
    engine, other = engine_factory(), engine_factory()
    seen: list[int] = []
    engine.subscribe("counter", lambda event: seen.append(event.position))
    runner = engine.run_subscribers()
    other.create("before")
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen, "the runner delivered nothing"
    engine.close()
    assert not runner.running
    delivered = len(seen)
    other.create("after")  # nobody runs this engine's subscribers any more
    time.sleep(0.3)
    assert len(seen) == delivered and not runner.errors
    with pytest.raises(StorageError, match="closed"):
        list(engine.timeline())
    with pytest.raises(StorageError, match="closed"):
        engine.run_subscribers()


def test_an_interrupt_out_of_a_hook_does_not_leak_into_the_next_command(
    engine_factory: EngineFactory,
) -> None:
    engine = engine_factory(lifecycle_hooks=False)
    child = engine.create("child")
    parent = engine.create("parent")
    seen: list[tuple[str, int]] = []

    def hook(event: SessionEvent) -> None:
        seen.append((event.session_id, event.version))
        if event.session_id == parent and event.version == 2:
            engine.update(child, {"from": "hook"})  # queued behind this delivery
            raise KeyboardInterrupt

    engine.hooks.subscribe(hook)
    with pytest.raises(KeyboardInterrupt):
        engine.update(parent, {"x": 1})
    assert engine.get(child).version == 2  # the hook's command committed
    seen.clear()
    engine.update(parent, {"x": 2}, actor="next")
    assert seen == [(parent, 3)], "the interrupted delivery's queue reached this command"


def test_two_engines_rebuilding_the_catalog_at_once(engine_factory: EngineFactory) -> None:
    """The second engine swaps its rebuilt tables in while the first is half way: the first
    returns 0 (the catalog was rebuilt), not an error about a missing table."""
    first, second = engine_factory(), engine_factory()
    ids = [first.create(f"s{i}", tags=["t"]) for i in range(12)]
    first._catalog.rebuild_batch = 4  # several batches
    swapped: list[int] = []

    def progress(done: int, head: int, rate: float) -> None:
        if done > 0 and not swapped:  # after the first window
            swapped.append(second.rebuild("catalog"))

    assert first.rebuild("catalog", progress=progress) == 0
    assert swapped == [8]  # it went on from where the first had got to (4 of 12)
    for engine in (first, second, engine_factory()):
        assert sorted(s.id for s in engine.find(tags=["t"])) == sorted(ids)
    assert first.rebuild("catalog") == 12  # and the next rebuild runs as usual


def test_a_closed_engine_refuses_every_read(engine_factory: EngineFactory) -> None:
    engine: SessionEngine = engine_factory()
    sid = engine.create("s")
    engine.close()
    for read in (lambda: engine.get(sid), lambda: engine.history(sid), engine.find,
                 lambda: list(engine.timeline()), engine.verify):
        with pytest.raises(StorageError, match="closed"):
            read()


def test_a_failing_rebuild_is_an_error_not_a_rebuild_done_elsewhere(
    backend: Backend, engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A storage error during a rebuild of an outdated catalog is raised, even when the
    "_next" tables are not there (it must not pass for another engine's finished rebuild)."""
    engine = engine_factory(auto_rebuild=False)
    engine.create("s")
    engine.find()
    backend.sql("UPDATE sl_meta SET value = '999' WHERE key = 'projection:catalog'")
    outdated = engine_factory(auto_rebuild=False)
    catalog = outdated._catalog

    def fail(progress: object, swaps: int) -> int:
        with catalog.subscriptions.transaction("catalog:rebuild") as (conn, _):
            conn.exec_driver_sql("DROP TABLE sl_catalog_tags_next")
            conn.exec_driver_sql("DROP TABLE sl_catalog_next")
        raise StorageError("the connection was lost")

    monkeypatch.setattr(catalog, "_fill_and_swap", fail)
    with pytest.raises(StorageError, match="lost"):
        outdated.rebuild("catalog")
    with pytest.raises(ProjectionOutdated):
        outdated.find()


def test_a_transactional_handler_issuing_a_command(
    backend: Backend, engine_factory: EngineFactory,
) -> None:
    """On SQLite the handler's transaction holds the write lock the command needs: the command
    fails at once (it waited 30 s for itself, then said "database is locked"). PostgreSQL
    takes it."""
    engine = engine_factory()
    sid = engine.create("s")
    note = engine.create("notes")

    def handler(event: SessionEvent, conn: object) -> None:
        if event.session_id == sid:
            engine.record(note, "seen", {"version": event.version})

    engine.subscribe("noter", handler, transactional=True, events=["SessionStarted"])
    started = time.monotonic()
    if backend.kind == "sqlite":
        with pytest.raises(SubscriberFailed) as failed:
            engine.run_subscribers(until_idle=True)
        assert time.monotonic() - started < 5
        assert isinstance(failed.value.__cause__, StorageError)
        assert "wait for itself" in str(failed.value.__cause__)
        assert engine.get(note).version == 1
    else:
        assert engine.run_subscribers(until_idle=True)["noter"] == 2
        assert engine.get(note).version == 2


def test_reads_survive_lost_postgresql_connections(pg_backend: Backend) -> None:
    """The server drops the engine's connections while they are idle (a restart, a failover):
    reads work at once (a pooled connection is checked at checkout, the engine's own one is
    taken again and the read retried), and commands work after that."""
    import psycopg

    with SessionEngine(pg_backend.url) as engine:
        sid = engine.create("s")
        engine.update(sid, {"a": 1})
        own = engine._store._db.info.backend_pid
        pooled = [pid for (pid,) in engine._store.scan("SELECT pg_backend_pid()")]
        assert pg_backend.pg_url is not None
        with psycopg.connect(pg_backend.pg_url, autocommit=True) as admin:
            for pid in {own, *pooled}:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        time.sleep(0.2)
        assert [e.version for e in engine.timeline()] == [1, 2]
        assert engine.verify().ok
        assert [s.id for s in engine.find()] == [sid]
        assert engine.get(sid, refresh=True).state == {"a": 1}
        assert engine.update(sid, {"a": 2}) == 3


def test_a_catalog_built_by_a_newer_release_is_not_rebuilt_back(
    backend: Backend, engine_factory: EngineFactory,
) -> None:
    """Old engines next to new ones (a rolling upgrade) would otherwise rebuild the catalog back
    and forth: an older projection leaves a newer catalog alone unless asked."""
    from sessionledger.projections.catalog import CATALOG_VERSION

    first = engine_factory()
    sid = first.create("s")
    first.find()  # the catalog is built, and its version recorded
    newer = str(CATALOG_VERSION + 1)
    backend.sql("UPDATE sl_meta SET value = ? WHERE key = 'projection:catalog'", (newer,))
    old = engine_factory()  # auto_rebuild on, the default
    assert backend.sql("SELECT value FROM sl_meta WHERE key = 'projection:catalog'") == [(newer,)]
    with pytest.raises(ProjectionOutdated, match="newer release"):
        old.find()
    assert old.get(sid).version == 1  # commands and reads of the log still work
    old.rebuild("catalog")  # asked for: this release's catalog
    assert [s.id for s in old.find()] == [sid]
    assert backend.sql("SELECT value FROM sl_meta WHERE key = 'projection:catalog'") == [
        (str(CATALOG_VERSION),)]
