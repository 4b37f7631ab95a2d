"""Durable subscribers and in-process hooks (issue 4): python -m benchmarks.subscribers_bench

Three scenarios, each next to a baseline measured in the same run:

(a) catch-up: a durable subscriber with a no-op handler reads a SQLite file of N events
    (default 200,000) with ``run_subscribers(until_idle=True)``. Target: at least 200,000
    events per second. The file is filled directly with sqlite3 (``executemany`` of rows
    encoded by the engine's own PayloadCodec, chained with its blake3 digest, as
    benchmarks/engine.py builds them): sessions of 100 events (a SessionStarted, then
    StateChanged), interleaved 10 sessions at a time. The engine opens the file first (so the
    schema is its own) and the built-in catalog subscriber is brought to the head before the
    timing (it is a subscriber too and runs in every ``run_subscribers``; its own fold rate is
    shown for information). Each round times a *new* subscriber name, so every round reads the
    whole log. Baselines: the raw sqlite3 ``SELECT ... ORDER BY position`` of the same rows
    (rows/s), and the same SELECT plus msgpack decoding of each payload (the least a
    subscriber that hands out decoded events can do).
(b) latency: median time from commit to delivery to a running background subscriber
    (``engine.run_subscribers()``, LISTEN/NOTIFY) on PostgreSQL. A writer engine in another
    process records an event and notes when its command returned ("commit"); the handler notes
    the arrival; both read the machine's monotonic clock. One event at a time, a few ms apart,
    so the runner is waiting each time. Target: at most 5 ms. Baseline: a raw psycopg
    INSERT + COMMIT round trip from the writer process, interleaved.
(c) hooks on the append path: ``engine.update()`` on SQLite in memory with no hook, with one
    no-op hook, and with the built-in LoggingHook + MetricsHook (lifecycle_hooks=True; the
    ``sessionledger.events`` logger at INFO with only a NullHandler and propagate=False, so
    every record is built and dropped). Interleaved blocks in rotating order, garbage collector
    paused per block; the figure is the median over rounds of the per-event difference to the
    no-hook case. Targets: at most 2 µs (one no-op hook) and 10 µs (built-in hooks).

``measure()`` returns the rows; ``--profile`` profiles (cProfile) every scenario whose target
failed and prints where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import logging
import os
import pstats
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgpack

from sessionledger import SessionConfig, SessionEngine, SessionEvent
from sessionledger.domain.events import EVENT_SCHEMAS, SESSION_STARTED, STATE_CHANGED
from sessionledger.infrastructure.codec import GENESIS_DIGEST, EventRow, PayloadCodec, chain_digest

CATCH_UP_TARGET = 200_000.0  # events per second, at least
LATENCY_TARGET_MS = 5.0  # median, at most
NOOP_HOOK_TARGET_US = 2.0  # per event above no hook, at most
LIFECYCLE_TARGET_US = 10.0

PG_ENV = ("SESSIONLEDGER_BENCH_POSTGRES_URL", "SESSIONLEDGER_TEST_POSTGRES_URL")
EVENTS_PER_SESSION = 100
INTERLEAVE = 10

_codec = PayloadCodec()

Progress = Callable[[str], None]


def _quiet_progress(message: str) -> None:
    pass


def _stderr_progress(message: str) -> None:
    print(f"  measuring: {message} ...", file=sys.stderr, flush=True)


# -- (a) catch-up from SQLite ----------------------------------------------------------------


def _session_rows(sid: str, events: int, micros: int) -> list[EventRow]:
    """A session of `events` events (SessionStarted + StateChanged), encoded and chained."""
    rows: list[EventRow] = []
    head = GENESIS_DIGEST
    for version in range(1, events + 1):
        if version == 1:
            event_type = SESSION_STARTED
            data: dict[str, Any] = {"name": "bench", "tags": [], "metadata": {},
                                    "state": {"step": 0}, "parent": None}
        else:
            event_type = STATE_CHANGED
            data = {"set": {"step": version - 1}, "delete": []}
        payload, _ = _codec.encode(data, EVENT_SCHEMAS[event_type])
        digest = chain_digest(head, sid, version, event_type, micros + version, None, None,
                              payload)
        rows.append((sid, version, event_type, micros + version, None, None, payload, digest))
        head = digest
    return rows


def fill_sqlite(path: str, events: int) -> float:
    """Create the engine's schema in `path`, then insert `events` events directly with sqlite3
    (sessions of EVENTS_PER_SESSION, INTERLEAVE sessions at a time). Returns seconds taken."""
    started = time.perf_counter()
    SessionEngine(f"sqlite:///{path}", SessionConfig(lifecycle_hooks=False)).close()
    micros = time.time_ns() // 1000
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=OFF")
        db.execute("BEGIN")
        written = 0
        while written < events:
            group: list[list[EventRow]] = []
            for _ in range(INTERLEAVE):
                size = min(EVENTS_PER_SESSION, events - written - sum(len(g) for g in group))
                if size <= 0:
                    break
                group.append(_session_rows(str(uuid.uuid4()), size, micros))
            # interleave the sessions of the group in the global order
            ordered = [row for rows in zip(*group, strict=True) for row in rows] if len({
                len(g) for g in group}) == 1 else [row for rows in group for row in rows]
            db.executemany(
                "INSERT INTO sl_events (session_id, version, type, ts, actor, correlation_id, "
                "payload, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", ordered)
            written += len(ordered)
        db.execute("COMMIT")
        count = db.execute("SELECT COUNT(*) FROM sl_events").fetchone()[0]
        if count != events:
            raise RuntimeError(f"filled {count} events, wanted {events}")
    finally:
        db.close()
    return time.perf_counter() - started


def _raw_select(path: str, decode: bool) -> int:
    db = sqlite3.connect(path)
    try:
        cursor = db.execute(
            "SELECT position, session_id, version, type, ts, actor, correlation_id, payload "
            "FROM sl_events WHERE position > ? ORDER BY position", (0,))
        n = 0
        if decode:
            unpack = msgpack.unpackb
            for row in cursor:
                unpack(row[7][2:], raw=False)
                n += 1
        else:
            for _row in cursor:
                n += 1
        return n
    finally:
        db.close()


def _noop(event: SessionEvent) -> None:
    pass


def catch_up(path: str, rounds: int, durability: str, batch_size: int,
             progress: Progress) -> dict[str, Any]:
    """Rates (events/s) of run_subscribers(until_idle=True) and the raw baselines, per round."""
    engine = SessionEngine(f"sqlite:///{path}",
                           SessionConfig(lifecycle_hooks=False, durability=durability))
    try:
        catalog = engine.subscribers()[0]
        head = catalog.position + catalog.lag
        progress(f"catalog catch-up over {catalog.lag} events (once, for information)")
        started = time.perf_counter()
        folded = engine.run_subscribers(until_idle=True)["catalog"]
        catalog_rate = folded / (time.perf_counter() - started) if folded else float("nan")
        rates: dict[str, list[float]] = {"subscriber": [], "raw select": [],
                                         "raw select + decode": []}
        for r in range(rounds):
            progress(f"catch-up round {r + 1}/{rounds} ({durability}, batch {batch_size})")
            name = f"bench-{durability}-{batch_size}-{r}"
            engine.subscribe(name, _noop)
            def subscriber(name: str = name) -> int:
                return engine.run_subscribers(until_idle=True, batch_size=batch_size)[name]

            cases: list[tuple[str, Callable[[], int]]] = [
                ("subscriber", subscriber),
                ("raw select", lambda: _raw_select(path, decode=False)),
                ("raw select + decode", lambda: _raw_select(path, decode=True)),
            ]
            shift = r % len(cases)
            for case, run in cases[shift:] + cases[:shift]:
                gc.collect()
                started = time.perf_counter()
                n = run()
                elapsed = time.perf_counter() - started
                if n != head:
                    raise RuntimeError(f"{case} saw {n} events, expected {head}")
                rates[case].append(n / elapsed)
            engine.unsubscribe(name)
        return {"events": head, "rates": rates, "catalog_rate": catalog_rate}
    finally:
        engine.close()


# -- (b) commit-to-delivery latency on PostgreSQL ------------------------------------------------


@contextlib.contextmanager
def _pg_schema(url: str) -> Iterator[tuple[str, str, str]]:
    from .suite import pg_schema

    with pg_schema(url) as made:
        yield made


def _clock_ns() -> int:
    """A clock shared by every process on the machine (CLOCK_MONOTONIC on Linux)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _latency_writer(engine_url: str, conninfo: str, schema: str, sid: str, conn: Any) -> None:
    """The writer process of pg_latency: on each request i, record event i and send back
    (called, committed) clock readings; then time one raw INSERT + COMMIT round trip."""
    import psycopg

    writer = SessionEngine(engine_url, SessionConfig(lifecycle_hooks=False))
    raw = psycopg.connect(conninfo, options=f"-csearch_path={schema}")
    body = os.urandom(64)
    try:
        while True:
            i = conn.recv()
            if i is None:
                return
            called = _clock_ns()
            writer.record(sid, "ping", {"i": i})
            committed = _clock_ns()
            conn.send((called, committed))
            if conn.recv() != "baseline":
                raise RuntimeError("protocol error")
            started = _clock_ns()
            raw.execute("INSERT INTO bench_rt (body) VALUES (%s)", (body,))
            raw.commit()
            conn.send(_clock_ns() - started)
    finally:
        raw.close()
        writer.close()


