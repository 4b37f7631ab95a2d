"""Corruption is detected, never served (issue 6).

Raw SQL damages the stored rows of one session (the "target"), then a fresh engine without a
working set loads it: `get` and `history` must each raise a SessionLedgerError whose message names
the session and the version where the damage is (CorruptedData today), and neighbouring sessions
must keep loading exactly as before. A command on the damaged session must write nothing, and
verify() must report the session at that version (and nothing about the neighbours).

The one damage a store cannot see on its own is the loss of its LAST events: what is left is a
complete, correctly chained shorter stream. Detecting that needs an anchor kept outside the
store (the last version or chain head a caller saw, a replica, an audit log); without one the
shorter stream is served, and test_deleted_last_event_serves_the_shorter_stream pins that down.

Three families of damage:

* EVENT_DAMAGE: bytes or rows changed under the chain digests (bit rot, a bad restore, a
  careless UPDATE): the blake3 chain, or the version sequence, catches each.
* FORGERIES: damage written with the chain digests recomputed (what any writer without the
  integrity_key can do): the decoder and replay must still refuse what they cannot serve;
  verify() checks chains, so only a few representative forgeries are put to it.
* SNAPSHOT_DAMAGE: a snapshot is a cache; a damaged one is skipped (the session loads from its
  events, exactly as before) or, with strict_snapshots=True, raises naming session and version.

Runs on a SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from _helpers import POSTGRESQL, Backend, same

from sessionledger import (
    CorruptedData,
    SessionConfig,
    SessionEngine,
    SessionLedgerError,
)
from sessionledger.infrastructure.codec import (
    FLAG_LZ4,
    GENESIS_DIGEST,
    SnapshotCodec,
    chain_digest,
)

EngineFactory = Callable[..., SessionEngine]

#: the target has 6 events; version 3 carries a payload above the 1 KiB lz4 threshold
TARGET_VERSIONS = 6
COMPRESSED_VERSION = 3
BIG_TEXT = " ".join(f"token-{i % 97}-{i}" for i in range(400))  # ~5 KB, lz4 shrinks it

EVENT_COLUMNS = "position, version, type, ts, actor, correlation_id, payload, digest"


@dataclass
class Stored:
    """One stored event row."""

    position: int
    version: int
    type: str
    ts: int
    actor: str | None
    correlation_id: str | None
    payload: bytes
    digest: bytes


class Damage:
    """Raw access to the events and snapshots of one database."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def events(self, sid: str) -> list[Stored]:
        rows = self.backend.sql(
            f"SELECT {EVENT_COLUMNS} FROM sl_events WHERE session_id = ? ORDER BY version", (sid,)
        )
        return [Stored(*(bytes(v) if isinstance(v, memoryview) else v for v in row))
                for row in rows]

    def event(self, sid: str, version: int) -> Stored:
        (found,) = [e for e in self.events(sid) if e.version == version]
        return found

    def set(self, sid: str, at: int, /, **columns: Any) -> None:
        """Set `columns` of the session's event at version `at`."""
        assignments = ", ".join(f"{name} = ?" for name in columns)
        self.backend.sql(
            f"UPDATE sl_events SET {assignments} WHERE session_id = ? AND version = ?",
            (*columns.values(), sid, at),
        )

    def delete(self, sid: str, version: int) -> None:
        self.backend.sql("DELETE FROM sl_events WHERE session_id = ? AND version = ?",
                         (sid, version))

    def insert(self, sid: str, e: Stored) -> None:
        self.backend.sql(
            "INSERT INTO sl_events (session_id, version, type, ts, actor, correlation_id, "
            "payload, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (sid, e.version, e.type, e.ts, e.actor, e.correlation_id, e.payload, e.digest),
        )

    def rechain(self, sid: str) -> None:
        """Recompute every chain digest of the session (unkeyed), as a forger would."""
        head = GENESIS_DIGEST
        for e in self.events(sid):
            head = chain_digest(head, sid, e.version, e.type, e.ts, e.actor, e.correlation_id,
                                e.payload)
            self.backend.sql("UPDATE sl_events SET digest = ? WHERE position = ?",
                             (head, e.position))

    def snapshots(self, sid: str) -> list[tuple[int, int | None, int, bytes, bytes]]:
        rows = self.backend.sql(
            "SELECT version, format_version, flags, digest, data FROM sl_snapshots "
            "WHERE session_id = ? ORDER BY version", (sid,)
        )
        return [(row[0], row[1], row[2], bytes(row[3]), bytes(row[4])) for row in rows]

    def set_snapshot(self, sid: str, at: int, /, **columns: Any) -> None:
        """Set `columns` of the session's snapshot at version `at`."""
        assignments = ", ".join(f"{name} = ?" for name in columns)
        self.backend.sql(
            f"UPDATE sl_snapshots SET {assignments} WHERE session_id = ? AND version = ?",
            (*columns.values(), sid, at),
        )


def flip(data: bytes, index: int) -> bytes:
    """`data` with every bit of one byte inverted (a negative index counts from the end)."""
    index %= len(data)
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1:]


# -- the sessions -------------------------------------------------------------------------------


