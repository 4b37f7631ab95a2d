"""Review round 17 (portability): a relative SQLite path after os.chdir(), and an engine dropped
without close()."""

from __future__ import annotations

import gc
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
from _helpers import Backend

from sessionledger import SessionConfig, SessionEngine


@pytest.mark.parametrize("url", ["app.db", "sqlite:///app.db",
                                 "sqlite:///file:app.db?uri=true"])
def test_a_relative_sqlite_path_keeps_naming_its_file_after_a_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str,
) -> None:
    """verify()'s worker processes opened the engine's URL again: a relative one named a file
    in the new directory (created empty), their share of the log went unchecked, and a
    tampered database verified ok."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with SessionEngine(url, SessionConfig(lifecycle_hooks=False)) as engine:
        sids = [engine.create(f"s{i}", state={"i": i}) for i in range(400)]
        db = sqlite3.connect(tmp_path / "a" / "app.db")
        db.execute("UPDATE sl_events SET actor = 'mallory' WHERE session_id = ?", (sids[-1],))
        db.commit()
        db.close()
        monkeypatch.chdir(tmp_path / "b")
        report = engine.verify(workers=2)
        assert (report.sessions, [p.session_id for p in report.problems]) == (400, [sids[-1]])
        assert engine.get(sids[0]).state == {"i": 0}
        assert str(tmp_path / "a" / "app.db") in engine.url
    assert list((tmp_path / "b").iterdir()) == []


def test_an_engine_dropped_without_close_is_freed_at_once_with_a_warning(
    backend: Backend,
) -> None:
    """The engine's metrics collector held the engine, in a cycle through the engine's own
    registry: an engine dropped open kept its connections until the garbage collector's next
    full pass (PostgreSQL ran out of connections for the whole server), with no warning."""
    gc.disable()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = SessionEngine(backend.url)
            sid = engine.create("s")
            engine.find()
            dropped = weakref.ref(engine)
            del engine
            assert dropped() is None
            unclosed = [w for w in caught if issubclass(w.category, ResourceWarning)]
            assert len(unclosed) == 1 and "dropped without close()" in str(unclosed[0].message)
            closed = SessionEngine(backend.url)
            assert closed.get(sid).version == 1
            closed.close()
            del closed
            assert len([w for w in caught if issubclass(w.category, ResourceWarning)]) == 1
    finally:
        gc.enable()


def _fork(child: Callable[[], None]) -> int:
    """Fork; the child runs `child` and exits 0 (1 when it raised), never returning here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: a fork with threads
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child()
            code = 0
        finally:
            os._exit(code)
    return pid


def _exit_codes(pids: list[int], seconds: float) -> dict[int, int | None]:
    """Each child's exit code, None for one still running after `seconds` (then killed)."""
    deadline = time.monotonic() + seconds
    codes: dict[int, int | None] = {}
    while len(codes) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    for pid in pids:
        if pid not in codes:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            codes[pid] = None
    return codes


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_while_a_runner_runs_can_write(tmp_path: Path) -> None:
    """A pre-fork server whose master runs a background runner (the catalog's subscriber) while
    another process writes: the children forked while the runner was reading closed a SQLite
    connection whose mutex the runner's thread held, and hung for good (29 of 30)."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom sessionledger import SessionEngine\n"
        f"with SessionEngine({url!r}) as e:\n"
        "    end = time.time() + 3\n"
        "    while time.time() < end:\n"
        "        e.create('w')\n")])
    try:
        with SessionEngine(url) as engine:
            engine.create("seed")
            engine.run_subscribers()
            time.sleep(0.3)
            pids = []
            for k in range(12):
                pids.append(_fork(lambda k=k: engine.create(f"child {k}")))  # type: ignore[misc]
                time.sleep(0.05)
            codes = _exit_codes(pids, 60)
    finally:
        writer.wait(timeout=60)
    assert list(codes.values()) == [0] * len(pids), codes


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_during_a_transactional_batch_waits_for_it(tmp_path: Path) -> None:
    """Forked while a transactional handler ran (its batch holding SQLite's write lock), the
    child found the database locked at every write, a fresh engine's too (30 s, then
    StorageError). The fork now waits for the batch to commit."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with SessionEngine(url) as engine:
        engine.create("parent")
        inside = threading.Event()

        def slow(event: object, conn: object) -> None:
            inside.set()
            time.sleep(0.5)

        engine.subscribe("slow", slow, transactional=True)
        engine.run_subscribers()
        assert inside.wait(10)

        def child() -> None:
            engine.create("child")
            with SessionEngine(url) as fresh:
                fresh.create("fresh engine in the child")

        started = time.monotonic()
        pid = _fork(child)
        waited = time.monotonic() - started
        assert _exit_codes([pid], 25) == {pid: 0}
        assert waited > 0.1  # the fork waited for the batch
        assert engine.create("parent again")
        names = sorted(s.name for s in engine.list_sessions())
    assert names == ["child", "fresh engine in the child", "parent", "parent again"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_waits_for_a_runner_only_so_long_then_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from sessionledger import subscribers

    monkeypatch.setattr(subscribers, "FORK_WAIT_SECONDS", 0.2)
    with SessionEngine(f"sqlite:///{tmp_path / 'db.sqlite'}") as engine:
        engine.create("s")
        inside, release = threading.Event(), threading.Event()

        def stuck(event: object) -> None:
            inside.set()
            release.wait(10)

        engine.subscribe("stuck", stuck)
        engine.run_subscribers()
        assert inside.wait(10)
        started = time.monotonic()
        pid = _fork(lambda: None)
        waited = time.monotonic() - started
        release.set()
        assert _exit_codes([pid], 20) == {pid: 0}
    assert 0.15 < waited < 5
    assert "forked while 1 subscriber runner(s) still ran a round" in caplog.text


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_from_a_hook_does_not_wait_for_the_runner(tmp_path: Path) -> None:
    """(Review 17, adversarial.) A hook runs while its command holds the engine's lock, and a
    runner starting a round waits for that lock inside the fork gate: a fork from the hook
    waited the gate's whole 10 s."""
    with SessionEngine(f"sqlite:///{tmp_path / 'db.sqlite'}") as engine:
        engine.create("s")
        engine.run_subscribers()
        took: list[float] = []
        pids: list[int] = []

        def forking_hook(event: object) -> None:
            started = time.monotonic()
            pids.append(_fork(lambda: None))
            took.append(time.monotonic() - started)

        engine.hooks.subscribe(forking_hook)
        for i in range(15):
            engine.create(f"s{i}")
            time.sleep(0.013)
        codes = _exit_codes(pids, 30)
    assert list(codes.values()) == [0] * 15
    assert max(took) < 5, took
