"""The catalog read model: find() with filters and keyset pages, exactly-once upkeep, rebuilds."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _helpers import Backend
from conftest import EngineFactory

from sessionledger import (
    InvalidArgument,
    ProjectionOutdated,
    RetentionPolicy,
    SessionEngine,
    SessionStatus,
)
from sessionledger.gc_pause import gc_paused


def catalog_rows(backend: Backend) -> list[tuple[object, ...]]:
    return backend.sql("SELECT * FROM sl_catalog ORDER BY session_id")


def tag_rows(backend: Backend) -> list[tuple[object, ...]]:
    return backend.sql("SELECT tag, session_id FROM sl_catalog_tags ORDER BY tag, session_id")


def populate(engine: SessionEngine) -> dict[str, str]:
    """A small realistic set of sessions in every status; returns name -> id."""
    ids: dict[str, str] = {}
    ids["agent"] = engine.create("agent-run", tags=["agent", "gpu"], actor="alice")
    engine.update(ids["agent"], {"step": 1})
    engine.checkpoint(ids["agent"], "cp-1")
    ids["child"] = engine.create("fetch", parent=ids["agent"], tags=["agent"], actor="bot")
    ids["paused"] = engine.create("notebook", tags=["user"], actor="bob")
    engine.suspend(ids["paused"])
    ids["done"] = engine.create("report", tags=["user", "gpu"])
    engine.end(ids["done"], outcome="completed")
    ids["failed"] = engine.create("import", tags=["batch"])
    engine.end(ids["failed"], outcome="failed")
    ids["archived"] = engine.create("old", tags=["batch"])
    engine.end(ids["archived"], outcome="cancelled")
    engine.archive(ids["archived"])
    return ids


def test_catalog_rows_follow_every_event(engine_factory: EngineFactory) -> None:
    engine = engine_factory()
    ids = populate(engine)
    page = engine.find(limit=100)
    by_id = {item.id: item for item in page}
    assert set(by_id) == set(ids.values())
    agent = by_id[ids["agent"]]
    assert (agent.name, agent.status, agent.version, agent.event_count) == (
        "agent-run", SessionStatus.ACTIVE, 3, 3)
    assert agent.tags == ["agent", "gpu"] and agent.created_by == "alice"
    assert agent.last_checkpoint == "cp-1"
    assert by_id[ids["child"]].parent == ids["agent"]
    assert by_id[ids["paused"]].status is SessionStatus.SUSPENDED
    assert by_id[ids["done"]].status is SessionStatus.COMPLETED
    assert by_id[ids["failed"]].status is SessionStatus.FAILED
    assert by_id[ids["archived"]].status is SessionStatus.ARCHIVED
    session = engine.get(ids["agent"])
    assert agent.updated_at == session.updated_at and agent.created_at == session.created_at
    # newest update first
    updated = [item.updated_at for item in page]
    assert updated == sorted(updated, reverse=True)


def test_find_filters(engine_factory: EngineFactory) -> None:
    engine = engine_factory()
    ids = populate(engine)

    def found(**filters: object) -> set[str]:
        return {item.id for item in engine.find(**filters)}  # type: ignore[arg-type]

    assert found(status="ACTIVE") == {ids["agent"], ids["child"]}
    assert found(status=SessionStatus.SUSPENDED) == {ids["paused"]}
    assert found(status=["completed", "FAILED"]) == {ids["done"], ids["failed"]}
    assert found(tags=["agent"]) == {ids["agent"], ids["child"]}
    assert found(tags=["gpu", "user"]) == {ids["done"]}  # every tag must be there
    assert found(tags=["gpu"], status="ACTIVE") == {ids["agent"]}
    assert found(name="notebook") == {ids["paused"]}
    assert found(parent=ids["agent"]) == {ids["child"]}
    assert found(tags=["nope"]) == set()
    middle = engine.get(ids["paused"]).updated_at
    newer = found(updated_after=middle)
    older = found(updated_before=middle)
    assert ids["paused"] not in newer | older
    assert newer | older | {ids["paused"]} == set(ids.values())
    assert found(updated_after=middle.isoformat()) == newer


def test_keyset_pages_cover_everything_once(engine_factory: EngineFactory) -> None:
    engine = engine_factory()
    created = {engine.create(f"s{i}", tags=["t"]) for i in range(23)}
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = engine.find(tags=["t"], limit=5, cursor=cursor)
        seen.extend(item.id for item in page)
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert pages == 5 and len(seen) == 23 and set(seen) == created
    with pytest.raises(InvalidArgument):
        engine.find(cursor="not-a-cursor")
    # the time part of a cursor must be ASCII digits: '\u00b2' is a digit to str.isdigit()
    # that int() refuses, '\u0661\u0662' Arabic-Indic digits that int() reads
    assert cursor is not None
    for digits in ("\u00b2" * 16, "\u0661\u0662", "+12", "1_2"):
        with pytest.raises(InvalidArgument, match="invalid cursor"):
            engine.find(cursor=f"{digits}.{cursor.partition('.')[2]}")


@pytest.mark.parametrize("bad", [
    {"status": "SLEEPING"}, {"tags": "x" * 0 or 5}, {"limit": 0}, {"limit": "10"},
    {"updated_after": "yesterday"}, {"updated_before": 12}, {"parent": "not-a-uuid"},
])
def test_find_rejects_bad_arguments(engine: SessionEngine, bad: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        engine.find(**bad)  # type: ignore[arg-type]


def test_find_reads_other_engines_writes(engine_factory: EngineFactory) -> None:
    a, b = engine_factory(), engine_factory()
    sid = a.create("from-a", tags=["x"])
    assert [item.id for item in b.find(tags=["x"])] == [sid]
    a.end(sid)
    assert b.find(tags=["x"])[0].status is SessionStatus.COMPLETED


def test_catalog_is_applied_exactly_once_by_concurrent_engines(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    engines = [engine_factory() for _ in range(3)]
    sid = engines[0].create("shared")
    for n in range(30):
        engines[n % 3].update(sid, {"n": n})
        engines[(n + 1) % 3].find()  # each engine folds what is pending, taking turns
    for engine in engines:
        engine.run_subscribers(until_idle=True)
    row = engines[0].find()[0]
    assert (row.version, row.event_count) == (31, 31)


def test_rebuilt_catalog_equals_the_live_one(engine_factory: EngineFactory,
                                             backend: Backend) -> None:
    engine = engine_factory()
    populate(engine)
    engine.find()  # live catalog up to date
    live, live_tags = catalog_rows(backend), tag_rows(backend)
    assert live
    reports: list[tuple[int, int, float]] = []
    folded = engine.rebuild("catalog", progress=lambda d, h, r: reports.append((d, h, r)))
    assert folded == sum(row[8] for row in live)  # every event of the log  # type: ignore
    assert catalog_rows(backend) == live and tag_rows(backend) == live_tags
    assert reports and reports[-1][0] == reports[-1][1]
    # still kept current after the swap
    sid = engine.create("after-rebuild", tags=["new"])
    assert [item.id for item in engine.find(tags=["new"])] == [sid]
    # and a second rebuild works too (index and key names survived the swap)
    engine.rebuild("catalog")
    assert len(catalog_rows(backend)) == len(live) + 1


def test_a_rebuild_leaves_secure_delete_as_it_found_it(tmp_path: Path) -> None:
    """The swap drops the old catalog with SQLite's secure_delete at FAST (it holds only what
    the events hold) and must put the connection's setting back: a purge on that pooled
    connection later must zero what it frees if the build says so. (A SQLite setting:
    PostgreSQL has nothing to restore.)"""
    with SessionEngine(f"sqlite:///{tmp_path / 'secure.db'}") as engine:
        populate(engine)
        engine.find()
        pool_engine = engine._store.engine
        with pool_engine.connect() as conn:
            before = conn.exec_driver_sql("PRAGMA secure_delete").scalar()
        seen: list[int] = []
        while_dropping: list[int] = []

        def secure_delete(dbapi_connection: Any) -> int:
            return int(dbapi_connection.execute("PRAGMA secure_delete").fetchone()[0])

        def on_checkin(dbapi_connection: Any, _record: object) -> None:
            seen.append(secure_delete(dbapi_connection))

        def on_execute(conn: sa.Connection, _cursor: object, statement: str, *_: object) -> None:
            if statement.startswith("DROP TABLE IF EXISTS sl_catalog"):
                while_dropping.append(secure_delete(conn.connection.dbapi_connection))

        sa.event.listen(pool_engine, "checkin", on_checkin)
        sa.event.listen(pool_engine, "before_cursor_execute", on_execute)
        try:
            engine.rebuild("catalog")
        finally:
            sa.event.remove(pool_engine, "checkin", on_checkin)
            sa.event.remove(pool_engine, "before_cursor_execute", on_execute)
        assert while_dropping == [2, 2]  # FAST while the old tables are dropped
        assert seen and set(seen) == {before}


def test_interrupted_rebuild_resumes(engine_factory: EngineFactory, backend: Backend) -> None:
    engine = engine_factory()
    populate(engine)
    engine.find()
    live = catalog_rows(backend)

    class Interrupt(Exception):
        pass

    def stop_after_first_batch(done: int, head: int, rate: float) -> None:
        if done > 0:  # the first call says where the rebuild starts (0)
            raise Interrupt

    small = engine_factory()
    small._catalog.rebuild_batch = 3  # several batches
    with pytest.raises(Interrupt):
        small.rebuild("catalog", progress=stop_after_first_batch)
    tracked = backend.sql("SELECT position FROM sl_tracking WHERE name = 'catalog:rebuild'")
    assert tracked and tracked[0][0] > 0
    assert catalog_rows(backend) == live  # the live catalog untouched meanwhile
    small.rebuild("catalog")
    assert catalog_rows(backend) == live
    assert backend.sql("SELECT COUNT(*) FROM sl_tracking WHERE name = 'catalog:rebuild'") == [(0,)]


def test_a_session_purged_during_a_rebuild_stays_out_of_the_rebuilt_catalog(
        engine_factory: EngineFactory, backend: Backend) -> None:
    """A purge deletes the live catalog row; a rebuild under way has folded the session into
    its "_next" tables already, and its swap must not bring the row back."""
    engine = engine_factory()
    ids = populate(engine)
    engine.find()

    class Interrupt(Exception):
        pass

    def stop(done: int, head: int, rate: float) -> None:
        if done > 0:  # after the first window
            raise Interrupt

    small = engine_factory()
    small._catalog.rebuild_batch = 1000  # the whole log in the first window
    with pytest.raises(Interrupt):
        small.rebuild("catalog", progress=stop)
    report = engine.cleanup(RetentionPolicy(keep_last=0, purge=True))
    assert ids["done"] in report.session_ids and ids["failed"] in report.session_ids
    live = catalog_rows(backend)
    assert ids["done"] not in {row[0] for row in live}
    small.rebuild("catalog")  # resumes, and swaps
    assert catalog_rows(backend) == live
    assert ids["done"] not in {s.id for s in engine.find(limit=1000)}
    assert ids["done"] not in {session_id for _, session_id in tag_rows(backend)}


def test_outdated_projection_is_rebuilt_or_refused(engine_factory: EngineFactory,
                                                   backend: Backend) -> None:
    engine = engine_factory()
    populate(engine)
    engine.find()
    live = catalog_rows(backend)
    backend.sql("UPDATE sl_meta SET value = '0' WHERE key = 'projection:catalog'")
    backend.sql("DELETE FROM sl_catalog")  # what an old projection left is thrown away
    refusing = engine_factory(auto_rebuild=False)
    with pytest.raises(ProjectionOutdated) as raised:
        refusing.find()
    assert "rebuild" in str(raised.value)
    engine_factory()  # auto_rebuild=True (the default) rebuilds at start-up
    assert catalog_rows(backend) == live
    assert backend.sql("SELECT value FROM sl_meta WHERE key = 'projection:catalog'") == [("1",)]


@pytest.mark.timeout(120)
def test_find_over_many_sessions_is_indexed(engine_factory: EngineFactory,
                                            backend: Backend) -> None:
    """A plan check, not a timing: the status and tag queries use the catalog's indexes."""
    engine = engine_factory(durability="normal", lifecycle_hooks=False)
    for i in range(300):
        engine.create(f"s{i}", tags=[f"t{i % 7}"])
    engine.find()
    started = time.perf_counter()
    page = engine.find(status="ACTIVE", tags=["t3"], limit=10)
    assert len(page) == 10
    assert time.perf_counter() - started < 5.0  # generous: catches a runaway scan only
    if backend.kind == "sqlite":
        plan = " ".join(str(r) for r in backend.sql(
            "EXPLAIN QUERY PLAN SELECT session_id FROM sl_catalog c WHERE c.status = 'ACTIVE' "
            "ORDER BY c.updated_ts DESC, c.session_id DESC LIMIT 10"))
        assert "ix_sl_catalog_status_updated" in plan


