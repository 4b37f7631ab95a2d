"""A parallel verify(): worker processes (forked where that is safe, else spawned) that take
pieces of the log beside the verifying process, end with it, and ignore the Ctrl-C it handles."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from sessionledger.infrastructure.store import EventStore

from .config import SessionConfig
from .verify import Verifier, VerifyReport, merge, run_pieces, shards

#: pieces of the log per process of a parallel verify (see run_pieces): small enough that
#: the processes finish close together (500,000 events on 2 CPUs: 8 pieces a process 2.23-2.25
#: µs an event, 32 pieces 2.15-2.19), large enough that a piece's two queries do not count
_VERIFY_PIECES_PER_PROCESS = 32
#: the most processes a verify() may be asked for
MAX_WORKERS = 64
#: how many times (a millisecond apart) start_method looks for the OS threads to be one
_THREAD_EXIT_POLLS = 20
#: a verify worker process's share of the piece counter (set as the process starts)
_verify_counter: Any = None


#: the worker processes of this process's parallel verifies, while they live
_worker_processes: weakref.WeakSet[Any] = weakref.WeakSet()


def _forget_the_parents_workers() -> None:
    """In a process forked (by anyone) while a parallel verify's workers were still exiting:
    they are its parent's children, not its own, and multiprocessing's exit handler failed on
    joining them ("can only join a child process", printed as the process exited)."""
    children = getattr(multiprocessing.process, "_children", None)
    if isinstance(children, set):
        children.difference_update(_worker_processes)
    _worker_processes.clear()


os.register_at_fork(after_in_child=_forget_the_parents_workers)


def spawn_reruns_main() -> bool:
    """True when a spawned process would run the main module's top level again: the main
    module is a file (a script, or `python -m module`), which multiprocessing's spawn imports in
    each worker to find what was defined there. A script without an ``if __name__ ==
    "__main__":`` guard then does all it did once more in every worker (its writes too). Not for
    a package's __main__ (spawn leaves those alone) or an interactive session."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__file__", None) is None:
        return False
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None) or ""
    return not (name == "__main__" or name.endswith(".__main__"))


def start_method(just_joined: bool = False) -> str:
    """How a parallel verify starts its workers: "fork" on Linux while this process runs a
    single thread, else "spawn". A forked worker is checking within milliseconds and runs
    nothing again; a spawned one is a fresh interpreter that imports for about 0.2 s first
    and runs the main module's top level again (spawn_reruns_main). Fork copies only the
    calling thread: a lock another thread held (logging's, a pool's, a native library's)
    would stay held in the worker for good, hence the one thread, counted by the OS so that
    native threads count too; macOS's system libraries are not fork-safe at all.
    `just_joined`: a thread was joined just now; its exit is waited for, up to 20 ms."""
    if sys.platform != "linux" or "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    if threading.active_count() > 1:
        return "spawn"
    # a thread `just_joined` (an earlier verify's closer) leaves the OS's list a moment later
    return "fork" if _one_os_thread(_THREAD_EXIT_POLLS if just_joined else 1) else "spawn"


def _one_os_thread(polls: int) -> bool:
    """True when the OS counts one thread in this process, looking up to `polls` times a
    millisecond apart (a joined thread leaves its list a moment after join() returns)."""
    for _ in range(polls):
        try:
            if len(os.listdir("/proc/self/task")) == 1:
                return True
        except OSError:
            return False
        time.sleep(0.001)
    return False


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """The cyclic collector kept off every object there is while workers are forked: the
    workers inherit them frozen, so a worker's collections neither walk the parent's heap
    (copying its pages) nor collect a garbage object of the parent's and run its finalizer
    (a dropped pool's connection: psycopg's close() sends Terminate down a socket the parent
    may still use). The engines still open are the fork handlers' (EventStore
    .after_fork_in_child). A worker opens its own engine and leaves through os._exit."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def start_worker(counter: Any) -> None:
    """The initializer of a verify worker process."""
    global _verify_counter
    _verify_counter = counter
    # Ctrl-C in a terminal reaches every process of the group: the verifying process handles
    # it (and ends the workers); a worker must not print a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # a verifying process that is killed (SIGKILL, SIGTERM) cannot end its workers, which
    # would wait for tasks for good: each ends itself when its parent is gone
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True,
                         name="sessionledger-verify-parent-watch").start()


def _exit_with(parent: Any) -> None:
    parent.join()  # returns when the parent process has ended
    os._exit(1)


@contextlib.contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """SIGINT ignored while worker processes are started, when this is the main thread: a
    process inherits the ignored disposition, and Python then leaves it ignored, so Ctrl-C
    while a worker imports prints nothing there. A Ctrl-C in these few milliseconds is lost
    (press it again). Blocking SIGINT instead would lose nothing, but a spawned process does
    not inherit the mask (measured: its SigBlk is empty)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _end_workers(pool: ProcessPoolExecutor) -> None:
    """Stop a parallel verify's workers now (an interrupt or a failure here): they only read,
    and waiting for each to finish its piece kept an interrupted verify running."""
    for process in list(getattr(pool, "_processes", {}).values()):
        with contextlib.suppress(Exception):
            process.terminate()


