"""Review round 12, time: each test failed on the code before its fix."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from _helpers import Backend, Cli
from conftest import EngineFactory

from sessionledger import CorruptedData, InvalidArgument
from sessionledger.audit import parse_time


def test_a_clock_set_before_1970_stamps_the_epoch(
        engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write under a pre-1970 wall clock committed a negative time that every reader
    refused as damage: the session, the catalog, timeline() and verify() failed for good."""
    engine = engine_factory()
    before = engine.create("before")
    real_time_ns = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: -5_000_000_000)
    glitched = engine.create("during", state={"a": 1})
    monkeypatch.setattr(time, "time_ns", real_time_ns)
    assert engine.update(glitched, {"a": 2}) == 2
    fresh = engine_factory()
    started, changed = fresh.history(glitched)
    assert started.timestamp == datetime(1970, 1, 1, tzinfo=UTC)
    assert changed.timestamp > started.timestamp
    assert fresh.get(glitched).state == {"a": 2}
    assert {s.id for s in fresh.find()} == {before, glitched}
    assert len(list(fresh.timeline())) == 3
    assert fresh.verify().ok


def test_a_time_argument_keeps_an_offset_of_seconds_and_microseconds() -> None:
    """'+00:00:00.5' came back as UTC (CPython 3.11 drops a sub-minute offset): a filter
    half a second off. The codec already rebuilt such offsets; parse_time did not."""
    moment = parse_time("2026-11-25T10:00:00+00:00:00.5")
    assert moment.utcoffset() == timedelta(microseconds=500_000)
    assert parse_time("2026-11-25T10:00:00-01:02:03").utcoffset() == -timedelta(
        hours=1, minutes=2, seconds=3)
    for text in ("2026-11-25T10:00:00Z", "2026-11-25T10:00:00z", "2026-11-25Z"):
        assert parse_time(text).utcoffset() == timedelta(0), text
    with pytest.raises(InvalidArgument, match="invalid time"):
        parse_time("2026-11-25T10:00:00+25:00")


def test_a_datetime_reads_back_as_the_writing_engine_holds_it(
        engine_factory: EngineFactory) -> None:
    """A naive datetime with fold=1 (the second 01:30 of a fall-back) was held with fold=1
    by the writing engine and read back with fold=0 (an hour apart in local time); a named
    offset kept its name in the writer only."""
    second_0130 = datetime(2023, 11, 5, 1, 30, fold=1)
    named = datetime(2023, 1, 1, tzinfo=timezone(timedelta(hours=1), "CET"))
    writer = engine_factory()
    sid = writer.create("fold", state={"t": second_0130, "named": named})
    held = writer.get(sid).state
    back = engine_factory(max_active_sessions=0).get(sid).state
    for value in (held, back):
        assert value["t"] == datetime(2023, 11, 5, 1, 30) and value["t"].fold == 0
        assert value["named"] == named and value["named"].utcoffset() == timedelta(hours=1)
    assert held["named"].tzname() == back["named"].tzname() == "UTC+01:00"
    # fold is not a change the engine keeps: nothing is written
    assert writer.update(sid, {"t": datetime(2023, 11, 5, 1, 30, fold=1)}) == 1


def test_ls_shows_a_time_that_names_the_latest_version(cli: Cli, backend: Backend,
                                                        engine_factory: EngineFactory) -> None:
    """ls cut UPDATED to whole seconds: pasted into `show --at` it named an earlier version."""
    engine = engine_factory()
    sid = engine.create("ls")
    engine.update(sid, {"k": 1})
    engine.run_subscribers(until_idle=True)
    row = next(line for line in cli.ok("ls").splitlines() if line.startswith(sid))
    updated = row.split()[-1]
    assert cli.json("show", sid, "--at", updated)["version"] == 2


def test_state_at_a_moment_checks_the_time_that_decided_it(
        engine_factory: EngineFactory, backend: Backend) -> None:
    """The search for `at` read raw times and only versions up to its answer were checked:
    version 4's time moved a day later made state_at(at=time of v6) return version 3, while
    get() and history() refused the session as damaged."""
    engine = engine_factory(snapshot_every=0)
    sid = engine.create("t", state={"n": 0})
    for n in range(1, 7):
        engine.update(sid, {"n": n})
    moment = engine.history(sid)[5].timestamp
    assert engine.state_at(sid, at=moment).version == 6
    later = backend.sql("SELECT ts FROM sl_events WHERE session_id = ? AND version = 4",
                        (sid,))[0][0] + 86_400_000_000
    backend.sql("UPDATE sl_events SET ts = ? WHERE session_id = ? AND version = 4",
                (later, sid))
    with pytest.raises(CorruptedData, match="version 4"):
        engine.state_at(sid, at=moment)
    # the first event's time moved later said "did not exist" instead of damage
    other = engine.create("t2")
    engine.update(other, {"n": 1})
    started = engine.history(other)[0].timestamp
    backend.sql("UPDATE sl_events SET ts = ? WHERE session_id = ? AND version = 1",
                (later, other))
    with pytest.raises(CorruptedData, match="version 1"):
        engine.state_at(other, at=started)