def pg_latency(url: str, events: int, progress: Progress) -> dict[str, Any]:
    """Commit-to-delivery latencies (ms) to a background subscriber, and raw round trips.

    The writer is a separate process (as in production, and so that it never waits for this
    process's GIL to note its commit time); both read the machine's monotonic clock.
    """
    import multiprocessing

    import psycopg

    with _pg_schema(url) as (conninfo, engine_url, schema):
        with psycopg.connect(conninfo, options=f"-csearch_path={schema}") as setup:
            setup.execute("CREATE TABLE bench_rt (id BIGSERIAL PRIMARY KEY, body BYTEA)")
        subscriber = SessionEngine(engine_url, SessionConfig(lifecycle_hooks=False))
        sid = subscriber.create("latency")
        arrivals: dict[int, int] = {}
        arrived = threading.Condition()

        def handler(event: SessionEvent) -> None:
            now = _clock_ns()
            with arrived:
                arrivals[int(event.data["payload"]["i"])] = now
                arrived.notify_all()

        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(target=_latency_writer,
                                  args=(engine_url, conninfo, schema, sid, theirs), daemon=True)
        process.start()
        try:
            subscriber.subscribe("latency", handler, events=["EventRecorded"])
            subscriber.run_subscribers(until_idle=True)
            handle = subscriber.run_subscribers()
            from_commit: list[float] = []
            from_call: list[float] = []
            round_trips: list[float] = []
            try:
                progress(f"PostgreSQL commit-to-delivery, {events} events")
                for i in range(-10, events):  # 10 warm-up events
                    time.sleep(0.003)  # the runner is waiting again
                    ours.send(i)
                    called, committed = ours.recv()
                    def delivered(i: int = i) -> bool:
                        return i in arrivals

                    with arrived:
                        if not arrived.wait_for(delivered, timeout=5):
                            raise RuntimeError(f"event {i} was not delivered within 5 s")
                        at = arrivals[i]
                    ours.send("baseline")  # interleaved: one raw INSERT + COMMIT round trip
                    trip = ours.recv()
                    if i >= 0:
                        from_commit.append((at - committed) / 1e6)
                        from_call.append((at - called) / 1e6)
                        round_trips.append(trip / 1e6)
            finally:
                handle.stop()
                ours.send(None)
                process.join(10)
            return {"from_commit": from_commit, "from_call": from_call,
                    "round_trip": round_trips}
        finally:
            if process.is_alive():
                process.terminate()
            subscriber.close()


