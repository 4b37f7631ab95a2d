"""Snapshots: policy, loads that use them, bad and old snapshots, the legacy fixture, rebuilds."""

from __future__ import annotations

import logging
import shutil
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import lz4.block
import pytest
from _helpers import Backend
from conftest import EngineFactory

from sessionledger import (
    CorruptedData,
    SessionConfig,
    SessionEngine,
    SessionStatus,
    SnapshotCorrupted,
    SnapshotVersionError,
    StorageError,
)

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-format0.db"
LEGACY_AGENT = "0b6f4d7e-1c2a-4f43-9a51-6f3d2e8c1a01"
LEGACY_ENDED = "0b6f4d7e-1c2a-4f43-9a51-6f3d2e8c1a02"


def snapshot_rows(backend: Backend, sid: str) -> list[tuple[int, Any]]:
    """(version, format_version) of the session's stored snapshots, ascending."""
    return [(r[0], r[1]) for r in backend.sql(
        "SELECT version, format_version FROM sl_snapshots WHERE session_id = ? ORDER BY version",
        (sid,))]


def break_event(backend: Backend, sid: str, version: int) -> None:
    """Change a stored event so that reading it raises CorruptedData."""
    backend.sql("UPDATE sl_events SET payload = ? WHERE session_id = ? AND version = ?",
                (b"\x00\x01\xc1", sid, version))


def grow(engine: SessionEngine, sid: str, updates: int) -> None:
    for n in range(updates):
        engine.update(sid, {"n": n})


# -- policy -------------------------------------------------------------------------------------


def test_periodic_snapshots_every_n_events(engine_factory: EngineFactory,
                                           backend: Backend) -> None:
    engine = engine_factory(snapshot_every=10)
    sid = engine.create("s")
    grow(engine, sid, 24)  # versions 2..25
    assert snapshot_rows(backend, sid) == [(10, 1), (20, 1)]


def test_save_and_checkpoint_always_snapshot(engine_factory: EngineFactory,
                                             backend: Backend) -> None:
    engine = engine_factory(snapshot_every=0)
    sid = engine.create("s")
    grow(engine, sid, 30)
    assert snapshot_rows(backend, sid) == []
    v_cp = engine.checkpoint(sid, "cp")
    engine.update(sid, {"x": 1})
    v_save = engine.save(sid)
    assert snapshot_rows(backend, sid) == [(v_cp, 1), (v_save, 1)]


