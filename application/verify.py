"""verify(): check every session's hash chain, its events and every snapshot against them.

A session's events are checked in version order, in one pass over the log: each must be the next
version, match its chain digest (blake3 over the previous digest and everything stored for the
event; keyed with SessionConfig.integrity_key), decode, and apply to the session (the shape checks
of a load). The first broken link of each session is reported: a changed byte, a deleted,
inserted or reordered event all break the chain there. Each snapshot must decode, match its own
digest, sit on the chain and equal the session replayed to its version. A tombstone (a purged
session) beside events of that session is reported too.

What a chain cannot show: events deleted from the end of a stream (the remaining prefix is a
valid chain). Snapshots and the catalog remember later versions, so such a truncation shows up
as a snapshot without its events.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack

from sessionledger.domain.errors import CorruptedData, SessionLedgerError
from sessionledger.domain.events import EVENT_SCHEMAS, MAX_MICROS, stored_micros
from sessionledger.domain.session import Session
from sessionledger.infrastructure import log_reads
from sessionledger.infrastructure.codec import (
    GENESIS_DIGEST,
    EventCodec,
    blob,
    chain_hasher,
    ext_hook,
    header_packer,
)
from sessionledger.infrastructure.store import EventStore
from sessionledger.projections.replay import current_data
from sessionledger.projections.snapshots import (
    CURRENT_FORMAT,
    lacks_outcome,
    session_from_snapshot,
    snapshot_fields,
)

from .gc_pause import gc_paused
from .repository import SessionRepository

#: (format_version, flags, digest, data) of a stored snapshot
StoredRow = tuple[Any, Any, Any, Any]
#: snapshots fetched per query while verifying
SNAPSHOT_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing verify() found wrong: where, and what."""

    session_id: str
    version: int | None
    what: str

    @property
    def session(self) -> str:
        """The session's id (another name for `session_id`)."""
        return self.session_id

    def __str__(self) -> str:
        where = self.session_id + (f" version {self.version}" if self.version else "")
        return f"{where}: {self.what}"


@dataclass
class VerifyReport:
    """What verify() checked and found. `ok` is True when `problems` is empty."""

    sessions: int = 0
    events: int = 0
    snapshots: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every chain, event and snapshot checked out."""
        return not self.problems


def shards(store: EventStore, count: int) -> list[tuple[str | None, str | None]]:
    """About `count` ranges of session ids holding about as many events each, covering every
    id ([low, high); None: open end). The cuts come from one recursive query that hops through
    the (session_id, version) index: 8 ms for 500,000 events, against 45 ms for listing every
    session's id in Python, time the engine's own process spent before its first piece."""
    if count <= 1:
        return [(None, None)]
    rows = store.query(log_reads.MAX_POSITION)
    total = rows[0][0] if rows and type(rows[0][0]) is int else 0
    step = -(-total // count)  # positions, so purged events make the pieces a little smaller
    if step < 1:
        return [(None, None)]
    cuts = [row[0] for row in store.query(log_reads.CUTS, (step, step))]
    if not cuts:
        return [(None, None)]
    bounds: list[str | None] = [None, *cuts, None]
    return list(itertools.pairwise(bounds))


def claim(counter: Any, total: int) -> int | None:
    """The index of the next piece nobody has taken yet (None when all are taken), from a
    multiprocessing Value shared by every process of a parallel verify."""
    with counter.get_lock():
        index: int = counter.value
        if index >= total:
            return None
        counter.value = index + 1
    return index


def run_pieces(verifier: Verifier, pieces: list[tuple[str | None, str | None]],
               counter: Any) -> list[VerifyReport]:
    """Check pieces as long as there are pieces nobody has taken: each process of a parallel
    verify runs this, so a process that starts late (a spawned worker imports for about 0.2 s)
    takes fewer pieces instead of finishing last. If it fails, it takes every piece left so
    that the others stop after the piece they are on."""
    reports: list[VerifyReport] = []
    try:
        while (index := claim(counter, len(pieces))) is not None:
            reports.append(verifier.run(shard=pieces[index]))
    except BaseException:
        with counter.get_lock():
            counter.value = len(pieces)
        raise
    return reports


def merge(reports: list[VerifyReport]) -> VerifyReport:
    """One report of several shards' reports."""
    merged = VerifyReport()
    for report in reports:
        merged.sessions += report.sessions
        merged.events += report.events
        merged.snapshots += report.snapshots
        merged.problems.extend(report.problems)
    merged.problems.sort(key=lambda p: (p.session_id, p.version or 0))
    return merged


