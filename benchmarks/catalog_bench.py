"""The catalog and tamper evidence at 100,000 sessions (issue 5).

    python -m benchmarks.catalog_bench [--sessions N] [--events N] [--rounds N] [--quick]
                                       [--no-profile] [--dir DIR] [--strict]

Fills a SQLite file (default: 100,000 sessions, 1,000,000 events; the main table uses 500,000)
with ``fill()``, which drives the engine's own decision, encoding and snapshot code
(``Session.decide_*``, ``SessionWriter._encode`` / ``_apply_committing``: the rows, chain
digests and snapshots a command writes) for many sessions at once, interleaved in commit order as
concurrent sessions would be, in worker processes, and inserts the rows with large executemany
transactions. Nothing goes through the catalog: the first rebuild builds it, and that rebuild
and a ``verify()`` must find the file whole (every event, every status) before anything is
timed. The fill time is printed.

Then, side by side in the same run:

- ``engine.rebuild("catalog")`` end to end, at durability full and normal (target at least
  300,000 events/s, i.e. at most 3.33 µs per event), next to plain ``eventsourcing`` reading
  and decoding its own events (``recorder.select_notifications`` in pages of 10,000 +
  ``mapper.to_domain_event`` each, no projection at all; on up to 200,000 events of its own
  file) and a raw sqlite3 SELECT of the rows (the subscriber feed's columns, in position order);
- ``find(status=..., tags=...)`` pages of 100 over the 100,000 sessions, several filter mixes
  and a second page by cursor (target at most 5 ms each), next to the same SQL (captured from
  the catalog store) on a plain sqlite3 connection;
- ``verify()`` of every chain, event and snapshot, with its default workers and with
  ``workers=1`` (target at least 500,000 events/s, i.e. at most 2 µs per event), next to a raw
  SELECT of the same rows in the same order with a blake3 of each row's payload and no chain
  logic (and, in the notes, the same SELECT without hashing, and in table order).

Whole-log cases run once per round, in rotating order. Throughputs are shown as µs per event so
the rows fit the main table; the notes give events/s. A failing rebuild or verify is profiled
(cProfile, top functions by own time) unless --no-profile.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import blake3
from eventsourcing.application import Application

from sessionledger import SessionConfig, SessionEngine
from sessionledger.domain.session import PendingEvent, Session

from .es_baseline import Counter as EsCounter
from .results import Row, Target
from .timing import Stats

# issue 5 targets
REBUILD_EVENTS_PER_S = 300_000
FIND_US = 5000.0
VERIFY_EVENTS_PER_S = 500_000

SESSIONS = 100_000
EVENTS = 1_000_000
#: plain eventsourcing's read + decode rate is measured on at most this many of its events
ES_EVENTS = 200_000

Progress = Callable[[str], None]

# -- the fill ----------------------------------------------------------------------------------

#: (kind tag, share), (environment tag, share), optional tags and their shares
KINDS = (("agent", 0.4), ("workflow", 0.3), ("notebook", 0.3))
ENVS = (("prod", 0.5), ("dev", 0.5))
EXTRA_TAGS = (("gpu", 0.10), ("priority", 0.02))
#: final status and its share
FINAL = (("ACTIVE", 0.50), ("SUSPENDED", 0.10), ("COMPLETED", 0.20), ("ARCHIVED", 0.05),
         ("FAILED", 0.10), ("CANCELLED", 0.05))
NAMES = ("research-run", "nightly-etl", "support-chat", "notebook", "eval-suite")
CHECKPOINT_SHARE = 0.3
SAVE_SHARE = 0.2
RECORD_SHARE = 0.3
#: a probe session: start, 4 updates, a checkpoint (snapshot at 6), 4 updates = 10 events, ACTIVE
PROBE_EVENTS = 10
_INSERT_EVENTS = ("INSERT INTO sl_events (session_id, version, type, ts, actor, correlation_id, "
                  "payload, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_SNAPSHOTS = ("INSERT INTO sl_snapshots (session_id, version, format_version, flags, "
                     "digest, data, ts) VALUES (?, ?, ?, ?, ?, ?, ?) "
                     "ON CONFLICT (session_id, version) DO UPDATE SET "
                     "format_version = excluded.format_version, flags = excluded.flags, "
                     "digest = excluded.digest, data = excluded.data, ts = excluded.ts")


def _pick(rng: random.Random, table: Sequence[tuple[str, float]]) -> str:
    x = rng.random()
    for value, share in table:
        x -= share
        if x < 0:
            return value
    return table[-1][0]


Step = Callable[[Session], list[PendingEvent]]


@dataclass
class _Plan:
    """One session's remaining commands (decisions taken on the session as it is then)."""

    session: Session
    head: bytes
    steps: list[Step]
    actor: str
    done: int = 0


