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
