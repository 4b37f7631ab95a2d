"""Review round 15 (a process that runs for days, and the code read again): what grew, churned
or went wrong without bound."""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import Backend
from conftest import EngineFactory

from sessionledger import SessionEngine, StorageError
from sessionledger.infrastructure.subscriptions import Waker


@pytest.fixture
def over_1024_descriptors() -> Iterator[None]:
    """More than 1,024 files open (a server's sockets and clients), so the next ones opened
    get descriptors past what select() takes."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip(f"the open files limit is {soft}")
    opened = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        yield
    finally:
        for fd in opened:
            os.close(fd)


def test_the_listener_waits_on_a_descriptor_past_1024(
        pg_backend: Backend, over_1024_descriptors: None) -> None:
    """The PostgreSQL waker waited with select(), which refuses a descriptor of 1,024 or more:
    each wait failed at once, was taken for a broken connection and opened a new one (48 new
    server connections a second from an idle runner, and no NOTIFY ever woke it)."""
    with SessionEngine(pg_backend.url) as engine:
        waker = Waker(engine._store)
        try:
            listening = waker._fairy
            assert listening.dbapi_connection.fileno() >= 1024
            for _ in range(5):  # (other databases' commits may wake it: the channel is shared)
                waker.wait(0.05)
                assert waker._fairy is listening
            # a NOTIFY (a commit) wakes it before its timeout
            commit = threading.Timer(0.2, lambda: engine.create("s"))
            commit.start()
            started = time.monotonic()
            waker.wait(10)
            assert time.monotonic() - started < 5
            commit.join()
            assert waker._fairy is listening
        finally:
            waker.close()


def test_the_figures_of_unsubscribed_hooks_go(memory_engine: SessionEngine) -> None:
    """The MetricsHook kept a latency entry and three Prometheus series for every hook name
    ever subscribed: a hook per session, each named, grew them (and every scrape) for good."""
    engine = memory_engine
    sid = engine.create("s")
    kept = engine.hooks.subscribe(lambda event: None, name="kept")
    twin = engine.hooks.subscribe(lambda event: None, name="kept")  # two share the name
    for i in range(50):
        hook = engine.hooks.subscribe(lambda event: None, sessions=[sid], name=f"sse-{i}")
        engine.update(sid, {"i": i})
        hook.unsubscribe()
    failing = engine.hooks.subscribe(lambda event: 1 / 0, name="failing")
    engine.update(sid, {"i": -1})
    assert engine.metrics()["hook_errors_total"] == {"failing": 1}
    failing.unsubscribe()
    twin.unsubscribe()
    engine.update(sid, {"i": -2})
    figures = engine.metrics()
    assert set(figures["hook_latency_seconds"]) == {"LoggingHook", "MetricsHook", "kept"}
    assert figures["hook_latency_seconds"]["kept"]["count"] == 52 * 2 - 1
    assert figures["hook_errors_total"] == {}
    exposition = engine.metrics(format="prometheus")
    assert "sse-" not in exposition and "failing" not in exposition
    assert 'sessionledger_hook_errors_total{hook="kept"} 0.0' in exposition
    kept.unsubscribe()
    assert "kept" not in engine.metrics()["hook_latency_seconds"]


def test_a_failed_subscriber_unsubscribed_leaves_the_runner_idle(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A durable subscriber that failed, then was unsubscribed, kept its retry time (soon
    past) in the background runner: every idle wait was then 0 s, a busy loop (2,045 waits a
    second on SQLite, each a poll), and the runner kept listing its error."""
    caplog.set_level(logging.CRITICAL, logger="sessionledger")
    with SessionEngine(f"sqlite:///{tmp_path / 'a.db'}") as engine:
        engine.create("s")

        def failing(event: Any) -> None:
            raise RuntimeError("boom")

        engine.subscribe("failing", failing)
        handle = engine.run_subscribers()
        deadline = time.monotonic() + 10
        while "failing" not in handle.errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "failing" in handle.errors
        engine.unsubscribe("failing")
        time.sleep(1.5)  # past its retry time (1 s after the failure)
        waits = 0
        real_wait = handle._waker.wait

        def counted(timeout: float) -> None:
            nonlocal waits
            waits += 1
            real_wait(timeout)

        handle._waker.wait = counted  # type: ignore[method-assign]
        time.sleep(1.0)
        assert waits < 100, waits  # a 50 ms poll: about 20
        assert handle.errors == {}


def test_the_figures_of_a_hook_that_unsubscribes_itself_go(
        memory_engine: SessionEngine) -> None:
    """A one-shot hook unsubscribing in its own call was forgotten, then that call's latency
    (or error) figure came and stayed for good: the release above missed the README's own
    case of a hook per session."""
    engine = memory_engine
    sid = engine.create("s")
    def one_shot(name: str, fails: bool) -> None:
        subscribed: list[Any] = []

        def once(event: Any) -> None:
            subscribed[0].unsubscribe()
            if fails:
                raise RuntimeError("after unsubscribing")

        subscribed.append(engine.hooks.subscribe(once, sessions=[sid], name=name))

    for i in range(20):
        one_shot(f"once-{i}", fails=False)
        one_shot(f"failing-{i}", fails=True)
        engine.update(sid, {"i": i})
    figures = engine.metrics()
    assert set(figures["hook_latency_seconds"]) == {"LoggingHook", "MetricsHook"}
    assert figures["hook_errors_total"] == {}
    assert "once-" not in engine.metrics(format="prometheus")


def test_a_tracking_row_that_cannot_be_locked_delivers_nothing(
        pg_backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """(Review round 15, code reading.) A tracking row deleted each of the three times a
    subscriber waited for its lock (rebuilds racing): the subscriber went on unlocked from
    position 0, and an exactly-once subscriber was handed its whole log again."""
    from sessionledger.infrastructure.subscriptions import SubscriptionStore

    with SessionEngine(pg_backend.url) as engine:
        sid = engine.create("s")
        engine.update(sid, {"n": 1})
        seen: list[int] = []
        engine.subscribe("counter", lambda event: seen.append(event.position))
        engine.run_subscribers(until_idle=True)
        assert len(seen) == 2
        engine.update(sid, {"n": 2})  # (behind: a caught-up subscriber locks nothing)
        monkeypatch.setattr(SubscriptionStore, "_locked_row", lambda self, conn, name: None)
        with pytest.raises(StorageError, match="cannot lock the tracking row"):
            engine.run_subscribers(until_idle=True)
        assert len(seen) == 2


def test_a_keyed_command_that_changes_nothing_keeps_the_session_loaded(
        engine_factory: EngineFactory) -> None:
    """The session leaves the working set while its command commits; a keyed command that
    changed nothing (only its key written) never put it back, so the next command loaded it
    from the database again."""
    engine = engine_factory()
    sid = engine.create("s", state={"n": 1})
    assert sid in engine._writer._working_set
    assert engine.update(sid, {"n": 1}, idempotency_key="same") == 1
    assert sid in engine._writer._working_set
    assert engine.update(sid, {"n": 2}) == 2
    assert engine.get(sid).state == {"n": 2}
