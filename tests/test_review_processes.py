"""Review round 12, many engines on one database: each test failed on the code before its fix."""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from _helpers import Backend
from conftest import EngineFactory

from sessionledger import SessionEngine, StorageError
from sessionledger.catalog import CATALOG, REBUILD_TRACKING


def test_a_rebuild_swapped_in_by_another_engine_leaves_a_later_rebuild_alone(
        engine_factory: EngineFactory, backend: Backend) -> None:
    """B's rebuild has folded every window; before its swap, A rebuilds and swaps (B's tables
    are in) and C starts a rebuild (new "_next" tables, a new tracking row). B's swap read
    C's tracking row (or none: 0) as its own and folded the whole log into C's tables without
    holding C's row: on PostgreSQL C's window and B's swap deadlocked. B must return 0 and
    leave C's rebuild to C."""
    writer = engine_factory()
    sids = [writer.create(f"s{i}", tags=["t"]) for i in range(5)]
    for sid in sids:
        writer.update(sid, {"k": 1})
    writer.find()
    a, b, c = engine_factory(), engine_factory(), engine_factory()
    real_transaction = b._subscriptions.transaction
    others_ran: list[int] = []

    def transaction(name: str, **options: Any) -> AbstractContextManager[Any]:
        if name == CATALOG and not others_ran:  # B's swap is about to begin
            others_ran.append(a.rebuild("catalog"))
            with c._subscriptions.transaction(REBUILD_TRACKING) as (conn, _):
                c._catalog.tables.create_next(conn)  # as c.rebuild() begins
        return real_transaction(name, **options)

    b._subscriptions.transaction = transaction  # type: ignore[method-assign,assignment]
    assert b.rebuild("catalog") == 0
    assert others_ran == [0]  # A swapped in the tables B had filled (shared work)
    assert c.rebuild("catalog") == 10  # C's rebuild was left to C, from its start
    rows = [(s.id, s.version, s.event_count) for s in writer.find(limit=100)]
    writer.rebuild("catalog")
    assert [(s.id, s.version, s.event_count) for s in writer.find(limit=100)] == rows
    assert sorted(r[0] for r in rows) == sorted(sids)


# -- an engine that crosses a fork (a pre-fork server: gunicorn --preload, Celery prefork) ------

def start_forked(work: Callable[[], int], seconds: int = 60) -> int:
    """fork; the child runs `work` (its return value is the exit status; an exception is 70,
    a hang is ended by SIGALRM) and never returns to pytest; the parent gets the child's pid."""
    pid = os.fork()
    if pid == 0:
        status = 70
        try:
            signal.alarm(seconds)
            status = work()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    return pid


def exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
@pytest.mark.timeout(120)
def test_a_forked_process_uses_connections_of_its_own(
        engine_factory: EngineFactory) -> None:
    """PostgreSQL: parent and child sent commands down one inherited server connection
    (false CorruptedData, raw ValueErrors, "lost synchronization with server", hangs), and a
    child that closed its engine ended the parent's connections."""
    engine = engine_factory()
    parent_sid = engine.create("parent", state={"n": 0})
    child_sid = engine.create("child", state={"n": 0})
    assert engine.get(child_sid).version == 1

    def child() -> int:
        for n in range(1, 41):
            assert engine.update(child_sid, {"n": n}) == n + 1
            assert engine.get(child_sid, refresh=True).state == {"n": n}
        engine.close()
        return 0

    pid = start_forked(child)
    for n in range(1, 41):
        assert engine.update(parent_sid, {"n": n}) == n + 1
    assert exit_code(pid) == 0
    # the parent's connections outlived the child's close()
    assert engine.update(parent_sid, {"n": 100}) == 42
    fresh = engine_factory()
    assert fresh.get(child_sid).state == {"n": 40} and fresh.get(child_sid).version == 41
    assert fresh.get(parent_sid).version == 42
    assert fresh.verify().ok


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
@pytest.mark.timeout(120)
def test_writes_of_a_forked_process_outlive_the_parent_closing(tmp_path: Path) -> None:
    """SQLite: fcntl locks do not cross a fork, so the child's inherited connections held none;
    the parent's close() (its last connection) checkpointed and deleted the write-ahead log the
    child went on writing to: every write acknowledged, every one lost."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    engine = SessionEngine(url)
    sid = engine.create("worker", state={"n": 0})
    ready, go = os.pipe()

    def child() -> int:
        os.read(ready, 1)  # the parent has closed its engine
        for n in range(1, 31):
            engine.update(sid, {"n": n})
        engine.create("made-by-child")
        return 0  # and exits as a killed worker would, without close()

    pid = start_forked(child)
    engine.close()
    os.write(go, b"x")
    assert exit_code(pid) == 0
    with SessionEngine(url) as fresh:
        assert fresh.get(sid).version == 31
        assert len(fresh.list_sessions()) == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
@pytest.mark.timeout(120)
# (it forks a multi-threaded process on purpose: Python 3.12+ warns about that)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_fork_while_another_thread_holds_the_engine_lock(
        engine_factory: EngineFactory) -> None:
    """The child inherited the engine's lock held by a thread that did not come along: its
    first call waited for good."""
    engine = engine_factory()
    sid = engine.create("s")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with engine._store.commands_lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        child = start_forked(lambda: 0 if engine.update(sid, {"k": 1}) == 2 else 1, seconds=20)
        assert exit_code(child) == 0
    finally:
        release.set()
        holder.join()
    assert engine.update(sid, {"k": 2}) == 3  # after the child's version 2


# -- interrupts and close() in odd places -----------------------------------------------------

def test_an_interrupt_between_commit_and_working_set_leaves_the_chain_whole(
        engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C that landed after a commit and before the working set took the new chain head
    left it holding the new version with the previous head: the next command chained to the
    wrong digest, and the session read as tampered for good. Batches the same."""
    engine = engine_factory()
    sid, other = engine.create("a", state={"n": 0}), engine.create("b", state={"n": 0})
    writer = engine._writer
    real_remember = writer._remember
    interrupts = [1]

    def remember(session: Any, head: bytes) -> None:
        if interrupts:
            interrupts.pop()
            raise KeyboardInterrupt
        real_remember(session, head)

    monkeypatch.setattr(writer, "_remember", remember)
    with pytest.raises(KeyboardInterrupt):
        engine.update(sid, {"n": 1})  # committed, then interrupted
    assert engine.update(sid, {"n": 2}) == 3
    interrupts.append(1)
    with pytest.raises(KeyboardInterrupt):
        engine.save_all_active()
    assert engine.update(other, {"n": 5}) == 3
    fresh = engine_factory(max_active_sessions=0)
    assert fresh.get(sid).state == {"n": 2} and fresh.get(other).state == {"n": 5}
    assert fresh.verify().ok