def test_updated_at_filters_accept_naive_and_aware(engine: SessionEngine) -> None:
    sid = engine.create("a")
    later = datetime.now(UTC) + timedelta(hours=1)
    assert [i.id for i in engine.find(updated_before=later)] == [sid]
    assert [i.id for i in engine.find(updated_before=later.replace(tzinfo=None))] == [sid]
    assert list(engine.find(updated_after=later)) == []


def test_catalog_equals_folding_every_event_one_by_one(engine_factory: EngineFactory) -> None:
    """The window fold (SQL GROUP BY + the few special events) against the reference fold."""
    from sessionledger.projections.catalog import fold, summary

    engine = engine_factory()
    ids = populate(engine)
    for n in range(5):
        engine.update(ids["agent"], {"n": n})
        engine.record(ids["child"], "tool", {"n": n})
    engine.resume(ids["paused"])
    engine.checkpoint(ids["paused"], "later")
    expected = {}
    for sid in ids.values():
        entry = None
        for event in engine.history(sid):
            entry = fold(entry, sid, event.version, event.type,
                         int(event.timestamp.timestamp() * 1_000_000), event.actor, event.data)
        assert entry is not None
        expected[sid] = summary(entry)
    assert {item.id: item for item in engine.find()} == expected


def test_tags_json_is_json_dumps_and_its_cache_stays_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from sessionledger import catalog as catalog_module

    monkeypatch.setattr(catalog_module, "_TAGS_JSON", {})
    monkeypatch.setattr(catalog_module, "_TAGS_JSON_LIMIT", 3)
    cases = [[], ["agent"], ["a", "b"], ['quo"te', "back\\slash"], ["ünï", "日本"], ["agent"]]
    for tags in cases:
        assert catalog_module._tags_json(tags) == json.dumps(tags, ensure_ascii=False)
    assert len(catalog_module._TAGS_JSON) <= 3


