"""Review round 9: one engine shared by many threads, and errors crossing processes.

Each test here failed before its fix: errors that did not survive pickling, a runner started while
close() ran left running for good, a timeline() of an in-memory engine finished in another thread
(every later call waited for good), and threads that each held a pooled connection and needed a
second (find() inside a timeline() loop) waiting 30 s for each other, then failing.
"""

from __future__ import annotations

import pickle
import threading
import time

import pytest
from _helpers import Backend

from sessionledger import (
    CheckpointNotFound,
    ConcurrencyConflict,
    CorruptedData,
    EventTooLarge,
    InvalidArgument,
    InvalidSessionId,
    InvalidTransition,
    SessionEngine,
    SessionEvent,
    SessionNotFound,
    SessionPurged,
    SnapshotCorrupted,
    SnapshotVersionError,
    StorageError,
    UnsupportedValue,
)
from sessionledger.domain.status import SessionStatus

SID = "0190e1c2-0000-7000-8000-000000000000"


@pytest.mark.parametrize("error", [
    InvalidArgument("bad"), InvalidSessionId("x"), SessionNotFound(SID),
    SessionPurged(SID, "n", "COMPLETED", "2026-01-01"),
    InvalidTransition(SID, SessionStatus.COMPLETED, "update"), CheckpointNotFound(SID, "cp"),
    ConcurrencyConflict(SID, 2, "x"), UnsupportedValue("state.a", "no"),
    EventTooLarge(SID, "StateChanged", 10, 5), StorageError("down"),
    CorruptedData(SID, 3, "bad digest"), SnapshotCorrupted(SID, 3, "bad"),
    SnapshotVersionError(SID, 100, 3, 1),
])
def test_errors_cross_processes_as_themselves(error: Exception) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)
    assert again.__dict__ == error.__dict__ and again.args == error.args


def test_a_runner_started_while_close_runs_is_refused(backend: Backend) -> None:
    release, entered = threading.Event(), threading.Event()
    engine = SessionEngine(backend.url)
    engine.subscribe("slow", lambda event: (entered.set(), release.wait(20)))
    engine.create("s")
    runner = engine.run_subscribers()
    assert entered.wait(10)
    closing = threading.Thread(target=engine.close)  # waits for the blocked runner
    closing.start()
    try:
        deadline = time.monotonic() + 10
        while not runner._stopping.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)  # close() has begun: it asked the runner to stop
        with pytest.raises(StorageError, match="closed"):
            engine.run_subscribers()
    finally:
        release.set()
        closing.join(30)
    assert not closing.is_alive()


def test_an_in_memory_timeline_finished_in_another_thread() -> None:
    engine = SessionEngine("sqlite://")
    sid = engine.create("s")
    engine.update(sid, {"a": 1})
    events = engine.timeline()
    first = next(events)
    rest: list[SessionEvent] = []
    worker = threading.Thread(target=lambda: rest.extend(events))
    worker.start()
    worker.join(10)
    assert [first.version, *(e.version for e in rest)] == [1, 2]
    done: list[int] = []
    writer = threading.Thread(target=lambda: done.append(engine.update(sid, {"a": 2})))
    writer.start()
    writer.join(10)
    assert done == [3]
    engine.close()


def test_threads_that_need_a_second_connection_do_not_wait_on_each_other(
    backend: Backend,
) -> None:
    with SessionEngine(backend.url) as engine:
        for i in range(3):
            engine.create(f"s{i}")
        engine.find()
        outcomes: list[str] = []
        start = threading.Barrier(16)

        def reader() -> None:
            try:
                events = engine.timeline()  # holds a connection while it is read
                next(events)
                start.wait(10)
                engine.find()  # needs another
                list(events)
                outcomes.append("ok")
            except Exception as error:
                outcomes.append(repr(error))

        threads = [threading.Thread(target=reader) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert outcomes == ["ok"] * 16  # (before: StorageError after the pool's 30 s wait)
