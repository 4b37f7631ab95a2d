"""Per-operation costs at scale (issue 6): python -m benchmarks.scale

    python -m benchmarks.scale [--sessions 100000] [--events 1000000] [--small-events 1000]

Fills two SQLite files with the same mix of sessions (benchmarks/catalog_bench.py ``fill()``:
rows, chain digests and snapshots made by the engine's own decision, encoding and snapshot code,
interleaved in commit order, inserted in large transactions; the fill time is printed): a large
one (default 100,000 sessions, 1,000,000 events) and a small one (about 1,000 events, a tenth
as many sessions as events, like the large one). Both hold "probe" sessions of one fixed shape:
10 events, start, 4 updates, a checkpoint at version 6 (so a snapshot there), 4 updates.

Then, in the same run, interleaved in rotating order (small and large side by side), the median
of single calls on each file, and their ratio, large ÷ small (target: at most 1.20):

- append: ``update(sid, {"step": n})`` + commit, durability normal (fsync would hide the rest),
  a session in the working set;
- create: ``create(...)`` + commit, durability normal;
- load: ``get(probe)`` with ``max_active_sessions=0`` (snapshot at 6 + events 6..10), cycling
  over every probe session of the file;
- state_at: ``state_at(probe, version=8)`` (snapshot + 2 events) and ``version=4`` (no snapshot
  at or below: events 1..4);
- find: ``find(status="ACTIVE", tags=["agent"], limit=10)`` and ``find(status="ACTIVE",
  limit=10)`` (pages of 10: the small file cannot fill a page of 100; catalog_bench times pages
  of 100 over 100,000 sessions);
- catalog rebuild and verify (``workers=1``: one process on both files), per event
  (whole-file runs, one sample per round).

The reads (load, state_at, find) are timed first with no write in between (another
connection's commit empties a SQLite connection's page cache; new sessions would head every
find page), then the writes (append, create).

An experiment, shown but not judged: the same loads through a connection with a 256 MiB page
cache (``PRAGMA cache_size``), to show how much of the growth of cold loads is SQLite's default
2 MiB page cache, which holds all of the small file and little of the large one.

Peak memory of a full catalog rebuild and of a full verify (``workers=1``: one verifier's
memory; sharded verifies run several such processes) on each file: each runs in a fresh
child process that reports ru_maxrss before and after the operation (the process's peak resident
set, SQLite's page cache and the Python heap alike), then runs the operation again under
tracemalloc for the Python heap's peak. Streaming means the large file's peaks stay near the
small file's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sessionledger import SessionConfig, SessionEngine

from .catalog_bench import FillResult, fill, timed_rounds
from .machine import facts
from .timing import Stats, interleave

GROWTH_LIMIT = 1.20
SESSIONS = 100_000
EVENTS = 1_000_000
SMALL_EVENTS = 1_000
PROBE_EVERY = 100
#: the experiment's PRAGMA cache_size, KiB (256 MiB: the probes' pages fit; SQLite's default
#: is 2 MiB per connection)
CACHE_KIB = 262_144


def _progress_printer(started: float) -> Callable[[str], None]:
    def progress(message: str) -> None:
        print(f"  [{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr,
              flush=True)
    return progress


@dataclass
class Database:
    """One filled file and the engines that measure it."""

    label: str
    path: str
    filled: FillResult
    writer: SessionEngine | None = None
    loader: SessionEngine | None = None
    #: a loader with a page cache larger than the file (experiment: PRAGMA cache_size)
    tuned: SessionEngine | None = None
    append_sid: str = ""

    @property
    def url(self) -> str:
        return "sqlite:///" + self.path

    def open(self) -> None:
        self.writer = SessionEngine(self.url, SessionConfig(durability="normal"))
        self.loader = SessionEngine(self.url, SessionConfig(durability="normal",
                                                            max_active_sessions=0))
        self.tuned = SessionEngine(self.url, SessionConfig(durability="normal",
                                                           max_active_sessions=0))
        # the store's own sqlite3 connection, where loads and state_at read
        self.tuned._store._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self.append_sid = self.writer.create("append-probe", tags=["bench"], state={"step": 0})

    def close(self) -> None:
        for engine in (self.writer, self.loader, self.tuned):
            if engine is not None:
                engine.close()


@dataclass
class GrowthRow:
    """One operation on the small and the large file."""

    operation: str
    small: Stats
    large: Stats
    unit: str = "call"
    note: str = ""
    #: False: an experiment shown for what it explains, not a target
    judged: bool = True

    @property
    def growth(self) -> float:
        return self.large.median_us / self.small.median_us

    @property
    def passed(self) -> bool:
        return self.growth <= GROWTH_LIMIT

    def as_dict(self) -> dict[str, Any]:
        return {"operation": self.operation, "unit": self.unit,
                "small": self.small.as_dict(), "large": self.large.as_dict(),
                "growth": round(self.growth, 3), "passed": self.passed if self.judged else None,
                "judged": self.judged, "note": self.note}


def _fmt(us: float) -> str:
    if us >= 1000:
        return f"{us / 1000:,.2f} ms"
    if us >= 100:
        return f"{us:,.0f} µs"
    if us >= 10:
        return f"{us:.1f} µs"
    return f"{us:.2f} µs"


def _read_cases(db: Database, tag: str) -> dict[str, Callable[[int], object]]:
    loader, tuned = db.loader, db.tuned
    assert loader is not None and tuned is not None
    probes = db.filled.probes
    n = len(probes)
    return {
        f"load.{tag}": lambda i: loader.get(probes[i % n]),
        f"state_at8.{tag}": lambda i: loader.state_at(probes[i % n], version=8),
        f"state_at4.{tag}": lambda i: loader.state_at(probes[i % n], version=4),
        f"find_tag.{tag}": lambda i: loader.find(status="ACTIVE", tags=["agent"], limit=10),
        f"find.{tag}": lambda i: loader.find(status="ACTIVE", limit=10),
        f"load_cache.{tag}": lambda i: tuned.get(probes[i % n]),
        f"state_at4_cache.{tag}": lambda i: tuned.state_at(probes[i % n], version=4),
    }


def _write_cases(db: Database, tag: str) -> dict[str, Callable[[int], object]]:
    writer = db.writer
    assert writer is not None
    sid = db.append_sid
    return {
        f"append.{tag}": lambda i: writer.update(sid, {"step": i + 1}),
        f"create.{tag}": lambda i: writer.create("bench", tags=["bench"], state={"step": 0}),
    }


OPERATIONS = {
    "load": "load a probe session cold (snapshot at 6 + 4 events)",
    "state_at8": "state_at(probe, version=8) (snapshot + 2 events)",
    "state_at4": "state_at(probe, version=4) (events 1..4, no snapshot)",
    "find_tag": "find(status=ACTIVE, tags=[agent], limit=10)",
    "find": "find(status=ACTIVE, limit=10)",
    "append": "append 1 state change + commit (durability normal)",
    "create": "create a session + commit (durability normal)",
}
EXPERIMENTS = {"load_cache": "load", "state_at4_cache": "state_at4"}


def _check_probes(db: Database) -> None:
    assert db.loader is not None
    if not db.filled.probes:
        raise RuntimeError(f"the {db.label} file has no probe sessions")
    for sid in db.filled.probes[:50]:
        session = db.loader.get(sid)
        if session.version != 10 or session.checkpoints != {"cp": 6} or \
                session.state.get("step") != 8:
            raise RuntimeError(f"probe {sid} of the {db.label} file is not the probe shape: "
                               f"{session!r} {session.state}")
        if db.loader.state_at(sid, version=4).state.get("step") != 3:
            raise RuntimeError(f"state_at of probe {sid} is wrong")


def verify_one_process(engine: SessionEngine) -> Any:
    """engine.verify() in this process only (workers=1 where verify takes workers): the
    per-event cost and the memory of one verifier, whatever the file size."""
    import inspect

    if "workers" in inspect.signature(engine.verify).parameters:
        return engine.verify(workers=1)
    return engine.verify()


# -- memory, in child processes ----------------------------------------------------------------

def _vm_kb(field: str) -> int | None:
    """A Vm* figure of /proc/self/status in kB (None where there is no /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the process's peak RSS (Linux: ru_maxrss and VmHWM start again from the current
    RSS), so the peak read afterwards is the operation's own, not start-up's."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _memory_child(op: str, path: str) -> dict[str, Any]:
    """Runs in a fresh process: peak RSS of `op` on `path`, then its tracemalloc peak."""
    import gc

    engine = SessionEngine("sqlite:///" + path)
    run: Callable[[], Any] = ((lambda: engine.rebuild("catalog")) if op == "rebuild"
                              else (lambda: verify_one_process(engine)))
    gc.collect()
    reset = _reset_peak()
    before = _vm_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = _vm_kb("VmHWM")
    tracemalloc.start()
    run()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    engine.close()
    events = result if op == "rebuild" else result.events
    if op == "verify" and not result.ok:
        raise RuntimeError(f"verify found problems: {result.problems[:3]}")
    return {"op": op, "events": events, "seconds": seconds, "rss_before_kb": before,
            "rss_peak_kb": peak, "vm_hwm_kb": hwm, "peak_reset": reset,
            "tracemalloc_peak_bytes": traced_peak}