def _close_verify_pool(pool: ProcessPoolExecutor, counter: Any) -> None:
    """Wait for a parallel verify's workers to exit; `counter` is kept alive until then."""
    pool.shutdown(wait=True, cancel_futures=True)
    del counter


def verify_pieces(url: str, config: SessionConfig,
                   pieces: list[tuple[str | None, str | None]]) -> list[VerifyReport]:
    """verify() of the pieces of the log this worker process gets to take first."""
    from .engine import SessionEngine  # (the engine imports this module)

    with SessionEngine(url, config) as engine:
        verifier = Verifier(engine._store, engine._codec, engine._repository)
        return run_pieces(verifier, pieces, _verify_counter)


def verify_in_processes(verifier: Verifier, store: EventStore, url: str, config: SessionConfig,
                        workers: int, method: str, closers: list[threading.Thread]
                        ) -> VerifyReport:
    """Every session checked by this process and `workers - 1` others started by `method`
    ("fork" or "spawn", see start_method; each its own engine on `url` with `config`);
    returns the merged report. The thread that waits for the workers to exit is appended to
    `closers` (close() joins them), interrupted or not: an interrupted verify's thread
    otherwise raced the interpreter's exit."""
    context = multiprocessing.get_context(method)
    counter = context.Value("i", 0)
    # This process starts on the pieces at once; the workers take pieces once they are up
    # (a spawned worker spends 0.2 s importing). Measured on 500,000 events, 2 CPUs,
    # alternating runs: equal shards 2.62-2.72 µs an event, pieces 2.44-2.53.
    # The workers are started first (a no-op task each: spawned processes start on demand,
    # forked ones all at the first task), so their start overlaps the query that cuts the
    # pieces.
    pool = ProcessPoolExecutor(workers - 1, mp_context=context,
                               initializer=start_worker, initargs=(counter,))
    finished = False
    try:
        frozen = _heap_frozen() if method == "fork" else contextlib.nullcontext()
        with _workers_ignore_sigint(), frozen:
            for _ in range(workers - 1):
                pool.submit(int)  # a process each, started here
        pieces = shards(store, workers * _VERIFY_PIECES_PER_PROCESS)
        others = [pool.submit(verify_pieces, url, config, pieces)
                  for _ in range(workers - 1)]
        reports = run_pieces(verifier, pieces, counter)
        if len(reports) < len(pieces):  # the workers took the rest
            for future in others:
                reports.extend(future.result())
        finished = True
    except BaseException:
        _end_workers(pool)
        raise
    finally:
        _worker_processes.update((getattr(pool, "_processes", None) or {}).values())
        if finished and method == "fork":
            # forked workers are up and done, and exit in milliseconds: waited for here, so
            # verify() leaves no thread behind (Python 3.12+ warns on a fork() while one runs,
            # and a lock one of them held would stay held in the child)
            try:
                _close_verify_pool(pool, counter)
                if threading.active_count() == 1:  # the pool's threads gone from the OS too
                    _one_os_thread(_THREAD_EXIT_POLLS)
            except BaseException:  # interrupted meanwhile: a thread waits, as below
                _close_in_thread(pool, counter, closers)
                raise
        else:
            _close_in_thread(pool, counter, closers)
    return merge(reports)


def _close_in_thread(pool: ProcessPoolExecutor, counter: Any,
                     closers: list[threading.Thread]) -> None:
    """Wait for the workers to exit in a thread appended to `closers`: spawned workers (one that
    got no piece may still be importing), or after an interrupt. It holds the shared counter: a
    worker opens it as it starts, and once this process dropped it the worker failed with
    FileNotFoundError."""
    closer = threading.Thread(target=_close_verify_pool, args=(pool, counter),
                              name="sessionledger-verify-pool")
    closer.start()
    closers.append(closer)