def test_a_failed_command_writes_no_snapshot(engine_factory: EngineFactory, backend: Backend,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The write fails after the snapshot was made: neither the event nor the snapshot is
    stored, and the engine's copy does not move on."""
    engine = engine_factory(snapshot_every=0)
    sid = engine.create("s")
    engine.checkpoint(sid, "cp")
    real_append = engine._store.append
    offered: list[int] = []

    def failing_append(rows: Any, idempotency: Any = None, snapshots: Any = ()) -> int:
        offered.append(len(snapshots))
        raise StorageError("the disk is full")

    monkeypatch.setattr(engine._store, "append", failing_append)
    with pytest.raises(StorageError):
        engine.checkpoint(sid, "cp2")
    assert offered == [1]  # the snapshot was part of the failed write
    monkeypatch.setattr(engine._store, "append", real_append)
    assert snapshot_rows(backend, sid) == [(2, 1)]
    assert engine.get(sid).version == 2 and "cp2" not in engine.get(sid).checkpoints
    assert engine.checkpoint(sid, "cp2") == 3


# -- loads use the snapshot ---------------------------------------------------------------------


def test_load_reads_only_events_after_the_snapshot(engine_factory: EngineFactory,
                                                   backend: Backend) -> None:
    writer = engine_factory(snapshot_every=10)
    sid = writer.create("s", state={"n": -1})
    grow(writer, sid, 24)
    # events at and below the snapshot's version (but the snapshot's own) are never read
    for version in (1, 5, 9):
        break_event(backend, sid, version)
    reader = engine_factory(max_active_sessions=0)
    session = reader.get(sid)
    assert session.version == 25
    assert session.state == {"n": 23}
    # ...while an event after the snapshot is read and checked
    break_event(backend, sid, 23)
    with pytest.raises(CorruptedData) as raised:
        reader.get(sid)
    assert "version 23" in str(raised.value)


def test_snapshot_load_equals_full_replay(engine_factory: EngineFactory,
                                          backend: Backend) -> None:
    writer = engine_factory(snapshot_every=7)
    values = {"uuid": uuid.uuid4(), "dec": Decimal("1.50"), "when":
              datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "bytes": b"\x00\xff",
              "nested": {"a": [1, 2.5, None, True, "x"]}}
    sid = writer.create("s", tags=["t1", "t2"], metadata={"m": 1}, state=values)
    for n in range(20):
        writer.update(sid, {f"k{n % 4}": n}, delete=["bytes"] if n == 9 else None)
        if n == 5:
            writer.checkpoint(sid, "five")
        if n == 12:
            writer.save(sid)
    writer.suspend(sid, reason="lunch")
    from_snapshot = engine_factory(max_active_sessions=0).get(sid)
    backend.sql("DELETE FROM sl_snapshots")
    from_events = engine_factory(max_active_sessions=0).get(sid)
    assert from_snapshot == from_events
    assert from_snapshot.status is SessionStatus.SUSPENDED
    assert from_snapshot.checkpoints == {"five": 8}


def test_commands_continue_the_chain_after_a_snapshot_load(engine_factory: EngineFactory) -> None:
    writer = engine_factory(snapshot_every=5)
    sid = writer.create("s")
    grow(writer, sid, 9)  # snapshot at 5 and 10
    other = engine_factory(max_active_sessions=0)
    assert other.update(sid, {"after": 1}) == 11
    assert engine_factory(max_active_sessions=0, snapshot_every=0).get(sid).state["after"] == 1
    assert [e.version for e in other.history(sid)] == list(range(1, 12))


# -- snapshots this release cannot use ----------------------------------------------------------


def _damage(backend: Backend, sid: str, version: int, how: str) -> None:
    if how == "newer-format":
        backend.sql("UPDATE sl_snapshots SET format_version = 3 WHERE session_id = ? AND "
                    "version = ?", (sid, version))
    elif how == "digest":
        backend.sql("UPDATE sl_snapshots SET digest = ? WHERE session_id = ? AND version = ?",
                    (b"\x00" * 32, sid, version))
    elif how == "not-lz4":
        backend.sql("UPDATE sl_snapshots SET flags = 1, data = ? WHERE session_id = ? AND "
                    "version = ?", (b"\xff\xff\xff\xff garbage", sid, version))
    elif how == "other-chain":
        # a well-formed snapshot whose chain head is not this stream's
        rows = backend.sql("SELECT flags, data FROM sl_snapshots WHERE session_id = ? AND "
                           "version = ?", (sid, version))
        flags, data = rows[0]
        body = lz4.block.decompress(data) if flags & 1 else data
        import blake3
        import msgpack

        fields = msgpack.unpackb(body, raw=False, strict_map_key=False)
        fields["head"] = b"\x01" * 32
        body = msgpack.packb(fields, use_bin_type=True)
        backend.sql("UPDATE sl_snapshots SET flags = 0, data = ?, digest = ? WHERE "
                    "session_id = ? AND version = ?",
                    (body, blake3.blake3(body).digest(), sid, version))
    else:  # pragma: no cover
        raise AssertionError(how)


BAD_SNAPSHOTS = ["newer-format", "digest", "not-lz4", "other-chain"]


@pytest.mark.parametrize("how", BAD_SNAPSHOTS)
def test_unusable_snapshot_is_skipped_with_a_warning(
    engine_factory: EngineFactory, backend: Backend, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    writer = engine_factory(snapshot_every=10)
    sid = writer.create("s")
    grow(writer, sid, 12)
    _damage(backend, sid, 10, how)
    reader = engine_factory(max_active_sessions=0)
    with caplog.at_level(logging.WARNING, logger="sessionledger.snapshots"):
        session = reader.get(sid)
    assert session.version == 13 and session.state == {"n": 11}
    warnings = [r for r in caplog.records if r.name == "sessionledger.snapshots"]
    assert len(warnings) == 1 and sid in warnings[0].getMessage()
    skipped = reader.metrics()["snapshots_skipped"]
    assert sum(skipped.values()) == 1


@pytest.mark.parametrize("how", BAD_SNAPSHOTS)
def test_unusable_snapshot_raises_when_strict(engine_factory: EngineFactory, backend: Backend,
                                              how: str) -> None:
    writer = engine_factory(snapshot_every=10)
    sid = writer.create("s")
    grow(writer, sid, 12)
    _damage(backend, sid, 10, how)
    reader = engine_factory(max_active_sessions=0, strict_snapshots=True)
    expected = SnapshotVersionError if how == "newer-format" else SnapshotCorrupted
    with pytest.raises(expected) as raised:
        reader.get(sid)
    message = str(raised.value)
    assert sid in message and "version 10" in message
    if how == "newer-format":
        assert message.startswith(
            f"snapshot format 3 of session {sid} is newer than this release reads (up to 1): "
            "upgrade sessionledger or rebuild snapshots")
        assert "upgrade sessionledger or rebuild snapshots" in message


def test_rebuild_snapshots_replaces_unusable_ones(engine_factory: EngineFactory,
                                                  backend: Backend) -> None:
    writer = engine_factory(snapshot_every=10)
    sid = writer.create("s")
    grow(writer, sid, 24)
    _damage(backend, sid, 10, "digest")
    _damage(backend, sid, 20, "newer-format")
    assert writer.rebuild_snapshots() == 3  # 10, 20 and the latest, 25
    assert snapshot_rows(backend, sid) == [(10, 1), (20, 1), (25, 1)]
    strict = engine_factory(max_active_sessions=0, strict_snapshots=True)
    assert strict.get(sid).state == {"n": 23}


# -- an older release's database ----------------------------------------------------------------


@pytest.fixture
def legacy_url(tmp_path: Path) -> str:
    target = tmp_path / "legacy.db"
    shutil.copy(FIXTURE, target)
    return f"sqlite:///{target}"


def test_legacy_database_loads(legacy_url: str) -> None:
    with SessionEngine(legacy_url, SessionConfig(strict_snapshots=True)) as engine:
        agent = engine.get(LEGACY_AGENT)
        assert (agent.name, agent.version, agent.status) == ("legacy-agent", 6,
                                                             SessionStatus.ACTIVE)
        assert agent.state == {"step": 2}
        assert agent.checkpoints == {"before-merge": 4}
        assert agent.last_saved_version == 6
        assert agent.parent is None
        ended = engine.get(LEGACY_ENDED)
        assert ended.status is SessionStatus.COMPLETED and ended.state == {"n": 2}
        # old event shapes come back in today's shape
        history = engine.history(LEGACY_AGENT)
        assert history[0].data["parent"] is None
        assert history[4].data == {"set": {"step": 2}, "delete": ["notes"]}
        assert engine.metrics()["snapshots_skipped"] == {}


def test_legacy_session_state_equals_its_events(legacy_url: str, tmp_path: Path) -> None:
    with SessionEngine(legacy_url) as engine:
        from_snapshot = engine.get(LEGACY_AGENT)
    events_only = tmp_path / "events-only.db"
    shutil.copy(legacy_url.removeprefix("sqlite:///"), events_only)
    import sqlite3

    with sqlite3.connect(events_only) as db:
        db.execute("DELETE FROM sl_snapshots")
    with SessionEngine(f"sqlite:///{events_only}") as engine:
        assert engine.get(LEGACY_AGENT) == from_snapshot


#: written by commit 4193030 (the repository's sixth), which stored schema-1 events in today's
#: shape before schema numbers were bumped (no snapshots yet): a parent, a state change with a
#: delete, a restore, a failed child, an archived parent
FIRST_COMMITS = Path(__file__).parent / "fixtures" / "legacy-first-commits.db"
FIRST_PARENT = "acff3539-461c-4908-969c-296d664be33b"
FIRST_CHILD = "84fca74c-53b5-4dff-9f2f-9aad65fff50a"


def test_database_of_the_first_commits_loads(tmp_path: Path) -> None:
    target = tmp_path / "first.db"
    shutil.copy(FIRST_COMMITS, target)
    with SessionEngine(f"sqlite:///{target}") as engine:
        parent, child = engine.get(FIRST_PARENT), engine.get(FIRST_CHILD)
        # what that commit's own engine read back
        assert (parent.version, parent.status, parent.state) == (
            9, SessionStatus.ARCHIVED, {"step": 1, "notes": ["a"]})
        assert (child.version, child.status, child.parent) == (
            5, SessionStatus.FAILED, FIRST_PARENT)
        assert engine.history(FIRST_PARENT)[1].data == {
            "set": {"step": 1, "notes": ["a"]}, "delete": ["gone"]}
        assert [s.id for s in engine.find(parent=FIRST_PARENT)] == [FIRST_CHILD]
        assert engine.verify().ok
        assert engine.update(engine.create("new", parent=FIRST_PARENT), {"a": 1}) == 2


def test_legacy_session_takes_new_commands(legacy_url: str) -> None:
    with SessionEngine(legacy_url) as engine:
        assert engine.restore(LEGACY_AGENT, checkpoint="before-merge") == 7
        assert engine.update(LEGACY_AGENT, {"step": 3}) == 8
    with SessionEngine(legacy_url, SessionConfig(max_active_sessions=0)) as engine:
        assert engine.get(LEGACY_AGENT).state == {"step": 3, "notes": ["a"]}
        assert engine.rebuild_snapshots() >= 3
    import sqlite3

    with sqlite3.connect(legacy_url.removeprefix("sqlite:///")) as db:
        formats = {row[0] for row in db.execute("SELECT format_version FROM sl_snapshots")}
    assert formats == {1}
