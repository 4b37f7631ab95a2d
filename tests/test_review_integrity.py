"""Review round 8: the integrity guarantees against someone with write access to the database,
and databases written by older releases.

Each test here failed before its fix: the integrity key in repr(SessionConfig), a forged
tombstone that froze a live session without verify() noticing, a CLI that could not read a keyed
database, a forged value nested too deeply to copy that crashed get() and the CLI, and names and
tags of the first releases that find() refused to search for. The catalog column's type is held
to what older releases made (a change broke other engines' prepared finds after a rebuild); the
prepared-finds test guards the swap itself and passed before too. From the CLI as an operator
uses it: `verify | head` exiting 0 on problems, a position an at-least-once subscriber moved
back, table cells printed raw to the terminal, close() waiting a second time for a runner already
stopped, and psycopg's warning when two rebuilds raced on PostgreSQL.
"""

from __future__ import annotations

import msgpack
import pytest
from _helpers import Backend, Cli

from sessionledger import (
    CorruptedData,
    InvalidArgument,
    RetentionPolicy,
    SessionConfig,
    SessionEngine,
    SessionPurged,
)
from sessionledger.cli import KEY_VARIABLE
from sessionledger.infrastructure.codec import chain_digest


def test_the_integrity_key_is_never_in_repr() -> None:
    config = SessionConfig(integrity_key="s3cret-key")
    assert "s3cret" not in repr(config) and "s3cret" not in str(config)
    assert config.integrity_key == "s3cret-key"


def test_verify_reports_a_tombstone_beside_a_session_s_events(backend: Backend) -> None:
    with SessionEngine(backend.url) as engine:
        gone = engine.create("gone")
        engine.end(gone, outcome="completed")
        engine.cleanup(RetentionPolicy(max_age=0, purge=True))  # a real tombstone
        live = engine.create("live", state={"a": 1})
        assert engine.verify().ok
    backend.sql("INSERT INTO sl_tombstones (session_id, name, final_status, version, purged_ts) "
                "VALUES (?, ?, ?, ?, ?)", (live, "live", "COMPLETED", 1, 0))
    with SessionEngine(backend.url) as engine:
        if backend.kind == "sqlite":  # (its triggers refuse appends to a tombstoned session)
            with pytest.raises(SessionPurged):
                engine.update(live, {"a": 2})
        for report in (engine.verify(), engine.verify(live)):
            assert not report.ok
            assert [(p.session_id, p.version) for p in report.problems] == [(live, None)]
            assert "tombstone" in report.problems[0].what


