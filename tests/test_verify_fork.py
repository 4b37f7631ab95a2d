"""How a parallel verify() starts its workers: forked on Linux from a single-threaded process
(milliseconds, and nothing of the caller's runs again), spawned otherwise."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _helpers import Backend
from conftest import EngineFactory

from sessionledger import SessionEngine
from sessionledger.parallel_verify import start_method

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="fork is used on Linux only")


def run_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


@linux_only
def test_workers_are_forked_only_from_a_single_threaded_process() -> None:
    done = subprocess.run(
        [sys.executable, "-c",
         "from sessionledger.parallel_verify import start_method; print(start_method())"],
        capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "fork", done.stderr
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert start_method() == "spawn"
    finally:
        stop.set()
        other.join()


@linux_only
@pytest.mark.timeout(120)
def test_an_unguarded_script_verifies_in_forked_workers_once(tmp_path: Path) -> None:
    """A spawned worker imports the main module again: this script, which has no
    ``if __name__ == "__main__":`` guard, made a session in each worker and its workers
    failed to start theirs. Forked workers run nothing of it again; a second verify forks
    too (the first one's closer thread is joined first, not counted as a thread)."""
    done = run_script(tmp_path, """
        import sessionledger.engine as engine_module
        from sessionledger import SessionEngine
        chosen = []
        real_start_method = engine_module.start_method
        engine_module.start_method = (
            lambda **how: chosen.append(real_start_method(**how)) or chosen[-1])
        engine = SessionEngine("sqlite:///app.db")
        engine.create("made-by-app")
        first, second = engine.verify(workers=2), engine.verify(workers=2)
        print(first.ok and second.ok, first.sessions, *chosen)
        engine.close()
    """)
    assert done.returncode == 0 and done.stdout.split() == ["True", "1", "fork", "fork"], (
        done.stdout, done.stderr)
    assert "RuntimeError" not in done.stderr
    count = run_script(tmp_path, """
        from sessionledger import SessionEngine
        with SessionEngine("sqlite:///app.db") as engine:
            print(len(engine.list_sessions()))
    """)
    assert count.stdout.strip() == "1", count.stderr


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.timeout(120)
def test_forked_and_spawned_workers_report_the_same_and_leave_the_engine_working(
        engine_factory: EngineFactory, backend: Backend, method: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    if method == "fork" and sys.platform != "linux":
        pytest.skip("fork is used on Linux only")
    import sessionledger.engine as engine_module

    monkeypatch.setattr(engine_module, "start_method", lambda **how: method)
    engine = engine_factory(snapshot_every=3)
    sids = sorted(engine.create("s", state={"i": 0}) for _ in range(6))
    for sid in sids:
        for i in range(1, 5):
            engine.update(sid, {"i": i})
    backend.sql("UPDATE sl_events SET actor = 'mallory' WHERE session_id = ? AND version = 2",
                (sids[0],))
    report = engine.verify(workers=3)
    assert [(p.session_id, p.version) for p in report.problems] == [(sids[0], 2)]
    assert (report.sessions, report.events) == (6, 30)
    # the engine's own pooled connections were inherited by the workers, never used there
    later = engine.create("after")
    assert engine.update(later, {"k": 1}) == 2
    assert engine.get(later).state == {"k": 1}
    assert engine.verify(workers=1).problems == report.problems


@linux_only
@pytest.mark.timeout(120)
def test_a_process_forked_right_after_a_parallel_verify_exits_quietly(tmp_path: Path) -> None:
    """The verify's workers may still be exiting when the application forks (a prefork
    server started right after a verify at start-up): the child inherited them in
    multiprocessing's list of children, and its exit handler failed on joining them ("can
    only join a child process", printed as the child exited). Spawned workers, as in a
    process that runs other threads: forked ones are waited for before verify() returns."""
    done = run_script(tmp_path, """
        import os, sys, warnings
        import sessionledger.engine as engine_module
        from sessionledger import SessionEngine
        if __name__ == "__main__":  # (spawned workers import this file)
            engine_module.start_method = lambda **how: "spawn"
            # the fork below is of a process whose verify thread still waits, on purpose
            warnings.filterwarnings("ignore", "This process .* is multi-threaded",
                                    DeprecationWarning)
            with SessionEngine("sqlite:///app.db") as engine:
                for i in range(50):
                    engine.create(f"s{i}")
                assert engine.verify(workers=2).ok
                pid = os.fork()
                if pid == 0:
                    engine.create("made-by-child")
                    sys.exit(0)  # an interpreter's exit: its exit handlers run
                _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 0
                assert engine.find(name="made-by-child")
            print("done")
        """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "done"
    assert done.stderr == ""


@linux_only
def test_close_waits_for_the_workers_of_an_interrupted_verify(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A verify interrupted in this process (Ctrl-C) left the thread that waits for its
    workers unknown to the engine: close() did not wait for it, and the interpreter's exit
    raced it ("Exception ignored ... _python_exit ... Bad file descriptor", seen 1 run in 25)."""
    import sessionledger.parallel_verify as parallel_verify

    real_close = parallel_verify._close_verify_pool

    def slow_close(pool: Any, counter: Any) -> None:
        time.sleep(0.5)  # workers slow to exit
        real_close(pool, counter)

    def interrupted(*_args: Any) -> Any:
        raise KeyboardInterrupt

    engine = SessionEngine(f"sqlite:///{tmp_path / 'v.db'}")
    try:
        for i in range(10):
            engine.create(f"s{i}")
        monkeypatch.setattr(parallel_verify, "_close_verify_pool", slow_close)
        monkeypatch.setattr(parallel_verify, "run_pieces", interrupted)
        with pytest.raises(KeyboardInterrupt):
            engine.verify(workers=2)
    finally:
        engine.close()
    assert not [t for t in threading.enumerate() if t.name == "sessionledger-verify-pool"]


@linux_only
@pytest.mark.timeout(120)
def test_a_forked_parallel_verify_leaves_no_thread_behind(tmp_path: Path) -> None:
    """verify() returned while a thread still waited for its forked workers to exit (and the
    pool's own threads ran): a fork() right after it forked a multi-threaded process, which
    Python 3.12+ warns about (DeprecationWarning) and which can leave a lock held in the
    child. Forked workers are done when the report is in: verify() waits for them."""
    done = run_script(tmp_path, """
        import os, threading
        from sessionledger import SessionEngine
        with SessionEngine("sqlite:///app.db") as engine:
            for i in range(50):
                engine.create(f"s{i}")
            assert engine.verify(workers=3).ok
            print(threading.active_count(), len(os.listdir("/proc/self/task")))
        """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"]
