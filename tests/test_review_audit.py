"""Found by review round 4 (audit queries and idempotency), each a test that failed before its
fix: keyed retries racing the original, CLI times that named another instant, a timeline that
crashed on damaged rows, format 0 snapshots of archived sessions, tzinfos without an offset,
audit queries on purged sessions."""

from __future__ import annotations

import datetime as dt
from typing import Any

import blake3
import msgpack
import pytest
import sqlalchemy as sa
from _helpers import Backend, Cli
from conftest import EngineFactory

from sessionledger import (
    InvalidArgument,
    RetentionPolicy,
    SessionConfig,
    SessionEngine,
    SessionLedgerError,
    SessionPurged,
)
from sessionledger.domain.session import Session
from sessionledger.infrastructure.codec import _default
from sessionledger.projections.replay import replay

# -- a keyed retry overlapping the first command (in another engine) --------------------------

KEYED = {
    "end": lambda e, s: e.end(s, idempotency_key="k"),
    "checkpoint": lambda e, s: e.checkpoint(s, "cp", idempotency_key="k"),
    "update+expected_version": lambda e, s: e.update(s, {"a": 1}, idempotency_key="k",
                                                     expected_version=1),
    "suspend": lambda e, s: e.suspend(s, idempotency_key="k"),
}


@pytest.mark.parametrize("command", sorted(KEYED))
def test_a_keyed_retry_racing_the_first_command_returns_its_result(
    engine_factory: EngineFactory, command: str,
) -> None:
    """The retry looks its key up (not used yet), then the first command commits in another
    engine, then the retry decides on the fresh session, where the command no longer applies:
    it returns the first command's version instead of raising (it raised InvalidTransition,
    InvalidArgument or ConcurrencyConflict)."""
    first, retry = engine_factory(), engine_factory()
    sid = first.create("s")
    run = KEYED[command]
    looked_up = retry._store.idempotent_result
    committed: list[int] = []

    def then_the_first_commits(scope: str, key: str) -> Any:
        found = looked_up(scope, key)
        if not committed:
            committed.append(run(first, sid))
        return found

    retry._store.idempotent_result = then_the_first_commits  # type: ignore[method-assign]
    assert run(retry, sid) == committed[0] == 2
    assert retry.get(sid).version == 2  # nothing written twice


def test_a_keyed_command_that_does_not_apply_still_raises(engine_factory: EngineFactory) -> None:
    engine = engine_factory()
    sid = engine.create("s")
    engine.end(sid)
    with pytest.raises(SessionLedgerError, match="COMPLETED"):
        engine.end(sid, idempotency_key="never-used")


# -- CLI tables print the stored microseconds -----------------------------------------------

def test_a_time_copied_from_a_cli_table_names_that_event(
    engine_factory: EngineFactory, cli: Cli,
) -> None:
    engine = engine_factory()
    sid = engine.create("s", state={"n": 0})
    engine.update(sid, {"n": 1})
    engine.update(sid, {"n": 2})
    stamps = {e.version: e.timestamp for e in engine.history(sid)}
    code, out, _ = cli("history", sid)
    assert code == 0
    for stamp in stamps.values():
        assert stamp.isoformat(timespec="microseconds") in out
    # the second event's time, as printed, names version 2 exactly
    printed = stamps[2].isoformat(timespec="microseconds")
    code, out, _ = cli("show", sid, "--at", printed, "--json")
    assert code == 0 and '"version": 2' in out
    code, out, _ = cli("history", sid, "--since", printed, "--json")
    assert code == 0 and [line for line in out.splitlines() if '"version":' in line]
    assert '"version": 1' not in out and '"version": 2' in out


# -- timeline on damaged rows ------------------------------------------------------------------

def test_timeline_over_swapped_event_types_answers_instead_of_crashing(
    engine_factory: EngineFactory, backend: Backend,
) -> None:
    engine = engine_factory()
    sid = engine.create("victim", state={"a": 1})
    engine.update(sid, {"a": 2})
    backend.sql("UPDATE sl_events SET type = CASE version WHEN 1 THEN 'StateChanged' "
                "ELSE 'SessionStarted' END WHERE session_id = ?", (sid,))
    try:
        events = list(engine.timeline())
    except SessionLedgerError:
        return  # a clear refusal is as good as an answer
    assert [(e.version, e.type) for e in events] == [(1, "StateChanged"), (2, "SessionStarted")]
    assert events[0].session_name is None


# -- format 0 snapshots of archived sessions -----------------------------------------------