TRICKY_TAGS = ['quo"te', "back\\slash", "ünï", "日本", "🙂", "nb\u00a0sp", "line\u2028sep", "123",
               "null", "[1]"]


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_rebuild_in_small_windows_resumes_to_the_live_rows_and_tags(
        engine_factory: EngineFactory, backend: Backend, batch: int) -> None:
    """Sessions started in an earlier window than their later events (a stored "_next" row to
    fold onto), tags filled from the rows at the swap whatever an interrupted run left there."""
    engine = engine_factory()
    ids = populate(engine)
    odd = engine.create("odd", tags=TRICKY_TAGS, actor="carol")
    for n in range(3):
        engine.update(ids["agent"], {"n": n})
        engine.update(odd, {"n": n})
    engine.checkpoint(odd, "late")
    engine.suspend(odd)
    engine.resume(odd)
    engine.create("untagged")
    engine.find()
    live, live_tags = catalog_rows(backend), tag_rows(backend)
    assert {tag for tag, sid in live_tags if sid == odd} == set(TRICKY_TAGS)

    class Interrupt(Exception):
        pass

    calls: list[int] = []

    def stop_after_two_windows(done: int, head: int, rate: float) -> None:
        calls.append(done)
        if len(calls) == 3:  # the starting point, then two windows
            raise Interrupt

    small = engine_factory()
    small._catalog.rebuild_batch = batch
    with pytest.raises(Interrupt):
        small.rebuild("catalog", progress=stop_after_two_windows)
    assert backend.sql("SELECT COUNT(*) FROM sl_catalog_next")[0][0] > 0  # type: ignore[operator]
    # what an interrupted run (or an older release, which wrote tags window by window) may have
    # left in the rebuild's tag table: replaced at the swap
    backend.sql("INSERT INTO sl_catalog_tags_next (tag, session_id) VALUES (?, ?)", ("stale", odd))
    backend.sql("INSERT INTO sl_catalog_tags_next (tag, session_id) VALUES (?, ?)",
                ("agent", ids["agent"]))
    small.rebuild("catalog")
    assert catalog_rows(backend) == live
    assert tag_rows(backend) == live_tags
    assert [item.id for item in small.find(tags=["日本", 'quo"te'])] == [odd]
    # the live catalog keeps its tags current after the swap, window by window again
    sid = engine.create("after", tags=["🙂"])
    assert {item.id for item in engine.find(tags=["🙂"])} == {odd, sid}


