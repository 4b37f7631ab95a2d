"""Found by review round 6 (reading the code): each test failed before its fix."""

from __future__ import annotations

import pytest
from _helpers import Backend, Cli
from conftest import EngineFactory

from sessionledger import CorruptedData, SessionEngine
from sessionledger.infrastructure.codec import PayloadCodec
from sessionledger.session_names import SessionNames
from sessionledger.subscribers import decode_feed_row


def test_cli_audit_verbs_name_a_purged_session(cli: Cli, url: str) -> None:
    with SessionEngine(url) as engine:
        sid = engine.create("gone", state={"k": 1})
        engine.update(sid, {"k": 2})
        engine.end(sid)
        engine._purge(sid, "gone", "COMPLETED")
    for argv in (["show", sid], ["show", sid, "--at", "1"], ["history", sid],
                 ["diff", sid, "1", "2"], ["blame", sid, "k"]):
        cli.fails(*argv, match="was purged")


def test_tombstone_keeps_the_last_version(engine_factory: EngineFactory,
                                          backend: Backend) -> None:
    engine = engine_factory()
    sid = engine.create("a")
    engine.update(sid, {"x": 1})
    engine.end(sid)
    assert engine._purge(sid, "a", "COMPLETED")
    assert backend.sql("SELECT version FROM sl_tombstones WHERE session_id = ?",
                       (sid,)) == [(3,)]


def test_verify_counts_the_snapshots_it_reports(engine_factory: EngineFactory,
                                                backend: Backend) -> None:
    """A snapshot past the last event (the stream lost its end) was reported, not counted."""
    engine = engine_factory()
    sid = engine.create("a")
    engine.update(sid, {"x": 1})
    engine.save(sid)  # snapshot at 3
    backend.sql("DELETE FROM sl_events WHERE session_id = ? AND version = 3", (sid,))
    report = engine.verify()
    assert [(p.version, p.what) for p in report.problems] == [
        (3, "snapshot of a version whose events are missing")]
    assert report.snapshots == 1


def test_subscriber_feed_row_with_a_number_as_payload_fails_cleanly() -> None:
    """SQLite keeps any type in any column: bytes(10**13) tried to make 10 TB of zeros."""
    row = (1, "01a250a3-ab14-7c7c-9985-5a1541835196", 1, "SessionStarted", 0, None, None,
           10**13)
    with pytest.raises(CorruptedData, match="does not decode"):
        decode_feed_row(PayloadCodec(), row, SessionNames(dict.fromkeys))
