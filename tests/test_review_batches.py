"""Found by review round 4 (retention, batches): sessions another engine changes between the
catalog's selection and the batch or purge, each a test that failed before its fix."""

from __future__ import annotations

import pytest
from _helpers import once_after
from conftest import EngineFactory

from sessionledger import InvalidArgument, RetentionPolicy, SessionStatus


def test_save_all_active_leaves_out_a_session_suspended_meanwhile(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    saver, other = engine_factory(), engine_factory()
    paused, kept = saver.create("paused"), saver.create("kept")
    once_after(monkeypatch, saver, "_catalog_ids", lambda: other.suspend(paused))
    saved = saver.save_all_active()
    assert set(saved) == {kept}
    assert [e.type for e in saver.history(paused)][-1] == "SessionSuspended"


def test_restore_recent_returns_only_the_sessions_it_recovered(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    restorer, other = engine_factory(), engine_factory()
    ended, purged, kept = (restorer.create(n) for n in ("ended", "purged", "kept"))

    def end_and_purge() -> None:
        other.end(ended)
        other.end(purged)
        other._purge(purged, "purged", "COMPLETED")

    once_after(monkeypatch, restorer._catalog, "find", end_and_purge)
    recovered = restorer.restore_recent(10)  # raised SessionPurged, after committing
    assert [s.id for s in recovered] == [kept]
    assert recovered[0].status is SessionStatus.ACTIVE
    assert "SessionRestored" not in [e.type for e in restorer.history(ended)]


def test_restore_recent_refuses_a_count_it_cannot_bring_back(
    engine_factory: EngineFactory,
) -> None:
    with pytest.raises(InvalidArgument, match="10,000"):
        engine_factory().restore_recent(10_001)


@pytest.mark.parametrize("action", ["archive", "purge"])
def test_cleanup_reports_only_what_it_did(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch, action: str,
) -> None:
    """Another engine archives (or purges) one of the selected sessions first."""
    cleaner, other = engine_factory(), engine_factory()
    first, second = cleaner.create("first"), cleaner.create("second")
    cleaner.end(first)
    cleaner.end(second)
    meanwhile = ((lambda: other.archive(first)) if action == "archive"
                 else (lambda: other._purge(first, "first", "COMPLETED")))
    once_after(monkeypatch, cleaner._catalog.tables, "find", meanwhile)
    report = cleaner.cleanup(RetentionPolicy(max_age=0, purge=action == "purge"))
    assert report.session_ids == [second]
    assert (report.archived if action == "archive" else report.purged) == [second]
    if action == "archive":
        archives = [e for e in cleaner.history(first) if e.type == "SessionArchived"]
        assert len(archives) == 1


def test_a_purge_records_the_status_the_session_has_when_purged(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Selected as COMPLETED, archived by another engine before the purge: the tombstone
    said COMPLETED. (With max_age the archive makes it recent, and it is not purged.)"""
    cleaner, other = engine_factory(), engine_factory()
    sid = cleaner.create("s")
    cleaner.end(sid)
    once_after(monkeypatch, cleaner._catalog.tables, "find",
                    lambda: other.archive(sid))
    assert cleaner.cleanup(RetentionPolicy(keep_last=0, purge=True)).purged == [sid]
    tombstone = cleaner._store.tombstone(sid)
    assert tombstone is not None and tombstone[1] == "ARCHIVED"


def test_a_purge_by_age_leaves_a_session_archived_meanwhile(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cleaner, other = engine_factory(), engine_factory()
    sid = cleaner.create("s")
    cleaner.end(sid)
    once_after(monkeypatch, cleaner._catalog.tables, "find",
                    lambda: other.archive(sid))
    assert cleaner.cleanup(RetentionPolicy(max_age=0, purge=True)).purged == []
    assert cleaner.get(sid).status is SessionStatus.ARCHIVED
