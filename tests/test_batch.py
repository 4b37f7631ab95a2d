"""Batch operations: save_all_active, restore_recent, cleanup with retention policies."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from _helpers import Backend
from conftest import EngineFactory

from sessionledger import (
    InvalidArgument,
    RetentionPolicy,
    SessionEngine,
    SessionNotFound,
    SessionPurged,
    SessionStatus,
    StorageError,
)


def count(backend: Backend, table: str, sid: str) -> int:
    return int(backend.sql(f"SELECT COUNT(*) FROM {table} WHERE session_id = ?", (sid,))[0][0])


# -- save_all_active ----------------------------------------------------------------------------


def test_save_all_active_saves_only_active_sessions(engine_factory: EngineFactory,
                                                    backend: Backend) -> None:
    engine = engine_factory(snapshot_every=0)
    active = [engine.create(f"a{i}", state={"i": i}) for i in range(5)]
    paused = engine.create("p")
    engine.suspend(paused)
    done = engine.create("d")
    engine.end(done)
    saved = engine.save_all_active(actor="ops")
    assert saved == {sid: 2 for sid in active}
    reader = engine_factory(max_active_sessions=0)
    for sid in active:
        events = reader.history(sid)
        assert events[-1].type == "SessionSaved" and events[-1].actor == "ops"
        assert reader.get(sid).last_saved_version == 2
        assert count(backend, "sl_snapshots", sid) == 1
    for sid in (paused, done):
        assert count(backend, "sl_snapshots", sid) == 0
        assert reader.get(sid).version == 2


def test_save_all_active_sees_sessions_of_other_engines(engine_factory: EngineFactory) -> None:
    a, b = engine_factory(), engine_factory()
    sid = a.create("from-a")
    b_sid = b.create("from-b")
    assert set(b.save_all_active()) == {sid, b_sid}
    assert a.get(sid, refresh=True).last_saved_version == 2


def test_save_all_active_is_all_or_nothing(engine_factory: EngineFactory, backend: Backend,
                                           monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    engine = engine_factory(snapshot_every=0)
    sids = [engine.create(f"s{i}") for i in range(4)]
    # the events of the batch are inserted, then the snapshot insert fails: nothing may stay
    statement = "upsert_snapshot" if backend.kind == "sqlite" else "upsert_snapshots_many"
    monkeypatch.setattr(engine._store._sql, statement,
                        "INSERT INTO no_such_table VALUES (?, ?, ?, ?, ?, ?, ?)")
    with caplog.at_level(logging.WARNING, logger="psycopg"), pytest.raises(StorageError):
        engine.save_all_active()
    # (PostgreSQL: the snapshots are one statement, not a pipelined executemany that logged
    # "error ignored terminating Pipeline" when it failed)
    assert not [r for r in caplog.records if r.name.startswith("psycopg")], caplog.text
    monkeypatch.undo()
    for sid in sids:
        assert count(backend, "sl_events", sid) == 1
        assert count(backend, "sl_snapshots", sid) == 0
        assert engine.get(sid).version == 1  # the working set was not left half-applied
    assert set(engine.save_all_active()) == set(sids)


# -- restore_recent -----------------------------------------------------------------------------


def test_restore_recent_after_a_restart(engine_factory: EngineFactory) -> None:
    before = engine_factory()
    sids = [before.create(f"s{i}", state={"i": i}) for i in range(6)]
    before.suspend(sids[4])
    before.end(sids[5])
    before.update(sids[0], {"i": 100})  # the most recently updated
    before.close()
    after = engine_factory()
    restored = after.restore_recent(3, actor="boot")
    assert [s.id for s in restored] == [sids[0], sids[4], sids[3]]
    assert restored[1].status is SessionStatus.SUSPENDED  # status kept
    assert restored[0].state == {"i": 100}
    for session in restored:
        last = after.history(session.id)[-1]
        assert last.type == "SessionRestored" and last.actor == "boot"
        assert last.data["reason"] == "recovery"
        assert after.get(session.id).version == session.version
    assert after.restore_recent(0) == []
    with pytest.raises(InvalidArgument):
        after.restore_recent(-1)


# -- cleanup ------------------------------------------------------------------------------------


def ended_sessions(engine: Any, n: int) -> list[str]:
    sids = []
    for i in range(n):
        sid = engine.create(f"e{i}")
        engine.end(sid, outcome="completed" if i % 2 else "failed")
        sids.append(sid)
    return sids


def test_cleanup_dry_run_touches_nothing(engine_factory: EngineFactory, backend: Backend) -> None:
    engine = engine_factory()
    sids = ended_sessions(engine, 3)
    live = engine.create("live")
    report = engine.cleanup(RetentionPolicy(max_age=0, purge=True, dry_run=True))
    assert set(report.session_ids) == set(sids) and report.dry_run
    assert report.purged == [] and report.archived == []
    for sid in sids:
        assert count(backend, "sl_events", sid) == 2
    assert live not in report.session_ids


def test_cleanup_archives_old_ended_sessions_keeping_the_last(
    engine_factory: EngineFactory,
) -> None:
    engine = engine_factory()
    sids = ended_sessions(engine, 5)  # sids[4] ended last
    active = engine.create("active")
    report = engine.cleanup(RetentionPolicy(max_age=timedelta(0), keep_last=2))
    assert report.action == "archive"
    assert set(report.archived) == set(sids[:3])
    for sid in sids[:3]:
        assert engine.get(sid).status is SessionStatus.ARCHIVED
    for sid in sids[3:]:
        assert engine.get(sid).status is not SessionStatus.ARCHIVED
    assert engine.get(active).status is SessionStatus.ACTIVE
    # nothing is old enough under a long max_age
    assert engine.cleanup(RetentionPolicy(max_age=3600)).session_ids == []


def test_cleanup_purge_leaves_a_tombstone(engine_factory: EngineFactory, backend: Backend) -> None:
    engine = engine_factory(snapshot_every=0)
    sid = engine.create("to-purge", tags=["x"])
    engine.save(sid)
    engine.end(sid, outcome="cancelled", idempotency_key="end-1")
    keep = engine.create("keep")
    report = engine.cleanup(RetentionPolicy(max_age=0, purge=True))
    assert report.purged == [sid]
    for table in ("sl_events", "sl_snapshots", "sl_idempotency", "sl_catalog",
                  "sl_catalog_tags"):
        assert count(backend, table, sid) == 0, table
    tomb = backend.sql("SELECT name, final_status FROM sl_tombstones WHERE session_id = ?",
                       (sid,))
    assert tomb == [("to-purge", "CANCELLED")]
    fresh = engine_factory()
    with pytest.raises(SessionPurged) as raised:
        fresh.get(sid)
    assert isinstance(raised.value, SessionNotFound)
    assert "to-purge" in str(raised.value) and "CANCELLED" in str(raised.value)
    with pytest.raises(SessionPurged):
        engine.get(sid)  # not served from the working set either
    assert [item.id for item in fresh.find()] == [keep]
    # the rebuilt catalog agrees: the purged session is gone from the log too
    fresh.rebuild("catalog")
    assert [item.id for item in fresh.find()] == [keep]


def test_a_create_retried_after_a_purge_returns_the_purged_id(
    engine_factory: EngineFactory, backend: Backend,
) -> None:
    """The key of a create outlives a purge: "however much later the retry comes"."""
    engine = engine_factory()
    sid = engine.create("keyed", idempotency_key="create-1")
    engine.update(sid, {"a": 1}, idempotency_key="update-1")
    engine.end(sid)
    engine.cleanup(RetentionPolicy(max_age=0, purge=True))
    assert backend.sql("SELECT scope, key FROM sl_idempotency") == [("create", "create-1")]
    for retrying in (engine, engine_factory()):
        assert retrying.create("keyed", idempotency_key="create-1") == sid
        with pytest.raises(SessionPurged):
            retrying.get(sid)
    assert backend.sql("SELECT COUNT(*) FROM sl_events")[0][0] == 0


@pytest.mark.parametrize("bad", [
    {}, {"max_age": "30d"}, {"max_age": -1}, {"keep_last": -1}, {"keep_last": 1.5},
    {"max_age": 1, "archive": True, "purge": True}, {"max_age": 1, "dry_run": "yes"},
])
def test_bad_retention_policies(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        RetentionPolicy(**bad)


def test_a_purge_leaves_no_copy_of_the_session_in_the_sqlite_files(tmp_path: Path) -> None:
    """Purged for good: the freed pages are zeroed (secure_delete on for the purge, whatever
    the SQLite build) and the WAL, which kept older copies of them, is emptied by cleanup().
    A SQLite matter: PostgreSQL's VACUUM reclaims deleted rows on its own schedule."""
    path = tmp_path / "purge.db"
    with SessionEngine(f"sqlite:///{path}") as engine:
        kept = engine.create("kept", state={"note": "KEPT-MARKER-1234"})
        sid = engine.create("gone", state={"note": "SECRET-MARKER-9876"})
        engine.update(sid, {"more": "SECRET-MARKER-9876"})
        engine.checkpoint(sid, "cp")  # a snapshot holds it too
        engine.end(sid, outcome="completed")
        engine.find()
        report = engine.cleanup(RetentionPolicy(max_age=0, purge=True))
        assert report.purged == [sid]
        files = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
        assert b"SECRET-MARKER" not in b"".join(files.values()), sorted(files)
        assert b"KEPT-MARKER" in b"".join(files.values())
        assert engine.get(kept).state == {"note": "KEPT-MARKER-1234"}