# -- (c) hooks on the append path ----------------------------------------------------------------

HOOK_CASES = ("no hook", "one no-op hook", "LoggingHook + MetricsHook")


@contextlib.contextmanager
def _null_events_logger() -> Iterator[None]:
    """sessionledger.events at INFO, only a NullHandler, no propagation (restored after)."""
    logger = logging.getLogger("sessionledger.events")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    logger.handlers[:] = [logging.NullHandler()]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.handlers[:], logger.propagate, level = saved
        logger.setLevel(level)


def _hook_engines() -> dict[str, SessionEngine]:
    engines = {
        "no hook": SessionEngine("sqlite://", SessionConfig(lifecycle_hooks=False)),
        "one no-op hook": SessionEngine("sqlite://", SessionConfig(lifecycle_hooks=False)),
        "LoggingHook + MetricsHook": SessionEngine("sqlite://", SessionConfig()),
    }
    engines["one no-op hook"].hooks.subscribe(_noop)
    return engines


def hook_cost(rounds: int, per_round: int, progress: Progress) -> dict[str, Any]:
    """Per-event µs of engine.update() for each case, per round (interleaved)."""
    with _null_events_logger():
        engines = _hook_engines()
        try:
            sids = {case: engine.create("hooks", state={"step": 0})
                    for case, engine in engines.items()}
            counters = dict.fromkeys(engines, 0)

            def block(case: str, n: int) -> float:
                engine, sid = engines[case], sids[case]
                start = counters[case]
                update = engine.update
                gc.disable()
                try:
                    started = time.perf_counter_ns()
                    for step in range(start + 1, start + n + 1):
                        update(sid, {"step": step})
                    elapsed = time.perf_counter_ns() - started
                finally:
                    gc.enable()
                counters[case] += n
                return elapsed / n / 1000.0

            progress("hooks on the append path (warm-up)")
            for case in HOOK_CASES:
                block(case, per_round)
            per_event: dict[str, list[float]] = {case: [] for case in HOOK_CASES}
            progress(f"hooks on the append path, {rounds} rounds x {per_round} updates")
            for r in range(rounds):
                order = HOOK_CASES[r % 3:] + HOOK_CASES[: r % 3]
                for case in order:
                    per_event[case].append(block(case, per_round))
                gc.collect()
            delivered = engines["LoggingHook + MetricsHook"].metrics()["events_total"]
            if delivered["StateChanged"] != counters["LoggingHook + MetricsHook"]:
                raise RuntimeError("the built-in hooks did not see every event")
            return {"per_event_us": per_event}
        finally:
            for engine in engines.values():
                engine.close()


