"""Review round 15 (the README against behaviour): what a user reading it runs as written."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from _helpers import Cli
from conftest import EngineFactory

from sessionledger import SessionEngine, StorageError
from sessionledger.cli import main


def test_show_prints_times_as_the_other_tables_do(
        engine_factory: EngineFactory, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """`show` printed created_at and updated_at with a space and without microseconds when they
    were 0, unlike every other table (ISO 8601 with the stored microseconds, which the README
    says can be pasted into --at)."""
    engine = engine_factory()
    whole_second = int(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()) * 10**9
    with monkeypatch.context() as clock:
        clock.setattr(time, "time_ns", lambda: whole_second)
        sid = engine.create("s", state={"n": 0})
    engine.update(sid, {"n": 1})
    lines = dict(line.split(None, 1) for line in cli.ok("show", sid).splitlines()
                 if line.startswith(("created_at", "updated_at")))
    assert lines["created_at"] == "2026-01-02T03:04:05.000000+00:00"
    updated = engine.get(sid).updated_at
    assert lines["updated_at"] == updated.isoformat(timespec="microseconds")
    assert cli.json("show", sid, "--at", lines["created_at"])["version"] == 1
    assert cli.json("show", sid, "--at", lines["updated_at"])["version"] == 2


def test_snapshots_takes_url_and_json_before_its_verb(
        engine_factory: EngineFactory, cli: Cli) -> None:
    """The README: each verb takes --url and --json before or after the verb. `snapshots
    --url URL rebuild` was a usage error ("invalid choice"), unlike `subscribers --url URL run`."""
    engine = engine_factory()
    engine.create("s")
    code, out, err = cli("snapshots", "--url", cli.url, "--json", "rebuild")
    assert (code, err) == (0, ""), err
    assert out.strip() == '{"snapshots_written": 1}'


def test_cleanup_help_says_what_max_age_measures(capsys: pytest.CaptureFixture[str]) -> None:
    """--max-age is the age of a session's last event (README, RetentionPolicy): its help said
    "ended longer ago than this", and an archived session's archive event is its last."""
    with pytest.raises(SystemExit) as done:
        main(["cleanup", "--help"])
    assert done.value.code == 0
    assert "last event older than this" in " ".join(capsys.readouterr().out.split())


def test_an_event_time_pasted_into_until_ends_the_window_before_that_event(
        engine_factory: EngineFactory, cli: Cli) -> None:
    """The README says so (review round 16): `at` includes the event at that time, `since`
    starts with it, `until` stops just before it, so consecutive windows share no event."""
    engine = engine_factory()
    sid = engine.create("s", state={"a": 1})
    engine.update(sid, {"a": 2})
    engine.update(sid, {"a": 3})
    t2 = engine.history(sid)[1].timestamp
    assert engine.state_at(sid, at=t2).version == 2
    assert [e.version for e in engine.history(sid, until=t2)] == [1]
    assert [e.version for e in engine.history(sid, since=t2)] == [2, 3]
    assert [e.version for e in engine.timeline(until=t2)] == [1]
    assert [e["version"] for e in cli.json("history", sid, "--until", t2.isoformat())] == [1]


def test_find_on_a_read_only_database_says_why_it_needs_to_write(tmp_path: Path) -> None:
    """Review round 16 (faults): find() and `ls` on a read-only database with events not yet in
    the catalog failed with "cannot run subscriber 'catalog' ...: attempt to write a readonly
    database", which did not say that a query writes."""
    path = tmp_path / "ro.db"
    with SessionEngine(f"sqlite:///{path}") as writer:
        sid = writer.create("a")
        writer.find()
        writer.update(sid, {"x": 1})  # not yet folded into the catalog
    with SessionEngine(f"sqlite:///file:{path}?mode=ro&uri=true") as reader:
        assert reader.get(sid).version == 2
        with pytest.raises(StorageError, match=r"find\(\) folds the events not yet in the "
                                               r"catalog first.*readonly"):
            reader.find()