@dataclass
class Sessions:
    target: str
    neighbours: list[str]
    #: what a fresh engine read for each session before any damage
    views: dict[str, tuple[Any, Any]]
    #: the SessionConfig fields the sessions were written with (integrity_key) to read them
    config: dict[str, Any]


def session_view(session: Any) -> tuple[Any, ...]:
    return (session.id, session.version, session.status, session.state, session.name,
            session.tags, session.metadata, session.parent, session.checkpoints,
            session.created_at, session.updated_at)


def history_view(events: list[Any]) -> list[tuple[Any, ...]]:
    return [(e.version, e.type, e.timestamp, e.actor, e.correlation_id, e.data) for e in events]


def reader(url: str, config: dict[str, Any], **more: Any) -> SessionEngine:
    """A fresh engine without a working set: every load reads the store."""
    return SessionEngine(url, SessionConfig(max_active_sessions=0, **config, **more))


def read_views(url: str, ids: list[str], config: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    with reader(url, config) as fresh:
        return {sid: (session_view(fresh.get(sid)), history_view(fresh.history(sid)))
                for sid in ids}


def build(engine: SessionEngine, url: str, *, with_snapshots: bool = False,
          config: dict[str, Any] | None = None) -> Sessions:
    """The target and two neighbours, their events interleaved in the global order.

    The target: 1 SessionStarted, 2 StateChanged, 3 EventRecorded (lz4), 4 StateChanged,
    5 EventRecorded, 6 StateChanged; with_snapshots adds checkpoint/save events so snapshots
    exist at versions 3 and 5 (then 7 events in all).
    """
    before = engine.create("neighbour-before", state={"k": "v"}, tags=["n"])
    target = engine.create("target", state={"n": 0}, metadata={"m": True}, actor="alice",
                           correlation_id="c-1")
    after = engine.create("neighbour-after", state={"k": "w"})
    engine.update(target, {"n": 1, "text": "short"}, actor="bob")
    engine.update(before, {"k": "v2", "big": BIG_TEXT})
    if with_snapshots:
        engine.save(before)  # a snapshot of another session, for a donor
        engine.checkpoint(target, "cp")  # 3: snapshot
        engine.update(target, {"n": 2, "big": BIG_TEXT})  # 4
        engine.save(target)  # 5: snapshot
        engine.record(after, "tick", {"i": 1})
        engine.update(target, {"n": 3})  # 6
        engine.update(target, {"n": 4})  # 7
    else:
        engine.record(target, "blob", {"text": BIG_TEXT}, correlation_id="c-2")
        engine.record(after, "tick", {"i": 1})
        engine.update(target, {"n": 2}, delete=["text"])
        engine.record(target, "note", {"i": 5})
        engine.update(before, {"k": "v3"})
        engine.update(target, {"n": 3})
    ids = [target, before, after]
    config = config or {}
    return Sessions(target, [before, after], read_views(url, ids, config), config)


@pytest.fixture
def damage(backend: Backend) -> Damage:
    return Damage(backend)


@pytest.fixture
def sessions(engine_factory: EngineFactory, backend: Backend) -> Sessions:
    built = build(engine_factory(snapshot_every=0), backend.url)
    stored = Damage(backend).events(built.target)
    assert [e.version for e in stored] == list(range(1, TARGET_VERSIONS + 1))
    assert stored[COMPRESSED_VERSION - 1].payload[0] & FLAG_LZ4, "version 3 is not compressed"
    assert not stored[1].payload[0] & FLAG_LZ4, "version 2 is compressed"
    assert not Damage(backend).snapshots(built.target), "the target has snapshots"
    return built


# -- checks -------------------------------------------------------------------------------------


def outcome(action: Callable[[], object]) -> BaseException | None:
    try:
        action()
    except Exception as error:
        return error
    return None


def refused(error: BaseException | None, sid: str, version: int, what: str) -> str | None:
    """Why `error` is not a clear refusal naming session and version (None when it is)."""
    if error is None:
        return f"{what}: served the damaged session instead of raising"
    if not isinstance(error, SessionLedgerError):
        return (f"{what}: raised {type(error).__module__}.{type(error).__name__}: {error} "
                "(not a SessionLedgerError)")
    message = str(error)
    if sid not in message:
        return f"{what}: {type(error).__name__} does not name session {sid}: {message}"
    if not re.search(rf"\bversion {version}\b", message):
        return f"{what}: {type(error).__name__} does not name version {version}: {message}"
    return None


def assert_detected(url: str, damage: Damage, sessions: Sessions, version: int, *,
                    verify: bool = True) -> list[str]:
    """Every load of the target refuses naming `version`, a command on it writes nothing,
    verify() reports it there (unless not `verify`), and the neighbours load exactly as
    before. Returns the error class names seen."""
    sid = sessions.target
    problems: list[str] = []
    seen: list[str] = []
    rows_before = len(damage.events(sid))
    with reader(url, sessions.config) as fresh:
        for what, load in (
            ("get", lambda: fresh.get(sid)),
            ("get(refresh=True)", lambda: fresh.get(sid, refresh=True)),
            ("history", lambda: fresh.history(sid)),
            ("update", lambda: fresh.update(sid, {"after-damage": 1})),
        ):
            error = outcome(load)
            problem = refused(error, sid, version, what)
            if problem:
                problems.append(problem)
            else:
                seen.append(type(error).__name__)
        if len(damage.events(sid)) != rows_before:
            problems.append("a command on the damaged session wrote an event")
        if verify:
            problems += verify_problems(fresh, sessions, version)
    problems += neighbour_problems(url, sessions)
    assert not problems, "\n".join(problems)
    return seen


def verify_problems(engine: SessionEngine, sessions: Sessions, version: int) -> list[str]:
    """verify() must report the target at `version`, and nothing about the neighbours."""
    problems = []
    for report in (engine.verify(), engine.verify(sessions.target)):
        found = [(p.session_id, p.version) for p in report.problems]
        if report.ok or (sessions.target, version) not in found:
            problems.append(f"verify() does not report session {sessions.target} version "
                            f"{version}: it reports {[str(p) for p in report.problems]}")
        if any(sid in sessions.neighbours for sid, _ in found):
            problems.append(f"verify() reports an intact neighbour: {found}")
    return problems


def neighbour_problems(url: str, sessions: Sessions) -> list[str]:
    problems = []
    now = read_views(url, sessions.neighbours, sessions.config)
    for sid in sessions.neighbours:
        if now[sid] != sessions.views[sid]:
            problems.append(f"neighbour {sid} no longer loads as before")
    return problems


# -- damage under the chain digests -------------------------------------------------------------

#: case id -> (damage done to the target, the version every load must name)
EventDamage = Callable[[Damage, Sessions], None]


def _flip_payload(version: int, index: int) -> EventDamage:
    def act(d: Damage, s: Sessions) -> None:
        d.set(s.target, version, payload=flip(d.event(s.target, version).payload, index))
    return act


def _flip_digest(d: Damage, s: Sessions) -> None:
    d.set(s.target, 4, digest=flip(d.event(s.target, 4).digest, 7))


def _truncate(version: int, keep: Callable[[int], int]) -> EventDamage:
    def act(d: Damage, s: Sessions) -> None:
        payload = d.event(s.target, version).payload
        d.set(s.target, version, payload=payload[: keep(len(payload))])
    return act


def _set(at: int, /, **columns: Any) -> EventDamage:
    def act(d: Damage, s: Sessions) -> None:
        d.set(s.target, at, **columns)
    return act


def _shift_ts(d: Damage, s: Sessions) -> None:
    d.set(s.target, 4, ts=d.event(s.target, 4).ts + 1)


def _delete(*versions: int) -> EventDamage:
    def act(d: Damage, s: Sessions) -> None:
        for version in versions:
            d.delete(s.target, version)
    return act


def _swap_versions(d: Damage, s: Sessions) -> None:
    d.set(s.target, 2, version=-2)
    d.set(s.target, 3, version=2)
    d.set(s.target, -2, version=3)


def _forged_last(d: Damage, s: Sessions) -> None:
    last = d.event(s.target, TARGET_VERSIONS)
    d.insert(s.target, Stored(0, TARGET_VERSIONS + 1, "EventRecorded", last.ts + 1, "mallory",
                              None, bytes((0, 1)) + msgpack.packb({"kind": "x", "payload": 1}),
                              b"\x01" * 32))


def _copied_from_neighbour(d: Damage, s: Sessions) -> None:
    # the neighbour's own, correctly chained event 2, appended to the target as its event 7
    donor = d.event(s.neighbours[0], 2)
    donor.version = TARGET_VERSIONS + 1
    d.insert(s.target, donor)


def _replaced_by_neighbours(d: Damage, s: Sessions) -> None:
    # the target's event 2 swapped for the neighbour's event 2 (same version, valid there)
    d.delete(s.target, 2)
    d.insert(s.target, d.event(s.neighbours[0], 2))


EVENT_DAMAGE: dict[str, tuple[EventDamage, int]] = {
    "flip-payload-byte-uncompressed": (_flip_payload(2, -3), 2),
    "flip-payload-byte-compressed": (_flip_payload(COMPRESSED_VERSION, 40), COMPRESSED_VERSION),
    "flip-compressed-size-prefix": (_flip_payload(COMPRESSED_VERSION, 3), COMPRESSED_VERSION),
    "flip-flags-byte": (_flip_payload(2, 0), 2),
    "flip-schema-byte": (_flip_payload(4, 1), 4),
    "flip-first-event-payload": (_flip_payload(1, -1), 1),
    "flip-digest-byte": (_flip_digest, 4),
    "truncate-payload-half": (_truncate(5, lambda n: n // 2), 5),
    "truncate-payload-one-byte": (_truncate(6, lambda n: n - 1), 6),
    "truncate-payload-empty": (_truncate(2, lambda n: 0), 2),
    "truncate-compressed-payload": (_truncate(COMPRESSED_VERSION, lambda n: n - 10),
                                    COMPRESSED_VERSION),
    "truncate-digest": (lambda d, s: d.set(s.target, 5, digest=d.event(s.target, 5).digest[:16]),
                        5),
    "change-type": (_set(2, type="EventRecorded"), 2),
    "change-type-unknown": (_set(4, type="SessionHijacked"), 4),
    "change-ts": (_shift_ts, 4),
    "change-actor": (_set(2, actor="mallory"), 2),
    "change-actor-to-null": (_set(1, actor=None), 1),
    "change-correlation-id": (_set(COMPRESSED_VERSION, correlation_id="c-forged"),
                              COMPRESSED_VERSION),
    "change-version-up": (_set(4, version=40), 4),
    "delete-middle-event": (_delete(3), 3),
    "delete-first-event": (_delete(1), 1),
    "delete-two-middle-events": (_delete(2, 3), 2),
    "swap-two-versions": (_swap_versions, 2),
    "forged-event-at-end-wrong-digest": (_forged_last, TARGET_VERSIONS + 1),
    "event-copied-from-another-session": (_copied_from_neighbour, TARGET_VERSIONS + 1),
    "event-replaced-by-another-sessions": (_replaced_by_neighbours, 2),
    # SQLite keeps any type in any column (PostgreSQL refuses these UPDATEs)
    "payload-a-huge-number": (_set(3, payload=2**40), 3),
    "payload-text": (_set(3, payload="not bytes"), 3),
    "digest-a-number": (_set(3, digest=7), 3),
    "ts-text": (_set(3, ts="yesterday"), 3),
    "actor-a-number": (_set(3, actor=42), 3),
    "type-a-number": (_set(3, type=7), 3),
    "version-text": (_set(3, version="three"), 3),
}
SQLITE_ONLY_EVENT_DAMAGE = {"payload-a-huge-number", "payload-text", "digest-a-number", "ts-text",
                            "actor-a-number", "type-a-number", "version-text"}


def damaged(backend: Backend, wrong_type: bool, act: Callable[[], object]) -> bool:
    """Do the damage; False when it puts a value of the wrong type in a column and the database
    refuses it (PostgreSQL's typed columns: then there is nothing to detect). SQLite must take
    every such damage: it keeps any type in any column."""
    if not wrong_type or backend.kind != POSTGRESQL:
        act()
        return True
    try:
        act()
    except Exception as error:  # psycopg's DataError, ProgrammingError...
        assert "type" in str(error) or "invalid" in str(error), error
        return False
    return True  # taken (a text that is valid bytea input): detected like any other damage


@pytest.mark.parametrize("case", list(EVENT_DAMAGE))
def test_damaged_event_is_detected_never_served(backend: Backend, damage: Damage,
                                                sessions: Sessions, case: str) -> None:
    act, version = EVENT_DAMAGE[case]
    if not damaged(backend, case in SQLITE_ONLY_EVENT_DAMAGE, lambda: act(damage, sessions)):
        return
    assert_detected(backend.url, damage, sessions, version)


def test_deleted_last_event_serves_the_shorter_stream(backend: Backend, damage: Damage,
                                                      sessions: Sessions) -> None:
    # Tail truncation is undetectable without an external anchor: events 1..5 are a complete,
    # correctly chained stream, exactly what the store held before event 6 was committed. A
    # caller that must notice keeps its own anchor (the last version or chain head it saw).
    damage.delete(sessions.target, TARGET_VERSIONS)
    sid = sessions.target
    history = sessions.views[sid][1]
    with reader(backend.url, sessions.config) as fresh:
        shorter = fresh.get(sid)
        assert shorter.version == TARGET_VERSIONS - 1
        assert history_view(fresh.history(sid)) == history[:-1]
        # what is served is the session as it was at version 5, not a mix
        assert same({"n": 2}, shorter.state)
    assert not neighbour_problems(backend.url, sessions)


# -- damage with the chain digests recomputed ---------------------------------------------------


def _repayload(version: int, make: Callable[[bytes], bytes]) -> EventDamage:
    def act(d: Damage, s: Sessions) -> None:
        d.set(s.target, version, payload=make(d.event(s.target, version).payload))
        d.rechain(s.target)
    return act


def _retype(version: int, new_type: str) -> EventDamage:
    def act(d: Damage, s: Sessions) -> None:
        d.set(s.target, version, type=new_type)
        d.rechain(s.target)
    return act


def _rets(version: int, ts: int) -> EventDamage:
    def act(d: Damage, s: Sessions) -> None:
        d.set(s.target, version, ts=ts)
        d.rechain(s.target)
    return act


def _body(data: Any, schema: int = 2) -> Callable[[bytes], bytes]:
    return lambda _old: bytes((0, schema)) + msgpack.packb(data, use_bin_type=True)


FORGERIES: dict[str, tuple[EventDamage, int]] = {
    "unknown-flags": (_repayload(2, lambda p: bytes((p[0] | 0x80,)) + p[1:]), 2),
    "lz4-flag-on-plain-body": (_repayload(2, lambda p: bytes((FLAG_LZ4,)) + p[1:]), 2),
    "lz4-flag-off-compressed-body": (
        _repayload(COMPRESSED_VERSION, lambda p: bytes((0,)) + p[1:]), COMPRESSED_VERSION),
    "lz4-body-truncated": (_repayload(COMPRESSED_VERSION, lambda p: p[:-20]),
                           COMPRESSED_VERSION),
    "lz4-size-prefix-huge": (
        _repayload(COMPRESSED_VERSION, lambda p: p[:2] + b"\xff\xff\xff\x7f" + p[6:]),
        COMPRESSED_VERSION),
    "schema-newer-than-release": (_repayload(4, lambda p: p[:1] + bytes((99,)) + p[2:]), 4),
    "schema-zero-no-upcaster": (_repayload(4, lambda p: p[:1] + bytes((0,)) + p[2:]), 4),
    # schema 1 was written in two shapes (see domain/events.py); a body of neither is damage
    "schema-1-of-neither-shape": (_repayload(4, _body({"other": 1}, schema=1)), 4),
    "body-not-msgpack": (_repayload(5, lambda p: p[:2] + b"\xc1\xc1\xc1"), 5),
    "body-empty": (_repayload(5, lambda p: p[:2]), 5),
    "payload-one-byte": (_repayload(5, lambda p: p[:1]), 5),
    "body-trailing-bytes": (_repayload(6, lambda p: p + b"\x00"), 6),
    "data-not-a-map": (_repayload(2, _body([1, 2, 3])), 2),
    "data-wrong-shape": (_repayload(2, _body({"set": 5, "delete": []})), 2),
    "data-missing-fields": (_repayload(6, _body({})), 6),
    "started-state-not-a-map": (_repayload(1, _body({"name": "t", "tags": [], "metadata": {},
                                                     "state": 7, "parent": None})), 1),
    "unknown-ext-type": (_repayload(5, _body({"kind": "note",
                                              "payload": msgpack.ExtType(42, b"x")}, 1)), 5),
    "bad-datetime-ext": (_repayload(5, _body({"kind": "note",
                                              "payload": msgpack.ExtType(1, b"not a date")}, 1)),
                         5),
    "bad-uuid-ext": (_repayload(5, _body({"kind": "note",
                                          "payload": msgpack.ExtType(2, b"short")}, 1)), 5),
    "bad-decimal-ext": (_repayload(5, _body({"kind": "note",
                                             "payload": msgpack.ExtType(3, b"1.2.3")}, 1)), 5),
    "type-unknown": (_retype(4, "SessionHijacked"), 4),
    "type-of-another-shape": (_retype(5, "CheckpointTaken"), 5),
    "type-ended-without-outcome": (_retype(5, "SessionEnded"), 5),
    "ts-beyond-datetime": (_rets(4, 2**62), 4),
    "ts-before-datetime": (_rets(4, -(2**62)), 4),
}


@pytest.mark.parametrize("case", list(FORGERIES))
def test_consistently_forged_event_is_refused(backend: Backend, damage: Damage,
                                              sessions: Sessions, case: str) -> None:
    """Damage whose chain digests were recomputed passes the chain check (only an
    integrity_key stops a forger): what cannot be served must still be refused, by the
    decoder or by replay, naming session and version, on every load path."""
    act, version = FORGERIES[case]
    act(damage, sessions)
    # verify() checks the chain, which the forger recomputed: see the test below
    assert_detected(backend.url, damage, sessions, version, verify=False)


@pytest.mark.parametrize("case", ["body-not-msgpack", "type-unknown", "schema-newer-than-release"])
def test_verify_reports_an_event_no_load_can_read(backend: Backend, damage: Damage,
                                                  sessions: Sessions, case: str) -> None:
    """An event every load refuses (CorruptedData) is damage verify() should report too, even
    when its chain digest was recomputed: "verify() passes" must mean the sessions load."""
    act, version = FORGERIES[case]
    act(damage, sessions)
    with reader(backend.url, sessions.config) as fresh:
        assert refused(outcome(lambda: fresh.get(sessions.target)), sessions.target, version,
                       "get") is None
        problems = verify_problems(fresh, sessions, version)
    assert not problems, "\n".join(problems)


def test_forged_chain_is_refused_with_an_integrity_key(engine_factory: EngineFactory,
                                                       backend: Backend) -> None:
    """With SessionConfig(integrity_key=...), a forger without the key cannot recompute the
    chain: a changed event with recomputed (unkeyed) digests is refused."""
    key = "a secret the forger does not have"
    built = build(engine_factory(snapshot_every=0, integrity_key=key), backend.url,
                  config={"integrity_key": key})
    damage = Damage(backend)
    damage.set(built.target, 2, payload=_body({"set": {"n": 666}, "delete": []})(b""))
    damage.rechain(built.target)
    # the whole chain is now unkeyed; the first event already fails the keyed check
    assert_detected(backend.url, damage, built, 1)


# -- damaged snapshots --------------------------------------------------------------------------

SnapshotDamage = Callable[[Damage, str, int], None]


def _snap_flip(column: str, index: int) -> SnapshotDamage:
    def act(d: Damage, sid: str, version: int) -> None:
        row = {s[0]: s for s in d.snapshots(sid)}[version]
        value = {"digest": row[3], "data": row[4]}[column]
        d.set_snapshot(sid, version, **{column: flip(value, index)})
    return act


def _snap_set(**columns: Any) -> SnapshotDamage:
    def act(d: Damage, sid: str, version: int) -> None:
        d.set_snapshot(sid, version, **columns)
    return act


def _snap_truncate(d: Damage, sid: str, version: int) -> None:
    row = {s[0]: s for s in d.snapshots(sid)}[version]
    d.set_snapshot(sid, version, data=row[4][: len(row[4]) // 2])


def _snap_other_session(d: Damage, sid: str, version: int) -> None:
    # a valid snapshot body and digest, of another session (the neighbour's)
    other = next(row for row in d.backend.sql(
        "SELECT session_id, flags, digest, data FROM sl_snapshots WHERE session_id <> ?",
        (sid,)))
    d.set_snapshot(sid, version, flags=other[1], digest=bytes(other[2]), data=bytes(other[3]))


def _snap_moved(d: Damage, sid: str, version: int) -> None:
    # the latest snapshot claims a later version than it holds
    d.set_snapshot(sid, version, version=version + 1)


def _snap_redigested(mutate: Callable[[dict[str, Any]], None]) -> SnapshotDamage:
    """A snapshot body changed and its (unkeyed) blake3 digest recomputed to match."""
    def act(d: Damage, sid: str, version: int) -> None:
        row = {s[0]: s for s in d.snapshots(sid)}[version]
        codec = SnapshotCodec()  # unkeyed: the forger has no integrity key
        # read the body without checking its digest (a keyed one cannot be checked here)
        body = codec.compressor.decompress(row[4]) if row[2] & 1 else bytes(row[4])
        fields = codec.transcoder.decode(body)
        mutate(fields)
        flags, digest, data = codec.encode(fields)
        d.set_snapshot(sid, version, flags=flags, digest=digest, data=data)
    return act


def _put(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda fields: fields.__setitem__(key, value)


SNAPSHOT_DAMAGE: dict[str, SnapshotDamage] = {
    "flip-data-byte": _snap_flip("data", 20),
    "flip-last-data-byte": _snap_flip("data", -1),
    "flip-digest-byte": _snap_flip("digest", 0),
    "truncate-data": _snap_truncate,
    "empty-data": _snap_set(data=b""),
    "unknown-flags": _snap_set(flags=0x80),
    "newer-format": _snap_set(format_version=99),
    "body-of-another-session": _snap_other_session,
    "moved-to-another-version": _snap_moved,
    "redigested-wrong-head": _snap_redigested(_put("head", b"\x00" * 32)),
    "redigested-wrong-version": _snap_redigested(_put("version", 1)),
    "redigested-status-garbage": _snap_redigested(_put("status", "HIJACKED")),
    "redigested-state-not-a-map": _snap_redigested(_put("state", [1, 2])),
    "redigested-missing-field": _snap_redigested(lambda f: f.pop("checkpoints")),
    "redigested-created-us-infinite": _snap_redigested(_put("created_us", float("inf"))),
    "redigested-created-us-not-a-number": _snap_redigested(_put("created_us", "soon")),
    # SQLite keeps any type in any column: a damaged row may hold a number or text where bytes
    # belong (bytes(n) of a number would make n zero bytes: 2**40 of them here)
    "data-a-huge-number": _snap_set(data=2**40),
    "data-text": _snap_set(data="not bytes"),
    "digest-a-number": _snap_set(digest=2**40),
    "flags-text": _snap_set(flags="lz4"),
    "format-text": _snap_set(format_version="one"),
}
#: damage only SQLite's dynamic typing lets in (PostgreSQL refuses the UPDATE)
SQLITE_ONLY_DAMAGE = {"data-a-huge-number", "data-text", "digest-a-number", "flags-text",
                      "format-text"}


@pytest.fixture
def snapshotted(engine_factory: EngineFactory, backend: Backend) -> Sessions:
    built = build(engine_factory(snapshot_every=0), backend.url, with_snapshots=True)
    versions = [s[0] for s in Damage(backend).snapshots(built.target)]
    assert versions == [3, 5], versions
    return built


@pytest.mark.parametrize("case", list(SNAPSHOT_DAMAGE))
def test_damaged_snapshot_falls_back_to_events(backend: Backend, snapshotted: Sessions,
                                               case: str) -> None:
    damage = Damage(backend)
    sid = snapshotted.target
    if not damaged(backend, case in SQLITE_ONLY_DAMAGE,
                   lambda: SNAPSHOT_DAMAGE[case](damage, sid, 5)):
        return
    with reader(backend.url, snapshotted.config) as fresh:
        error = outcome(lambda: fresh.get(sid))
        assert error is None, (
            f"a damaged snapshot must be skipped (the events are intact), got "
            f"{type(error).__module__}.{type(error).__name__}: {error}"
        )
        assert session_view(fresh.get(sid)) == snapshotted.views[sid][0]
        assert history_view(fresh.history(sid)) == snapshotted.views[sid][1]
        skipped = fresh.metrics()["snapshots_skipped"]
        assert sum(skipped.values()) >= 1, f"the skipped snapshot was not counted: {skipped}"
        # the moved snapshot now sits at version 6: that is the snapshot verify() names
        version = 6 if case == "moved-to-another-version" else 5
        problems = verify_problems(fresh, snapshotted, version)
        assert not problems, "\n".join(problems)
        # restoring to the checkpoint below the damaged snapshot still works from the events
        assert fresh.restore(sid, checkpoint="cp") == 8
        assert same({"n": 1, "text": "short"}, fresh.get(sid, refresh=True).state)
    assert not neighbour_problems(backend.url, snapshotted)


@pytest.mark.parametrize("case", list(SNAPSHOT_DAMAGE))
def test_damaged_snapshot_is_an_error_when_strict(backend: Backend, snapshotted: Sessions,
                                                  case: str) -> None:
    damage = Damage(backend)
    sid = snapshotted.target
    if not damaged(backend, case in SQLITE_ONLY_DAMAGE,
                   lambda: SNAPSHOT_DAMAGE[case](damage, sid, 5)):
        return
    # the moved snapshot now sits at version 6: that is the snapshot the error names
    version = 6 if case == "moved-to-another-version" else 5
    with reader(backend.url, snapshotted.config, strict_snapshots=True) as fresh:
        problem = refused(outcome(lambda: fresh.get(sid)), sid, version,
                          "get (strict snapshots)")
        assert problem is None, problem
        assert history_view(fresh.history(sid)) == snapshotted.views[sid][1]
    assert not neighbour_problems(backend.url, snapshotted)


def test_forged_snapshot_is_not_served_with_an_integrity_key(engine_factory: EngineFactory,
                                                             backend: Backend) -> None:
    """With an integrity_key the events cannot be forged without the key (see above); a
    snapshot whose state was changed and whose digest was recomputed must not be a way round
    that: it is skipped (or refused), never served."""
    key = "a secret the forger does not have"
    built = build(engine_factory(snapshot_every=0, integrity_key=key), backend.url,
                  with_snapshots=True, config={"integrity_key": key})
    sid = built.target
    _snap_redigested(_put("state", {"n": 666, "owner": "mallory"}))(Damage(backend), sid, 5)
    with reader(backend.url, built.config) as fresh:
        problems = verify_problems(fresh, built, 5)
        assert not problems, "\n".join(problems)
        error = outcome(lambda: fresh.get(sid))
        if error is None:
            served = fresh.get(sid).state
            assert served == built.views[sid][0][3], (
                f"a forged snapshot was served as session {sid}'s state: {served}"
            )
        else:
            assert refused(error, sid, 5, "get") is None, refused(error, sid, 5, "get")


# -- damage below a snapshot --------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3])
def test_damage_below_a_snapshot(backend: Backend, snapshotted: Sessions, version: int) -> None:
    """An event at or below the latest snapshot is damaged. history() reads every event and
    must refuse; get() may start from the snapshot, and then it must serve exactly the session
    as it was (the snapshot was taken from the intact events), never anything else."""
    damage = Damage(backend)
    sid = snapshotted.target
    damage.set(sid, version, payload=flip(damage.event(sid, version).payload, -1))
    with reader(backend.url, snapshotted.config) as fresh:
        problem = refused(outcome(lambda: fresh.history(sid)), sid, version, "history")
        assert problem is None, problem
        problems = verify_problems(fresh, snapshotted, version)
        assert not problems, "\n".join(problems)
        error = outcome(lambda: fresh.get(sid))
        if error is None:
            assert session_view(fresh.get(sid)) == snapshotted.views[sid][0]
        else:
            assert refused(error, sid, version, "get") is None, refused(error, sid, version,
                                                                          "get")
    assert not neighbour_problems(backend.url, snapshotted)


def test_case_counts() -> None:
    total = len(EVENT_DAMAGE) + 1 + len(FORGERIES) + 1 + 3 + 2 * len(SNAPSHOT_DAMAGE) + 1 + 3
    print(f"\ncorruption: {len(EVENT_DAMAGE)} damaged-event cases, 1 tail truncation, "
          f"{len(FORGERIES)} forgeries (+1 with an integrity_key, +3 through verify()), "
          f"{len(SNAPSHOT_DAMAGE)} snapshot damages (lenient and strict, +1 forged with a key), "
          f"3 below a snapshot: {total} per backend")
    assert issubclass(CorruptedData, SessionLedgerError)



#: (table, column, value of the wrong type) put in the row of version 3 of a session
WRONG_TYPES = {
    "event-payload-a-number": ("sl_events", "payload", 2**40),
    "event-payload-text": ("sl_events", "payload", "x"),
    "event-ts-text": ("sl_events", "ts", "yesterday"),
    "event-digest-a-number": ("sl_events", "digest", 7),
    "event-type-a-number": ("sl_events", "type", 7),
    "event-actor-a-number": ("sl_events", "actor", 42),
    "event-version-text": ("sl_events", "version", "three"),
    "snapshot-data-a-number": ("sl_snapshots", "data", 2**40),
    "snapshot-version-text": ("sl_snapshots", "version", "x"),
    "snapshot-format-text": ("sl_snapshots", "format_version", "one"),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_values_of_the_wrong_type_are_errors_never_crashes(tmp_path: Path, case: str) -> None:
    """SQLite keeps any type in any column. Whatever a damaged row holds, every read (audit
    queries, the catalog and its rebuild included) answers or raises a SessionLedgerError."""
    import sqlite3

    table, column, value = WRONG_TYPES[case]
    url = f"sqlite:///{tmp_path / 'wrong-types.db'}"
    config = SessionConfig(snapshot_every=3, lifecycle_hooks=False, max_active_sessions=0)
    with SessionEngine(url, config) as engine:
        sid = engine.create("s", state={"a": 0})
        for i in range(5):
            engine.update(sid, {"a": i + 1})
    db = sqlite3.connect(tmp_path / "wrong-types.db")
    db.execute(f"UPDATE {table} SET {column} = ? WHERE session_id = ? AND version = 3",
               (value, sid))
    db.commit()
    db.close()
    with SessionEngine(url, config) as engine:
        assert not engine.verify().ok
        reads: dict[str, Callable[[], object]] = {
            "get": lambda: engine.get(sid),
            "history": lambda: engine.history(sid),
            "state_at 2": lambda: engine.state_at(sid, version=2),
            "state_at 4": lambda: engine.state_at(sid, version=4),
            "diff": lambda: engine.diff(sid, 1, 5),
            "blame": lambda: engine.blame(sid, "a"),
            "timeline": lambda: list(engine.timeline()),
            "verify": lambda: engine.verify(),
            "rebuild": lambda: engine.rebuild("catalog"),
            "find": lambda: engine.find(),
            "update": lambda: engine.update(sid, {"b": 1}),
            "rebuild_snapshots": lambda: engine.rebuild_snapshots(),  # a repair: the last
        }
        crashes = []
        for name, read in reads.items():
            try:
                read()
            except SessionLedgerError:
                pass
            except Exception as error:
                crashes.append(f"{name}: {type(error).__name__}: {error}")
        assert not crashes, "\n".join(crashes)


#: damage to the engine's bookkeeping rows (read model, tracking, idempotency, meta)
BOOKKEEPING_DAMAGE = {
    "catalog-version-text": "UPDATE sl_catalog SET version = 'x'",
    "catalog-tags-not-json": "UPDATE sl_catalog SET tags = '[not json'",
    "catalog-tags-not-a-list": "UPDATE sl_catalog SET tags = '{}'",
    "catalog-status-unknown": "UPDATE sl_catalog SET status = 'HIJACKED'",
    "tracking-position-text": "UPDATE sl_tracking SET position = 'x'",
    "idempotency-version-text": "UPDATE sl_idempotency SET version = 'x'",
    "meta-schema-version-text": "UPDATE sl_meta SET value = 'x' WHERE key = 'schema_version'",
    # a digit to str.isdigit() that int() refuses
    "meta-schema-version-superscript":
        "UPDATE sl_meta SET value = '²' WHERE key = 'schema_version'",
    "meta-catalog-version-text":
        "UPDATE sl_meta SET value = 'x' WHERE key = 'projection:catalog'",
    "meta-catalog-version-superscript":
        "UPDATE sl_meta SET value = '²' WHERE key = 'projection:catalog'",
}


@pytest.mark.parametrize("case", list(BOOKKEEPING_DAMAGE))
def test_damaged_bookkeeping_rows_are_errors_never_crashes(tmp_path: Path, case: str) -> None:
    import sqlite3

    path = tmp_path / "bookkeeping.db"
    url = f"sqlite:///{path}"
    config = SessionConfig(lifecycle_hooks=False, max_active_sessions=0)
    with SessionEngine(url, config) as engine:
        sid = engine.create("s", tags=["t"])
        engine.update(sid, {"a": 1}, idempotency_key="k1")
        assert len(engine.find(tags=["t"])) == 1  # the catalog caught up: its rows exist
    db = sqlite3.connect(path)
    assert db.execute(BOOKKEEPING_DAMAGE[case]).rowcount >= 1
    db.commit()
    db.close()
    crashes: list[str] = []
    try:
        engine = SessionEngine(url, config)
    except SessionLedgerError:
        assert case.startswith("meta-schema-version")  # no engine on a database it cannot read
        return
    with engine:
        reads: dict[str, Callable[[], object]] = {
            "find": lambda: engine.find(),
            "find by tag": lambda: engine.find(tags=["t"]),
            "retried update": lambda: engine.update(sid, {"a": 1}, idempotency_key="k1"),
            "get": lambda: engine.get(sid),
            "rebuild": lambda: engine.rebuild("catalog"),
        }
        for name, read in reads.items():
            try:
                answer = read()
            except SessionLedgerError:
                continue
            except Exception as error:
                crashes.append(f"{name}: {type(error).__name__}: {error}")
                continue
            if name == "retried update":
                assert answer == 2, answer  # never the damaged value itself
    assert not crashes, "\n".join(crashes)