# -- rows -----------------------------------------------------------------------------------------


def _row(key: str, scenario: str, figure: float, unit: str, baseline: str,
         target: float | None, higher_is_better: bool, **extra: Any) -> dict[str, Any]:
    passed = None if target is None else (figure >= target if higher_is_better
                                          else figure <= target)
    return {"key": key, "scenario": scenario, "figure": figure, "unit": unit,
            "baseline": baseline, "target": target,
            "target_text": None if target is None else (
                f"≥ {target:,.0f}" if higher_is_better else f"≤ {target:g}") + f" {unit}",
            "passed": passed, **extra}


def measure(events: int = 200_000, rounds: int = 5, pg_url: str | None = None,
            pg_events: int = 200, hook_rounds: int = 15, hook_per_round: int = 2000,
            directory: str | None = None, progress: Progress = _quiet_progress,
            ) -> list[dict[str, Any]]:
    """Every scenario; one dict per row (figure, unit, baseline text, target, passed).

    Without `pg_url` (or $SESSIONLEDGER_BENCH_POSTGRES_URL / $SESSIONLEDGER_TEST_POSTGRES_URL)
    the PostgreSQL row says it was skipped.
    """
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slsubs-", dir=directory) as tmp:
        path = os.path.join(tmp, "catchup.db")
        progress(f"filling {path} with {events:,} events")
        fill_seconds = fill_sqlite(path, events)
        runs = {}
        for durability, batch in (("full", 1000), ("normal", 1000), ("full", 10_000)):
            runs[(durability, batch)] = catch_up(path, rounds, durability, batch, progress)
    main = runs[("full", 1000)]
    raw = statistics.median(main["rates"]["raw select"])
    raw_decode = statistics.median(main["rates"]["raw select + decode"])
    baseline = (f"raw sqlite3 SELECT {raw:,.0f} rows/s; + msgpack decode {raw_decode:,.0f} "
                "rows/s")
    for (durability, batch), run in runs.items():
        rate = statistics.median(run["rates"]["subscriber"])
        primary = (durability, batch) == ("full", 1000)
        rows.append(_row(
            f"subscribers.catch_up.{durability}.{batch}",
            f"catch-up from SQLite, durability={durability}, batch_size={batch}"
            + (" (defaults)" if primary else ""),
            rate, "events/s", baseline if primary else "",
            CATCH_UP_TARGET if primary else None, True,
            rounds=run["rates"]["subscriber"], events=run["events"]))
    rows.append(_row("subscribers.catalog_fold", "built-in catalog fold (info)",
                     main["catalog_rate"], "events/s", "", None, True))
    rows.append({"key": "subscribers.fill", "scenario": f"fill {events:,} events (info)",
                 "figure": fill_seconds, "unit": "s", "baseline": "", "target": None,
                 "target_text": None, "passed": None})

    pg_url = pg_url or next((os.environ[v] for v in PG_ENV if os.environ.get(v)), None)
    if pg_url:
        lat = pg_latency(pg_url, pg_events, progress)
        trip = statistics.median(lat["round_trip"])
        ordered = sorted(lat["from_commit"])
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        rows.append(_row(
            "subscribers.pg_latency", "PostgreSQL commit -> delivery, median",
            statistics.median(lat["from_commit"]), "ms",
            f"raw INSERT+COMMIT round trip {trip:.3f} ms",
            LATENCY_TARGET_MS, False, p90=p90,
            from_call_ms=statistics.median(lat["from_call"]), n=len(ordered)))
    else:
        rows.append({"key": "subscribers.pg_latency",
                     "scenario": "PostgreSQL commit -> delivery: SKIPPED (no URL)",
                     "figure": float("nan"), "unit": "ms", "baseline": "",
                     "target": LATENCY_TARGET_MS, "target_text": f"≤ {LATENCY_TARGET_MS:g} ms",
                     "passed": None})

    cost = hook_cost(hook_rounds, hook_per_round, progress)["per_event_us"]
    base = cost["no hook"]
    rows.append(_row("hooks.append.none", "append (update) with no hook", statistics.median(base),
                     "µs/event", "", None, False))
    for case, target in (("one no-op hook", NOOP_HOOK_TARGET_US),
                         ("LoggingHook + MetricsHook", LIFECYCLE_TARGET_US)):
        deltas = [a - b for a, b in zip(cost[case], base, strict=True)]
        rows.append(_row(
            "hooks.append." + ("noop" if case.startswith("one") else "lifecycle"),
            f"append + {case}, over no hook", statistics.median(deltas), "µs/event",
            f"no hook {statistics.median(base):.2f} µs/event; this case "
            f"{statistics.median(cost[case]):.2f}", target, False,
            range=(min(deltas), max(deltas))))
    return rows