@dataclass
class _Shape:
    """What one session will do, drawn before its number of updates is known."""

    name: str
    tags: list[str]
    actor: str
    probe: bool
    record: bool = False
    checkpoint: bool = False
    save: bool = False
    final: str = "ACTIVE"

    def fixed(self) -> int:
        """Commands other than updates."""
        if self.probe:
            return PROBE_EVENTS
        ending = {"ACTIVE": 0, "ARCHIVED": 2}.get(self.final, 1)
        return 1 + self.record + self.checkpoint + self.save + ending


def _shape(rng: random.Random, probe: bool) -> _Shape:
    tags = [_pick(rng, KINDS), _pick(rng, ENVS)]
    tags += [tag for tag, share in EXTRA_TAGS if rng.random() < share]
    shape = _Shape(rng.choice(NAMES), tags, f"user-{rng.randrange(50)}", probe)
    if not probe:
        shape.record = rng.random() < RECORD_SHARE
        shape.checkpoint = rng.random() < CHECKPOINT_SHARE
        shape.save = rng.random() < SAVE_SHARE
        shape.final = _pick(rng, FINAL)
    return shape


def _update(n: int) -> Step:
    return lambda s: s.decide_update({"step": n, f"k{n % 8}": n * 3})


def _steps(rng: random.Random, shape: _Shape, updates: int) -> list[Step]:
    """The commands of one session: start, updates with the record / checkpoint / save placed
    among them at random, then its ending (suspend, end, end + archive, or none)."""
    name, tags = shape.name, shape.tags

    def start(_: Session) -> list[PendingEvent]:
        return [Session.decide_start(name, tags, {"team": tags[0]}, {"step": 0}, None)]

    if shape.probe:
        return [start, *(_update(n) for n in range(1, 5)),
                lambda s: s.decide_checkpoint("cp"), *(_update(n) for n in range(5, 9))]
    middle: list[Step] = [_update(n) for n in range(1, updates + 1)]
    if shape.record:
        middle.insert(rng.randint(0, len(middle)),
                      lambda s: s.decide_record("tool_call", {"tool": "search", "q": "x"}))
    if shape.checkpoint:
        middle.insert(rng.randint(0, len(middle)), lambda s: s.decide_checkpoint("cp"))
    if shape.save:
        middle.insert(rng.randint(0, len(middle)), lambda s: s.decide_save())
    ending: list[Step] = []
    final = shape.final
    if final == "SUSPENDED":
        ending = [lambda s: s.decide_suspend("idle")]
    elif final in ("COMPLETED", "ARCHIVED"):
        ending = [lambda s: s.decide_end("completed")]
        if final == "ARCHIVED":
            ending.append(lambda s: s.decide_archive())
    elif final in ("FAILED", "CANCELLED"):
        outcome = final.lower()
        ending = [lambda s: s.decide_end(outcome)]
    return [start, *middle, *ending]


