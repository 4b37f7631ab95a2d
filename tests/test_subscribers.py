"""Durable subscribers end to end (issue 4): catch-up in global order, resume after a restart,
filters, at-least-once and exactly-once delivery, the background runner, subscribers() and
gap-free positions on PostgreSQL while a writer's transaction is held open.

Every backend test runs on a SQLite file and on PostgreSQL; the gap tests are PostgreSQL only
(SQLite serialises writers with its database lock).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from _helpers import POSTGRESQL, Backend
from sqlalchemy.engine import Connection, make_url

from sessionledger import (
    InvalidArgument,
    RetentionPolicy,
    SessionConfig,
    SessionEngine,
    SessionEvent,
    SessionLedgerError,
)
from sessionledger.domain.events import EVENT_SCHEMAS, SESSION_STARTED
from sessionledger.infrastructure.codec import GENESIS_DIGEST, PayloadCodec, chain_digest
from sessionledger.subscribers import SubscriberFailed

EngineFactory = Callable[..., SessionEngine]

pytestmark = pytest.mark.timeout(60)

#: the advisory lock key EventStore.append holds on PostgreSQL from BEGIN to COMMIT
APPEND_LOCK_KEY = 0x736C01


class Collector:
    """An at-least-once handler that keeps what it was given (thread-safe)."""

    def __init__(self, fail_at: set[int] | None = None, fail_times: int = 1) -> None:
        self.events: list[SessionEvent] = []
        self.attempts: list[int] = []
        self.fail_at = fail_at or set()
        self.fail_times = fail_times
        self._failed: dict[int, int] = {}
        self._lock = threading.Lock()
        self.arrived = threading.Condition(self._lock)

    def __call__(self, event: SessionEvent) -> None:
        assert event.position is not None
        with self._lock:
            self.attempts.append(event.position)
            if event.position in self.fail_at and self._failed.get(event.position, 0) < (
                self.fail_times
            ):
                self._failed[event.position] = self._failed.get(event.position, 0) + 1
                raise RuntimeError(f"handler failed at {event.position}")
            self.events.append(event)
            self.arrived.notify_all()

    @property
    def positions(self) -> list[int]:
        with self._lock:
            return [e.position for e in self.events]  # type: ignore[misc]

    def wait_for(self, count: int, timeout: float = 15.0) -> bool:
        with self._lock:
            return self.arrived.wait_for(lambda: len(self.events) >= count, timeout)


def feed(backend: Backend) -> list[tuple[int, str, int, str]]:
    """(position, session id, version, type) of every stored event in position order."""
    return [(int(p), s, int(v), t) for p, s, v, t in backend.sql(
        "SELECT position, session_id, version, type FROM sl_events ORDER BY position")]


def positions(backend: Backend) -> list[int]:
    return [row[0] for row in feed(backend)]


def tracked(backend: Backend, name: str) -> int | None:
    rows = backend.sql("SELECT position FROM sl_tracking WHERE name = ?", (name,))
    return int(rows[0][0]) if rows else None


def write_some(engine: SessionEngine, sessions: int = 3, updates: int = 3) -> list[str]:
    """Interleaved commands on a few sessions (every event type a normal run produces)."""
    ids = [engine.create(f"w{i}", state={"n": 0}) for i in range(sessions)]
    for n in range(1, updates + 1):
        for sid in ids:
            engine.update(sid, {"n": n})
    engine.checkpoint(ids[0], "cp")
    engine.end(ids[-1])
    return ids


def quiet(**fields: Any) -> SessionConfig:
    return SessionConfig(lifecycle_hooks=False, **fields)


def status_of(engine: SessionEngine, name: str) -> Any:
    return next(s for s in engine.subscribers() if s.name == name)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


ROWS_TABLE = ("CREATE TABLE sub_rows (position BIGINT NOT NULL, session_id VARCHAR(36) NOT NULL, "
              "type VARCHAR(64) NOT NULL)")


def row_writer(fail_at: set[int] | None = None, sleep: float = 0.0
               ) -> Callable[[SessionEvent, Connection], None]:
    """A transactional handler: one row per event into sub_rows, through the connection it
    receives; raises *after* writing the row of a position in `fail_at` (once each)."""
    failed: set[int] = set()

    def handle(event: SessionEvent, connection: Connection) -> None:
        connection.execute(
            sa.text("INSERT INTO sub_rows (position, session_id, type) VALUES (:p, :s, :t)"),
            {"p": event.position, "s": event.session_id, "t": event.type})
        if sleep:
            time.sleep(sleep)
        if fail_at and event.position in fail_at and event.position not in failed:
            failed.add(event.position)
            raise RuntimeError(f"failed after writing {event.position}")

    return handle


def written_rows(backend: Backend) -> list[int]:
    return [int(r[0]) for r in backend.sql("SELECT position FROM sub_rows ORDER BY position")]


# -- catching up -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1000, 4])
def test_run_until_idle_delivers_everything_in_global_order(
    engine_factory: EngineFactory, backend: Backend, batch_size: int
) -> None:
    writer = engine_factory(quiet())
    reader = engine_factory(quiet())
    ids = write_some(writer)
    collector = Collector()
    reader.subscribe("audit", collector)
    delivered = reader.run_subscribers(until_idle=True, batch_size=batch_size)
    stored = feed(backend)
    assert len(stored) == 3 + 9 + 2
    assert delivered["audit"] == len(stored)
    assert delivered["catalog"] == len(stored)  # the built-in catalog is a subscriber too
    assert [(e.position, e.session_id, e.version, e.type) for e in collector.events] == stored
    # the data is what history() shows
    for sid in ids:
        mine = [e for e in collector.events if e.session_id == sid]
        assert [e.data for e in mine] == [e.data for e in writer.history(sid)]
        assert [e.timestamp for e in mine] == [e.timestamp for e in writer.history(sid)]
    assert status_of(reader, "audit").position == stored[-1][0]
    # nothing pending: a second run delivers nothing
    assert reader.run_subscribers(until_idle=True, batch_size=batch_size) == {
        "catalog": 0, "audit": 0}
    assert len(collector.events) == len(stored)
    # new events only
    writer.update(ids[0], {"n": 100})
    assert reader.run_subscribers(until_idle=True)["audit"] == 1
    assert collector.events[-1].position == positions(backend)[-1]


def test_several_subscribers_each_get_everything(engine_factory: EngineFactory) -> None:
    engine = engine_factory(quiet())
    write_some(engine, sessions=2, updates=2)
    a, b = Collector(), Collector()
    engine.subscribe("a", a)
    engine.subscribe("b", b)
    result = engine.run_subscribers(until_idle=True)
    assert result["a"] == result["b"] == 8
    assert a.positions == b.positions


def test_a_restart_resumes_where_the_position_was(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    writer = engine_factory(quiet())
    write_some(writer, sessions=2, updates=2)
    first = engine_factory(quiet())
    before = Collector()
    first.subscribe("resumable", before)
    assert first.run_subscribers(until_idle=True)["resumable"] == 8
    first.close()  # the process stops

    ids = write_some(writer, sessions=2, updates=1)  # committed while nobody ran it
    second = engine_factory(quiet())
    after = Collector()
    second.subscribe("resumable", after)
    assert status_of(second, "resumable").lag == 6
    assert second.run_subscribers(until_idle=True)["resumable"] == 6
    assert {e.session_id for e in after.events} == set(ids)
    # nothing twice, nothing lost
    assert before.positions + after.positions == positions(backend)
    assert tracked(backend, "resumable") == positions(backend)[-1]


def test_events_filter(engine_factory: EngineFactory, backend: Backend) -> None:
    engine = engine_factory(quiet())
    ids = write_some(engine, sessions=3, updates=2)
    engine.end(ids[0], outcome="failed")
    ends = Collector()
    engine.subscribe("ends", ends, events=["SessionEnded", "SessionStarted"])
    assert engine.run_subscribers(until_idle=True, batch_size=2)["ends"] == 5
    expected = [(p, s, v, t) for p, s, v, t in feed(backend)
                if t in ("SessionEnded", "SessionStarted")]
    assert [(e.position, e.session_id, e.version, e.type) for e in ends.events] == expected
    # the filtered-out events count as handled: no lag, and a restart does not re-read them
    status = status_of(engine, "ends")
    assert (status.position, status.lag) == (positions(backend)[-1], 0)
    engine.update(ids[1], {"n": 7})
    assert engine.run_subscribers(until_idle=True)["ends"] == 0
    assert status_of(engine, "ends").lag == 0


def test_a_subscriber_registered_late_gets_the_whole_log(engine_factory: EngineFactory,
                                                          backend: Backend) -> None:
    engine = engine_factory(quiet())
    write_some(engine)
    engine.run_subscribers(until_idle=True)  # only the catalog
    late = Collector()
    engine.subscribe("late", late)
    assert engine.run_subscribers(until_idle=True) == {"catalog": 0, "late": 14}
    assert late.positions == positions(backend)


# -- at least once -----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1000, 3])
def test_a_failing_handler_stops_just_before_the_failed_event(
    engine_factory: EngineFactory, backend: Backend, batch_size: int
) -> None:
    engine = engine_factory(quiet())
    write_some(engine, sessions=2, updates=3)  # 10 events
    all_positions = positions(backend)
    failing = all_positions[4]
    collector = Collector(fail_at={failing})
    engine.subscribe("flaky", collector)
    with pytest.raises(SubscriberFailed) as failed:
        engine.run_subscribers(until_idle=True, batch_size=batch_size)
    assert failed.value.name == "flaky"
    assert failed.value.position == failing
    assert f"position {failing}" in str(failed.value)
    assert f"handler failed at {failing}" in str(failed.value)
    assert collector.positions == all_positions[:4]
    assert status_of(engine, "flaky").position == all_positions[3]
    assert tracked(backend, "flaky") == all_positions[3]
    # the next run re-delivers from the failed event on, and nothing before it
    assert engine.run_subscribers(until_idle=True, batch_size=batch_size)["flaky"] == 6
    assert collector.positions == all_positions
    assert collector.attempts == all_positions[:5] + all_positions[4:]


def test_a_handler_failing_on_the_first_event_leaves_the_position(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    engine = engine_factory(quiet())
    write_some(engine, sessions=1, updates=1)
    first = positions(backend)[0]
    collector = Collector(fail_at={first}, fail_times=2)
    engine.subscribe("early", collector)
    for _ in range(2):
        with pytest.raises(SubscriberFailed) as failed:
            engine.run_subscribers(until_idle=True)
        assert failed.value.position == first
        assert status_of(engine, "early").position == 0
    assert engine.run_subscribers(until_idle=True)["early"] == 4
    assert collector.positions == positions(backend)


@pytest.mark.parametrize("transactional", [False, True], ids=["at-least-once", "exactly-once"])
def test_a_handler_raising_a_library_error_is_reported_as_subscriber_failed(
    engine_factory: EngineFactory, backend: Backend, transactional: bool
) -> None:
    """A handler whose own engine command is refused (InvalidTransition) is a handler failure
    like any other: SubscriberFailed naming the subscriber and the event, position kept."""
    engine = engine_factory(quiet())
    sid = engine.create("ended")
    engine.end(sid)
    failing = positions(backend)[-1]

    def react(event: SessionEvent, connection: Connection | None = None) -> None:
        if event.type == "SessionEnded":
            engine.update(event.session_id, {"after": "end"})  # InvalidTransition

    engine.subscribe("reacts", react, transactional=transactional)
    with pytest.raises(SubscriberFailed) as failed:
        engine.run_subscribers(until_idle=True)
    assert failed.value.name == "reacts"
    assert failed.value.position == failing
    assert status_of(engine, "reacts").position < failing


@pytest.mark.parametrize("transactional", [False, True], ids=["at-least-once", "exactly-once"])
def test_the_handlers_exception_is_the_cause_of_subscriber_failed(
    engine_factory: EngineFactory, transactional: bool
) -> None:
    """The handler's own exception (with its traceback) must stay reachable for debugging."""
    engine = engine_factory(quiet())
    engine.create("x")

    class HandlerBug(Exception):
        pass

    def broken(event: SessionEvent, connection: Connection | None = None) -> None:
        raise HandlerBug("in the handler")

    engine.subscribe("broken", broken, transactional=transactional)
    with pytest.raises(SubscriberFailed) as failed:
        engine.run_subscribers(until_idle=True)
    assert isinstance(failed.value.__cause__, HandlerBug)
    assert failed.value.__cause__.__traceback__ is not None