def test_large_windows_fold_with_the_collector_paused_and_restore_it(
        engine_factory: EngineFactory, backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from sessionledger import catalog as catalog_module

    engine = engine_factory()
    populate(engine)
    engine.find()
    live, live_tags = catalog_rows(backend), tag_rows(backend)
    monkeypatch.setattr(catalog_module, "_GC_PAUSE_MIN", 1)  # every window "large"
    seen: list[bool] = []
    fold_window = catalog_module.CatalogConsumer._fold_window

    def spy(self: object, *args: object) -> int:
        seen.append(gc.isenabled())
        return fold_window(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(catalog_module.CatalogConsumer, "_fold_window", spy)
    assert gc.isenabled()
    engine.rebuild("catalog")
    assert seen and not any(seen) and gc.isenabled()
    assert catalog_rows(backend) == live and tag_rows(backend) == live_tags
    gc.disable()  # a caller's choice is left alone
    try:
        engine.rebuild("catalog")
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ZeroDivisionError), gc_paused():
        1 / 0  # noqa: B018
    assert gc.isenabled()


def test_a_rebuild_reads_each_next_windows_totals_ahead(
        engine_factory: EngineFactory, backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The totals read ahead (one JSON document, on a connection of their own) are the totals
    the fold would read itself, and a rebuild of several windows takes them."""
    from sessionledger.infrastructure.catalog_store import CatalogStore

    engine = engine_factory()
    populate(engine)
    engine.find()
    live = catalog_rows(backend)
    tables = engine._catalog.tables
    head = engine._catalog.subscriptions.head()
    with engine._store.engine.connect() as conn:
        own = tables.window(conn, 3, head - 2, ["SessionStarted"])[0]
    assert sorted(map(tuple, tables.read_totals(3, head - 2))) == sorted(own)
    assert tables.read_totals(head, head + 10) == []

    taken: list[bool] = []
    real = CatalogStore.window

    def window(self: CatalogStore, conn: Any, after: int, upto: int, special: Any,
               totals: Any = None) -> Any:
        taken.append(totals is not None)
        return real(self, conn, after, upto, special, totals)

    monkeypatch.setattr(CatalogStore, "window", window)
    small = engine_factory()
    small._catalog.rebuild_batch = 4
    assert small.rebuild("catalog") == head
    assert catalog_rows(backend) == live
    # every window but the first was read ahead
    assert len(taken) == -(-head // 4) and taken == [False] + [True] * (len(taken) - 1)


def test_totals_read_ahead_of_a_purge_skip_the_purged_session(
        engine_factory: EngineFactory, backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Totals read ahead may count a session that a purge deleted before its window was
    folded (its start included): the fold leaves it out. A session counted there that never
    started and was not purged is damage, as before."""
    from sessionledger import CorruptedData
    from sessionledger.infrastructure.catalog_store import CatalogStore

    engine = engine_factory()
    populate(engine)
    gone = engine.create("gone")
    engine.end(gone)
    assert gone in engine.cleanup(RetentionPolicy(max_age=0, purge=True)).session_ids
    live = catalog_rows(backend)
    real = CatalogStore.read_totals
    extra = [gone, 2, 1, 2]

    def read_before_the_purge(self: CatalogStore, after: int, upto: int) -> Any:
        return [*real(self, after, upto), extra]

    monkeypatch.setattr(CatalogStore, "read_totals", read_before_the_purge)
    small = engine_factory()
    small._catalog.rebuild_batch = 3
    small.rebuild("catalog")
    assert catalog_rows(backend) == live
    extra[0] = "01a21600-0000-7000-8000-000000000000"  # no tombstone: damage
    with pytest.raises(CorruptedData, match="never started"):
        small.rebuild("catalog")