def _plans(rng: random.Random, sessions: int, events: int, probe_every: int
           ) -> Iterator[tuple[list[Step], str, bool]]:
    """Every session's commands, exactly `events` events in all: the updates left after the
    other commands are spread at random over the non-probe sessions."""
    shapes = [_shape(rng, probe_every > 0 and i % probe_every == probe_every // 2)
              for i in range(sessions)]
    budget = events - sum(shape.fixed() for shape in shapes)
    free = [i for i, shape in enumerate(shapes) if not shape.probe]
    if budget < 0 or (budget and not free):
        raise ValueError(f"{events:,} events are too few for {sessions:,} sessions (at least "
                         f"{events - budget:,} with this mix)")
    extra = Counter(rng.choices(free, k=budget)) if budget else Counter()
    for i, shape in enumerate(shapes):
        yield _steps(rng, shape, extra.get(i, 0)), shape.actor, shape.probe


@dataclass
class FillResult:
    """What fill() wrote and how long it took."""

    sessions: int = 0
    events: int = 0
    snapshots: int = 0
    seconds: float = 0.0
    workers: int = 1
    probes: list[str] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        return (f"{self.sessions:,} sessions, {self.events:,} events, {self.snapshots:,} "
                f"snapshots in {self.seconds:.1f} s ({self.events / self.seconds:,.0f} events/s, "
                f"{self.workers} encoding process{'es' if self.workers > 1 else ''} + the "
                "inserting one)")


#: one chunk of a generator's output: (event rows, snapshot rows, {status: sessions finished},
#: probe session ids)
Chunk = tuple[list[Any], list[Any], dict[str, int], list[str]]


def _generate(worker: int, workers: int, sessions: int, events: int, seed: int,
              concurrent: int, probe_every: int, base_us: int, chunk: int) -> Iterator[Chunk]:
    """This worker's share of the sessions, as the engine would write them, in chunks.

    `concurrent` sessions are live at once; each next command goes to one of them at random,
    so the events of many sessions interleave in commit order. Each command is decided by the
    aggregate, encoded and chained by the engine's _encode, applied with the engine's
    _apply_committing (which also returns the snapshot rows its policy makes due), on an
    in-memory engine of the default configuration: no database is touched here.
    """
    from sessionledger.writer import new_session_id

    rng = random.Random(seed * 1000 + worker)
    engine = SessionEngine("sqlite://", SessionConfig(lifecycle_hooks=False))
    encode, apply_committing = engine._writer._encode, engine._writer._apply_committing
    plans = _plans(rng, sessions, events, probe_every)
    live: list[_Plan] = []
    event_rows: list[Any] = []
    snapshot_rows: list[Any] = []
    statuses: Counter[str] = Counter()
    probes: list[str] = []
    genesis = b"\x00" * 32
    clock = base_us + worker

    def admit() -> None:
        nxt = next(plans, None)
        if nxt is not None:
            steps, actor, probe = nxt
            # ids as the engine makes them (time-ordered UUIDv7)
            session = Session(new_session_id())
            live.append(_Plan(session, genesis, steps, actor))
            if probe:
                probes.append(session.id)

    try:
        for _ in range(concurrent):
            admit()
        randrange = rng.randrange
        while live:
            k = randrange(len(live))
            plan = live[k]
            session = plan.session
            pending = plan.steps[plan.done](session)
            plan.done += 1
            clock += 10 * workers
            rows = encode(session, plan.head, pending, plan.actor, None, clock)
            snapshots = apply_committing(session, pending, rows, clock)
            if snapshots:
                snapshot_rows.extend(snapshots)
            plan.head = rows[-1][7]
            event_rows.extend(rows)
            if plan.done == len(plan.steps):
                statuses[session.status.value] += 1
                live[k] = live[-1]
                live.pop()
                admit()
            if len(event_rows) >= chunk:
                yield event_rows, snapshot_rows, dict(statuses), probes
                event_rows, snapshot_rows, probes = [], [], []
                statuses.clear()
        yield event_rows, snapshot_rows, dict(statuses), probes
    finally:
        engine.close()


def _worker_main(queue: Any, args: tuple[Any, ...]) -> None:
    try:
        for chunk in _generate(*args):
            queue.put(chunk)
        queue.put(None)
    except BaseException as error:  # the parent re-raises it
        queue.put(error)
        raise


def fill(path: str, sessions: int, events: int, *, seed: int = 5, concurrent: int = 1000,
         probe_every: int = 0, workers: int | None = None,
         progress: Progress | None = None) -> FillResult:
    """Write `sessions` sessions with `events` events in all into the SQLite file at `path`
    (created by the engine first, so the schema is the engine's), as the engine would have
    written them: see _generate. Every `probe_every`-th session of each worker follows the fixed
    10-event probe plan (ACTIVE, a checkpoint and so a snapshot at version 6); their ids come
    back in the result.

    `workers` processes (default: the usable cores) generate the rows; this process inserts
    them in 100,000-row transactions (synchronous=OFF and a large page cache on its own
    connection only: the file is an ordinary WAL database afterwards), taking chunks from the
    workers in turn so their sessions interleave in the log.
    """
    import multiprocessing

    started = time.perf_counter()
    if workers is None:
        workers = max(1, min(len(os.sched_getaffinity(0)), sessions // 1000 or 1))
    SessionEngine("sqlite:///" + path, SessionConfig(lifecycle_hooks=False)).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-1000000")
    base_us = time.time_ns() // 1000 - events * 10 - 10_000_000
    shares = [(sessions // workers + (w < sessions % workers),
               events // workers + (w < events % workers)) for w in range(workers)]
    chunk = 5000
    jobs = [(w, workers, n_sessions, n_events, seed, max(1, concurrent // workers),
             probe_every, base_us, chunk) for w, (n_sessions, n_events) in enumerate(shares)]
    result = FillResult(workers=workers)
    pending_events: list[Any] = []
    pending_snapshots: list[Any] = []
    processes = []
    try:
        if workers == 1:
            sources: list[Iterator[Chunk | None]] = [iter(_generate(*jobs[0]))]
        else:
            context = multiprocessing.get_context("fork")
            queues = [context.Queue(maxsize=8) for _ in jobs]
            for queue, job in zip(queues, jobs, strict=True):
                process = context.Process(target=_worker_main, args=(queue, job), daemon=True)
                process.start()
                processes.append(process)
            sources = [iter(queue.get, None) for queue in queues]
        reported = 0
        while sources:
            for source in list(sources):
                item = next(source, None)
                if item is None:
                    sources.remove(source)
                    continue
                if isinstance(item, BaseException):
                    raise RuntimeError("a fill worker failed") from item
                event_rows, snapshot_rows, statuses, probes = item
                pending_events.extend(event_rows)
                pending_snapshots.extend(snapshot_rows)
                result.statuses.update(statuses)
                result.sessions += sum(statuses.values())
                result.probes.extend(probes)
                if len(pending_events) >= 100_000:
                    _flush(conn, pending_events, pending_snapshots, result)
                    if progress is not None and result.events - reported >= 250_000:
                        reported = result.events
                        progress(f"fill: {result.events:,} of {events:,} events written")
        _flush(conn, pending_events, pending_snapshots, result)
    finally:
        conn.close()
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    if result.events != events or result.sessions != sessions:
        raise RuntimeError(f"fill wrote {result.events:,} events of {result.sessions:,} sessions, "
                           f"not {events:,} of {sessions:,}")
    result.seconds = time.perf_counter() - started
    return result


def _flush(conn: sqlite3.Connection, event_rows: list[Any], snapshot_rows: list[Any],
           result: FillResult) -> None:
    with conn:
        conn.executemany(_INSERT_EVENTS, event_rows)
        conn.executemany(_INSERT_SNAPSHOTS, snapshot_rows)
    result.events += len(event_rows)
    result.snapshots += len(snapshot_rows)
    event_rows.clear()
    snapshot_rows.clear()


# -- eventsourcing's read + decode -------------------------------------------------------------

class EsLog:
    """Plain eventsourcing on its own SQLite file, holding `events` events of Counter
    aggregates (created + steps), for its read + decode rate."""

    def __init__(self, path: str) -> None:
        self.app: Application[UUID] = Application(env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": path,
        })

    def fill(self, events: int, per_aggregate: int = 5, batch: int = 1000) -> None:
        written = 0
        while written < events:
            counters: list[EsCounter] = []
            while written < events and len(counters) < batch:
                n = min(per_aggregate, events - written)
                counter = EsCounter("bench")
                for step in range(1, n):
                    counter.set_step(step)
                written += n
                counters.append(counter)
            self.app.save(*counters)

    def read_all(self, page: int = 10_000) -> int:
        """select_notifications in pages + mapper.to_domain_event of each: the events read."""
        recorder: Any = self.app.recorder
        to_domain_event = self.app.mapper.to_domain_event
        start, seen = 1, 0
        while True:
            notifications = recorder.select_notifications(start, page)
            if not notifications:
                return seen
            for notification in notifications:
                to_domain_event(notification)
            seen += len(notifications)
            start = notifications[-1].id + 1

    def close(self) -> None:
        self.app.close()


# -- measuring ---------------------------------------------------------------------------------

_FEED_SQL = ("SELECT position, session_id, version, type, ts, actor, correlation_id, payload "
             "FROM sl_events WHERE position > ? AND position <= ? ORDER BY position")
_VERIFY_SQL = ("SELECT session_id, version, type, ts, actor, correlation_id, payload, digest "
               "FROM sl_events ORDER BY session_id, version")


def raw_feed(conn: sqlite3.Connection, window: int = 10_000) -> int:
    """A raw SELECT of every event's feed columns in position windows: the rows read."""
    head = conn.execute("SELECT MAX(position) FROM sl_events").fetchone()[0] or 0
    seen = 0
    for after in range(0, head, window):
        seen += len(conn.execute(_FEED_SQL, (after, after + window)).fetchall())
    return seen


def raw_hash(conn: sqlite3.Connection) -> int:
    """A raw SELECT of the rows verify() reads, in its order, with a blake3 of each payload
    (no header, no chain, no comparison): the rows read."""
    seen = 0
    hasher = blake3.blake3
    cursor = conn.execute(_VERIFY_SQL)
    while True:
        rows = cursor.fetchmany(2000)
        if not rows:
            return seen
        for row in rows:
            hasher(row[6]).digest()
        seen += len(rows)


def _verify_workers(engine: SessionEngine) -> int:
    """How many processes engine.verify() uses by default here (1 before verify had workers)."""
    import inspect

    if "workers" not in inspect.signature(engine.verify).parameters:
        return 1
    from sessionledger import engine as engine_module

    threshold = getattr(engine_module, "_PARALLEL_VERIFY_FROM", None)
    if threshold is None or engine._subscriptions.head() <= threshold:
        return 1
    return min(os.cpu_count() or 1, 4)


def raw_scan(conn: sqlite3.Connection, sql: str) -> int:
    """Rows of `sql` fetched in batches of 2,000, nothing else done with them."""
    seen = 0
    cursor = conn.execute(sql)
    while True:
        rows = cursor.fetchmany(2000)
        if not rows:
            return seen
        seen += len(rows)


def timed_rounds(cases: dict[str, Callable[[], int]], rounds: int
                 ) -> tuple[dict[str, Stats], dict[str, list[float]]]:
    """Run each whole-log case once per round in rotating order. Returns per case the Stats of
    µs per event (one sample per round) and the events/s of each round."""
    import gc

    names = list(cases)
    per_event: dict[str, list[float]] = {name: [] for name in names}
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            gc.collect()
            t0 = time.perf_counter_ns()
            count = cases[name]()
            elapsed = time.perf_counter_ns() - t0
            if count <= 0:
                raise RuntimeError(f"{name} read no events")
            per_event[name].append(elapsed / count)
            rates[name].append(count / (elapsed / 1e9))
    return {name: Stats.of(v) for name, v in per_event.items()}, rates


def _rate_text(rates: list[float]) -> str:
    ordered = sorted(rates)
    median = ordered[len(ordered) // 2]
    return f"{median:,.0f} events/s (rounds: {', '.join(f'{r / 1000:,.0f}k' for r in rates)})"


def _capture_sql(engine: SessionEngine, call: Callable[[], object]) -> tuple[str, list[Any]]:
    """The (SQL, parameters) the catalog's query ran for `call` (the store's query(), peeked)."""
    store = engine._store
    original = store.query
    seen: list[tuple[str, list[Any]]] = []

    def spy(sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if "FROM sl_catalog c" in sql:
            seen.append((sql, list(params)))
        return original(sql, params)

    store.query = spy  # type: ignore[method-assign]
    try:
        call()
    finally:
        store.query = original  # type: ignore[method-assign]
    if len(seen) != 1:
        raise RuntimeError(f"expected one catalog query, saw {len(seen)}")
    return seen[0]


#: find() mixes: (label, filters); the last page of the second mix is also asked by cursor
FIND_MIXES: list[tuple[str, dict[str, Any]]] = [
    ("status=ACTIVE (50% of sessions)", {"status": "ACTIVE"}),
    ("status=ACTIVE, tags=[agent] (20%)", {"status": "ACTIVE", "tags": ["agent"]}),
    ("status=FAILED, tags=[prod, gpu] (0.5%)", {"status": "FAILED", "tags": ["prod", "gpu"]}),
    ("tags=[priority] (2%)", {"tags": ["priority"]}),
    ("status=[ACTIVE, SUSPENDED], tags=[notebook] (18%)",
     {"status": ["ACTIVE", "SUSPENDED"], "tags": ["notebook"]}),
    ("status=CANCELLED, tags=[priority] (0.1%)", {"status": "CANCELLED", "tags": ["priority"]}),
]


def profile_text(call: Callable[[], object], top: int = 14) -> str:
    """cProfile of one call: the `top` functions by own time (cProfile inflates small Python
    functions: read it for proportions)."""
    profiler = cProfile.Profile()
    profiler.enable()
    call()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(line for line in lines[start - 2 if start >= 2 else 0:] if line.strip())


@dataclass
class CatalogRun:
    """Everything a catalog benchmark run produced."""

    rows: list[Row]
    fill: FillResult
    es_setup_s: float
    notes: list[str]
    profiles: dict[str, str]


def measure(tmp: str, sessions: int = SESSIONS, events: int = EVENTS, *, rounds: int = 3,
            find_rounds: int = 10, find_per_round: int = 20, profile: bool = True,
            progress: Progress | None = None) -> CatalogRun:
    """Fill, then time rebuild, find and verify against their baselines (module docstring)."""
    say = progress or (lambda message: None)
    path = os.path.join(tmp, "catalog.db")
    url = "sqlite:///" + path
    say(f"catalog: filling {sessions:,} sessions / {events:,} events")
    filled = fill(path, sessions, events, progress=say)
    say(f"catalog: {filled.describe()}")
    es_path = os.path.join(tmp, "catalog-es.db")
    es_events = min(events, ES_EVENTS)
    say(f"catalog: filling plain eventsourcing with {es_events:,} events")
    started = time.perf_counter()
    es = EsLog(es_path)
    es.fill(es_events)
    es_setup = time.perf_counter() - started
    engine = SessionEngine(url)
    fast = SessionEngine(url, SessionConfig(durability="normal"))
    raw = sqlite3.connect(path)
    notes: list[str] = []
    profiles: dict[str, str] = {}
    rows: list[Row] = []
    setting = f"SQLite, {filled.sessions:,} sessions, {filled.events:,} events"
    try:
        say("catalog: first build (and a check of the file)")
        first = engine.rebuild("catalog")
        report = engine.verify()
        if first != events or not report.ok or report.events != events:
            raise RuntimeError(f"the filled file is wrong: rebuild folded {first:,}, verify "
                               f"{report.events:,} events, problems {report.problems[:3]}")
        counts = Counter(row[2] for row in engine._catalog.tables.all_rows())
        if counts != filled.statuses:
            raise RuntimeError(f"catalog statuses {counts} differ from the fill's "
                               f"{filled.statuses}")
        es_count = es.read_all()
        if es_count != es_events:
            raise RuntimeError(f"eventsourcing holds {es_count:,} events, not {es_events:,}")

        # -- rebuild ---------------------------------------------------------------------------
        say(f"catalog: rebuild (durability full and normal) vs eventsourcing read+decode vs "
            f"raw SELECT, {rounds} rounds")
        folded: list[int] = []

        def rebuild(which: SessionEngine) -> Callable[[], int]:
            def run() -> int:
                n = which.rebuild("catalog")
                folded.append(n)
                return n
            return run

        stats, rates = timed_rounds({"sl": rebuild(engine), "sl_normal": rebuild(fast),
                                     "es": es.read_all, "floor": lambda: raw_feed(raw)}, rounds)
        if any(n != events for n in folded):
            raise RuntimeError(f"a rebuild folded {folded} events, not {events:,}")
        limit = 1e6 / REBUILD_EVENTS_PER_S
        rows.append(Row(
            "catalog.rebuild", "catalog rebuild, per event (end to end)",
            setting + ", durability full (default)",
            sl=stats["sl"], floor=stats["floor"], es=stats["es"], target=Target(round(limit, 2)),
            note=f"≥ {REBUILD_EVENTS_PER_S:,} events/s = ≤ {limit:.2f} µs/event; sessionledger "
                 f"engine.rebuild('catalog') {_rate_text(rates['sl'])}; eventsourcing "
                 f"select_notifications (pages of 10,000) + mapper.to_domain_event of "
                 f"{es_events:,} of its events {_rate_text(rates['es'])}; floor = raw sqlite3 "
                 f"SELECT of the feed columns in windows of 10,000 positions "
                 f"{_rate_text(rates['floor'])}; one sample per round, {rounds} rounds"))
        rows.append(Row(
            "catalog.rebuild.normal", "catalog rebuild, per event (end to end)",
            setting + ", durability normal", sl=stats["sl_normal"], floor=stats["floor"],
            es=stats["es"], target=Target(round(limit, 2)),
            note=f"SessionConfig(durability='normal'): {_rate_text(rates['sl_normal'])}"))
        if profile and rows[-2].passed is False:
            say("catalog: profiling a rebuild")
            profiles["rebuild"] = profile_text(lambda: engine.rebuild("catalog"))

        # -- find ------------------------------------------------------------------------------
        say(f"catalog: find, {len(FIND_MIXES) + 1} filter mixes")
        engine.find(limit=1)  # the catalog is current; later calls only check that it is
        rows.extend(_find_rows(engine, raw, setting, find_rounds, find_per_round))

        # -- verify ----------------------------------------------------------------------------
        say(f"catalog: verify (default and workers=1) vs raw SELECT + blake3, {rounds} rounds")
        checked: list[int] = []
        workers_used = _verify_workers(engine)

        def verify(workers: int | None) -> Callable[[], int]:
            def run() -> int:
                result = (engine.verify() if workers is None
                          else engine.verify(workers=workers))
                if not result.ok:
                    raise RuntimeError(f"verify found problems: {result.problems[:3]}")
                checked.append(result.snapshots)
                return result.events
            return run

        cases: dict[str, Callable[[], int]] = {"sl": verify(None)}
        if workers_used != 1:
            cases["sl_1"] = verify(1)
        cases.update({
            "floor": lambda: raw_hash(raw),
            "by_session": lambda: raw_scan(raw, _VERIFY_SQL),
            "by_position": lambda: raw_scan(raw, _VERIFY_SQL.replace("session_id, version",
                                                                     "position")),
        })
        stats, rates = timed_rounds(cases, rounds)
        limit = 1e6 / VERIFY_EVENTS_PER_S
        vsetting = setting + f", {filled.snapshots:,} snapshots"
        rows.append(Row(
            "catalog.verify", "verify(), per event (every chain, event and snapshot)",
            vsetting + f", default workers ({workers_used} here)", sl=stats["sl"],
            floor=stats["floor"], target=Target(round(limit, 2)),
            note=f"≥ {VERIFY_EVENTS_PER_S:,} events/s = ≤ {limit:.2f} µs/event; verify() "
                 f"{_rate_text(rates['sl'])}, {checked[0]:,} snapshots checked too; floor (one "
                 f"process) = raw SELECT of the same rows in (session, version) order + blake3 "
                 f"of each payload, no chain logic: {_rate_text(rates['floor'])}; the same "
                 f"SELECT without hashing {_rate_text(rates['by_session'])}; the same rows in "
                 f"position (table) order, no hashing {_rate_text(rates['by_position'])}"))
        if "sl_1" in stats:
            rows.append(Row(
                "catalog.verify.1", "verify(), per event (every chain, event and snapshot)",
                vsetting + ", workers=1", sl=stats["sl_1"], floor=stats["floor"],
                target=Target(round(limit, 2)),
                note=f"verify(workers=1) {_rate_text(rates['sl_1'])}: one process, as the "
                     "floor"))
        if profile and rows[-1].passed is False:
            say("catalog: profiling verify(workers=1)")
            profiles["verify(workers=1)"] = profile_text(
                lambda: engine.verify(workers=1) if workers_used != 1 else engine.verify())
    finally:
        raw.close()
        fast.close()
        engine.close()
        es.close()
    notes.append(f"set-up: {filled.describe()}; plain eventsourcing: {es_events:,} events of "
                 f"Counter aggregates (5 each, app.save of 1,000 at a time) in {es_setup:.1f} s")
    notes.append("fill mix: tags kind agent 40% / workflow 30% / notebook 30%, env prod/dev "
                 "50/50, gpu 10%, priority 2%; final status ACTIVE 50%, SUSPENDED 10%, "
                 "COMPLETED 20%, ARCHIVED 5%, FAILED 10%, CANCELLED 5%; 30% take a checkpoint, "
                 "20% save, 30% record an event (checkpoints and saves write snapshots); "
                 "statuses as found: " + ", ".join(f"{k} {v:,}" for k, v in
                                                   sorted(filled.statuses.items())))
    return CatalogRun(rows, filled, es_setup, notes, profiles)


def _find_rows(engine: SessionEngine, raw: sqlite3.Connection, setting: str, rounds: int,
               per_round: int) -> list[Row]:
    from .timing import interleave

    rows: list[Row] = []
    specs: list[tuple[str, dict[str, Any]]] = list(FIND_MIXES)
    second = engine.find(**FIND_MIXES[1][1])
    if second.next_cursor is None:
        raise RuntimeError("the second mix has a single page")
    specs.append((FIND_MIXES[1][0] + ", page 2 by cursor",
                  {**FIND_MIXES[1][1], "cursor": second.next_cursor}))
    for label, filters in specs:
        def find(_: int = 0, filters: dict[str, Any] = filters) -> object:
            return engine.find(**filters)

        sql, params = _capture_sql(engine, find)
        page = engine.find(**filters)
        found = raw.execute(sql, params).fetchall()
        if [item.id for item in page] != [row[0] for row in found][: len(page)]:
            raise RuntimeError(f"find({filters}) and its raw SQL disagree")

        def floor(_: int, sql: str = sql, params: list[Any] = params) -> object:
            return raw.execute(sql, params).fetchall()

        measured = interleave({"floor": floor, "sl": find}, rounds=rounds,
                              per_round=per_round, warmup=per_round)
        row = Row(f"catalog.find.{len(rows) + 1}", f"find() page of 100: {label}", setting,
                  sl=measured.stats["sl"], floor=measured.stats["floor"],
                  target=Target(FIND_US),
                  note=f"{len(page)} sessions on the page; floor = the same SQL "
                       "(captured from the catalog store) on a plain sqlite3 connection"
                  if not rows else "")
        row.round_deltas_us = measured.round_deltas("sl", "floor")
        rows.append(row)
    return rows


def rows(tmp: str, plan: Any, progress: Progress) -> list[Row]:
    """The issue-5 rows for the main table: 100,000 sessions of 500,000 events, 2 rounds (the
    quick plan: 20,000 sessions of 100,000 events, 1 round)."""
    quick = plan.load10_rounds < 30
    sessions, events = (SESSIONS // 5, EVENTS // 10) if quick else (SESSIONS, EVENTS // 2)
    run = measure(tmp, sessions, events, rounds=1 if quick else 2,
                  find_rounds=5 if quick else 10, find_per_round=10 if quick else 20,
                  profile=False, progress=progress)
    if run.rows:
        run.rows[0].note += "; " + "; ".join(run.notes)
    return run.rows


def main(argv: Sequence[str] | None = None) -> int:
    from .machine import facts
    from .report import render

    parser = argparse.ArgumentParser(prog="python -m benchmarks.catalog_bench",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=SESSIONS,
                        help=f"sessions in the file (default {SESSIONS:,})")
    parser.add_argument("--events", type=int, default=EVENTS,
                        help=f"events in the file (default {EVENTS:,})")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the whole-log cases (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds and fewer find samples")
    parser.add_argument("--no-profile", action="store_true",
                        help="do not profile a failing rebuild or verify")
    parser.add_argument("--dir", metavar="DIR", help="where to put the temporary SQLite files")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"  [{time.perf_counter() - started:5.1f} s] {message}", file=sys.stderr,
              flush=True)

    with tempfile.TemporaryDirectory(prefix="slcatalog-", dir=args.dir) as tmp:
        machine = facts(tmp)
        machine["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        run = measure(tmp, args.sessions, args.events, rounds=2 if args.quick else args.rounds,
                      find_rounds=5 if args.quick else 10,
                      find_per_round=10 if args.quick else 20,
                      profile=not args.no_profile, progress=progress)
    machine["run time"] = f"{time.perf_counter() - started:.0f} s"
    print(render(machine, run.rows, run.notes))
    for name, text in run.profiles.items():
        print(f"\n### cProfile of one {name} (top functions by own time)\n\n```\n{text}\n```")
    failed = any(row.passed is False for row in run.rows)
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