def render(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a text table."""
    lines = [f"{'scenario':<58} {'figure':>16}  {'target':<20} {'verdict':<7} baseline",
             "-" * 130]
    for row in rows:
        figure = row["figure"]
        unit = row["unit"]
        if figure != figure:  # NaN: skipped
            shown = "-"
        elif unit == "events/s":
            shown = f"{figure:,.0f} {unit}"
        else:
            shown = f"{figure:.3f} {unit}"
        verdict = {True: "PASS", False: "FAIL", None: ""}[row["passed"]]
        lines.append(f"{row['scenario']:<58} {shown:>16}  {row['target_text'] or '':<20} "
                     f"{verdict:<7} {row['baseline']}")
        if "rounds" in row:
            low, high = min(row["rounds"]), max(row["rounds"])
            lines.append(f"{'':<58} {'':>16}  rounds {low:,.0f} .. {high:,.0f} events/s")
        if "range" in row:
            low, high = row["range"]
            lines.append(f"{'':<58} {'':>16}  rounds {low:.2f} .. {high:.2f} µs/event")
        if row["key"] == "subscribers.pg_latency" and "p90" in row:
            lines.append(f"{'':<58} {'':>16}  p90 {row['p90']:.3f} ms; from the writer's call "
                         f"{row['from_call_ms']:.3f} ms; n={row['n']}")
    return "\n".join(lines)


# -- profiles of failed targets -------------------------------------------------------------------


def _profile(run: Callable[[], object], title: str, limit: int = 18) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    return f"== profile: {title} (sorted by own time) ==\n{out.getvalue()}"


def latency_breakdown(pg_url: str, events: int = 100) -> str:
    """Where the commit-to-delivery time goes: the runner's steps timed per consumer (cProfile
    cannot see the runner's thread). Wraps SubscriberRunner.step for the duration."""
    from sessionledger.subscribers import SubscriberRunner

    timings: dict[tuple[str, bool], list[float]] = {}
    original = SubscriberRunner.step

    def timed(self: SubscriberRunner, consumer: Any) -> int:
        started = time.perf_counter_ns()
        handled = original(self, consumer)
        timings.setdefault((consumer.name, bool(handled)), []).append(
            (time.perf_counter_ns() - started) / 1e6)
        return handled

    SubscriberRunner.step = timed  # type: ignore[method-assign]
    try:
        result = pg_latency(pg_url, events, _quiet_progress)
    finally:
        SubscriberRunner.step = original  # type: ignore[method-assign]
    lines = [f"== PostgreSQL delivery path: runner steps, {events} events ==",
             f"commit -> delivery median {statistics.median(result['from_commit']):.3f} ms; "
             f"raw INSERT+COMMIT {statistics.median(result['round_trip']):.3f} ms",
             f"{'consumer':<12} {'had events':<11} {'steps':>6} {'median ms':>10}"]
    for (name, busy), values in sorted(timings.items()):
        lines.append(f"{name:<12} {busy!s:<11} {len(values):>6} {statistics.median(values):>10.3f}")
    lines.append("(each wake-up runs the catalog's transactional step before the user's "
                 "subscriber, then one more idle pass over both before waiting again)")
    return "\n".join(lines)


def event_cost_breakdown(n: int = 100_000) -> str:
    """The per-event pieces of delivering to in-process hooks, timed one by one (µs)."""
    import timeit

    from sessionledger.domain.events import to_datetime
    from sessionledger.projections.hooks import HookRegistry, LoggingHook
    from sessionledger.projections.metrics import MetricsHook

    payload, _ = _codec.encode({"set": {"step": 1}, "delete": []}, EVENT_SCHEMAS[STATE_CHANGED])
    sid = str(uuid.uuid4())
    micros = time.time_ns() // 1000
    moment = to_datetime(micros)
    event = SessionEvent(sid, 2, STATE_CHANGED, moment, None, None, {"set": {"step": 1}}, 5, "p")
    noop_registry = HookRegistry()
    noop_registry.subscribe(_noop)
    metrics = MetricsHook()
    metrics(SessionEvent(sid, 1, SESSION_STARTED, moment, None, None, {}, 4, "p"))
    with _null_events_logger():
        logging_hook = LoggingHook()
        pieces: list[tuple[str, Callable[[], object]]] = [
            ("decode the stored payload (PayloadCodec.decode)",
             lambda: _codec.decode(payload, sid, 2)),
            ("timestamp: to_datetime(micros)", lambda: to_datetime(micros)),
            ("SessionEvent(...) (frozen dataclass)", lambda: SessionEvent(
                sid, 2, STATE_CHANGED, moment, None, None, {}, 5, "p")),
            ("HookRegistry.dispatch([event]) to one no-op hook",
             lambda: noop_registry.dispatch([event])),
            ("LoggingHook(event) (NullHandler)", lambda: logging_hook(event)),
            ("MetricsHook(event)", lambda: metrics(event)),
            ("latency observer: 2 x perf_counter_ns + observe_latency",
             lambda: metrics.observe_latency("x", time.perf_counter_ns()
                                             - time.perf_counter_ns())),
        ]
        lines = [f"== per-event pieces of hook delivery (µs, {n:,} calls each) =="]
        empty = timeit.timeit(lambda: None, number=n) / n * 1e6
        for label, call in pieces:
            cost = timeit.timeit(call, number=n) / n * 1e6 - empty
            lines.append(f"{label:<58} {cost:6.2f}")
    return "\n".join(lines)


def profiles(rows: Sequence[dict[str, Any]], events: int, pg_url: str | None) -> list[str]:
    """cProfile reports of the scenarios whose target failed."""
    failed = {row["key"] for row in rows if row["passed"] is False}
    reports = []
    if any(key.startswith("subscribers.catch_up") for key in failed):
        with tempfile.TemporaryDirectory(prefix="slsubs-prof-") as tmp:
            path = os.path.join(tmp, "p.db")
            fill_sqlite(path, events)
            engine = SessionEngine(f"sqlite:///{path}", SessionConfig(lifecycle_hooks=False))
            try:
                engine.run_subscribers(until_idle=True)
                engine.subscribe("profiled", _noop)
                reports.append(_profile(lambda: engine.run_subscribers(until_idle=True),
                                        f"catch-up of {events:,} events"))
            finally:
                engine.close()
    if "subscribers.pg_latency" in failed and pg_url:
        reports.append(latency_breakdown(pg_url))
    if failed & {"hooks.append.noop", "hooks.append.lifecycle"}:
        with _null_events_logger():
            engine = SessionEngine("sqlite://", SessionConfig())
            try:
                sid = engine.create("p")
                reports.append(_profile(
                    lambda: [engine.update(sid, {"step": i}) for i in range(20_000)],
                    "20,000 updates with the built-in hooks"))
            finally:
                engine.close()
        reports.append(event_cost_breakdown())
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.subscribers_bench",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000,
                        help="events in the SQLite catch-up file (default 200000)")
    parser.add_argument("--rounds", type=int, default=5, help="catch-up rounds (default 5)")
    parser.add_argument("--pg-events", type=int, default=200,
                        help="events timed for PostgreSQL latency (default 200)")
    parser.add_argument("--postgres", metavar="URL",
                        help="PostgreSQL URL (default $" + " or $".join(PG_ENV) + ")")
    parser.add_argument("--quick", action="store_true", help="smaller, noisier run")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile every scenario whose target failed")
    parser.add_argument("--dir", help="directory for the temporary SQLite file")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.rounds, args.pg_events = min(args.events, 50_000), 3, 60
    started = time.perf_counter()
    rows = measure(args.events, args.rounds, args.postgres, args.pg_events,
                   hook_rounds=7 if args.quick else 15,
                   hook_per_round=1000 if args.quick else 2000,
                   directory=args.dir, progress=_stderr_progress)
    print(render(rows))
    print(f"\n(run time {time.perf_counter() - started:.0f} s)")
    if args.profile:
        pg_url = args.postgres or next((os.environ[v] for v in PG_ENV if os.environ.get(v)),
                                       None)
        for report in profiles(rows, args.events, pg_url):
            print()
            print(report)
    failed = any(row["passed"] is False for row in rows)
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
