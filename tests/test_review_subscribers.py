"""Review round 16 (subscribers): durable subscribers and the metrics hook under failures."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import pytest
from conftest import EngineFactory

from sessionledger import SessionConfig, StorageError, SubscriberFailed


def wait_for(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_handler_raising_systemexit_does_not_end_the_background_runner(
        engine_factory: EngineFactory) -> None:
    """A SystemExit (or GeneratorExit, asyncio's CancelledError) out of a handler ended the
    runner's thread without a word, and every subscriber, the catalog too, stopped for good."""
    engine = engine_factory(SessionConfig(lifecycle_hooks=False))
    sid = engine.create("x")
    failing = [True]

    def exits(event: Any) -> None:
        if failing[0]:
            sys.exit(1)

    delivered: list[Any] = []
    engine.subscribe("a_exits", exits)
    engine.subscribe("b_other", delivered.append)
    runner = engine.run_subscribers()
    try:
        assert wait_for(lambda: "a_exits" in runner.errors)
        assert isinstance(runner.errors["a_exits"], SystemExit)
        engine.update(sid, {"k": 1})
        assert wait_for(lambda: len(delivered) == 2)  # the others keep going
        failing[0] = False
        assert wait_for(lambda: not runner.errors)  # retried, recovered
        assert runner.running
        assert {s.name: s.lag for s in engine.subscribers()} == {
            "a_exits": 0, "b_other": 0, "catalog": 0}
    finally:
        runner.stop()


def test_until_idle_catches_every_other_subscriber_up_before_it_raises(
        engine_factory: EngineFactory) -> None:
    """run_subscribers(until_idle=True) stopped at the first failing subscriber: the ones
    after it never got anything, at every call."""
    engine = engine_factory(SessionConfig(lifecycle_hooks=False))
    engine.create("x")

    def broken(event: Any) -> None:
        raise RuntimeError("broken")

    delivered: list[Any] = []
    engine.subscribe("a_broken", broken)
    engine.subscribe("b_ok", delivered.append)
    with pytest.raises(SubscriberFailed) as failed:
        engine.run_subscribers(until_idle=True)
    assert failed.value.name == "a_broken"
    assert len(delivered) == 1
    assert {s.name: s.lag for s in engine.subscribers()}["b_ok"] == 0


def test_an_at_least_once_handler_cannot_run_its_own_subscriber_again(
        engine_factory: EngineFactory) -> None:
    """Its handler calling run_subscribers(until_idle=True) delivered the same event again,
    about 200 times, until the recursion limit."""
    engine = engine_factory(SessionConfig(lifecycle_hooks=False))
    engine.create("x")
    sent: list[int | None] = []
    nested: list[BaseException] = []

    def mailer(event: Any) -> None:
        sent.append(event.position)
        try:
            engine.run_subscribers(until_idle=True)
        except StorageError as error:
            nested.append(error)

    engine.subscribe("mailer", mailer)
    assert engine.run_subscribers(until_idle=True)["mailer"] == 1
    assert sent == [1]
    assert len(nested) == 1 and "its own handler" in str(nested[0])


def test_close_from_a_handler_does_not_wait_for_the_other_runners_under_it(
        engine_factory: EngineFactory, caplog: pytest.LogCaptureFixture) -> None:
    """close() called by a transactional handler joined the engine's other runner, which
    waited for that very batch (its tracking row, the command lock): the handler stalled for
    the 10 s timeout and a warning said a handler still ran."""
    engine = engine_factory(SessionConfig(lifecycle_hooks=False))
    sid = engine.create("x")
    closed = []

    def closer(event: Any, conn: Any) -> None:
        if event.type == "EventRecorded":
            engine.close()
            closed.append(True)

    engine.subscribe("closer", closer, transactional=True)
    first, second = engine.run_subscribers(), engine.run_subscribers()
    with caplog.at_level(logging.WARNING):
        engine.record(sid, "shutdown", {})
        assert wait_for(lambda: not first.running and not second.running, timeout=20)
    assert closed == [True]
    assert not [r for r in caplog.records if "did not stop" in r.getMessage()]
    with pytest.raises(StorageError, match="closed"):
        engine.get(sid)


def test_the_metrics_gauge_follows_what_another_engine_did(
        engine_factory: EngineFactory) -> None:
    """The MetricsHook kept the status it had seen: a recovery (restore_recent) of a session
    another engine suspended counted it ACTIVE, and an update after another engine's resume
    left it SUSPENDED."""
    a, b = engine_factory(), engine_factory()
    sid = a.create("x")
    b.suspend(sid)
    assert a.restore_recent(10)[0].status.value == "SUSPENDED"
    statuses = {k: v for k, v in a.metrics()["sessions"].items() if v}
    assert statuses == {"SUSPENDED": 1}
    b.resume(sid)
    a.update(sid, {"k": 1})
    assert {k: v for k, v in a.metrics()["sessions"].items() if v} == {"ACTIVE": 1}


@pytest.mark.postgresql
def test_the_waker_listens_again_after_an_outage(pg_backend: Any) -> None:
    """Review round 16 (error paths): a LISTEN connection lost while no new one could be made
    left the runner polling every 50 ms for good, never woken by NOTIFY again. It now tries
    again, at most once a second."""
    from sessionledger import SessionEngine
    from sessionledger.infrastructure.subscriptions import Waker

    with SessionEngine(pg_backend.url) as engine:
        store = engine._store
        waker = Waker(store)
        try:
            assert waker._fairy is not None
            real = store.engine.raw_connection
            attempts: list[int] = []

            def down() -> Any:
                attempts.append(1)
                raise OSError("server down")

            waker._fairy.invalidate()  # lost ...
            waker._fairy = None
            store.engine.raw_connection = down  # type: ignore[method-assign]
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:  # ... while the server is down
                waker.wait(0.01)
            assert len(attempts) == 1  # tried, then not again within the second
            store.engine.raw_connection = real  # type: ignore[method-assign]
            deadline = time.monotonic() + 3
            while waker._fairy is None and time.monotonic() < deadline:
                waker.wait(0.05)
            assert waker._fairy is not None  # listening again
        finally:
            waker.close()


def test_an_interrupt_in_a_transactional_batch_whose_rollback_fails_stays_an_interrupt(
        engine_factory: EngineFactory) -> None:
    """Review round 16 (error paths): the rollback after an interrupt in a transactional batch
    could fail too (PostgreSQL: a connection the interrupt left busy), and its error replaced
    the interrupt: the caller saw StorageError "another command is already in progress"."""
    engine = engine_factory(SessionConfig(lifecycle_hooks=False))
    sid = engine.create("x")
    armed = [True]

    def handler(event: Any, conn: Any) -> None:
        if armed[0]:
            armed[0] = False

            def rollback() -> None:
                raise OSError("another command is already in progress")

            conn.rollback = rollback
            raise KeyboardInterrupt

    engine.subscribe("t", handler, transactional=True)
    with pytest.raises(KeyboardInterrupt):
        engine.run_subscribers(until_idle=True)
    assert engine.run_subscribers(until_idle=True)["t"] == 1  # delivered again, once
    assert engine.update(sid, {"k": 1}) == 2


@pytest.mark.parametrize("transactional", [False, True])
def test_durable_subscribers_receive_the_session_name(
        engine_factory: EngineFactory, transactional: bool) -> None:
    """Review round 16 (contract): durable handlers got session_name=None where hooks and
    timeline() give the name; a mailer subscribed to SessionEnded wants it. Batches of one
    event make every name but the first come from the lookup, not the feed."""
    engine = engine_factory(SessionConfig(lifecycle_hooks=False))
    first = engine.create("first-run")
    second = engine.create("second-run")
    engine.end(first, outcome="completed")
    engine.end(second, outcome="failed")
    got: list[Any] = []

    def handler(event: Any, *conn: Any) -> None:
        got.append((event.session_id, event.type, event.session_name))

    engine.subscribe("ended", handler, events=["SessionEnded"], transactional=transactional)
    engine.run_subscribers(until_idle=True, batch_size=1)
    assert got == [(first, "SessionEnded", "first-run"), (second, "SessionEnded", "second-run")]
