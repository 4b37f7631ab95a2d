"""The scenarios of issue 2: what is measured, against what, with which target."""

from __future__ import annotations

import contextlib
import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import blake3
import lz4.block
import msgpack
import psycopg
from sqlalchemy.engine import make_url

from sessionledger import SessionEngine
from sessionledger.domain.events import STATE_CHANGED
from sessionledger.infrastructure.codec import GENESIS_DIGEST, PayloadCodec, chain_digest

from . import engine as sl
from .es_baseline import EsApp
from .raw import PostgresFloor, SqliteFloor
from .results import Row, Target
from .timing import Case, interleave, measure

SYNC = {"full": "FULL", "normal": "NORMAL"}

# issue 2 targets (µs)
APPEND_OVER_FLOOR = 20.0
CREATE_OVER_FLOOR = 30.0
LOAD_10 = 60.0
LOAD_1000 = 1500.0
PG_WRITE_OVER_FLOOR = 60.0
PG_LOAD_10 = 250.0

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    """How many samples: rounds x per_round per case, after warm-up calls."""

    write_rounds: int
    write_per_round: int
    write_warmup: int
    load10_rounds: int
    load10_per_round: int
    load1000_rounds: int
    load1000_per_round: int
    pg_rounds: int
    pg_per_round: int
    micro_iterations: int

    @classmethod
    def default(cls) -> Plan:
        return cls(write_rounds=60, write_per_round=50, write_warmup=200,
                   load10_rounds=60, load10_per_round=100,
                   load1000_rounds=25, load1000_per_round=8,
                   pg_rounds=50, pg_per_round=50,
                   micro_iterations=20_000)

    @classmethod
    def quick(cls) -> Plan:
        return cls(write_rounds=10, write_per_round=30, write_warmup=30,
                   load10_rounds=10, load10_per_round=50,
                   load1000_rounds=6, load1000_per_round=4,
                   pg_rounds=8, pg_per_round=30,
                   micro_iterations=3_000)

    def total_writes(self, rounds: int, per_round: int) -> int:
        return self.write_warmup + rounds * per_round


def _row_from(key: str, operation: str, setting: str, measured: Any, *,
              sl_case: str = "sl", floor_case: str | None = "floor", es_case: str | None = "es",
              target: Target | None = None, note: str = "") -> Row:
    stats = measured.stats
    row = Row(key, operation, setting, sl=stats[sl_case],
              floor=stats.get(floor_case) if floor_case else None,
              es=stats.get(es_case) if es_case else None, target=target, note=note)
    if floor_case is not None and floor_case in stats:
        row.round_deltas_us = measured.round_deltas(sl_case, floor_case)
    return row


# -- SQLite: append and create -----------------------------------------------------------------

