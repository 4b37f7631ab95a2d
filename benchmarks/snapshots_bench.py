"""Snapshot loads, snapshot encoding and save_all_active (issue 3).

    python -m benchmarks.snapshots_bench [--quick] [--dir DIR] [--strict]

Rows (also part of the main ``python -m benchmarks`` table through ``rows()``):

- load a 1,000-event session with a snapshot at version 1,000 from disk (SQLite,
  ``SessionConfig(max_active_sessions=0)``, snapshot_every=100): target at most 60 µs, and at
  least 3 times faster than plain ``eventsourcing`` loading its own 1,000-event aggregate with
  its own snapshot (``IS_SNAPSHOTTING_ENABLED=y``, ``app.take_snapshot(id)``, then
  ``app.repository.get(id)``). All three contenders read THE SAME FILE: sessionledger's tables,
  eventsourcing's ``stored_events`` / ``snapshots`` tables, and the raw floor, a plain sqlite3
  connection running the two SELECTs the engine's load runs (the latest snapshot row, then the
  events from the snapshot's version on: one row, the event the snapshot's chain head is
  checked against), rows fetched, nothing decoded.
- load a 100,000-event session with a snapshot at 100,000: target within 1.2 times the
  1,000-event median measured in the same interleaved rounds. The 100,000 rows are built with
  the engine's own EventCodec (the bytes and chain digests a command writes) and inserted with
  one executemany; the snapshot is then written by the engine (``rebuild_snapshots()``), and
  ``verify(sid)`` checks the whole chain and the snapshot before anything is timed.
- snapshot encode + compress of a session holding 2 KB of state
  (``SessionRepository.snapshot_row``): target at most 10 µs; floor = msgpack + lz4 of the same
  snapshot map, no digest.
- ``save_all_active()`` of 1,000 ACTIVE sessions (SQLite WAL, synchronous=FULL, the engine's
  defaults otherwise: lifecycle hooks on): target at most 100 ms, with the sessions in the
  engine's working set and (another file) with ``max_active_sessions=0``, so each session is
  loaded from its snapshot first. Floor: one raw sqlite3 transaction inserting the same number
  of event rows and snapshot rows (two executemany) and committing.

Loads run interleaved in rotating order with the garbage collector paused (benchmarks/timing.py).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID

import blake3
import lz4.block
import msgpack
from eventsourcing.application import Application
from sqlalchemy import create_mock_engine
from sqlalchemy.schema import CreateTable

from sessionledger import SessionConfig, SessionEngine
from sessionledger.domain.events import (
    EVENT_SCHEMAS,
    SESSION_SAVED,
    SESSION_STARTED,
    STATE_CHANGED,
)
from sessionledger.infrastructure import schema
from sessionledger.infrastructure.codec import GENESIS_DIGEST, EventRow, chain_digest
from sessionledger.projections.snapshots import snapshot_fields

from . import engine as sl
from .es_baseline import Counter
from .raw import floor_ddl
from .results import Row, Target
from .timing import Case, interleave

# issue 3 targets
LOAD_SNAPSHOT_1000_US = 60.0
ES_FACTOR = 3.0
LONG_HISTORY_FACTOR = 1.2
SNAPSHOT_ENCODE_US = 10.0
SAVE_ALL_ACTIVE_US = 100_000.0

LONG_EVENTS = 100_000
BATCH_SESSIONS = 1000

Progress = Callable[[str], None]

_SNAPSHOT_SQL = ("SELECT version, format_version, flags, digest, data FROM sl_snapshots "
                 "WHERE session_id = ? ORDER BY version DESC LIMIT 1")
_EVENTS_SQL = ("SELECT version, type, ts, actor, correlation_id, payload, digest FROM sl_events "
               "WHERE session_id = ? AND version > ? ORDER BY version")
_INSERT_EVENT = ("INSERT INTO sl_events (session_id, version, type, ts, actor, correlation_id, "
                 "payload, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")


def _counts(plan: Any) -> dict[str, int]:
    """Sample counts from the main benchmark's plan (quick or default)."""
    quick = plan.load10_rounds < 30
    return {
        "load_rounds": 10 if quick else 30,
        "load_per_round": 40 if quick else 100,
        "encode_iterations": plan.micro_iterations,
        "batch_rounds": 4 if quick else 8,
        "batch_per_round": 2,
        "batch_warmup": 2,
    }