# -- exactly once -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1000, 3])
def test_a_transactional_handler_commits_its_rows_with_the_position(
    engine_factory: EngineFactory, backend: Backend, batch_size: int
) -> None:
    backend.sql(ROWS_TABLE)
    engine = engine_factory(quiet())
    write_some(engine, sessions=2, updates=3)  # 10 events
    all_positions = positions(backend)
    failing = all_positions[7]
    engine.subscribe("projector", row_writer(fail_at={failing}), transactional=True)
    with pytest.raises(SubscriberFailed) as failed:
        engine.run_subscribers(until_idle=True, batch_size=batch_size)
    assert failed.value.name == "projector"
    # neither the failing event's row nor the position moved past it; what did commit is
    # exactly the rows up to the tracked position
    position = tracked(backend, "projector") or 0
    assert position < failing
    assert written_rows(backend) == [p for p in all_positions if p <= position]
    if batch_size == 3:  # the two batches before the failing one committed (rows + position)
        assert position == all_positions[5]
    # the retry writes every row exactly once
    assert engine.run_subscribers(until_idle=True, batch_size=batch_size)["projector"] == (
        len([p for p in all_positions if p > position]))
    assert written_rows(backend) == all_positions
    assert tracked(backend, "projector") == all_positions[-1]
    rows = backend.sql("SELECT position, session_id, type FROM sub_rows ORDER BY position")
    assert [(int(p), s, t) for p, s, t in rows] == [(p, s, t) for p, s, _, t in feed(backend)]
    # and a second run adds nothing
    engine.run_subscribers(until_idle=True)
    assert written_rows(backend) == all_positions


