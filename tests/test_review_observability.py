"""Review round 13, observability: each test failed on the code before its fix."""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from typing import Any

import pytest
from _helpers import Backend, Cli
from conftest import EngineFactory
from sqlalchemy.engine import make_url
from test_hooks_engine import samples

import sessionledger.subscribers as subscribers_module
from sessionledger import RetentionPolicy, SessionEngine, SessionEvent, StorageError
from sessionledger.cli import _next_page_command, main
from sessionledger.infrastructure.store import safe_url


def test_a_password_is_never_shown(capsys: pytest.CaptureFixture[str]) -> None:
    """A URL that did not parse was echoed raw; a password given as ?password= was shown by
    engine.url and every StorageError; the CLI echoed an undecodable --url whole; the `ls`
    next-page line printed the URL as given."""
    with pytest.raises(StorageError) as bad_port:
        SessionEngine("postgresql+psycopg://app:hunter2@db.example:54x2/app")
    assert "hunter2" not in str(bad_port.value) and "app:***@" in str(bad_port.value)
    assert safe_url(make_url("postgresql+psycopg://app@h/db?password=hunter2&sslmode=require")
                    ) == "postgresql+psycopg://app@h/db?password=***&sslmode=require"
    with pytest.raises(StorageError) as refused:  # (nothing listens on port 1)
        SessionEngine("postgresql+psycopg://app@127.0.0.1:1/db?password=hunter2"
                      "&connect_timeout=2")
    assert "hunter2" not in str(refused.value)
    assert main(["ls", "--url", "postgresql://app:hunter2@h/db\udcff"]) == 1
    assert "hunter2" not in capsys.readouterr().err
    listing = argparse.Namespace(url="postgresql+psycopg://app:hunter2@h/db", status=None,
                                 tag=None, name=None, parent=None, limit=10)
    line = _next_page_command(listing, "CURSOR")
    assert "hunter2" not in line and "--url=URL" in line
    listing.url = "postgresql+psycopg://app@h/db"
    assert "--url=postgresql+psycopg://app@h/db" in _next_page_command(listing, "CURSOR")


def test_verify_escapes_what_a_tampered_row_holds(
        cli: Cli, backend: Backend, engine_factory: EngineFactory) -> None:
    """verify printed problems raw: a session id edited to hold escape sequences could clear
    the screen and draw a fake 'ok' (the tables and --json escaped them already)."""
    engine = engine_factory()
    sid = engine.create("s")
    engine.update(sid, {"k": 1})
    forged = "\x1b[2J\x1b[Hchecked 1 sessions: ok\n"
    backend.sql("UPDATE sl_events SET session_id = ? WHERE session_id = ? AND version = 2",
                (forged, sid))
    code, out, err = cli("verify")
    assert code == 2 and err == ""
    assert "\x1b" not in out and "\\x1b[2J" in out
    assert len(out.splitlines()) == 2  # the summary and the one problem: no line split