def test_the_cli_reads_a_keyed_database_with_the_key_from_the_environment(
    cli: Cli, backend: Backend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with SessionEngine(backend.url, SessionConfig(integrity_key="k1")) as engine:
        sid = engine.create("keyed", state={"a": 1})
        engine.update(sid, {"a": 2})
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    code, out, _ = cli("verify")
    assert code == 2 and "another integrity_key" in out
    cli.fails("show", sid, match="another integrity_key")
    monkeypatch.setenv(KEY_VARIABLE, "k1")
    assert "ok" in cli.ok("verify")
    assert cli.json("show", sid)["state"] == {"a": 2}
    monkeypatch.setenv(KEY_VARIABLE, "k2")
    assert cli("verify")[0] == 2


def test_a_forged_value_nested_too_deeply_is_corrupted_data_not_a_crash(
    cli: Cli, backend: Backend,
) -> None:
    with SessionEngine(backend.url) as engine:
        sid = engine.create("deep")
    # a StateChanged nested 600 levels deep (commands refuse more than 100), chained without a
    # key as a forger with write access can
    value: object = 1
    for _ in range(600):
        value = [value]
    payload = bytes((0, 1)) + msgpack.packb({"set": {"deep": value}, "delete": []})
    rows = backend.sql("SELECT ts, digest FROM sl_events WHERE session_id = ? AND version = 1",
                       (sid,))
    ts, head = rows[0][0], bytes(rows[0][1])
    digest = chain_digest(head, sid, 2, "StateChanged", ts + 1, None, None, payload)
    backend.sql("INSERT INTO sl_events (session_id, version, type, ts, actor, correlation_id, "
                "payload, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sid, 2, "StateChanged", ts + 1, None, None, payload, digest))
    with SessionEngine(backend.url) as engine, pytest.raises(CorruptedData, match="too deeply"):
        engine.get(sid)
    err = cli.fails("show", sid, match="nested too deeply")
    assert "Traceback" not in err



def test_a_rebuild_by_another_engine_leaves_prepared_finds_working(backend: Backend) -> None:
    # PostgreSQL prepares a statement run often (psycopg: from the fifth run): a swap drops
    # and renames the tables under it, and the other engines' finds go on answering
    with SessionEngine(backend.url) as reader, SessionEngine(backend.url) as rebuilder:
        sid = reader.create("s", tags=["a"])
        for _ in range(8):
            assert [s.id for s in reader.find(tags=["a"])] == [sid]
        rebuilder.rebuild("catalog")
        for _ in range(3):
            assert [s.id for s in reader.find(tags=["a"])] == [sid]


def test_the_catalog_tags_column_keeps_its_type() -> None:
    # what older releases made: a rebuild swaps in tables of this shape under running engines,
    # and a column of another type broke their prepared finds on PostgreSQL ("cached plan must
    # not change result type") until they restarted
    from sqlalchemy import String

    from sessionledger.infrastructure.schema import catalog

    column_type = catalog.c.tags.type
    assert isinstance(column_type, String) and column_type.length == 8192


def test_find_searches_for_names_and_tags_the_first_releases_stored(backend: Backend) -> None:
    # commands refuse control characters; the first releases stored them (DEL and C1 here)
    import uuid

    from sessionledger.domain.events import EVENT_SCHEMAS
    from sessionledger.infrastructure.codec import GENESIS_DIGEST, PayloadCodec

    name, tag = "old\x7fname", "tag\x85"
    sid = str(uuid.uuid4())
    data = {"name": name, "tags": [tag], "metadata": {}, "state": {}, "parent": None}
    payload, _ = PayloadCodec().encode(data, EVENT_SCHEMAS["SessionStarted"])
    ts = 1_700_000_000_000_000
    digest = chain_digest(GENESIS_DIGEST, sid, 1, "SessionStarted", ts, None, None, payload)
    with SessionEngine(backend.url) as engine:
        backend.sql("INSERT INTO sl_events (session_id, version, type, ts, actor, "
                    "correlation_id, payload, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (sid, 1, "SessionStarted", ts, None, None, payload, digest))
        assert [s.id for s in engine.find(name=name)] == [sid]
        assert [s.id for s in engine.find(tags=[tag])] == [sid]
        for bad in ("a\x00b", "a\udcff", " "):
            with pytest.raises(InvalidArgument):
                engine.find(name=bad)
        with pytest.raises(InvalidArgument):
            engine.create(name)


def test_two_rebuilds_at_once_log_no_driver_warning(
    pg_backend: Backend, caplog: pytest.LogCaptureFixture,
) -> None:
    import logging
    import threading

    with SessionEngine(pg_backend.url, SessionConfig(lifecycle_hooks=False)) as engine:
        for i in range(1500):
            engine.update(engine.create(f"s{i}", tags=["t"]), {"i": i})
    engines = [SessionEngine(pg_backend.url) for _ in range(2)]
    try:
        with caplog.at_level(logging.WARNING, logger="psycopg"):
            for _ in range(3):
                start = threading.Barrier(2)
                results: list[int] = []

                def rebuild(engine: SessionEngine, start: threading.Barrier,
                            results: list[int]) -> None:
                    start.wait()
                    results.append(engine.rebuild("catalog"))

                threads = [threading.Thread(target=rebuild, args=(e, start, results))
                           for e in engines]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                assert sorted(results)[-1] == 3000
        assert not [r for r in caplog.records if r.name.startswith("psycopg")], caplog.text
        assert len(engines[0].find(tags=["t"], limit=10_000)) == 1500
    finally:
        for engine in engines:
            engine.close()


# -- review round 8: the CLI as an operator uses it ------------------------------------------


def test_verify_keeps_its_exit_status_when_the_reader_goes_away(
    backend: Backend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from sessionledger.cli import main

    with SessionEngine(backend.url) as engine:
        sid = engine.create("s")
        engine.update(sid, {"a": 1})
    backend.sql("UPDATE sl_events SET actor = 'mallory' WHERE session_id = ? AND version = 2",
                (sid,))

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError

        def flush(self) -> None:
            raise BrokenPipeError

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["verify", "--url", backend.url]) == 2  # `verify | head`: still a failure
    assert main(["ls", "--url", backend.url]) == 0


def test_an_at_least_once_position_never_moves_back(engine: SessionEngine) -> None:
    # two processes running one at-least-once subscriber each record the end of their batch
    subscriptions = engine._subscriptions
    subscriptions.advance_now("mailer", 7000)
    subscriptions.advance_now("mailer", 3000)  # the slower one records last
    assert {s.name: s.position for s in engine.subscribers()}["mailer"] == 7000
    subscriptions.advance_now("mailer", 9000)
    assert {s.name: s.position for s in engine.subscribers()}["mailer"] == 9000


def test_tables_escape_what_a_terminal_would_act_on(cli: Cli, backend: Backend) -> None:
    with SessionEngine(backend.url) as engine:
        sid = engine.create("s", state={"plain": 1})
        engine.update(sid, {"two\nlines": 1, "clear\x1b[2J": 2})
    out = cli.ok("diff", sid, "1", "2")
    assert "\x1b" not in out and "two\\nlines" in out and "clear\\x1b[2J" in out
    assert len(out.splitlines()) == 5  # title, header, rule, two rows
    # values too, wherever the CLI prints them (an 8-bit CSI and a NEL are C1 controls)
    engine2 = SessionEngine(backend.url)
    engine2.update(sid, {"v": "x\x9b2J\x85y\x7f"})
    engine2.close()
    for argv in (["show", sid], ["timeline"], ["history", sid], ["show", sid, "--json"],
                 ["timeline", "--json"], ["blame", sid, "v"]):
        shown = cli.ok(*argv)
        assert not any(c in shown for c in "\x9b\x85\x7f\x1b"), (argv, shown)
        assert "\\u009b" in shown or "\\x9b" in shown, (argv, shown)


def test_a_stopped_runner_is_stopped_once_and_close_lets_its_batch_finish(
    backend: Backend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ctrl-C in `subscribers run` stopped the runner, then close() stopped it again: two waits
    # of 10 s. Now the CLI leaves it to close(), which waits for a batch still running (its
    # position is recorded) also when the runner's owner stopped it already.
    import threading

    from sessionledger.cli import cmd_subscribers_run
    from sessionledger.subscribers import SubscriberThread

    release, entered = threading.Event(), threading.Event()
    waits: list[float | None] = []
    stop = SubscriberThread.stop

    def counted(self: SubscriberThread, timeout: float | None = 10.0) -> bool:
        waits.append(timeout)
        return stop(self, timeout)

    monkeypatch.setattr(SubscriberThread, "stop", counted)
    engine = SessionEngine(backend.url)
    engine.subscribe("slow", lambda event: (entered.set(), release.wait(10)))
    engine.create("s")
    runner = engine.run_subscribers()
    assert entered.wait(10)
    assert runner.stop(timeout=0.1) is False  # its owner gave up waiting
    threading.Timer(0.3, release.set).start()
    engine.close()  # waits for the batch under way
    assert waits == [0.1, 10.0] and not runner.running
    with SessionEngine(backend.url) as fresh:
        assert {s.name: s.position for s in fresh.subscribers()}["slow"] >= 1

    # the CLI: one stop, by close(), when Ctrl-C ends its loop
    waits.clear()
    import argparse

    import sessionledger.cli as cli_module

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    # (the CLI module's own `time` only: the runner's thread keeps the real sleep)
    monkeypatch.setattr(cli_module, "time", argparse.Namespace(sleep=interrupted))
    args = argparse.Namespace(setup=None, until_idle=False, json=False)
    with SessionEngine(backend.url) as engine, pytest.raises(KeyboardInterrupt):
        engine.subscribe("quick", lambda event: None)
        cmd_subscribers_run(engine, args)
    assert waits == [10.0]