# -- eventsourcing with its own snapshots ------------------------------------------------------

class EsSnapshotApp:
    """Plain eventsourcing on a SQLite file, snapshotting enabled (its default JSON transcoder)."""

    def __init__(self, path: str) -> None:
        self.app: Application[UUID] = Application(env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": path,
            "IS_SNAPSHOTTING_ENABLED": "y",
        })

    def counter_with_snapshot(self, events: int) -> UUID:
        counter = Counter("bench")
        for step in range(1, events):
            counter.set_step(step)
        self.app.save(counter)
        self.app.take_snapshot(counter.id)
        assert self.app.snapshots is not None
        snapshots = list(self.app.snapshots.get(counter.id, desc=True, limit=1))
        if not snapshots or snapshots[0].originator_version != events:
            raise RuntimeError("eventsourcing did not store the snapshot")
        return counter.id

    def load(self, aggregate_id: UUID) -> Counter:
        loaded: Counter = self.app.repository.get(aggregate_id)
        return loaded

    def close(self) -> None:
        self.app.close()


# -- set-up ------------------------------------------------------------------------------------

def long_session(engine: SessionEngine, path: str, events: int) -> str:
    """A session of `events` events (create + updates {"step": n}) whose rows are built with the
    engine's own codec and inserted in one transaction; its snapshot is then written by the
    engine (rebuild_snapshots) and the chain and snapshot checked (verify)."""
    codec = engine._codec  # the engine's own EventCodec: same bytes, same chain digests
    sid = str(uuid.uuid4())
    now = time.time_ns() // 1000
    rows: list[EventRow] = codec.encode(
        sid, 0, GENESIS_DIGEST,
        [(SESSION_STARTED, EVENT_SCHEMAS[SESSION_STARTED], sl.started_data())], now, None, None)
    schema_v = EVENT_SCHEMAS[STATE_CHANGED]
    step = 1
    while step < events:
        chunk = range(step, min(events, step + 1000))
        rows.extend(codec.encode(
            sid, step, rows[-1][7],
            [(STATE_CHANGED, schema_v, {"set": {"step": n}, "delete": []}) for n in chunk],
            now, None, None))
        step = chunk[-1] + 1
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.executemany(_INSERT_EVENT, rows)
    finally:
        conn.close()
    engine.rebuild_snapshots()
    report = engine.verify(sid)
    if not report.ok or report.events != events:
        raise RuntimeError(f"the {events:,}-event session does not verify: {report.problems[:3]}")
    return sid


def _snapshot_ddl() -> str:
    dialect = create_mock_engine("sqlite://", executor=lambda *_: None).dialect
    ddl = str(CreateTable(schema.snapshots).compile(dialect=dialect))
    return ddl.replace(schema.snapshots.name, "floor_snapshots").strip()