def test_the_failing_event_is_named_by_an_exactly_once_failure(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    backend.sql(ROWS_TABLE)
    engine = engine_factory(quiet())
    write_some(engine, sessions=2, updates=1)
    failing = positions(backend)[3]
    engine.subscribe("projector", row_writer(fail_at={failing}), transactional=True)
    with pytest.raises(SubscriberFailed) as failed:
        engine.run_subscribers(until_idle=True)
    assert failed.value.position == failing
    assert f"position {failing}" in str(failed.value)


@pytest.mark.timeout(90)
def test_two_engines_running_one_transactional_subscriber_never_apply_an_event_twice(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    backend.sql(ROWS_TABLE)
    writer = engine_factory(quiet())
    runners = [engine_factory(quiet()) for _ in range(2)]
    for runner in runners:
        runner.subscribe("shared", row_writer(sleep=0.002), transactional=True)
    done = threading.Event()
    errors: list[BaseException] = []
    counts: list[int] = [0, 0]

    def run(index: int) -> None:
        try:
            while True:
                finished = done.is_set()
                counts[index] += runners[index].run_subscribers(
                    until_idle=True, batch_size=2)["shared"]
                if finished:
                    return
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    ids = [writer.create(f"c{i}") for i in range(4)]
    for n in range(8):
        for sid in ids:
            writer.update(sid, {"n": n})
    done.set()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    expected = positions(backend)
    assert len(expected) == 36
    assert written_rows(backend) == expected  # each exactly once
    assert sum(counts) == len(expected)
    assert tracked(backend, "shared") == expected[-1]


# -- the background runner -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_background_runner_delivers_new_commits_until_stopped(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    subscriber = engine_factory(quiet())
    writer = engine_factory(quiet())
    collector = Collector()
    subscriber.subscribe("live", collector)
    handle = subscriber.run_subscribers()
    try:
        assert handle.running
        ids = write_some(writer, sessions=2, updates=2)
        assert collector.wait_for(8), collector.positions
        assert collector.positions == positions(backend)
        writer.end(ids[0])
        assert collector.wait_for(9)
    finally:
        handle.stop()
    assert not handle.running
    seen = collector.positions
    assert seen == positions(backend)
    writer.create("after-stop")
    time.sleep(0.3)
    assert collector.positions == seen  # stopped: nothing more arrives
    assert status_of(subscriber, "live").lag == 1
    # and the next run picks it up where the background runner left off
    assert subscriber.run_subscribers(until_idle=True)["live"] == 1


@pytest.mark.timeout(60)
def test_background_runner_as_context_manager_and_exactly_once(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    backend.sql(ROWS_TABLE)
    subscriber = engine_factory(quiet())
    writer = engine_factory(quiet())
    subscriber.subscribe("bg-rows", row_writer(), transactional=True)
    with subscriber.run_subscribers() as handle:
        write_some(writer, sessions=2, updates=1)
        wait_until(lambda: len(written_rows(backend)) >= 6, what="rows")
        assert handle.running
    assert not handle.running
    assert written_rows(backend) == positions(backend)


@pytest.mark.timeout(60)
def test_background_runner_keeps_others_running_and_retries_a_failure(
    engine_factory: EngineFactory, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="sessionledger.subscribers")
    subscriber = engine_factory(quiet())
    writer = engine_factory(quiet())
    sid = writer.create("bg")
    fail_at = positions(backend)[0]
    flaky = Collector(fail_at={fail_at}, fail_times=1)  # fails once, then works
    good = Collector()
    subscriber.subscribe("flaky", flaky)
    subscriber.subscribe("good", good)
    handle = subscriber.run_subscribers()
    try:
        writer.update(sid, {"n": 1})
        assert good.wait_for(2)
        assert flaky.wait_for(2, timeout=20), flaky.attempts  # retried after its pause
    finally:
        handle.stop()
    assert good.positions == flaky.positions == positions(backend)
    records = [r for r in caplog.records if r.name == "sessionledger.subscribers"]
    assert records and "flaky" in records[0].getMessage()
    assert getattr(records[0], "subscriber", None) == "flaky"


@pytest.mark.timeout(60)
def test_a_waiting_subscriber_wakes_on_commit_without_poll_delay(
    engine_factory: EngineFactory,
) -> None:
    """PostgreSQL: LISTEN/NOTIFY wakes the runner (its fallback wait is 1 s); SQLite: a 50 ms
    poll. The median of several commit-to-delivery times must stay far below 1 s."""
    subscriber = engine_factory(quiet())
    writer = engine_factory(quiet())
    sid = writer.create("wake")
    collector = Collector()
    subscriber.subscribe("wake", collector)
    handle = subscriber.run_subscribers()
    latencies = []
    try:
        assert collector.wait_for(1)
        for n in range(7):
            time.sleep(0.15)  # let the runner go back to waiting
            started = time.perf_counter()
            writer.update(sid, {"n": n})
            assert collector.wait_for(n + 2, timeout=5)
            latencies.append(time.perf_counter() - started)
    finally:
        handle.stop()
    assert statistics.median(latencies) < 0.25, latencies


# -- listing and arguments ----------------------------------------------------------------------


def test_subscribers_lists_name_position_and_lag(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    engine = engine_factory(quiet())
    engine.subscribe("b-audit", Collector())
    engine.subscribe("a-mail", Collector(), events=["SessionEnded"])
    listed = engine.subscribers()
    assert [(s.name, s.position, s.lag, s.registered) for s in listed] == [
        ("a-mail", 0, 0, True), ("b-audit", 0, 0, True), ("catalog", 0, 0, True)]
    ids = write_some(engine, sessions=2, updates=1)  # 6 events
    assert {s.name: s.lag for s in engine.subscribers()} == {
        "a-mail": 6, "b-audit": 6, "catalog": 6}
    engine.run_subscribers(until_idle=True)
    head = positions(backend)[-1]
    engine.update(ids[0], {"n": 5})
    engine.record(ids[0], "x", {})
    listed = engine.subscribers()
    assert [(s.name, s.position, s.lag) for s in listed] == [
        ("a-mail", head, 2), ("b-audit", head, 2), ("catalog", head, 2)]
    # another engine sees the tracked positions, without having registered the handlers
    other = engine_factory(quiet())
    listed = other.subscribers()
    assert [(s.name, s.position, s.lag, s.registered) for s in listed[:2]] == [
        ("a-mail", head, 2, False), ("b-audit", head, 2, False)]
    assert (listed[2].name, listed[2].registered) == ("catalog", True)
    # unsubscribe stops running it here; the position stays tracked
    engine.unsubscribe("b-audit")
    assert "b-audit" not in engine.run_subscribers(until_idle=True)
    assert status_of(engine, "b-audit").lag == 2 and not status_of(engine, "b-audit").registered


def test_lag_counts_events_still_to_deliver_also_after_a_purge(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    """SubscriberStatus.lag is "how many events it is behind". cleanup() purges events for good,
    leaving holes in the positions: lag must still be 0 for a subscriber that delivered
    everything (never negative when the newest events went), and for one that is behind, the
    number of events it will still get (not the width of the position range)."""
    engine = engine_factory(quiet())
    old = engine.create("purged-old")
    engine.update(old, {"n": 1})
    engine.end(old)
    kept = engine.create("kept")
    new = engine.create("purged-new")
    engine.update(new, {"n": 1})
    engine.end(new)
    engine.subscribe("done", Collector())
    engine.run_subscribers(until_idle=True)
    behind = Collector()
    engine.subscribe("behind", behind)
    report = engine.cleanup(RetentionPolicy(keep_last=0, purge=True))
    assert sorted(report.purged) == sorted([old, new])
    assert len(positions(backend)) == 1  # only kept's SessionStarted is left
    lags = {s.name: s.lag for s in engine.subscribers()}
    assert lags["done"] == 0
    assert lags["catalog"] == 0
    assert lags["behind"] == 1
    assert engine.run_subscribers(until_idle=True)["behind"] == 1
    assert [e.session_id for e in behind.events] == [kept]
    assert all(s.lag == 0 for s in engine.subscribers())
    engine.update(kept, {"n": 1})
    assert {s.name: s.lag for s in engine.subscribers()} == {
        "behind": 1, "catalog": 1, "done": 1}


def test_running_the_catalog_as_a_subscriber_keeps_it_current_for_other_engines(
    engine_factory: EngineFactory,
) -> None:
    """run_subscribers() also feeds the built-in catalog. A catalog brought up to date that way
    is a current catalog: an engine opened afterwards must not take it for one built by another
    projection version (with auto_rebuild=False find() would refuse; with the default the whole
    catalog would be rebuilt from the log at start-up)."""
    engine = engine_factory(quiet())
    ids = write_some(engine, sessions=2, updates=1)
    assert engine.run_subscribers(until_idle=True)["catalog"] == 6
    strict = engine_factory(quiet(auto_rebuild=False))
    assert {item.id for item in strict.find()} == set(ids)


@pytest.mark.parametrize("name", ["catalog", "catalog:rebuild"])
def test_reserved_names_are_refused(memory_engine: SessionEngine, name: str) -> None:
    with pytest.raises(InvalidArgument, match="reserved"):
        memory_engine.subscribe(name, Collector())
    assert [s.name for s in memory_engine.subscribers()] == ["catalog"]


@pytest.mark.parametrize("args, kwargs", [
    (("", Collector()), {}),
    (("x" * 300, Collector()), {}),
    (("bad\nname", Collector()), {}),
    ((None, Collector()), {}),
    (("ok", "not callable"), {}),
    (("ok", Collector()), {"events": "SessionEnded"}),
    (("ok", Collector()), {"events": ["NoSuchType"]}),
    (("ok", Collector()), {"events": []}),
])
def test_bad_subscribe_arguments(memory_engine: SessionEngine, args: tuple[Any, ...],
                                 kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        memory_engine.subscribe(*args, **kwargs)
    assert [s.name for s in memory_engine.subscribers()] == ["catalog"]


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, "10", True, None])
def test_bad_batch_size(memory_engine: SessionEngine, batch_size: Any) -> None:
    with pytest.raises(InvalidArgument):
        memory_engine.run_subscribers(until_idle=True, batch_size=batch_size)
    with pytest.raises(InvalidArgument):
        memory_engine.run_subscribers(batch_size=batch_size)


# -- gap-free positions on PostgreSQL ----------------------------------------------------------


def _pg_connect(backend: Backend, autocommit: bool = False) -> Any:
    import psycopg

    assert backend.pg_url is not None
    return psycopg.connect(backend.pg_url, autocommit=autocommit, connect_timeout=10,
                           options=f"-csearch_path={backend.pg_schema}")


def _tagged_url(backend: Backend, tag: str) -> str:
    """The backend's URL with an application_name, to find its sessions in pg_stat_activity."""
    url = make_url(backend.url).update_query_dict({"application_name": tag})
    return url.render_as_string(hide_password=False)


def _waiting(backend: Backend, tag: str, wait_event: str) -> int:
    """How many connections named `tag` wait on a lock of kind `wait_event`."""
    rows = backend.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = ? "
        "AND wait_event_type = 'Lock' AND wait_event = ?", (tag, wait_event))
    return int(rows[0][0])


def _started_row(sid: str) -> tuple[Any, ...]:
    """The sl_events row of a SessionStarted, encoded as the engine encodes it."""
    data: dict[str, Any] = {"name": "raw", "tags": [], "metadata": {}, "state": {},
                            "parent": None}
    payload, _ = PayloadCodec().encode(data, EVENT_SCHEMAS[SESSION_STARTED])
    micros = time.time_ns() // 1000
    digest = chain_digest(GENESIS_DIGEST, sid, 1, SESSION_STARTED, micros, None, None, payload)
    return (sid, 1, SESSION_STARTED, micros, None, None, payload, digest)


@contextlib.contextmanager
def _raw_append(backend: Backend, take_lock: bool) -> Iterator[int]:
    """A writer that mimics EventStore.append on its own connection (with or without the
    advisory lock) and holds its transaction open for the block: yields its event's position,
    commits at the end."""
    conn = _pg_connect(backend)
    try:
        if take_lock:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK_KEY,))
        position = conn.execute(
            "INSERT INTO sl_events (session_id, version, type, ts, actor, correlation_id, "
            "payload, digest) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING position",
            _started_row(str(uuid.uuid4()))).fetchone()[0]
        yield int(position)
        conn.execute(f"NOTIFY sl_events")  # noqa: F541 - as the store does
        conn.commit()
    finally:
        conn.close()


def _start(target: Callable[[], object], errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            target()
        except BaseException as error:  # reported by the test
            errors.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _assert_gap_free(collector: Collector, backend: Backend) -> None:
    delivered = collector.positions
    assert delivered == sorted(set(delivered)), "delivered out of order or twice"
    assert delivered == positions(backend), "an event was skipped"


@pytest.mark.postgresql
@pytest.mark.timeout(60)
def test_gap_free_while_an_engine_holds_its_append_transaction_open(
    pg_backend: Backend,
) -> None:
    """A writer engine's append is held open (its event row inserted, position taken, not
    committed) while three other engines try to commit; a subscriber runs in between. After
    the held transaction commits, the subscriber has every event exactly once, in order."""
    backend = pg_backend
    tag = f"slgap-{uuid.uuid4().hex[:8]}"
    engines: list[SessionEngine] = []
    errors: list[BaseException] = []
    try:
        held = SessionEngine(_tagged_url(backend, tag + "-held"), quiet())
        others = [SessionEngine(_tagged_url(backend, tag + "-other"), quiet()) for _ in range(3)]
        subscriber = SessionEngine(backend.url, quiet())
        engines += [held, *others, subscriber]
        held_sid = held.create("held")
        other_ids = [engine.create(f"other-{i}") for i, engine in enumerate(others)]
        collector = Collector()
        subscriber.subscribe("gapcheck", collector)
        subscriber.run_subscribers(until_idle=True)
        assert collector.positions == positions(backend)

        # hold the writer inside its transaction: it has inserted its event and waits on the
        # snapshot table, which save() always writes to
        locker = _pg_connect(backend)
        try:
            locker.execute("LOCK TABLE sl_snapshots IN EXCLUSIVE MODE")
            writers = [_start(lambda: held.save(held_sid), errors)]
            wait_until(lambda: _waiting(backend, tag + "-held", "relation") == 1,
                       what="the held writer to block mid-transaction")
            for engine, sid in zip(others, other_ids, strict=True):
                def burst(engine: SessionEngine = engine, sid: str = sid) -> None:
                    for n in range(3):
                        engine.update(sid, {"n": n})
                writers.append(_start(burst, errors))
            # the others are queued behind the held transaction (or, were the store to order
            # positions some other way, done): either way the subscriber runs now
            wait_until(lambda: _waiting(backend, tag + "-other", "advisory") == 3
                       or not any(t.is_alive() for t in writers[1:]), what="other writers")
            subscriber.run_subscribers(until_idle=True)
            in_between = collector.positions
            assert in_between == sorted(set(in_between))
        finally:
            locker.rollback()
            locker.close()
        for thread in writers:
            thread.join(30)
        assert not errors, errors
        subscriber.run_subscribers(until_idle=True)
        _assert_gap_free(collector, backend)
        assert len(collector.positions) == 4 + 1 + 9
        saved = [e for e in collector.events if e.session_id == held_sid and e.version == 2]
        assert len(saved) == 1 and saved[0].type == "SessionSaved"
        held_position = saved[0].position
        assert held_position is not None
        # while it was uncommitted the subscriber never got past it
        assert all(p < held_position for p in in_between)
    finally:
        for engine in engines:
            engine.close()


@pytest.mark.postgresql
@pytest.mark.timeout(60)
def test_gap_free_with_a_raw_writer_taking_the_append_lock(pg_backend: Backend) -> None:
    """A raw connection appending as EventStore.append does (BEGIN; advisory lock; INSERT)
    holds its transaction open: later writers queue behind it, and a subscriber running in
    between never moves past its position."""
    backend = pg_backend
    tag = f"slgap-{uuid.uuid4().hex[:8]}"
    errors: list[BaseException] = []
    engines: list[SessionEngine] = []
    try:
        others = [SessionEngine(_tagged_url(backend, tag), quiet()) for _ in range(2)]
        subscriber = SessionEngine(backend.url, quiet())
        engines += [*others, subscriber]
        ids = [engine.create("other") for engine in others]
        collector = Collector()
        subscriber.subscribe("gapcheck", collector)
        subscriber.run_subscribers(until_idle=True)
        with _raw_append(backend, take_lock=True) as held_position:
            def burst(engine: SessionEngine, sid: str) -> Callable[[], object]:
                return lambda: [engine.update(sid, {"n": n}) for n in range(3)]

            writers = [_start(burst(e, s), errors) for e, s in zip(others, ids, strict=True)]
            wait_until(lambda: _waiting(backend, tag, "advisory") == 2
                       or not any(t.is_alive() for t in writers), what="other writers")
            subscriber.run_subscribers(until_idle=True)
            assert all(p < held_position for p in collector.positions)
            assert (status_of(subscriber, "gapcheck").position or 0) < held_position
        for thread in writers:
            thread.join(30)
        assert not errors, errors
        subscriber.run_subscribers(until_idle=True)
        _assert_gap_free(collector, backend)
        assert held_position in collector.positions
        assert len(collector.positions) == 2 + 1 + 6
    finally:
        for engine in engines:
            engine.close()


@pytest.mark.postgresql
@pytest.mark.timeout(60)
def test_without_the_append_lock_a_late_commit_would_be_skipped(pg_backend: Backend) -> None:
    """The control for the two tests above: a writer that bypasses the advisory lock takes a
    position, commits after a later writer, and the subscriber - having moved past it - never
    gets it. This is the failure the lock prevents (and the gap check above would catch)."""
    backend = pg_backend
    with SessionEngine(backend.url, quiet()) as writer, \
            SessionEngine(backend.url, quiet()) as subscriber:
        sid = writer.create("other")
        collector = Collector()
        subscriber.subscribe("gapcheck", collector)
        subscriber.run_subscribers(until_idle=True)
        with _raw_append(backend, take_lock=False) as late_position:
            for n in range(3):
                writer.update(sid, {"n": n})  # not blocked: positions after late_position
            subscriber.run_subscribers(until_idle=True)
        subscriber.run_subscribers(until_idle=True)
        assert late_position in positions(backend)
        assert late_position not in collector.positions  # skipped for good
        assert status_of(subscriber, "gapcheck").position > late_position


def test_a_transactional_handler_reading_the_engine_while_another_thread_commands(
    engine_factory: EngineFactory,
) -> None:
    """The handler calls get() while another thread's update() waits for the batch. On SQLite
    the update held the engine's lock waiting for the batch's write lock, the handler waited
    for that lock: both stalled 30 s and the update failed with "database is locked"."""
    engine = engine_factory()
    sid = engine.create("s")
    in_handler, handled = threading.Event(), threading.Event()
    seen: list[int] = []

    def handler(event: SessionEvent, conn: Any) -> None:
        if event.session_id != sid or event.version != 1:
            return
        in_handler.set()
        time.sleep(0.3)  # the other thread's command starts meanwhile
        seen.append(engine.get(event.session_id).version)
        handled.set()

    engine.subscribe("reader", handler, transactional=True)
    runner = engine.run_subscribers()
    try:
        assert in_handler.wait(10)
        outcome: list[object] = []
        started = time.monotonic()

        def update() -> None:
            try:
                outcome.append(engine.update(sid, {"x": 1}))
            except SessionLedgerError as error:
                outcome.append(error)

        writer = threading.Thread(target=update)
        writer.start()
        writer.join(timeout=20)
        assert not writer.is_alive() and outcome == [2], outcome
        assert time.monotonic() - started < 5
        assert handled.wait(10) and seen[0] in (1, 2)
    finally:
        runner.stop()


def test_find_from_a_transactional_handler(engine_factory: EngineFactory,
                                           backend: Backend) -> None:
    """find() folds pending events into the catalog first. From a transactional handler on
    SQLite that needs a second write lock on the thread holding the first: it waited 30 s for
    itself, then failed. It answers when the catalog is current, and else fails at once."""
    engine = engine_factory()
    sid = engine.create("s")
    engine.find()  # the catalog is current
    found: list[object] = []

    def handler(event: SessionEvent, conn: Any) -> None:
        started = time.monotonic()
        try:
            found.append([s.id for s in engine.find()])
        except SessionLedgerError as error:
            found.append(error)
        found.append(time.monotonic() - started)

    engine.subscribe("finder", handler, transactional=True, events=["SessionStarted"])
    engine.run_subscribers(until_idle=True)
    assert found[0] == [sid] and found[1] < 5, found
    found.clear()
    engine.create("t")  # the handler runs for this event, the catalog may be behind then
    engine.run_subscribers(until_idle=True)
    if backend.kind == POSTGRESQL or not isinstance(found[0], SessionLedgerError):
        assert len(found[0]) == 2, found  # type: ignore[arg-type]
    else:  # SQLite, the catalog behind: refused at once
        assert "write lock" in str(found[0])
    assert found[1] < 5, found


def test_an_in_memory_engine_shared_by_threads() -> None:
    """sqlite:// is one connection for every thread. The background runner (catalog and a
    transactional subscriber) and another thread's find() ran transactions on it while the
    main thread's commands did: "cannot start a transaction within a transaction", lost
    commits, positions handled twice, a crash."""
    engine = SessionEngine("sqlite://")
    try:
        sids = [engine.create(f"s{i}") for i in range(10)]
        handled: list[int] = []
        engine.subscribe("tx", lambda event, conn: handled.append(event.position),
                         transactional=True)
        runner = engine.run_subscribers()
        stop = threading.Event()
        finder_errors: list[BaseException] = []

        def finder() -> None:
            while not stop.is_set():
                try:
                    engine.find(limit=5)
                    list(engine.timeline())
                except BaseException as error:  # any failure is the finding
                    finder_errors.append(error)
                    return

        other = threading.Thread(target=finder)
        other.start()
        deadline = time.monotonic() + 1.5
        updates = 0
        while time.monotonic() < deadline:
            engine.update(sids[updates % 10], {"i": updates})
            updates += 1
        stop.set()
        other.join(timeout=30)
        runner.stop()
        assert not finder_errors and not runner.errors, (finder_errors, runner.errors)
        engine.run_subscribers(until_idle=True)
        head = engine._subscriptions.head()
        assert head == 10 + updates
        assert sorted(handled) == list(range(1, head + 1))  # each once
        assert engine.verify().ok
        assert sum(s.version for s in engine.find(limit=100)) == head
    finally:
        engine.close()