@pytest.mark.timeout(60)
def test_a_failing_subscriber_logs_its_traceback_once_and_backs_off(
        engine_factory: EngineFactory, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The background runner retried a failing subscriber every second, for good, logging an
    ERROR with the full traceback each time, and said nothing once it recovered."""
    monkeypatch.setattr(subscribers_module, "_FIRST_RETRY", 0.05)
    monkeypatch.setattr(subscribers_module, "_LAST_RETRY", 0.4)
    engine = engine_factory()
    engine.create("s")
    broken = [True]
    calls: list[float] = []

    def mailer(event: SessionEvent) -> None:
        calls.append(time.monotonic())
        if broken[0]:
            raise ConnectionError("smtp down")

    engine.subscribe("mailer", mailer)
    with caplog.at_level(logging.INFO, logger="sessionledger.subscribers"):
        runner = engine.run_subscribers()
        while len(calls) < 6:
            time.sleep(0.02)
        broken[0] = False
        deadline = time.monotonic() + 10
        while "mailer" in runner.errors or not any(
                "recovered" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, caplog.records
            time.sleep(0.02)
        runner.stop()
    failures = [r for r in caplog.records if "smtp down" in r.getMessage()]
    assert [r.levelno for r in failures[:3]] == [logging.ERROR, logging.WARNING, logging.WARNING]
    assert [bool(r.exc_info) for r in failures] == [True] + [False] * (len(failures) - 1)
    assert all(getattr(r, "position", None) for r in failures)
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls[:6])]
    assert gaps[-1] > 2 * gaps[0]  # backing off


def test_a_failing_hooks_latency_excludes_the_logging_of_its_failure(
        engine: SessionEngine) -> None:
    """The clock stopped after the failure was logged: with a 50 ms log handler a hook that
    raised at once measured 50 ms a call."""

    class SlowHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            time.sleep(0.05)

    def fails(event: SessionEvent) -> None:
        raise ValueError("boom")

    hooks_log = logging.getLogger("sessionledger.hooks")
    slow = SlowHandler()
    hooks_log.addHandler(slow)
    try:
        engine.hooks.subscribe(fails, name="fails")
        engine.create("s")
    finally:
        hooks_log.removeHandler(slow)
    latency = engine.metrics()["hook_latency_seconds"]["fails"]
    assert latency["count"] == 1 and latency["sum"] < 0.02


def test_rebuild_counts_events_not_positions(engine_factory: EngineFactory) -> None:
    """After a purge of a 60-event session the log holds 2 events, but rebuild() returned 62
    (positions), and the CLI's events/s counted the hole too."""
    engine = engine_factory()
    big = engine.create("big")
    for n in range(58):
        engine.update(big, {"n": n})
    engine.end(big)
    engine.create("kept")
    engine.cleanup(RetentionPolicy(max_age=0, purge=True))
    remaining = len(list(engine.timeline()))
    assert remaining == 1
    assert engine.rebuild("catalog") == remaining


def test_prometheus_lists_counters_from_zero(engine: SessionEngine) -> None:
    """hook_errors_total and snapshots_skipped_total had no sample before their first count,
    so rate() and increase() never saw a first failure."""
    engine.hooks.subscribe(lambda event: None, name="quiet")
    found = samples(engine.metrics(format="prometheus"))
    assert found[("sessionledger_hook_errors_total", frozenset({("hook", "quiet")}))] == 0
    for reason in ("newer_format", "corrupted", "incomplete"):
        assert found[("sessionledger_snapshots_skipped_total",
                      frozenset({("reason", reason)}))] == 0


def test_a_hook_name_made_from_code_is_escaped(engine: SessionEngine,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A name built from a handler's qualname went in unchecked: a lone surrogate in it broke
    every Prometheus exposition (UnicodeEncodeError), a newline split the log line."""

    def handler(event: Any) -> None:
        raise ValueError("x")

    handler.__qualname__ = "odd\nname\udcff"
    subscription = engine.hooks.subscribe(handler)
    assert subscription.name.isprintable() and "\\n" in subscription.name
    with caplog.at_level(logging.ERROR, logger="sessionledger.hooks"):
        engine.create("s")
    assert all("\n" not in r.getMessage() for r in caplog.records)
    assert "odd" in engine.metrics(format="prometheus")


def test_the_diff_table_lists_ten_events_a_key(cli: Cli, engine_factory: EngineFactory) -> None:
    """Review round 14: over a wide span the EVENTS cell listed every event that touched the
    key, megabytes on one line for a key changed 100,000 times; --json keeps every one."""
    engine = engine_factory()
    sid = engine.create("s", state={"n": 0})
    for n in range(1, 26):
        engine.update(sid, {"n": n})
    row = next(line for line in cli.ok("diff", sid, "1", "26").splitlines()
               if line.startswith("changed"))
    assert row.count(" by ") == 10 and row.endswith("and 15 more (--json lists them all)")
    changed = cli.json("diff", sid, "1", "26")["changed"]["n"]
    assert len(changed["changes"]) == 25
