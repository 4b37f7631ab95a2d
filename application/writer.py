"""The write path: the working set, commands, batches, and hook delivery after each commit.

A command travels: working set or store -> the aggregate decides (nothing written if it raises)
-> the codec encodes and chains the events -> the events are applied to the session (and a due
snapshot taken of it) -> one transaction appends them (unique (session, version) for optimistic
concurrency, the idempotency key if given) -> commit -> the in-process hooks get the events.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from uuid import UUID

from sessionledger.domain.errors import (
    CheckpointNotFound,
    ConcurrencyConflict,
    InvalidArgument,
    InvalidTransition,
    SessionNotFound,
    SessionPurged,
)
from sessionledger.domain.events import (
    CHECKPOINT_TAKEN,
    EVENT_SCHEMAS,
    MAX_MICROS,
    SESSION_RESTORED,
    SESSION_SAVED,
    SESSION_STARTED,
    STATE_CHANGED,
    SessionEvent,
    to_datetime,
)
from sessionledger.domain.session import PendingEvent, Session
from sessionledger.domain.values import checked_optional_text, parse_session_id
from sessionledger.infrastructure.codec import GENESIS_DIGEST, EventCodec, EventRow
from sessionledger.infrastructure.store import (
    EventStore,
    IdempotencyKeyUsed,
    SessionGone,
    SnapshotRow,
    VersionConflict,
)
from sessionledger.projections.hooks import HookFailed, HookRegistry

from .config import SessionConfig
from .repository import SessionRepository

#: a command's decision: the events it produces on a session (raising writes nothing)
Decision = Callable[[Session], list[PendingEvent]]

#: the idempotency scope of create() (other commands use the session id)
CREATE_SCOPE = "create"

#: events after which a snapshot is always written (whatever snapshot_every says)
SNAPSHOT_ON = frozenset({SESSION_SAVED, CHECKPOINT_TAKEN})

#: errors a decision taken on a working-set copy may owe to that copy being stale (another
#: engine moved the session on): the command re-reads the store and decides again once, so the
#: error it raises is the one the stored session gives (a fresh engine checks the status first)
_STALE_DECISION_ERRORS = (InvalidTransition, CheckpointNotFound, ConcurrencyConflict,
                          InvalidArgument)

def _shares_nothing(event_type: str, data: dict[str, Any]) -> bool:
    """True when a session that applied this event holds no mutable object of its data, so
    hooks may have the data itself: the session copies the top-level maps it keeps, but a list
    or map inside a state value (or SessionStarted's metadata) is shared."""
    if event_type == STATE_CHANGED:
        values = data["set"].values()
    elif event_type == SESSION_RESTORED:
        values = data.get("state", {}).values()
    else:
        return event_type != SESSION_STARTED  # the rest keep nothing mutable
    for value in values:  # noqa: SIM110 - a loop: any() over a generator costs twice the time
        if type(value) is list or type(value) is dict:
            return False
    return True


#: the millisecond clock of the last id new_session_id() made (ids never go back in time)
_last_id_ms = 0
_random_bits = secrets.randbits


def new_session_id() -> str:
    """A new session id: a UUID version 7 (RFC 9562), whose leading 48 bits are a millisecond
    clock kept increasing (as the `uuid6` package does it: in bursts of several ids a
    millisecond it runs ahead of the wall clock, so read creation times from the events, never
    from ids), then 74 random bits.

    Time-ordered ids keep the B-trees keyed by session id (the events' (session, version)
    index, snapshots, the catalog) appending near their right edge instead of touching a random
    page per new session: on a 1M-event file that is the difference between a create that grows
    1.2x and one that does not (benchmarks/scale.py). Ids of other versions are still accepted.

    Written here rather than taken from `uuid6`: building its UUID object and formatting it
    cost 2.6 µs of a create whose budget over the raw INSERT is 30; this costs 1.4 µs.
    """
    global _last_id_ms
    ms = max(time.time_ns() // 1_000_000, 0)  # (a clock set before 1970: see now_us)
    if ms <= _last_id_ms:
        ms = _last_id_ms + 1
    _last_id_ms = ms
    rand = _random_bits(74)
    # 48 bits of clock, version 7, 12 random bits, variant 0b10, 62 random bits
    value = ((ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0x2 << 62
             | (rand & 0x3FFF_FFFF_FFFF_FFFF))
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def now_us() -> int:
    """Now, in microseconds since the epoch (how timestamps are stored), within the range every
    reader accepts: a wall clock set before 1970 (a reset RTC, faketime) stamps the epoch
    instead of a time that every later load, fold and verify would refuse as damage."""
    micros = time.time_ns() // 1000
    if 0 <= micros <= MAX_MICROS:  # (a compare, not min/max calls: on every command's path)
        return micros
    return 0 if micros < 0 else MAX_MICROS


def checked_meta(
    actor: object, correlation_id: object, idempotency_key: object
) -> tuple[str | None, str | None, str | None]:
    """Validated actor, correlation id and idempotency key of a command."""
    return (
        checked_optional_text(actor, "actor"),
        checked_optional_text(correlation_id, "correlation_id"),
        checked_optional_text(idempotency_key, "idempotency_key"),
    )


def _merged(first: HookFailed, later: HookFailed) -> HookFailed:
    """One HookFailed for the failures of two deliveries, in delivery order."""
    merged = HookFailed([*first.failures, *later.failures])
    merged.__cause__ = first.__cause__
    return merged


class SessionWriter:
    """Decides, writes and delivers: the one place sessions change. Thread-safe (one lock)."""

    def __init__(self, config: SessionConfig, store: EventStore, codec: EventCodec,
                 repository: SessionRepository, hooks: HookRegistry) -> None:
        self.config = config
        self._store = store
        self._codec = codec
        self._repository = repository
        self.hooks = hooks
        #: held while a command or a batch reads, decides and writes
        self.lock = store.commands_lock
        # the working set: session id -> (session, digest of its last event), LRU order
        self._working_set: OrderedDict[str, tuple[Session, bytes]] = OrderedDict()
        self._hook_queue: list[SessionEvent] = []
        self._delivering = False

    def forget(self, sid: str) -> None:
        """Drop a session from the working set (the next use reads the store)."""
        self._working_set.pop(sid, None)

    def clear(self) -> None:
        """Drop the whole working set."""
        self._working_set.clear()

    def create(self, pending: PendingEvent, parent_id: str | None, key: str | None,
               actor: str | None, correlation_id: str | None) -> str:
        """Write a new session's SessionStarted; return its id (the first one's for a used
        idempotency key)."""
        with self.lock:
            if key is not None:
                used = self._store.idempotent_result(CREATE_SCOPE, key)
                if used is not None:
                    return used[0]
            # SessionNotFound for an unknown parent; a copy held in the working set may be of a
            # parent another engine purged since: the store is asked then
            if (parent_id is not None and self.loaded(parent_id)[2]
                    and self._store.tombstone(parent_id) is not None):
                self._working_set.pop(parent_id, None)
                raise self.not_found(parent_id)
            session = Session(new_session_id())
            now = now_us()
            rows = self._encode(session, GENESIS_DIGEST, [pending], actor, correlation_id, now)
            idem = None if key is None else (CREATE_SCOPE, key, session.id, 1)
            try:
                position = self._store.append(rows, idem)
            except IdempotencyKeyUsed as used_key:
                return used_key.session_id
            session.apply(pending[0], pending[1], 1, now)
            self._remember(session, rows[-1][7])
            if self.hooks.active:
                self._deliver({session.id: session.name}, rows, position)
            return session.id

    def batch(
        self, ids: list[str], decide: Callable[[Session], list[PendingEvent]],
        actor: str | None, correlation_id: str | None,
    ) -> dict[str, int]:
        """Apply one decision to many sessions in one transaction (snapshots as the policy says).

        A session whose status refuses the decision is left out; a lost race retries the whole
        batch from the store, up to `retries` times. Returns {session id: new version}.
        """
        attempt = 0
        while True:
            now = now_us()
            decided: list[tuple[Session, list[PendingEvent], list[EventRow]]] = []
            for sid in ids:
                try:
                    session, head, cached = self.loaded(sid)
                    try:
                        pending = decide(session)
                    except InvalidTransition:
                        if not cached:
                            raise
                        self._working_set.pop(sid, None)
                        session, head, _ = self.loaded(sid)
                        pending = decide(session)
                except (InvalidTransition, SessionNotFound):
                    continue  # changed (or purged) since the catalog said so: not for this batch
                rows = self._encode(session, head, pending, actor, correlation_id,
                                    max(now, session.updated_us))
                decided.append((session, pending, rows))
            all_rows = [row for _, _, rows in decided for row in rows]
            # out of the working set until the commit is in (see command())
            for session, _, _ in decided:
                self._working_set.pop(session.id, None)
            try:
                snapshots = []
                for session, pending, rows in decided:
                    # the policy's snapshots: one for every save (save_all_active), periodic
                    # ones for the others
                    snapshots.extend(self._apply_committing(session, pending, rows, rows[-1][3]))
                position = self._store.append(all_rows, None, snapshots)
            except BaseException as error:
                if isinstance(error, SessionGone):
                    # a session of the batch was purged meanwhile: decide again without it
                    # (only purged ones leave; a purge is no lost race, so no retry is spent)
                    ids = [sid for sid in ids if self._store.tombstone(sid) is None]
                    continue
                if not isinstance(error, VersionConflict):
                    raise
                if attempt >= self.config.retries:
                    # (the versions the batch read: the sessions have applied its events)
                    raise self._batch_conflict(
                        [(session.id, rows[0][1] - 1) for session, _, rows in decided if rows]
                    ) from None
                attempt += 1
                continue
            for session, _, rows in decided:
                self._remember(session, rows[-1][7])
            if self.hooks.active and all_rows:
                self._deliver({s.id: s.name for s, _, _ in decided}, all_rows, position,
                              [event for _, pending, _ in decided for event in pending])
            return {session.id: rows[-1][1] for session, _, rows in decided}

    def command(
        self,
        session_id: str | UUID,
        decide: Decision,
        actor: str | None,
        correlation_id: str | None,
        idempotency_key: str | None,
        expected_version: int | None,
    ) -> int:
        # an id held in the working set is canonical already: skip parsing it (about 1 µs)
        sid = (session_id if type(session_id) is str and session_id in self._working_set
               else parse_session_id(session_id))
        if actor is not None or correlation_id is not None or idempotency_key is not None:
            actor, correlation_id, idempotency_key = checked_meta(
                actor, correlation_id, idempotency_key)
        if expected_version is not None and type(expected_version) is not int:
            # an int, checked: True, 2.0 or Decimal(3) compare equal to a version, and a str
            # would read as a conflict
            if isinstance(expected_version, bool) or not isinstance(expected_version, int):
                raise InvalidArgument(
                    f"expected_version must be an int, got {expected_version!r}")
            expected_version = int.__int__(expected_version)
        if expected_version is not None and expected_version < 1:
            raise InvalidArgument(f"expected_version must be >= 1, got {expected_version}")
        key = idempotency_key
        with self.lock:
            if key is not None:
                used = self._store.idempotent_result(sid, key)
                if used is not None:
                    return used[1]
            attempt = 0
            while True:
                session, head, cached = self.loaded(sid)
                try:
                    if expected_version is not None and session.version != expected_version:
                        raise ConcurrencyConflict(
                            sid, expected_version, f"it is at version {session.version}"
                        )
                    pending = decide(session)
                    if (not pending and cached
                            and self._store.latest_version(sid) != session.version):
                        # "nothing to change" was decided on a stale copy: decide again
                        raise ConcurrencyConflict(sid, session.version, "stale working set")
                except SessionNotFound:
                    # a decision that reads more of the stream (restore's target) found it
                    # gone: purged by another engine since this copy was read
                    self._working_set.pop(sid, None)
                    raise self.not_found(sid) from None
                except _STALE_DECISION_ERRORS:
                    if cached:
                        self._working_set.pop(sid, None)
                        continue
                    if key is not None:
                        # the same keyed command, committed by another engine since the key
                        # was looked up, is why this one no longer applies: its result
                        used = self._store.idempotent_result(sid, key)
                        if used is not None:
                            return used[1]
                    raise
                if not pending and key is None:
                    return session.version
                # never let a session's clock run backwards, whatever the writers' clocks say
                now = max(now_us(), session.updated_us)
                rows = self._encode(session, head, pending, actor, correlation_id, now)
                last_version = rows[-1][1] if rows else session.version
                idem = None if key is None else (sid, key, sid, last_version)
                # Applied before the commit so a due snapshot holds the new state. The session
                # leaves the working set until the commit is in, so a half-applied copy is never
                # served: not after a failure, nor after an interrupt (Ctrl-C) that lands
                # between the commit and _remember, which would leave the working set holding
                # the new version with the chain head of the one before (the next command then
                # chained to the wrong digest, and the session read as tampered for good).
                self._working_set.pop(sid, None)
                try:
                    snapshots = self._apply_committing(session, pending, rows, now)
                    position = self._store.append(rows, idem, snapshots)
                except VersionConflict:
                    # another engine wrote this session meanwhile: re-read it and decide again
                    if expected_version is not None or attempt >= self.config.retries:
                        raise ConcurrencyConflict(
                            sid, last_version - len(rows),
                            "another writer committed that version first",
                        ) from None
                    attempt += 1
                    continue
                except IdempotencyKeyUsed as used_key:
                    return used_key.version
                except SessionGone:  # purged meanwhile (by another engine): nothing written
                    raise self.not_found(sid) from None
                # (no rows: a keyed command that changed nothing, only its key was written)
                self._remember(session, rows[-1][7] if rows else head)
                if rows and self.hooks.active:
                    if len(rows) == 1:
                        self._deliver_one(session.name, rows[0], position, pending[0][1])
                    else:
                        self._deliver({sid: session.name}, rows, position, pending)
                return last_version

    def _deliver(
        self, names: dict[str, str], rows: list[EventRow], last_position: int,
        pending: list[PendingEvent] | None = None,
    ) -> None:
        """Hand committed rows to the in-process hooks (after the commit, never before).

        Hooks get objects of their own, so a hook that mutates an event cannot touch a session:
        an event's decided data is handed over as it is when the session keeps none of its
        mutable parts (most events), else it is decoded from the stored bytes (a deep copy:
        about 0.65 µs an event, a third of what a hook may cost).
        """
        decode = self._codec.payloads.decode
        first = last_position - len(rows) + 1
        # tuple.__new__ builds the NamedTuple in half the time of its constructor (0.18 µs)
        new_event = tuple.__new__
        # the rows of one command share their commit time: convert it once
        last_micros = rows[0][3]
        moment = to_datetime(last_micros)
        events = []
        for offset, (sid, version, event_type, micros, actor, correlation, payload, _) in (
            enumerate(rows)
        ):
            if micros != last_micros:
                last_micros, moment = micros, to_datetime(micros)
            data = pending[offset][1] if pending is not None else None
            if data is None or not _shares_nothing(event_type, data):
                data = decode(payload, sid, version)[1]
            events.append(new_event(SessionEvent, (sid, version, event_type, moment, actor,
                                                   correlation, data, first + offset,
                                                   names[sid])))
        self._dispatch(events)

    def _deliver_one(self, name: str, row: EventRow, position: int, data: dict[str, Any]) -> None:
        """_deliver for a command that wrote one event (the common case, kept lean: a no-op
        hook may cost at most 2 µs an event, benchmarks/subscribers_bench.py)."""
        sid, version, event_type, micros, actor, correlation, payload, _ = row
        if not _shares_nothing(event_type, data):
            data = self._codec.payloads.decode(payload, sid, version)[1]
        event = tuple.__new__(SessionEvent, (sid, version, event_type, to_datetime(micros), actor,
                                             correlation, data, position, name))
        if self._delivering:  # issued by a hook: queued behind the events being delivered
            self._hook_queue.append(event)
            return
        self._delivering = True
        failed: HookFailed | None = None
        try:
            self.hooks.dispatch_one(event)
        except HookFailed as error:
            failed = error
        except BaseException:
            # an interrupt (KeyboardInterrupt, SystemExit) out of a hook ends this delivery:
            # what its hooks' own commands queued must not reach the next command's hooks
            self._hook_queue = []
            raise
        finally:
            self._delivering = False
        if failed is not None or self._hook_queue:
            self._dispatch([], failed)

    def _dispatch(self, events: list[SessionEvent], failed: HookFailed | None = None) -> None:
        """Run the hooks on `events`, then on whatever they queued by issuing commands; once
        all went out, raise one HookFailed listing every failure (`failed`'s, from an earlier
        delivery, first)."""
        # A hook may issue commands itself: their events queue behind the batch being delivered,
        # so every hook still sees each session's events in version order.
        if self._delivering:
            self._hook_queue.extend(events)
            return
        self._delivering = True
        try:
            while True:
                if events:
                    try:
                        self.hooks.dispatch(events)
                    except HookFailed as error:  # hook_errors="raise": after all went out
                        failed = error if failed is None else _merged(failed, error)
                if not self._hook_queue:
                    break
                events, self._hook_queue = self._hook_queue, []
        except BaseException:
            self._hook_queue = []  # as in _deliver_one
            raise
        finally:
            self._delivering = False
        if failed is not None:
            raise failed

    def _apply_committing(
        self, session: Session, pending: list[PendingEvent], rows: list[EventRow], now: int
    ) -> list[SnapshotRow]:
        """Apply `pending` (stored as `rows`) to `session`; the snapshot rows now due."""
        if not rows:
            return []
        before = session.version
        due = False
        for (event_type, data), row in zip(pending, rows, strict=True):
            session.apply(event_type, data, row[1], now)
            if event_type in SNAPSHOT_ON:
                due = True
        every = self.config.snapshot_every
        if not due and not (every and before // every != session.version // every):
            return []
        return [self._repository.snapshot_row(session, rows[-1][7], now)]

    def _encode(
        self,
        session: Session,
        head: bytes,
        pending: list[PendingEvent],
        actor: str | None,
        correlation_id: str | None,
        now: int,
    ) -> list[EventRow]:
        """Stored rows for `pending` after `session.version` (chain digest `head`)."""
        return self._codec.encode(
            session.id, session.version, head,
            [(event_type, EVENT_SCHEMAS[event_type], data) for event_type, data in pending],
            now, actor, correlation_id,
        )

    def loaded(self, sid: str) -> tuple[Session, bytes, bool]:
        """(session at its latest version, its chain head, whether it came from the working
        set rather than the store)."""
        entry = self._working_set.get(sid)
        if entry is not None:
            self._working_set.move_to_end(sid)
            return entry[0], entry[1], True
        try:
            session, head = self._repository.load(sid)
        except SessionNotFound:
            raise self.not_found(sid) from None
        self._remember(session, head)
        return session, head, False

    def _batch_conflict(self, read: list[tuple[str, int]]) -> ConcurrencyConflict:
        """The ConcurrencyConflict of a batch that lost its last race: it names a session
        another writer changed, at the version the batch read ((id, version) pairs; on the
        failure path only: a query per session)."""
        changed = [(sid, v) for sid, v in read if self._store.latest_version(sid) != v]
        others = len(changed) - 1
        detail = "the batch wrote nothing" + (
            f" ({others} more session{'s' if others > 1 else ''} of it changed too)"
            if others > 0 else "")
        sid, version = (changed or read or [("-", 0)])[0]
        return ConcurrencyConflict(sid, version, detail)

    def not_found(self, sid: str) -> SessionNotFound:
        """SessionNotFound, or SessionPurged when a cleanup left a tombstone for `sid`."""
        tombstone = self._store.tombstone(sid)
        if tombstone is None:
            return SessionNotFound(sid)
        name, status, micros = tombstone
        return SessionPurged(sid, name, status, to_datetime(micros).isoformat())

    def after_fork_in_child(self) -> None:
        """In a forked process: no delivery under way (a fork from inside a hook would leave
        every later event queued behind it, for good)."""
        self._delivering = False
        self._hook_queue = []

    def _remember(self, session: Session, head: bytes) -> None:
        capacity = self.config.max_active_sessions
        if capacity == 0:
            return
        working_set = self._working_set
        working_set[session.id] = (session, head)
        working_set.move_to_end(session.id)
        while len(working_set) > capacity:
            working_set.popitem(last=False)