def _format_0_snapshot(engine: SessionEngine, sid: str) -> None:
    """A first-release snapshot of `sid` at its latest version (format 0 kept no outcome)."""
    session = engine.get(sid)
    fields = {"id": sid, "version": session.version, "name": session.name,
              "status": session.status.value, "state": session.state, "tags": session.tags,
              "metadata": session.metadata, "parent": session.parent,
              "created_at": session.created_at, "updated_at": session.updated_at,
              "checkpoints": dict(session.checkpoints), "last_saved": None}
    body = msgpack.packb(fields, default=_default, use_bin_type=True)
    with engine._store.engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO sl_snapshots (session_id, version, format_version, flags, digest, data,"
            " ts) VALUES (:s, :v, NULL, 0, :d, :b, 0)"),
            {"s": sid, "v": session.version, "d": blake3.blake3(body).digest(), "b": body})


@pytest.mark.parametrize("strict", [False, True])
def test_a_format_0_snapshot_of_an_archived_session_keeps_its_outcome(
    engine_factory: EngineFactory, url: str, strict: bool,
) -> None:
    engine = engine_factory()
    sid = engine.create("legacy", state={"n": 1})
    engine.end(sid, "failed")
    version = engine.archive(sid)
    _format_0_snapshot(engine, sid)
    plain = Session(sid)
    replay(plain, engine._codec.decode(sid, engine._store.stream(sid)))
    assert plain.outcome == "failed"
    with SessionEngine(url, SessionConfig(max_active_sessions=0,
                                          strict_snapshots=strict)) as cold:
        assert cold.state_at(sid, version=version) == plain
        assert cold.get(sid).outcome == "failed"
        report = cold.verify(sid)
        assert report.ok, report.problems
        assert report.snapshots == 1
        assert cold.metrics()["snapshots_skipped"].get("incomplete", 0) >= 1


def test_a_format_0_snapshot_of_an_ended_session_is_still_used(
    engine_factory: EngineFactory, url: str,
) -> None:
    engine = engine_factory()
    sid = engine.create("legacy")
    engine.end(sid, "cancelled")
    _format_0_snapshot(engine, sid)
    with SessionEngine(url, SessionConfig(max_active_sessions=0)) as cold:
        assert cold.get(sid).outcome == "cancelled"
        assert cold.metrics()["snapshots_skipped"] == {}


# -- a tzinfo that gives no offset ------------------------------------------------------------

class NoOffset(dt.tzinfo):
    def utcoffset(self, moment: dt.datetime | None) -> dt.timedelta | None:
        return None

    def dst(self, moment: dt.datetime | None) -> dt.timedelta | None:
        return None


class Failing(dt.tzinfo):
    def utcoffset(self, moment: dt.datetime | None) -> dt.timedelta | None:
        raise RuntimeError("no zone database")


def test_a_datetime_whose_tzinfo_gives_no_offset_is_naive(engine_factory: EngineFactory) -> None:
    engine = engine_factory()
    sid = engine.create("s", state={"n": 0})
    engine.update(sid, {"n": 1})
    last = engine.get(sid).updated_at
    naive_moment = last.replace(tzinfo=None)
    no_offset = naive_moment.replace(tzinfo=NoOffset())
    assert engine.state_at(sid, at=no_offset).version == 2
    assert [e.version for e in engine.history(sid, since=no_offset)] == [2]
    assert [e.version for e in engine.timeline(until=no_offset)] == [1]
    with pytest.raises(InvalidArgument, match="tzinfo"):
        engine.state_at(sid, at=naive_moment.replace(tzinfo=Failing()))
    with pytest.raises(InvalidArgument, match="tzinfo"):
        engine.history(sid, until=naive_moment.replace(tzinfo=Failing()))


# -- audit queries on a purged session --------------------------------------------------------

def test_audit_queries_on_a_purged_session_raise_session_purged(
    engine_factory: EngineFactory,
) -> None:
    engine = engine_factory()
    sid = engine.create("gone", state={"k": 1})
    engine.update(sid, {"k": 2})
    engine.end(sid)
    assert sid in engine.cleanup(RetentionPolicy(max_age=0, purge=True)).session_ids
    calls = {
        "state_at version": lambda: engine.state_at(sid, version=1),
        "state_at at": lambda: engine.state_at(sid, at=dt.datetime.now(dt.UTC)),
        "diff": lambda: engine.diff(sid, 1, 2),
        "blame": lambda: engine.blame(sid, "k"),
        "history": lambda: engine.history(sid),
    }
    for name, call in calls.items():
        with pytest.raises(SessionPurged):
            call()
            pytest.fail(f"{name} did not raise")
