"""Found by review round 6 (processes killed, connections dropped, rebuilds racing): each test
failed before its fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import EngineFactory

from sessionledger import StorageError
from sessionledger.catalog import CATALOG, REBUILD_TRACKING


def test_a_window_folded_during_the_swap_is_not_folded_twice(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two engines rebuild the catalog: the swap of one read the rebuild's position outside its
    transaction, the other folded a window meanwhile, and the swap folded it again
    (PostgreSQL: event counts one too high for good)."""
    swapper, helper, writer = engine_factory(), engine_factory(), engine_factory()
    sids = [writer.create(f"s{i}") for i in range(3)]
    for sid in sids:
        writer.update(sid, {"n": 1})
    swapper._catalog.rebuild_batch = helper._catalog.rebuild_batch = 2
    subs = swapper._catalog.subscriptions
    in_swap = threading.Event()
    outcome: list[object] = []

    def fold_in_the_other_engine() -> None:
        try:
            outcome.append(helper._catalog._fold_next_window(None))
        except StorageError as error:  # its tables were swapped in under it
            outcome.append(error)

    other = threading.Thread(target=fold_in_the_other_engine)
    real_transaction = subs.transaction

    def transaction(name: str, **kwargs: Any) -> Any:
        if name == CATALOG:  # the swap's (this engine runs no live catalog step meanwhile)
            for sid in sids:  # news for the swap, and for the other engine's next window
                writer.update(sid, {"n": 2})
            in_swap.set()
        return real_transaction(name, **kwargs)

    def then_the_other_engine_folds(read: Any) -> Any:
        def reading(*args: Any) -> int:
            position: int = read(*args)
            if in_swap.is_set() and args[-1] == REBUILD_TRACKING:
                in_swap.clear()
                other.start()
                other.join(1.0)  # it commits a window (before the fix) or waits for the swap
            return position
        return reading

    monkeypatch.setattr(subs, "transaction", transaction)
    # the swap reads the rebuild's position: position() before the fix, locked_position() after
    monkeypatch.setattr(subs, "position", then_the_other_engine_folds(subs.position))
    monkeypatch.setattr(subs, "locked_position", then_the_other_engine_folds(
        getattr(subs, "locked_position", None)), raising=False)
    swapper.rebuild("catalog")
    other.join(30)
    assert not other.is_alive() and outcome
    rows = {item.id: item for item in writer.find(limit=100)}
    assert {sid: (rows[sid].version, rows[sid].event_count) for sid in sids} == {
        sid: (3, 3) for sid in sids}


_WORKER_OF_A_KILLED_PARENT = """
import multiprocessing, os, time
from concurrent.futures import ProcessPoolExecutor
from sessionledger.parallel_verify import start_worker
if __name__ == "__main__":
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(1, mp_context=context, initializer=start_worker,
                               initargs=(context.Value("i", 0),))
    print(pool.submit(os.getpid).result(), flush=True)
    time.sleep(120)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return "\nState:\tZ" not in status.read()  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.timeout(60)
def test_verify_workers_end_when_the_verifying_process_is_killed(tmp_path: Path) -> None:
    """A verify killed with SIGKILL left its spawned workers waiting for tasks for good."""
    script = tmp_path / "verify_parent.py"
    script.write_text(_WORKER_OF_A_KILLED_PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        worker = int(parent.stdout.readline())
        assert _running(worker)
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    deadline = time.monotonic() + 20
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _running(worker):
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the worker outlived its killed parent")


def test_a_driver_error_in_a_subscriber_read_is_a_storage_error(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Subscriber batches read on a raw driver cursor: a connection the server dropped
    (psycopg's AdminShutdown) escaped run_subscribers() as the driver's own exception."""
    engine = engine_factory()
    engine.create("a")
    engine.subscribe("reader", lambda event: None)
    store = engine._store
    if store.dialect == "postgresql":
        import psycopg

        dropped: Exception = psycopg.errors.AdminShutdown(
            "terminating connection due to administrator command")
    else:
        dropped = store._dbapi_error("disk I/O error")

    def drop(*args: Any) -> Any:
        raise dropped

    monkeypatch.setattr(engine._subscriptions, "_fetch", drop)
    with pytest.raises(StorageError, match=r"administrator command|disk I/O error"):
        engine.run_subscribers(until_idle=True)


def _held_in_the_swap(monkeypatch: pytest.MonkeyPatch, engine: Any, meanwhile: Any) -> None:
    """`meanwhile()` runs inside the engine's catalog swap, once it holds the rebuild's
    tracking row (and on SQLite the write lock)."""
    subs = engine._catalog.subscriptions
    real = subs.locked_position

    def locked_position(conn: Any, name: str) -> int:
        position: int = real(conn, name)
        if name == REBUILD_TRACKING:
            meanwhile()
        return position

    monkeypatch.setattr(subs, "locked_position", locked_position)


@pytest.mark.timeout(60)
def test_a_command_during_the_swap_does_not_stall_it(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SQLite: the swap read the swap count through the store's connection, which a command of
    another thread held while it waited for the swap's write lock: both waited 30 s."""
    engine = engine_factory()
    sid = engine.create("s")
    outcome: list[object] = []

    def update() -> None:
        started = time.monotonic()
        try:
            outcome.append(engine.update(sid, {"x": 1}))
        except StorageError as error:
            outcome.append(error)
        outcome.append(time.monotonic() - started)

    command = threading.Thread(target=update)

    def start_a_command() -> None:
        command.start()
        time.sleep(0.3)  # it holds the store's connection, waiting for the write lock

    _held_in_the_swap(monkeypatch, engine, start_a_command)
    engine.rebuild("catalog")
    command.join(40)
    assert outcome[0] == 2 and outcome[1] < 10, outcome


@pytest.mark.timeout(60)
def test_rebuilds_started_during_a_swap_take_turns(
    engine_factory: EngineFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL: two rebuilds waiting for the rebuild's tracking row found it deleted by the
    swap and both went on unlocked: CREATE TABLE sl_catalog_next raced (pg_type unique key)."""
    swapper, first, second = engine_factory(), engine_factory(), engine_factory()
    for i in range(10):
        swapper.update(swapper.create(f"s{i}"), {"i": i})
    results: dict[str, object] = {}

    def rebuild(name: str, engine: Any) -> None:
        try:
            results[name] = engine.rebuild("catalog")
        except StorageError as error:
            results[name] = error

    others = [threading.Thread(target=rebuild, args=(name, engine))
              for name, engine in (("first", first), ("second", second))]

    def start_two_rebuilds() -> None:
        for thread in others:
            thread.start()
        time.sleep(0.5)  # both wait for the tracking row the swap holds

    _held_in_the_swap(monkeypatch, swapper, start_two_rebuilds)
    assert swapper.rebuild("catalog") == 20
    for thread in others:
        thread.join(40)
    assert all(type(value) is int for value in results.values()), results
    live = {item.id: (item.version, item.event_count) for item in first.find(limit=100)}
    assert len(live) == 10 and all(v == (2, 2) for v in live.values())