class BatchFloor:
    """The floor of save_all_active: one transaction of two executemany and a commit."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path)
        self.conn.isolation_level = None
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute(floor_ddl("sqlite"))
        self.conn.execute(_snapshot_ddl())
        self.conn.isolation_level = "DEFERRED"
        cols = "session_id, version, type, ts, actor, correlation_id, payload, digest"
        self._events = f"INSERT INTO floor_events ({cols}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        self._snapshots = ("INSERT INTO floor_snapshots (session_id, version, format_version, "
                           "flags, digest, data, ts) VALUES (?, ?, ?, ?, ?, ?, ?)")

    def write(self, events: Sequence[EventRow], snapshots: Sequence[Any]) -> None:
        conn = self.conn
        conn.executemany(self._events, events)
        conn.executemany(self._snapshots, snapshots)
        conn.commit()

    def close(self) -> None:
        self.conn.close()


def _floor_batches(engine: SessionEngine, sample_id: str, sids: list[str], calls: int
                   ) -> list[tuple[list[EventRow], list[Any]]]:
    """Per call: the SessionSaved rows and snapshot rows save_all_active writes for `sids`
    (encoded like the engine's; the snapshot bytes of a real session of the same shape)."""
    payload, _ = engine._codec.payloads.encode({}, EVENT_SCHEMAS[SESSION_SAVED])
    sample = engine.get(sample_id)
    sample.version += 1
    sample.last_saved_version = sample.version
    flags, digest, data = engine._repository.snapshots.encode(
        snapshot_fields(sample, GENESIS_DIGEST))
    now = time.time_ns() // 1000
    heads = dict.fromkeys(sids, GENESIS_DIGEST)
    batches = []
    for call in range(calls):
        version = call + 2
        events: list[EventRow] = []
        snapshots: list[Any] = []
        for sid in sids:
            head = chain_digest(heads[sid], sid, version, SESSION_SAVED, now, None, None, payload)
            heads[sid] = head
            events.append((sid, version, SESSION_SAVED, now, None, None, payload, head))
            snapshots.append((sid, version, 1, flags, digest, data, now))
        batches.append((events, snapshots))
    return batches


# -- the rows ----------------------------------------------------------------------------------

def load_rows(tmp: str, plan: Any, progress: Progress) -> list[Row]:
    """Snapshot loads: 1,000 events (floor, sessionledger, eventsourcing) and 100,000 events."""
    counts = _counts(plan)
    path = os.path.join(tmp, "snapshot-load.db")
    url = "sqlite:///" + path
    progress("snapshot load: writing a 1,000-event session through the engine")
    sid1000 = sl.populate(url, 1000, snapshot_every=100)  # a snapshot at 1,000
    progress(f"snapshot load: writing a {LONG_EVENTS:,}-event session (codec rows + engine "
             "snapshot + verify)")
    started = time.perf_counter()
    with SessionEngine(url, SessionConfig(durability="normal")) as writer:
        sid_long = long_session(writer, path, LONG_EVENTS)
    setup_long = time.perf_counter() - started
    es = EsSnapshotApp(path)  # eventsourcing's own tables, in the same file
    loader = SessionEngine(url, SessionConfig(max_active_sessions=0))
    raw = sqlite3.connect(path, check_same_thread=False)
    try:
        es_id = es.counter_with_snapshot(1000)
        for sid, events in ((sid1000, 1000), (sid_long, LONG_EVENTS)):
            session = loader.get(sid)
            snap = raw.execute(_SNAPSHOT_SQL, (sid,)).fetchone()
            if session.version != events or snap[0] != events or \
                    session.state != {"step": events - 1}:
                raise RuntimeError(f"the {events:,}-event session loaded wrong: {session!r}")
        if es.load(es_id).version != 1000:
            raise RuntimeError("eventsourcing loaded the wrong version")

        def floor(sid: str) -> Case:
            def read(_: int) -> object:
                snap = raw.execute(_SNAPSHOT_SQL, (sid,)).fetchone()
                return raw.execute(_EVENTS_SQL, (sid, snap[0] - 1)).fetchall()
            return read

        progress("snapshot load: 1,000 and 100,000 events, interleaved")
        measured = interleave({
            "floor": floor(sid1000),
            "sl": lambda i: loader.get(sid1000),
            "es": lambda i: es.load(es_id),
            "floor_long": floor(sid_long),
            "sl_long": lambda i: loader.get(sid_long),
        }, rounds=counts["load_rounds"], per_round=counts["load_per_round"],
            warmup=counts["load_per_round"])
    finally:
        raw.close()
        loader.close()
        es.close()
    stats = measured.stats
    setting = "SQLite file, max_active_sessions=0"
    floor_note = ("floor = the load's two SELECTs (latest snapshot row; events from its version "
                  "on: 1 row), fetched, not decoded; the three contenders read the same file")
    load = Row("snapshots.load.1000", "load a 1,000-event session with a snapshot from disk",
               setting + ", snapshot at 1,000", sl=stats["sl"], floor=stats["floor"],
               es=stats["es"], target=Target(LOAD_SNAPSHOT_1000_US), note=floor_note)
    load.round_deltas_us = measured.round_deltas("sl", "floor")
    es_limit = stats["es"].median_us / ES_FACTOR
    versus_es = Row(
        "snapshots.load.1000.vs_es",
        f"  same, ≥ {ES_FACTOR:g}x faster than eventsourcing",
        "target = eventsourcing median ÷ 3, same rounds", sl=stats["sl"], es=stats["es"],
        target=Target(round(es_limit, 1)),
        note=f"eventsourcing {stats['es'].median_us:.1f} µs: its Application with "
             "IS_SNAPSHOTTING_ENABLED=y, take_snapshot(id) at 1,000 events, then "
             "repository.get(id) (snapshot + events after it), in the same file")
    long_limit = stats["sl"].median_us * LONG_HISTORY_FACTOR
    long = Row(
        "snapshots.load.100k", f"load a {LONG_EVENTS:,}-event session with a snapshot",
        setting + f", snapshot at {LONG_EVENTS:,}", sl=stats["sl_long"],
        floor=stats["floor_long"], target=Target(round(long_limit, 1)),
        note=f"target = {LONG_HISTORY_FACTOR:g} x the 1,000-event median "
             f"({stats['sl'].median_us:.1f} µs, same rounds); set-up {setup_long:.1f} s "
             f"({LONG_EVENTS:,} rows from the engine's codec in one executemany, the snapshot "
             "by engine.rebuild_snapshots(), then verify(sid))")
    long.round_deltas_us = measured.round_deltas("sl_long", "floor_long")
    return [load, versus_es, long]


def flat_state_2k() -> dict[str, Any]:
    """About 2 KB of state as 40 flat string fields (the shape whose msgpack + lz4 floor is the
    issue's "about 2.3 µs"; state_2k()'s 30 nested records cost several times that to pack)."""
    return {f"field_{i:02d}": f"value-{i:02d}-" + "y" * 40 for i in range(40)}


def encode_rows(plan: Any, progress: Progress) -> list[Row]:
    """SessionRepository.snapshot_row of a session holding 2 KB of state, in two shapes."""
    from .suite import state_2k

    rows = []
    for key, label, state in (("2k", "2 KB of state (suite.state_2k: 30 nested records)",
                               state_2k()),
                              ("2k_flat", "2 KB of state (40 flat string fields)",
                               flat_state_2k())):
        progress(f"snapshot encode + compress, {label}")
        rows.append(_encode_row(key, label, state, plan))
    return rows


def _encode_row(key: str, label: str, state: dict[str, Any], plan: Any) -> Row:
    n = _counts(plan)["encode_iterations"]
    with SessionEngine("sqlite://", SessionConfig(lifecycle_hooks=False)) as engine:
        sid = engine.create(sl.SESSION_NAME, tags=["agent"], metadata={"model": "x"},
                            state=state)
        session = engine.get(sid)
        repository = engine._repository
        head = engine._store.stream(sid)[-1][6]
    micros = time.time_ns() // 1000
    fields = snapshot_fields(session, head)
    packer = msgpack.Packer(use_bin_type=True)

    def floor(_: int) -> bytes:
        packed: bytes = lz4.block.compress(packer.pack(fields), store_size=True)
        return packed

    packed = packer.pack(fields)
    measured = interleave({
        "floor": floor,
        "sl": lambda i: repository.snapshot_row(session, head, micros),
        # the parts, for where the time goes
        "msgpack": lambda i: packer.pack(fields),
        "lz4": lambda i: lz4.block.compress(packed, store_size=True),
        "blake3": lambda i: blake3.blake3(packed).digest(),
    }, rounds=10, per_round=max(1, n // 10), warmup=max(1, n // 10))
    stats = measured.stats
    body = len(packed)
    stored = len(repository.snapshot_row(session, head, micros)[5])
    row = Row(
        f"snapshots.encode.{key}", "snapshot encode + compress", label,
        sl=stats["sl"], floor=stats["floor"], target=Target(SNAPSHOT_ENCODE_US),
        note=f"{body} B msgpack -> {stored} B stored (lz4 ratio {stored / body:.2f}); floor = "
             "msgpack (kept Packer) + lz4.block.compress of the same snapshot map; "
             f"the parts, measured in the same rounds: msgpack {stats['msgpack'].median_us:.1f} "
             f"µs, lz4 {stats['lz4'].median_us:.1f} µs, blake3 of the body (which "
             f"snapshot_row adds to the floor) {stats['blake3'].median_us:.1f} µs")
    row.round_deltas_us = measured.round_deltas("sl", "floor")
    return row


def save_all_active_rows(tmp: str, plan: Any, progress: Progress) -> list[Row]:
    """save_all_active() of 1,000 ACTIVE sessions: in the working set, loaded cold, the floor."""
    counts = _counts(plan)
    rounds, per_round, warmup = (counts["batch_rounds"], counts["batch_per_round"],
                                 counts["batch_warmup"])
    calls = warmup + rounds * per_round
    progress(f"save_all_active: creating {BATCH_SESSIONS:,} sessions in two files")
    cached = SessionEngine("sqlite:///" + os.path.join(tmp, "batch-cached.db"))
    cold = SessionEngine("sqlite:///" + os.path.join(tmp, "batch-cold.db"),
                         SessionConfig(max_active_sessions=0))
    floor = BatchFloor(os.path.join(tmp, "batch-floor.db"))
    try:
        ids: dict[str, list[str]] = {}
        for name, engine in (("cached", cached), ("cold", cold)):
            ids[name] = [engine.create(sl.SESSION_NAME, state=dict(sl.INITIAL_STATE))
                         for _ in range(BATCH_SESSIONS)]
        if len(cached._writer._working_set) != BATCH_SESSIONS or cold._writer._working_set:
            raise RuntimeError("the working sets are not what the rows say")
        floor_ids = [str(uuid.uuid4()) for _ in range(BATCH_SESSIONS)]
        batches = _floor_batches(cached, ids["cached"][0], floor_ids, calls)

        def save(engine: SessionEngine) -> Case:
            def call(_: int) -> object:
                saved = engine.save_all_active()
                if len(saved) != BATCH_SESSIONS:
                    raise RuntimeError(f"save_all_active saved {len(saved)} sessions")
                return saved
            return call

        progress("save_all_active of 1,000 sessions, interleaved")
        measured = interleave({
            "floor": lambda i: floor.write(*batches[i]),
            "cached": save(cached),
            "cold": save(cold),
        }, rounds=rounds, per_round=per_round, warmup=warmup)
        cached_in_set = len(cached._writer._working_set)
        stored = cold._store.query("SELECT COUNT(*) FROM sl_snapshots")[0][0]
        if stored != BATCH_SESSIONS * calls:
            raise RuntimeError(f"{stored} snapshots stored, not {BATCH_SESSIONS * calls}")
    finally:
        cached.close()
        cold.close()
        floor.close()
    stats = measured.stats
    setting = "SQLite WAL, synchronous=FULL"
    floor_note = (f"floor = one sqlite3 transaction: executemany of {BATCH_SESSIONS:,} event rows "
                  f"+ executemany of {BATCH_SESSIONS:,} snapshot rows, commit; sessions of "
                  "state {'step': 0}; engine defaults otherwise (lifecycle hooks on), so the "
                  "time includes the catalog catch-up on the previous batch and hook delivery")
    rows = []
    for key, label, note in (
        ("cached", f"sessions in the working set ({cached_in_set:,} of {BATCH_SESSIONS:,})",
         floor_note),
        ("cold", "max_active_sessions=0: each session loaded from its snapshot first", ""),
    ):
        row = Row(f"snapshots.save_all_active.{key}",
                  f"save_all_active() of {BATCH_SESSIONS:,} ACTIVE sessions",
                  f"{setting}, {label}", sl=stats[key], floor=stats["floor"],
                  target=Target(SAVE_ALL_ACTIVE_US), note=note)
        row.round_deltas_us = measured.round_deltas(key, "floor")
        rows.append(row)
    return rows


def rows(tmp: str, plan: Any, progress: Progress) -> list[Row]:
    """Every issue-3 row, for the main table (SQLite files under `tmp`)."""
    return [*load_rows(tmp, plan, progress), *encode_rows(plan, progress),
            *save_all_active_rows(tmp, plan, progress)]


def main(argv: Sequence[str] | None = None) -> int:
    from . import suite
    from .machine import facts
    from .report import render

    parser = argparse.ArgumentParser(prog="python -m benchmarks.snapshots_bench",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples (noisier)")
    parser.add_argument("--dir", metavar="DIR", help="where to put the temporary SQLite files")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args(argv)
    plan = suite.Plan.quick() if args.quick else suite.Plan.default()
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"  [{time.perf_counter() - started:5.1f} s] {message} ...", file=sys.stderr,
              flush=True)

    with tempfile.TemporaryDirectory(prefix="slsnap-", dir=args.dir) as tmp:
        machine = facts(tmp)
        result = rows(tmp, plan, progress)
    machine["run time"] = f"{time.perf_counter() - started:.0f} s"
    print(render(machine, result, []))
    failed = any(row.passed is False for row in result)
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