def memory_of(op: str, path: str) -> dict[str, Any]:
    """_memory_child in a new interpreter, started by a shell that forks it (not exec): on
    Linux a process's ru_maxrss starts from the peak of the process image its exec replaced,
    so a child exec'd straight from this (large) process would report this process's peak."""
    import shlex

    command = shlex.join([sys.executable, "-m", "benchmarks.scale", "--memory-child", op,
                          path]) + "; exit $?"
    out = subprocess.run(
        ["/bin/sh", "-c", command], check=True, capture_output=True, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- the run -----------------------------------------------------------------------------------

@dataclass
class ScaleRun:
    small: FillResult
    large: FillResult
    rows: list[GrowthRow]
    memory: list[dict[str, Any]]
    notes: list[str]


def measure(tmp: str, sessions: int = SESSIONS, events: int = EVENTS,
            small_events: int = SMALL_EVENTS, *, rounds: int = 20, per_round: int = 50,
            whole_rounds: int = 2, progress: Callable[[str], None] | None = None) -> ScaleRun:
    say = progress or (lambda message: None)
    small_sessions = max(10, small_events // 10)
    say(f"filling the small file: {small_sessions:,} sessions, {small_events:,} events")
    small_fill = fill(os.path.join(tmp, "small.db"), small_sessions, small_events,
                      probe_every=10)
    say(f"small file: {small_fill.describe()}")
    say(f"filling the large file: {sessions:,} sessions, {events:,} events")
    large_fill = fill(os.path.join(tmp, "large.db"), sessions, events, probe_every=PROBE_EVERY,
                      progress=say)
    say(f"large file: {large_fill.describe()}")
    small = Database("small", os.path.join(tmp, "small.db"), small_fill)
    large = Database("large", os.path.join(tmp, "large.db"), large_fill)
    rows: list[GrowthRow] = []
    notes: list[str] = []
    try:
        for db in (small, large):
            db.open()
            _check_probes(db)

        # -- whole-file operations: catalog rebuild and verify, per event --------------------
        for op in ("rebuild", "verify"):
            per_db: dict[str, Stats] = {}
            rates: dict[str, list[float]] = {}
            for db, n_rounds in ((small, max(5, whole_rounds * 5)), (large, whole_rounds)):
                say(f"{op} of the {db.label} file, {n_rounds} rounds")
                engine = db.writer
                assert engine is not None

                def run(engine: SessionEngine = engine, op: str = op) -> int:
                    if op == "rebuild":
                        return engine.rebuild("catalog")
                    report = verify_one_process(engine)
                    if not report.ok:
                        raise RuntimeError(f"verify found problems: {report.problems[:3]}")
                    return int(report.events)

                stats, db_rates = timed_rounds({db.label: run}, n_rounds)
                per_db[db.label] = stats[db.label]
                rates[db.label] = db_rates[db.label]
            label = ("catalog rebuild, per event (whole log)" if op == "rebuild"
                     else "verify(), per event (every chain and snapshot)")
            rows.append(GrowthRow(label, per_db["small"], per_db["large"], unit="event",
                                  note=f"small {statistics.median(rates['small']):,.0f} "
                                       f"events/s, large {statistics.median(rates['large']):,.0f}"
                                       " events/s; one sample per round"))

        # -- per-call operations, small and large interleaved ------------------------------
        # reads first, with no writer in between (a commit by another connection empties a
        # SQLite connection's page cache, and new sessions would sit at the head of every find
        # page), then the writes
        for db in (small, large):
            assert db.loader is not None
            db.loader.find(limit=1)  # the catalog is current before timing
        per_call: dict[str, Stats] = {}
        for phase, make in (("reads", _read_cases), ("writes", _write_cases)):
            cases = {**make(small, "small"), **make(large, "large")}
            say(f"per-call {phase}: {len(cases)} cases, {rounds} rounds x {per_round} calls")
            # reads warm up over every probe once, so the experiment's large page cache holds
            # them all (the default 2 MiB cache of the large file cannot, which is the point)
            warmup = max(per_round, len(large.filled.probes)) if phase == "reads" else per_round
            per_call.update(interleave(cases, rounds=rounds, per_round=per_round,
                                       warmup=warmup).stats)
        for key, label in OPERATIONS.items():
            rows.append(GrowthRow(label, per_call[f"{key}.small"], per_call[f"{key}.large"]))
        for key, base in EXPERIMENTS.items():
            rows.append(GrowthRow(
                f"  experiment: {OPERATIONS[base]}, PRAGMA cache_size={CACHE_KIB >> 10} MiB",
                per_call[f"{key}.small"], per_call[f"{key}.large"], judged=False,
                note="a loader whose connection's page cache holds the probes' pages"))
    finally:
        small.close()
        large.close()

    memory = []
    for op in ("rebuild", "verify"):
        for db in (small, large):
            say(f"peak memory of a full {op} of the {db.label} file (child process)")
            result = memory_of(op, db.path)
            result["file"] = db.label
            result["file_events"] = db.filled.events
            memory.append(result)
    notes.append(f"small file: {small_fill.describe()}")
    notes.append(f"large file: {large_fill.describe()}")
    notes.append(f"probe sessions: {len(small_fill.probes):,} in the small file, "
                 f"{len(large_fill.probes):,} in the large one; loads and state_at cycle over "
                 "them")
    return ScaleRun(small_fill, large_fill, rows, memory, notes)


def render(run: ScaleRun, machine: dict[str, str]) -> str:
    parts = ["## sessionledger at scale", ""]
    parts.extend(f"- {key}: {value}" for key, value in machine.items())
    headers = ("operation", "unit", f"small ({run.small.events:,} events)",
               f"large ({run.large.events:,} events)", "growth", "target", "verdict")
    body = []
    for row in run.rows:
        verdict = ("info (not a target)" if not row.judged else
                   f"PASS ({(GROWTH_LIMIT - row.growth) * 100:.0f} pts to spare)" if row.passed
                   else f"FAIL (by {(row.growth - GROWTH_LIMIT) * 100:.0f} pts)")
        body.append([row.operation, row.unit, _fmt(row.small.median_us),
                     _fmt(row.large.median_us), f"{row.growth:.2f}x",
                     f"≤ {GROWTH_LIMIT:.2f}x" if row.judged else "—", verdict])
    parts += ["", _table(headers, body), ""]
    parts.append("Medians; per-call rows are single calls interleaved small / large in rotating "
                 "order in the same rounds, p10…p90 below. growth = large ÷ small.")
    parts += ["", _table(("operation", "small p10…p90", "large p10…p90", "n"), [
        [row.operation, f"{_fmt(row.small.p10_us)}…{_fmt(row.small.p90_us)}",
         f"{_fmt(row.large.p10_us)}…{_fmt(row.large.p90_us)}",
         f"{row.small.n} / {row.large.n}"] for row in run.rows])]
    parts += ["", "### Peak memory (fresh child process per run)", ""]
    mem_body = []
    for m in run.memory:
        mem_body.append([
            "catalog rebuild" if m["op"] == "rebuild" else "verify()", m["file"],
            f"{m['events']:,}", f"{m['seconds']:.2f} s",
            f"{m['rss_before_kb'] / 1024:,.1f} MB", f"{m['rss_peak_kb'] / 1024:,.1f} MB",
            f"+{(m['rss_peak_kb'] - m['rss_before_kb']) / 1024:,.1f} MB",
            f"{m['tracemalloc_peak_bytes'] / 1e6:,.1f} MB"])
    parts.append(_table(("operation", "file", "events", "time", "RSS before", "RSS peak",
                         "RSS growth", "tracemalloc peak"), mem_body))
    reset = all(m.get("peak_reset") for m in run.memory)
    parts += ["", "RSS before = VmRSS when the operation starts; RSS peak = ru_maxrss after it "
              + ("(the peak was reset just before the operation through /proc/self/clear_refs, "
                 "so it is the operation's own: Python heap, SQLite page cache, libraries)"
                 if reset else "(NOT reset: a high-water mark since the process started)")
              + "; tracemalloc = peak of Python allocations during a second run of the same "
              "operation."]
    parts += ["", "Notes:"]
    parts.extend(f"- {note}" for note in run.notes)
    judged = [row for row in run.rows if row.judged]
    failed = [row for row in judged if not row.passed]
    parts += ["", f"Targets: {len(judged) - len(failed)} of {len(judged)} grow at most "
              f"{GROWTH_LIMIT:.2f}x."
              + (" Failing: " + "; ".join(f"{r.operation} {r.growth:.2f}x" for r in failed)
                 if failed else "")]
    return "\n".join(parts)


def _table(headers: Sequence[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in body)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=SESSIONS,
                        help=f"sessions in the large file (default {SESSIONS:,})")
    parser.add_argument("--events", type=int, default=EVENTS,
                        help=f"events in the large file (default {EVENTS:,})")
    parser.add_argument("--small-events", type=int, default=SMALL_EVENTS,
                        help=f"events in the small file (default {SMALL_EVENTS:,})")
    parser.add_argument("--rounds", type=int, default=20,
                        help="interleaving rounds of the per-call operations (default 20)")
    parser.add_argument("--per-round", type=int, default=50,
                        help="calls per case per round (default 50)")
    parser.add_argument("--whole-rounds", type=int, default=2,
                        help="rounds of the whole-file rebuild and verify on the large file "
                             "(default 2; the small file gets 5 times as many)")
    parser.add_argument("--dir", metavar="DIR", help="where to put the temporary SQLite files")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    parser.add_argument("--memory-child", nargs=2, metavar=("OP", "PATH"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(_memory_child(*args.memory_child)))
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slscale-", dir=args.dir) as tmp:
        machine = facts(tmp)
        machine["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        run = measure(tmp, args.sessions, args.events, args.small_events, rounds=args.rounds,
                      per_round=args.per_round, whole_rounds=args.whole_rounds,
                      progress=_progress_printer(started))
        sizes = {name: os.path.getsize(os.path.join(tmp, name)) for name in
                 ("small.db", "large.db")}
    machine["file sizes"] = ", ".join(f"{name} {size / 1e6:,.1f} MB"
                                      for name, size in sizes.items())
    machine["run time"] = f"{time.perf_counter() - started:.0f} s"
    print(render(run, machine))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"machine": machine, "rows": [row.as_dict() for row in run.rows],
                       "memory": run.memory, "notes": run.notes}, out, indent=2,
                      ensure_ascii=False)
            out.write("\n")
    failed = any(row.judged and not row.passed for row in run.rows)
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