class _SnapshotFeed:
    """The stored snapshots of the walk, fetched in chunks in the walk's own order (one query
    per SNAPSHOT_CHUNK snapshots instead of one per snapshot: a tenth of verify's time went to
    those queries). Only the chunk in use is held. A snapshot dropped after the walk began is
    not found (None: snapshots are a cache)."""

    def __init__(self, store: EventStore, versions: dict[str, list[int]]) -> None:
        self.store = store
        self.order = [(sid, version) for sid, listed in versions.items() for version in listed]
        self.index = {pair: i for i, pair in enumerate(self.order)}
        self.chunk: dict[tuple[str, int], StoredRow | None] = {}

    def get(self, sid: str, version: int) -> StoredRow | None:
        """(format_version, flags, digest, data) of one snapshot; None when it was dropped
        after the walk began (snapshots are a cache)."""
        key = (sid, version)
        if key not in self.chunk:
            start = self.index[key]
            pairs = self.order[start:start + SNAPSHOT_CHUNK]
            # the range from the chunk's first to its last snapshot in (session, version)
            # order, an index range scan instead of a join on the keys (with the loop changes
            # in _walk, one-process verify 3.86 -> 3.64 µs an event; those alone 3.65 -> 3.54)
            (low_sid, low_version), (high_sid, high_version) = pairs[0], pairs[-1]
            rows = self.store.query(log_reads.SNAPSHOTS_BETWEEN,
                                    [low_sid, low_version, high_sid, high_version])
            # rows the walk does not expect (written since it began, or with a version that is
            # no number) are never asked for
            self.chunk = {(row[0], row[1]): tuple(row[2:]) for row in rows}
            for pair in pairs:
                self.chunk.setdefault(pair, None)
        return self.chunk[key]


