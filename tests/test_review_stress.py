"""Found by review round 5 (several engine processes on one database): another engine acts at
the one moment that matters, injected here. Each test failed before its fix."""

from __future__ import annotations

import gc
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _helpers import once_after
from conftest import EngineFactory

from sessionledger import (
    ConcurrencyConflict,
    RetentionPolicy,
    SessionConfig,
    SessionEngine,
    SessionPurged,
    SessionStatus,
)


def test_purge_does_not_delete_a_session_archived_meanwhile(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cleanup read the session ended and due; another engine archived it (which makes it
    recent) before the purge's transaction: it was purged anyway, with a COMPLETED tombstone."""
    cleaner, other = engine_factory(), engine_factory()
    first, second = cleaner.create("first"), cleaner.create("second")
    cleaner.end(first)
    cleaner.end(second)
    once_after(monkeypatch, cleaner._writer, "loaded", lambda: other.archive(first),
               when=lambda sid: sid == first)
    report = cleaner.cleanup(RetentionPolicy(max_age=0, purge=True))
    assert report.purged == [second]
    assert cleaner.get(first).status is SessionStatus.ARCHIVED
    assert cleaner._store.tombstone(first) is None
    # still counted (as this engine last saw it: another engine archived it), the purged one not
    counted = {status: n for status, n in cleaner.metrics()["sessions"].items() if n}
    assert counted == {"COMPLETED": 1}


def test_catch_up_returns_while_another_engine_keeps_appending(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """find() brought the catalog to the head, and the head moved on with every step."""
    reader, writer = engine_factory(), engine_factory()
    sid = writer.create("busy")
    runner = reader._catalog.runner
    real_step = runner.step
    steps: list[int] = []

    def step_while_another_appends(consumer: Any) -> int:
        steps.append(1)
        if len(steps) > 20:
            raise AssertionError("catch_up chases the head")
        handled = real_step(consumer)
        writer.update(sid, {"n": len(steps)})
        return handled

    monkeypatch.setattr(runner, "step", step_while_another_appends)
    assert [s.id for s in reader.find()] == [sid]
    assert len(steps) <= 2
    assert reader.run_subscribers(until_idle=True) == {"catalog": 1}


def test_checkpoint_after_a_purge_does_not_wait_for_readers(tmp_path: Path) -> None:
    """A TRUNCATE checkpoint waited the 30 s busy timeout for a reader, holding the write lock:
    every writer stood still meanwhile."""
    path = tmp_path / "s.db"
    with SessionEngine(f"sqlite:///{path}") as engine:
        sid = engine.create("a")
        reader = sqlite3.connect(path)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM sl_events").fetchall()  # a snapshot held open
        try:
            engine.update(sid, {"x": 1})  # a WAL frame the reader's snapshot predates
            started = time.monotonic()
            engine._store.checkpoint()
            waited = time.monotonic() - started
            wrote = threading.Thread(target=engine.update, args=(sid, {"x": 2}))
            wrote.start()
            wrote.join(10)
            assert not wrote.is_alive()
        finally:
            reader.rollback()
            reader.close()
        assert waited < 5  # not the busy timeout (30 s)
        assert engine.get(sid).state == {"x": 2}


def test_sqlite_load_racing_a_purge_raises_session_purged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SQLite reads the snapshot and the events apart: a purge between the two read as a
    snapshot without its events, "SnapshotCorrupted" (strict) or a skipped-snapshot warning."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    with SessionEngine(url) as writer, SessionEngine(
        url, SessionConfig(max_active_sessions=0, strict_snapshots=True)
    ) as reader:
        sid = writer.create("a")
        writer.save(sid)  # a snapshot at version 2
        writer.end(sid)
        once_after(monkeypatch, reader._store, "latest_snapshot",
                   lambda: writer._purge(sid, "a", "COMPLETED"))
        with pytest.raises(SessionPurged):
            reader.get(sid)
        assert reader.metrics()["snapshots_skipped"] == {}


def test_restore_of_a_session_purged_meanwhile_raises_session_purged(
    engine_factory: EngineFactory,
) -> None:
    holder, other = engine_factory(), engine_factory()
    sid = holder.create("a")
    holder.checkpoint(sid, "cp")  # holder keeps the ACTIVE session in its working set
    other.end(sid)
    other._purge(sid, "a", "COMPLETED")
    with pytest.raises(SessionPurged):
        holder.restore(sid, checkpoint="cp")
    with pytest.raises(SessionPurged):  # the stale copy is gone too
        holder.get(sid)


def test_list_sessions_leaves_out_a_session_purged_meanwhile(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    lister, other = engine_factory(max_active_sessions=0), engine_factory()
    kept, purged = lister.create("kept"), lister.create("purged")
    once_after(monkeypatch, lister._store, "newest_session_ids",
               lambda: other._purge(purged, "purged", "COMPLETED"))
    assert [s.id for s in lister.list_sessions()] == [kept]


def test_create_under_a_parent_purged_meanwhile_raises_session_purged(
    engine_factory: EngineFactory,
) -> None:
    holder, other = engine_factory(), engine_factory()
    parent = holder.create("parent")  # in holder's working set
    other.end(parent)
    other._purge(parent, "parent", "COMPLETED")
    with pytest.raises(SessionPurged):
        holder.create("child", parent=parent)
    assert holder.find(parent=parent).items == []


def test_batch_conflict_names_the_session_another_writer_changed(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    saver, other = engine_factory(retries=0), engine_factory()
    untouched, changed = saver.create("untouched"), saver.create("changed")
    saver.get(changed)
    once_after(monkeypatch, saver._writer, "_encode",
               lambda: other.update(changed, {"x": 1}))
    with pytest.raises(ConcurrencyConflict) as raised:
        saver.save_all_active()
    assert raised.value.session_id == changed and raised.value.expected_version == 1
    assert "expected version 1" in str(raised.value) and untouched not in str(raised.value)


def test_a_batch_losing_a_race_logs_no_driver_warning(
    engine_factory: EngineFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    """On PostgreSQL the batch's executemany ran in a psycopg pipeline, and the unique
    violation of a lost race logged "error ignored terminating Pipeline" (13 times in 20)."""
    saver, other = engine_factory(), engine_factory()
    ids = [saver.create(f"s{i}") for i in range(40)]
    with caplog.at_level(logging.WARNING):
        for round_ in range(8):
            for sid in ids:
                saver.get(sid)  # held at this version
            other.update(ids[round_], {"x": round_})  # the batch loses its race once
            assert set(saver.save_all_active()) == set(ids)
            gc.collect()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")] == []