def sqlite_writes(tmp: str, durability: str, plan: Plan, progress: Progress
                  ) -> tuple[list[Row], dict[str, Any]]:
    """append and create at one durability: floor, sessionledger and eventsourcing side by side."""
    sync = SYNC[durability]
    setting = f"SQLite WAL, synchronous={sync}"
    total = plan.total_writes(plan.write_rounds, plan.write_per_round)
    sl_path = os.path.join(tmp, f"sl-{durability}.db")
    floor = SqliteFloor(os.path.join(tmp, f"floor-{durability}.db"), sync)
    engine = sl.open_engine("sqlite:///" + sl_path, durability)
    es = EsApp(os.path.join(tmp, f"es-{durability}.db"), durability)
    try:
        settings = {"raw floor": floor.settings(), "sessionledger": sl.sqlite_settings(engine),
                    "eventsourcing": es.settings()}

        progress(f"SQLite append, synchronous={sync}")
        sid = engine.create(sl.SESSION_NAME, state=dict(sl.INITIAL_STATE))
        floor_sid = str(uuid.uuid4())
        floor.insert(sl.create_row(floor_sid))
        floor_rows = sl.update_rows(floor_sid, total)
        counter = es.new_counter()
        cases: dict[str, Case] = {
            "floor": lambda i: floor.insert(floor_rows[i]),
            "sl": lambda i: engine.update(sid, {"step": i + 1}),
            "es": lambda i: es.append(counter, i + 1),
        }
        appended = interleave(cases, rounds=plan.write_rounds, per_round=plan.write_per_round,
                              warmup=plan.write_warmup)
        mismatch = sl.check_same_bytes(
            sl_path, sid, {v: floor_rows[v - 2] for v in (2, total // 2, total + 1)})
        append = _row_from(
            f"sqlite.append.{durability}", "append 1 state change + commit", setting, appended,
            target=Target(APPEND_OVER_FLOOR, above_floor=True),
            note="; ".join(mismatch) if mismatch else "")

        progress(f"SQLite create, synchronous={sync}")
        create_rows = [sl.create_row() for _ in range(total)]
        cases = {
            "floor": lambda i: floor.insert(create_rows[i]),
            "sl": lambda i: engine.create(sl.SESSION_NAME, state=dict(sl.INITIAL_STATE)),
            "es": lambda i: es.create(),
        }
        created = interleave(cases, rounds=plan.write_rounds, per_round=plan.write_per_round,
                             warmup=plan.write_warmup)
        create = _row_from(
            f"sqlite.create.{durability}", "create a session + commit", setting, created,
            target=Target(CREATE_OVER_FLOOR, above_floor=True))
        return [append, create], settings
    finally:
        engine.close()
        es.close()
        floor.close()


# -- SQLite: cold loads ------------------------------------------------------------------------

def sqlite_loads(tmp: str, plan: Plan, progress: Progress) -> list[Row]:
    """Load 10- and 1,000-event sessions from disk (no working set / no aggregate cache)."""
    url = "sqlite:///" + os.path.join(tmp, "sl-load.db")
    progress("SQLite load: writing the sessions")
    sid10 = sl.populate(url, 10)
    sid1000 = sl.populate(url, 1000)
    loader = sl.open_engine(url, cached=False)
    es = EsApp(os.path.join(tmp, "es-load.db"))
    floor = SqliteFloor(os.path.join(tmp, "floor-load.db"), "FULL")
    try:
        floor_ids = {}
        for events in (10, 1000):
            fsid = str(uuid.uuid4())
            floor.insert_many([sl.create_row(fsid), *sl.update_rows(fsid, events - 1)])
            floor_ids[events] = fsid
        c10, c1000 = es.new_counter(10), es.new_counter(1000)
        for session_id, expected in ((sid10, 10), (sid1000, 1000)):
            version = loader.get(session_id).version
            if version != expected:
                raise RuntimeError(f"sessionledger loaded version {version}, not {expected}")
        if es.load(c1000.id).version != 1000 or len(floor.select(floor_ids[1000])) != 1000:
            raise RuntimeError("eventsourcing or floor session has the wrong length")

        rows = []
        specs = ((10, sid10, c10.id, plan.load10_rounds, plan.load10_per_round, LOAD_10),
                 (1000, sid1000, c1000.id, plan.load1000_rounds, plan.load1000_per_round,
                  LOAD_1000))
        for events, sid, es_id, rounds, per_round, limit in specs:
            progress(f"SQLite load {events} events")
            measured = interleave(_load_cases(floor, floor_ids[events], loader, sid, es, es_id),
                                  rounds=rounds, per_round=per_round, warmup=max(2, per_round))
            snapshot = "no snapshot, " if events > 10 else ""
            rows.append(_row_from(
                f"sqlite.load.{events}", f"load a {events:,}-event session from disk",
                f"SQLite, {snapshot}max_active_sessions=0", measured,
                target=Target(limit),
                note="floor = SELECT of the rows only"))
        return rows
    finally:
        loader.close()
        es.close()
        floor.close()


def _load_cases(floor: SqliteFloor, floor_sid: str, loader: SessionEngine, sid: str, es: EsApp,
                es_id: UUID) -> dict[str, Case]:
    return {
        "floor": lambda i: floor.select(floor_sid),
        "sl": lambda i: loader.get(sid),
        "es": lambda i: es.load(es_id),
    }


# -- PostgreSQL --------------------------------------------------------------------------------

@contextlib.contextmanager
def pg_schema(url: str) -> Iterator[tuple[str, str, str]]:
    """A fresh schema in the database: (libpq conninfo, engine URL on it, schema); dropped after."""
    parsed = make_url(url)
    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"slbench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{name}"')
        try:
            separator = "&" if "?" in url else "?"
            engine_url = parsed.set(drivername="postgresql+psycopg").render_as_string(
                hide_password=False) + f"{separator}options=-csearch_path%3D{name}"
            yield conninfo, engine_url, name
        finally:
            admin.execute(f'DROP SCHEMA "{name}" CASCADE')


def postgres_version(url: str) -> str:
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"


def postgres(url: str, plan: Plan, progress: Progress) -> list[Row]:
    """append, create and a cold 10-event load on PostgreSQL against raw psycopg."""
    setting = "PostgreSQL, psycopg 3"
    total = plan.total_writes(plan.pg_rounds, plan.pg_per_round)
    with pg_schema(url) as (conninfo, engine_url, schema_name):
        floor = PostgresFloor(conninfo, schema_name)
        one_trip = PostgresFloor(conninfo, schema_name, autocommit=True, create=False)
        engine = sl.open_engine(engine_url)
        loader = sl.open_engine(engine_url, cached=False)
        try:
            progress("PostgreSQL append")
            sid = engine.create(sl.SESSION_NAME, state=dict(sl.INITIAL_STATE))
            floor_sid, auto_sid = str(uuid.uuid4()), str(uuid.uuid4())
            floor.insert(sl.create_row(floor_sid))
            floor.insert(sl.create_row(auto_sid))
            floor_rows = sl.update_rows(floor_sid, total)
            auto_rows = sl.update_rows(auto_sid, total)
            appended = interleave({
                "floor": lambda i: floor.insert(floor_rows[i]),
                "sl": lambda i: engine.update(sid, {"step": i + 1}),
                "auto": lambda i: one_trip.insert(auto_rows[i]),
            }, rounds=plan.pg_rounds, per_round=plan.pg_per_round, warmup=plan.write_warmup)
            rows = [_row_from(
                "postgres.append", "append 1 state change + commit", setting, appended,
                es_case=None, target=Target(PG_WRITE_OVER_FLOOR, above_floor=True),
                note="floor = BEGIN, INSERT, COMMIT (psycopg transactional mode)")]
            auto = appended.stats["auto"]
            rows.append(Row("postgres.insert_autocommit", "raw INSERT in autocommit (info)",
                            setting, floor=auto,
                            note="one round trip: what a single-statement commit costs"))

            progress("PostgreSQL create")
            create_rows = [sl.create_row() for _ in range(total)]
            created = interleave({
                "floor": lambda i: floor.insert(create_rows[i]),
                "sl": lambda i: engine.create(sl.SESSION_NAME, state=dict(sl.INITIAL_STATE)),
            }, rounds=plan.pg_rounds, per_round=plan.pg_per_round, warmup=plan.write_warmup)
            rows.append(_row_from(
                "postgres.create", "create a session + commit", setting, created, es_case=None,
                target=Target(PG_WRITE_OVER_FLOOR, above_floor=True)))

            progress("PostgreSQL load 10 events")
            sid10 = sl.populate(engine_url, 10)
            fsid = str(uuid.uuid4())
            floor.insert_many([sl.create_row(fsid), *sl.update_rows(fsid, 9)])
            if loader.get(sid10).version != 10 or len(one_trip.select(fsid)) != 10:
                raise RuntimeError("PostgreSQL load sessions have the wrong length")
            loaded = interleave({
                "floor": lambda i: one_trip.select(fsid),
                "sl": lambda i: loader.get(sid10),
            }, rounds=plan.load10_rounds, per_round=plan.load10_per_round,
                warmup=plan.load10_per_round)
            rows.append(_row_from(
                "postgres.load.10", "load a 10-event session from disk", setting + ", cold",
                loaded, es_case=None, target=Target(PG_LOAD_10),
                note="floor = SELECT of the rows in autocommit"))
            return rows
        finally:
            loader.close()
            engine.close()
            one_trip.close()
            floor.close()


# -- codec micro-benchmarks (informational) ----------------------------------------------------

def state_2k() -> dict[str, Any]:
    """A state dict of about 2 KB when msgpacked: nested records of mixed scalars."""
    state: dict[str, Any] = {}
    i = 0
    while len(msgpack.packb(state)) < 2048:
        state[f"field_{i:03d}"] = {"step": i, "label": f"item-{i}", "score": i * 0.25,
                                   "done": i % 2 == 0, "tags": ["alpha", "beta"]}
        i += 1
    return state


def micro(plan: Plan, progress: Progress) -> list[Row]:
    """msgpack + lz4 of a 2 KB state and blake3 chain digests, next to the bare libraries."""
    progress("codec and digest")
    codec = PayloadCodec()
    state = state_2k()
    body = msgpack.packb(state, use_bin_type=True)
    payload, size = codec.encode(state, 1)
    sid = str(uuid.uuid4())
    n = plan.micro_iterations
    warm = n // 10
    rows = []

    def pack(_: int) -> bytes:
        compressed: bytes = lz4.block.compress(msgpack.packb(state, use_bin_type=True),
                                               store_size=True)
        return compressed

    ratio = (len(payload) - 2) / size
    rows.append(Row(
        "codec.encode.2k", "msgpack + lz4 encode, 2 KB state dict", "PayloadCodec.encode",
        sl=measure(lambda i: codec.encode(state, 1), iterations=n, warmup=warm),
        floor=measure(pack, iterations=n, warmup=warm),
        note=f"{size} B msgpack -> {len(payload)} B stored (lz4 ratio {ratio:.2f}); "
             "floor = msgpack.packb + lz4.block.compress"))
    rows.append(Row(
        "codec.decode.2k", "msgpack + lz4 decode, 2 KB state dict", "PayloadCodec.decode",
        sl=measure(lambda i: codec.decode(payload, sid, 1), iterations=n, warmup=warm),
        floor=measure(lambda i: msgpack.unpackb(lz4.block.decompress(payload[2:])),
                      iterations=n, warmup=warm),
        note="floor = lz4.block.decompress + msgpack.unpackb"))

    update_payload, _ = codec.encode({"set": {"step": 1}, "delete": []}, 1)
    for key, label, event_payload in (("update", "update event", update_payload),
                                      ("2k", "2 KB payload", body)):
        rows.append(_digest_row(key, label, sid, event_payload, n, warm))
    return rows


def _digest_row(key: str, label: str, sid: str, payload: bytes, n: int, warm: int) -> Row:
    header = msgpack.packb((sid, 2, STATE_CHANGED, 1_700_000_000_000_000, None, None))
    message = GENESIS_DIGEST + header + payload

    def chained(i: int) -> bytes:
        return chain_digest(GENESIS_DIGEST, sid, i + 2, STATE_CHANGED, 1_700_000_000_000_000,
                            None, None, payload)

    def bare(i: int) -> bytes:
        digest: bytes = blake3.blake3(message).digest()
        return digest

    return Row(
        f"digest.{key}", f"blake3 chain digest per event, {label}",
        f"chain_digest, {len(message)} B hashed",
        sl=measure(chained, iterations=n, warmup=warm),
        floor=measure(bare, iterations=n, warmup=warm),
        note="floor = blake3 of the same bytes, already concatenated (no header packing)")