class Verifier:
    """Walks the log once, in (session, version) order, with constant memory per session."""

    def __init__(self, store: EventStore, codec: EventCodec,
                 repository: SessionRepository) -> None:
        self.store = store
        self.codec = codec
        self.repository = repository

    def run(self, session_id: str | None = None,
            shard: tuple[str | None, str | None] | None = None) -> VerifyReport:
        """Check one session, the sessions of a shard (ids in [low, high); None: open end), or
        every session, and return the report."""
        with gc_paused():
            return self._walk(session_id, shard)

    def _walk(self, session_id: str | None,
              shard: tuple[str | None, str | None] | None) -> VerifyReport:
        report = VerifyReport()
        where, params = log_reads.events_where(session_id, shard)
        snapshots = self._snapshot_versions(where, params, report)
        feed = _SnapshotFeed(self.store, snapshots)
        # the chain link, the timestamp check and the uncompressed payload decode inlined
        # (stored_micros and PayloadCodec.decode are called only for what they alone handle).
        # Measured in one process, 500,000 events, six alternating runs each: with the
        # per-session guard below, 3.65 -> 3.54 µs an event
        hasher = chain_hasher(self.codec.chain_key)
        reset, update, hash_digest = hasher.reset, hasher.update, hasher.digest
        pack = header_packer.pack
        decode = self.codec.payloads.decode
        unpack = msgpack.unpackb
        schemas = EVENT_SCHEMAS
        # a snapshot dropped after the walk began (feed.get gives None) is skipped: a cache
        holds_exactly = self.repository.snapshots.holds_exactly
        problems = report.problems
        # the current session's running check: its replayed state, chain head, next version,
        # whether its chain broke and its snapshots still to check (locals: the loop runs once
        # per event)
        current: str | None = None
        session = Session("")
        head = GENESIS_DIGEST
        expected = 1
        broken = False
        due: list[int] = []
        sessions = events = 0
        for sid, version, event_type, micros, actor, correlation, payload, digest in (
            self.store.scan(log_reads.EVENTS_BY_SESSION.format(where=where), params)
        ):
            events += 1
            if sid != current:
                if due:  # snapshots of the last session the walk never reached (rarely any)
                    self._leftover_snapshots(report, current or "", due, broken)
                current, session, head = sid, Session(sid), GENESIS_DIGEST
                expected, broken = 1, False
                due = snapshots.pop(sid, [])
                sessions += 1
            if broken:
                continue
            if version != expected:
                what = (f"event version {expected} is missing" if version > expected
                        else f"event version {version} appears twice")
                problems.append(Problem(sid, expected, what))
                broken = True
                continue
            reset()
            try:
                update(head + pack((sid, version, event_type, micros, actor, correlation))
                       + payload)
            except TypeError:  # SQLite keeps any type in any column: a number for the payload
                problems.append(Problem(sid, version, "the stored payload is not bytes"))
                broken = True
                continue
            head = hash_digest()
            if head != digest:
                problems.append(Problem(
                    sid, version, "the event does not match its chain digest: it was changed, "
                    "or an event before it was changed, inserted, moved or deleted (or it was "
                    "written with another integrity_key)"))
                broken = True
                continue
            try:
                if type(micros) is not int or not 0 <= micros <= MAX_MICROS:
                    stored_micros(sid, version, micros)  # raises, with its message
                if len(payload) < 3 or payload[0]:  # no body, or compressed: the general path
                    schema, data = decode(payload, sid, version)
                else:
                    schema = payload[1]
                    try:
                        data = unpack(payload[2:], ext_hook=ext_hook, raw=False,
                                      strict_map_key=True)
                    except Exception:
                        schema, data = decode(payload, sid, version)  # fails, with its message
                if type(data) is not dict or schemas.get(event_type) != schema:
                    data = current_data(sid, version, event_type, schema, data)
                session.apply(event_type, data, version, micros)
            except CorruptedData as error:
                problems.append(Problem(sid, version, str(error).split(": ", 1)[-1]))
                broken = True
                continue
            except (KeyError, TypeError, AttributeError, ValueError) as error:
                problems.append(Problem(sid, version, f"{event_type} data has the wrong shape "
                                                      f"({error!r})"))
                broken = True
                continue
            expected += 1
            if due and due[0] == version:
                due.pop(0)
                report.snapshots += 1
                found = feed.get(sid, version)
                if found is not None and not (
                    found[0] == CURRENT_FORMAT and type(found[1]) is int and holds_exactly(
                        found[1], blob(found[2]), blob(found[3]),
                        snapshot_fields(session, digest))
                ):
                    # not exactly what the engine writes for the replayed session on this
                    # chain (the common case, checked inline above with one encode): decode it
                    # and say what is wrong, if anything
                    problems.extend(self._snapshot_problems(found, session, version, digest))
        if current is not None and due:
            self._leftover_snapshots(report, current, due, broken)
        report.sessions, report.events = sessions, events
        problems.extend(
            Problem(sid, None, "a tombstone says it was purged, but its events are there "
                               "(commands may refuse it as purged)")
            for (sid,) in self.store.query(log_reads.tombstones_beside_events(where), params))
        for sid, versions in snapshots.items():  # snapshots of sessions with no events at all
            if self._purged(sid):
                continue
            report.snapshots += len(versions)
            problems.extend(Problem(sid, v, "snapshot of a session with no events")
                            for v in versions)
        return report

    def _leftover_snapshots(self, report: VerifyReport, sid: str, due: list[int],
                            broken: bool) -> None:
        """Snapshots of `sid` the walk never reached: beyond its last event (reported and
        counted), or after a broken link (neither: the broken link is reported). None when a
        cleanup purged the session meanwhile."""
        if broken or self._purged(sid):
            return
        report.snapshots += len(due)
        report.problems.extend(
            Problem(sid, version, "snapshot of a version whose events are missing")
            for version in due)

    def _purged(self, sid: str) -> bool:
        """True when a cleanup purged `sid` while the walk ran (its snapshots were listed
        before, its events were gone when the walk got there): not damage."""
        return self.store.tombstone(sid) is not None

    def _snapshot_versions(self, where: str, params: tuple[str, ...],
                           report: VerifyReport) -> dict[str, list[int]]:
        """session id -> versions of its snapshots, ascending (only ints are kept per
        session: a few per hundred events). A version that is not a number (SQLite keeps any
        type in any column) is reported here."""
        versions: dict[str, list[int]] = {}
        rows = self.store.query(log_reads.SNAPSHOT_VERSIONS.format(where=where), params)
        for sid, version in rows:
            if type(version) is not int:
                report.snapshots += 1
                report.problems.append(
                    Problem(sid, None, f"a snapshot's version is {version!r}, not a number"))
                continue
            versions.setdefault(sid, []).append(version)
        return versions

    def _snapshot_problems(self, found: StoredRow, session: Session, version: int,
                           event_digest: bytes) -> Iterator[Problem]:
        """What is wrong with one stored snapshot of the session replayed to `version`."""
        sid = session.id
        format_version, flags, digest, data = found
        fmt = 0 if format_version is None else format_version
        if type(fmt) is not int:
            yield Problem(sid, version, f"snapshot format {fmt!r} is not a number")
            return
        if fmt > CURRENT_FORMAT:
            yield Problem(sid, version, f"snapshot format {fmt} is newer than this release "
                                        f"reads (up to {CURRENT_FORMAT})")
            return
        try:
            fields = self.repository.snapshots.decode(flags, blob(digest), blob(data),
                                                      sid, version)
            snapshot, head = session_from_snapshot(fields, fmt, sid, version)
        except SessionLedgerError as error:
            yield Problem(sid, version, f"snapshot unreadable: {error}")
            return
        if fmt == 0 and lacks_outcome(snapshot):
            snapshot.outcome = session.outcome  # format 0 holds none (loads use the events)
        if head is not None and head != event_digest:
            yield Problem(sid, version, "snapshot is not on the chain of the events")
        elif snapshot != session:
            yield Problem(sid, version, "snapshot does not match the events")