def test_an_interrupt_during_a_failed_writes_rollback_still_rolls_back(
        engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second Ctrl-C inside the rollback of an interrupted write skipped the ROLLBACK: SQLite's
    connection kept its BEGIN IMMEDIATE (the database's write lock, held while idle) and the
    next command failed with "cannot start a transaction within a transaction"."""
    engine = engine_factory()
    sid = engine.create("a")
    store = engine._store
    real_db = store._db

    class InterruptedRollback:
        rollbacks_to_interrupt = 1

        def execute(self, statement: str, *args: Any) -> Any:
            if statement == "ROLLBACK" and self.rollbacks_to_interrupt:
                self.rollbacks_to_interrupt -= 1
                raise KeyboardInterrupt
            return real_db.execute(statement, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(real_db, name)

    def interrupted_insert(*args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_db", InterruptedRollback())
    monkeypatch.setattr(store, "_insert_rows", interrupted_insert)
    with pytest.raises(KeyboardInterrupt):
        engine.record(sid, "k", {}, idempotency_key="k1")  # (not the one-statement path)
    monkeypatch.undo()
    assert engine.update(sid, {"x": 1}) == 2
    assert engine_factory().get(sid).version == 2


@pytest.mark.timeout(60)
def test_close_from_a_durable_handler_on_the_background_runner(
        engine_factory: EngineFactory) -> None:
    """close() joined the runner's own thread (RuntimeError) and left the engine half closed:
    run_subscribers() refused, commands still committed. Now the engine closes once the batch
    has committed: its position moved, so the handler does not see the event again."""
    engine = engine_factory()
    sid = engine.create("svc")
    seen: list[str] = []

    def on_shutdown(event: Any) -> None:
        seen.append(event.type)
        engine.close()

    engine.subscribe("shutdown-watcher", on_shutdown, events=["EventRecorded"])
    runner = engine.run_subscribers()
    engine.record(sid, "shutdown", {})
    deadline = time.monotonic() + 20
    while runner.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not runner.running and runner.errors == {}
    assert seen == ["EventRecorded"]
    with pytest.raises(StorageError, match="closed"):
        engine.update(sid, {"x": 1})
    later = engine_factory()
    status = {s.name: s for s in later.subscribers()}["shutdown-watcher"]
    assert status.lag == 0 and status.position > 0


# -- review round 13: the fork and interrupt fixes, attacked ------------------------------------

@pytest.mark.timeout(60)
def test_a_second_close_waits_for_the_runner_whose_handler_closed(
        engine_factory: EngineFactory) -> None:
    """A handler's close() defers the store close to its runner's end; a close() from another
    thread meanwhile found no runner left to wait for and closed the store under that batch,
    whose position then never moved."""
    engine = engine_factory()
    sid = engine.create("svc")
    entered, release = threading.Event(), threading.Event()

    def on_shutdown(event: Any) -> None:
        engine.close()
        entered.set()
        release.wait(20)

    engine.subscribe("shutdown-watcher", on_shutdown, events=["EventRecorded"])
    runner = engine.run_subscribers()
    engine.record(sid, "shutdown", {})
    assert entered.wait(20)
    second = threading.Thread(target=engine.close)
    second.start()
    time.sleep(0.2)
    assert second.is_alive()  # waiting for the runner's batch
    release.set()
    second.join(20)
    assert not second.is_alive() and not runner.running and runner.errors == {}
    status = {s.name: s for s in engine_factory().subscribers()}["shutdown-watcher"]
    assert status.lag == 0


def test_verify_of_a_small_log_does_not_ask_how_to_start_workers(
        engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify() chose the workers' start method before knowing it would use any: with a
    native thread running it polled the OS's thread list for 20 ms on every call."""
    import sessionledger.engine as engine_module

    def asked(**how: Any) -> str:
        raise AssertionError("start_method() called for a one-process verify")

    monkeypatch.setattr(engine_module, "start_method", asked)
    engine = engine_factory()
    engine.create("s")
    assert engine.verify().ok


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
@pytest.mark.timeout(60)
def test_a_fork_from_inside_a_hook_leaves_the_childs_hooks_working(
        engine_factory: EngineFactory) -> None:
    """The child inherited "a delivery is under way": every event of its own was queued
    behind it and never delivered to any hook."""
    engine = engine_factory()
    sid = engine.create("s")
    seen: list[int] = []
    children: list[int] = []

    def counting(event: Any) -> None:
        seen.append(event.version)

    def forking(event: Any) -> None:
        if event.type == "EventRecorded" and not children:
            children.append(start_forked(child))

    def child() -> int:
        before = len(seen)
        for n in range(3):
            engine.update(sid, {"n": n})
        return 0 if len(seen) == before + 3 else 1

    engine.hooks.subscribe(forking)
    engine.hooks.subscribe(counting)
    engine.record(sid, "fork-here", {})
    assert exit_code(children[0]) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
@pytest.mark.timeout(60)
def test_a_shared_cache_in_memory_database_comes_along_a_fork() -> None:
    """The fork handler closed the idle connections of file:NAME?mode=memory&cache=shared,
    the last ones to it: the child's copy was freed, and it reconnected to an empty one."""
    engine = SessionEngine("sqlite:///file:sl_fork_memdb?mode=memory&cache=shared&uri=true")
    try:
        sid = engine.create("s", state={"n": 0})
        child = start_forked(lambda: 0 if engine.update(sid, {"n": 1}) == 2 else 1)
        assert exit_code(child) == 0
        assert engine.get(sid).version == 1  # the parent's copy is its own
    finally:
        engine.close()


@pytest.mark.postgresql
def test_an_interrupt_mid_statement_leaves_postgresql_usable(
        pg_backend: Backend) -> None:
    """A Ctrl-C after a statement was sent and before its result was read left the engine's
    connection busy for good: every later call failed with "another command is already in
    progress"."""
    with SessionEngine(pg_backend.url) as engine:
        sid = engine.create("s")
        store = engine._store
        real = store._db

        class InterruptedOnce:
            interrupted = False

            def execute(self, *args: Any) -> Any:
                if not self.interrupted:
                    self.interrupted = True
                    real.pgconn.send_query(b"SELECT pg_sleep(0.05)")
                    raise KeyboardInterrupt
                return real.execute(*args)

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        store._db = InterruptedOnce()
        with pytest.raises(KeyboardInterrupt):
            engine.get(sid, refresh=True)
        assert engine.get(sid, refresh=True).version == 1
        assert engine.update(sid, {"k": 1}) == 2


@pytest.mark.postgresql
@pytest.mark.parametrize("first", ["command", "read"])
def test_a_connection_left_busy_by_a_driver_error_is_replaced(
        pg_backend: Backend, first: str) -> None:
    """Review round 16 (faults): a connection the server terminated mid-result can leave
    psycopg's connection open but busy; the engine replaced its connection only when it was
    closed, so every later command and read failed ("another command is already in
    progress", growing by a copy each time) until the process restarted. Now the call that
    meets it fails once (a read is retried at once on a new connection) and the next works."""
    with SessionEngine(pg_backend.url) as engine:
        sid = engine.create("s")
        engine._store._db.pgconn.send_query(b"SELECT 1")  # the state the terminated run left
        if first == "command":
            with pytest.raises(StorageError, match="another command is already in progress"):
                engine.update(sid, {"k": 1})
            assert engine.update(sid, {"k": 2}) == 2
        else:
            assert engine.get(sid, refresh=True).version == 1
        assert engine.update(sid, {"k": 3}) == (3 if first == "command" else 2)
        assert engine.get(sid, refresh=True).state["k"] == 3


def test_an_interrupt_in_a_catalog_fold_leaves_sqlite_writable(tmp_path: Path) -> None:
    """A Ctrl-C that landed in a fold's statement (SQLAlchemy then invalidates the connection)
    left sqlite3's connection open as long as the interrupted cursor lived in the traceback's
    frames, BEGIN IMMEDIATE included: every writer, in every process, got "database is
    locked" after 30 s, until the exception was collected."""
    import sqlite3
    import sys
    from types import FrameType

    path = tmp_path / "a.db"
    engine = SessionEngine(f"sqlite:///{path}")
    try:
        engine.create("s", state={"n": 0})
        fired: list[int] = []

        def in_head_in(frame: FrameType | None) -> bool:
            while frame is not None:
                if frame.f_code.co_name == "head_in":
                    return True
                frame = frame.f_back
            return False

        def tracer(frame: FrameType, event: str, arg: Any) -> None:
            if (event == "call" and not fired and frame.f_code.co_name == "_setup_result_proxy"
                    and in_head_in(frame)):
                fired.append(1)
                raise KeyboardInterrupt

        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt) as interrupted:
                engine.save_all_active()
        finally:
            sys.settrace(None)
        assert fired
        other = sqlite3.connect(path, timeout=2, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # "database is locked" after 2 s while held
        other.execute("ROLLBACK")
        other.close()
        del interrupted
    finally:
        engine.close()


def test_an_interrupt_as_a_scan_returns_its_connection_logs_nothing(
        engine_factory: EngineFactory, caplog: pytest.LogCaptureFixture) -> None:
    """A Ctrl-C while a scan handed its connection back to the pool (the pool's reset): the
    pool logged "Exception during reset or similar" with a traceback and raised the interrupt
    on, so a Ctrl-C in a parallel verify or a timeline printed a traceback beside the CLI's one
    line (seen in CI). The interrupt still propagates, and the engine still works."""
    import logging

    from sqlalchemy import event as sa_event

    engine = engine_factory()
    sid = engine.create("s", state={"n": 0})
    engine.update(sid, {"n": 1})
    interrupted: list[int] = []

    def interrupt_once(*_args: Any) -> None:
        if not interrupted:
            interrupted.append(1)
            raise KeyboardInterrupt

    pool = engine._store.engine.pool
    sa_event.listen(pool, "reset", interrupt_once)
    try:
        with (caplog.at_level(logging.DEBUG, logger="sqlalchemy.pool"),
              pytest.raises(KeyboardInterrupt)):
            list(engine.timeline())
    finally:
        sa_event.remove(pool, "reset", interrupt_once)
    assert interrupted
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [e.version for e in engine.timeline()] == [1, 2]
    assert engine.verify().ok


def test_close_from_a_durable_handler_under_run_until_idle(
        engine_factory: EngineFactory) -> None:
    """close() from a handler under run_subscribers(until_idle=True) closed the store under
    the batch: its position never moved, so every start delivered the same event again (and
    closed again). As on a background runner, the engine closes once the batch committed."""
    engine = engine_factory()
    sid = engine.create("svc")
    engine.record(sid, "shutdown", {})
    engine.record(sid, "after", {})
    seen: list[str] = []

    def on_shutdown(event: Any) -> None:
        seen.append(event.data["kind"] if event.type == "EventRecorded" else event.type)
        if event.type == "EventRecorded" and event.data["kind"] == "shutdown":
            engine.close()

    engine.subscribe("shutdown-watcher", on_shutdown, events=["EventRecorded"])
    delivered = engine.run_subscribers(until_idle=True, batch_size=1)
    assert seen == ["shutdown"] and delivered["shutdown-watcher"] == 1
    with pytest.raises(StorageError, match="closed"):
        engine.update(sid, {"x": 1})
    later = engine_factory()
    status = {s.name: s for s in later.subscribers()}["shutdown-watcher"]
    assert status.position > 0 and status.lag == 1  # "after" is still to come


def test_a_fork_handler_that_fails_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The at-fork handlers swallowed any error: a child could go on with its parent's
    connection without a word. They now log a warning naming the database."""
    from sessionledger import engine as engine_module
    from sessionledger.infrastructure import store as store_module

    with SessionEngine(f"sqlite:///{tmp_path / 'a.db'}") as engine:
        def broken() -> None:
            raise RuntimeError("no")

        monkeypatch.setattr(engine._store, "after_fork_in_child", broken)
        monkeypatch.setattr(engine, "_after_fork_in_child", broken)
        with caplog.at_level("WARNING", logger="sessionledger"):
            store_module._after_fork_in_child()
            engine_module._engines_after_fork_in_child()
        warnings = [r.getMessage() for r in caplog.records if r.name == "sessionledger"]
        assert len(warnings) == 2, warnings
        assert all("a.db" in w and "after a fork" in w for w in warnings)


def _interrupt_when(condition: Any) -> Any:
    """A trace function raising KeyboardInterrupt (as a SIGINT would) at the first call for
    which condition(frame) holds."""
    fired: list[int] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event == "call" and not fired and condition(frame):
            fired.append(1)
            raise KeyboardInterrupt
        return None

    tracer.fired = fired  # type: ignore[attr-defined]
    return tracer


def _called_from(frame: Any, name: str) -> bool:
    while frame is not None:
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


def test_an_interrupt_in_a_subscriber_commit_leaves_the_database_writable(
        engine_factory: EngineFactory) -> None:
    """Review round 16 (error paths): SQLAlchemy marks a transaction done even when its COMMIT
    raised, so a Ctrl-C in the commit of a catalog fold sent the connection back to the pool
    still in its transaction: on SQLite holding BEGIN IMMEDIATE (every writer of every process
    got "database is locked"), on PostgreSQL idle in transaction with its locks."""
    import sys

    engine = engine_factory()
    sid = engine.create("s")
    tracer = _interrupt_when(lambda f: f.f_code.co_name == "_commit_impl"
                             and _called_from(f.f_back, "transaction"))
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.find()
    finally:
        sys.settrace(None)
    assert tracer.fired
    other = engine_factory()
    assert other.update(sid, {"a": 1}) == 2  # not locked out
    assert engine.update(sid, {"a": 2}) == 3
    assert [e.id for e in engine.find().items] == [sid]


def test_an_interrupt_right_after_the_held_mark_is_not_left_behind(
        engine_factory: EngineFactory) -> None:
    """Review round 16 (error paths): an interrupt between marking a subscriber's tracking row
    as held by this thread and the try that unmarks it left the mark for good: every later
    find(), cleanup() and run_subscribers() on that thread was refused ("this thread holds
    its tracking row")."""
    engine = engine_factory()
    engine.create("s")

    class InterruptAfterAdd(set[str]):
        armed = True

        def add(self, item: str) -> None:
            super().add(item)
            if InterruptAfterAdd.armed:
                InterruptAfterAdd.armed = False
                raise KeyboardInterrupt

    engine._subscriptions._rows_held.names = InterruptAfterAdd()
    with pytest.raises(KeyboardInterrupt):
        engine.find()
    assert len(engine.find().items) == 1


@pytest.mark.parametrize("statement", ["DELETE FROM sl_events", "PRAGMA wal_checkpoint"])
def test_an_interrupt_in_a_sqlite_purge_stays_an_interrupt(
        tmp_path: Path, statement: str) -> None:
    """Review round 16 (error paths): the PRAGMA that puts secure_delete (or the busy
    timeout) back ran on the connection the interrupt had invalidated, and its error replaced
    the interrupt: a caller saw StorageError "Can't reconnect until invalid transaction is
    rolled back", and a handler of StorageError swallowed the Ctrl-C."""
    import sys

    from sessionledger import RetentionPolicy

    engine = SessionEngine(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        sid = engine.create("s")
        engine.end(sid, outcome="completed")
        tracer = _interrupt_when(
            lambda f: f.f_code.co_name == "_setup_result_proxy"
            and str(f.f_locals["self"].statement).startswith(statement))
        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt):
                engine.cleanup(RetentionPolicy(max_age=0, purge=True))
        finally:
            sys.settrace(None)
        assert tracer.fired
        engine.create("t")  # still writable
    finally:
        engine.close()


def test_a_scan_connection_whose_rollback_fails_leaves_the_pool(tmp_path: Path) -> None:
    """Review round 16 (error paths): a scan's connection whose rollback failed (a backend
    terminated while it sat idle) went back to the pool, whose reset failed again and logged
    an ERROR with a traceback; it is now invalidated."""
    engine = SessionEngine(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        engine.create("s")
        store = engine._store
        real = store.engine.raw_connection
        taken: list[Any] = []

        class RollbackFails:
            def __init__(self, fairy: Any) -> None:
                self.fairy = fairy

            invalidated = False

            def rollback(self) -> None:
                raise OSError("the connection is lost")

            def invalidate(self, *args: Any) -> None:
                self.invalidated = True
                self.fairy.invalidate(*args)

            def __getattr__(self, name: str) -> Any:
                return getattr(self.fairy, name)

        def raw_connection() -> Any:
            taken.append(RollbackFails(real()))
            return taken[-1]

        store.engine.raw_connection = raw_connection  # type: ignore[method-assign]
        try:
            assert len(list(engine.timeline())) == 1
        finally:
            store.engine.raw_connection = real  # type: ignore[method-assign]
        assert taken and taken[0].invalidated  # its record reconnects on its next use
        assert len(list(engine.timeline())) == 1
    finally:
        engine.close()
