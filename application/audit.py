"""Replay queries: a session as it was at a version or a moment, diffs between versions,
filtered history, the global timeline, and blame of one state key.

`AuditQueries` reads through the same store, repository and codec as the engine, so every
answer is built from checked events (versions in order, chain digests matching) and the
aggregate's own apply functions: `state_at(sid, version=N)` is exactly what replaying events
1..N gives. The one deliberate exception is `timeline()`, a streaming feed across all sessions:
see its docstring.

Times: a datetime (naive means UTC), a date (midnight UTC) or an ISO 8601 string
(``2026-11-25T10:00:00Z``, with an offset, or a date alone). Windows are half-open:
`since` <= timestamp < `until`, so consecutive windows never count an event twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, time
from typing import Any
from uuid import UUID

from sessionledger.domain.errors import CorruptedData, InvalidArgument, SessionNotFound
from sessionledger.domain.events import (
    SESSION_STARTED,
    SessionEvent,
    checked_event_types,
    event_time,
    to_datetime,
    to_micros,
)
from sessionledger.domain.session import Session
from sessionledger.domain.values import parse_session_id
from sessionledger.infrastructure import log_reads
from sessionledger.infrastructure.codec import GENESIS_DIGEST, EventCodec, datetime_from_iso
from sessionledger.infrastructure.store import EventStore
from sessionledger.projections.audit import BlameEntry, StateDiff, blame_key, diff_states
from sessionledger.projections.replay import current_data, replay, session_events

from .repository import SessionRepository
from .session_names import SessionNames

#: what the time arguments accept
TimeLike = datetime | date | str

#: session ids per query when timeline() looks names up
_NAMES_CHUNK = 500


def parse_time(value: object, what: str = "time") -> datetime:
    """An aware datetime from a datetime (naive means UTC), a date (midnight UTC) or an ISO 8601
    string (``2026-11-25T10:00:00Z``, ``2026-11-25T11:00:00+01:00``, ``2026-11-25``).

    InvalidArgument naming `what` for anything else.
    """
    if isinstance(value, str):
        text = value.strip()
        if text[-1:] in ("Z", "z"):  # (fromisoformat takes "Z" after a time only)
            text = text[:-1] + "+00:00"
        try:
            value = datetime_from_iso(text)
        except ValueError:
            raise InvalidArgument(
                f"invalid {what} {value!r}: expected ISO 8601 such as 2026-11-25T10:00:00Z, "
                "2026-11-25T11:00:00+01:00 or 2026-11-25"
            ) from None
    if isinstance(value, datetime):
        # naive is what Python says it is: no tzinfo, or one that gives no offset
        try:
            offset = value.utcoffset()
        except Exception as error:  # a tzinfo that fails, or gives no timedelta
            raise InvalidArgument(
                f"invalid {what} {value!r}: its tzinfo gives no UTC offset ({error})"
            ) from None
        return value if offset is not None else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime.combine(value, time(), tzinfo=UTC)
    raise InvalidArgument(
        f"{what} must be a datetime or an ISO 8601 string, got {type(value).__name__}"
    )


def time_filter_micros(value: object, what: str) -> int | None:
    """A time filter (None: no filter) in stored microseconds, read by parse_time."""
    return None if value is None else to_micros(parse_time(value, what))


def _window(since: object, until: object) -> tuple[int | None, int | None]:
    low, high = time_filter_micros(since, "since"), time_filter_micros(until, "until")
    if low is not None and high is not None and low > high:
        raise InvalidArgument(f"since ({since}) is after until ({until})")
    return low, high


def checked_types(types: object) -> frozenset[str] | None:
    """The event types to keep (None: all), each one of EVENT_TYPES; a str is one type.
    InvalidArgument naming the unknown ones, or for an empty list."""
    return checked_event_types(types, "types", one_str=True)


def _checked_version(value: object, what: str, low: int, latest: int, sid: str) -> int:
    if type(value) is not int or not low <= value <= latest:
        raise InvalidArgument(
            f"{what} must be a version of session {sid}, {low}..{latest}, got {value!r}"
        )
    return value


class AuditQueries:
    """The replay queries over one store (the engine exposes them as its own methods)."""

    def __init__(self, store: EventStore, repository: SessionRepository,
                 codec: EventCodec) -> None:
        self._store = store
        self._repository = repository
        self._codec = codec

    # -- one session -----------------------------------------------------------------------

    def state_at(
        self, session_id: str | UUID, version: int | None = None,
        at: datetime | date | str | None = None,
    ) -> Session:
        """The session as it was at `version`, or at the moment `at` (its last version whose
        timestamp is at or before `at`; a naive datetime means UTC; an ISO string works too).

        Built from the nearest snapshot at or below and the events after it, so it equals a
        plain replay of events 1..version exactly. Give exactly one of version / at.
        InvalidArgument for a version outside 1..latest (the message names the range) or a
        moment before the session started; SessionNotFound for an unknown session.
        """
        sid = parse_session_id(session_id)
        if (version is None) == (at is None):
            raise InvalidArgument("state_at takes exactly one of version= or at=")
        if version is not None:
            latest = self._latest(sid)
            target = _checked_version(version, "version", 1, latest, sid)
            return self._repository.load(sid, target)[0]
        moment = parse_time(at, "at")
        target = self._version_at(sid, to_micros(moment), moment)
        session, head = self._repository.load(sid, target)
        # The search read raw times and found the event after `target` later than `at`: that
        # event is checked on the chain too (the load checked 1..target), so a changed time
        # is CorruptedData, never a wrong version (unless whoever changed it also rewrote the
        # chain, which only a database without an integrity_key allows). Genuine times never
        # go back in a session.
        following = self._store.stream(sid, target, target + 1)
        if following:
            self._codec.decode(sid, following, target, head)
        return session

    def diff(self, session_id: str | UUID, a: int, b: int) -> StateDiff:
        """State keys added, changed and removed from version `a` to version `b`, each with the
        events (version, time, actor, type) that touched it in between.

        Versions are 0..latest (0: before the session started, an empty state). `a` may be
        above `b`: the diff then reads back in time (`old` is the value at `a`), and equals
        diff(b, a).reversed(). The lower state loads as state_at() does (nearest snapshot,
        then checked events); the events in between are checked as they continue its chain.
        """
        sid = parse_session_id(session_id)
        latest = self._latest(sid)
        a = _checked_version(a, "a", 0, latest, sid)
        b = _checked_version(b, "b", 0, latest, sid)
        low, high = min(a, b), max(a, b)
        if low == 0:
            start, head = Session(sid), GENESIS_DIGEST
        else:
            start, head = self._repository.load(sid, low)
        between = self._codec.decode(sid, self._store.stream(sid, low, high), low, head)
        forward = diff_states(start, session_events(sid, between))
        return forward if a <= b else forward.reversed()

    def history(
        self,
        session_id: str | UUID,
        since: TimeLike | None = None,
        until: TimeLike | None = None,
        types: Iterable[str] | str | None = None,
        actor: str | None = None,
    ) -> list[SessionEvent]:
        """The session's events with since <= timestamp < until, of `types` (names from
        EVENT_TYPES), by `actor` (exact match); each filter is optional. Version order.
        """
        # Why the whole stream is read, checked and then filtered here rather than in SQL: the
        # chain check needs every row from version 1 (each digest covers the one before), and
        # filtered history must never serve an event the check would refuse. Measured on a
        # 10,000-event SQLite session, a filter keeping 1% (benchmarks/audit_bench.py): whole
        # stream checked and decoded 36-39 ms (what history() costs anyway), SQL filter without
        # the check 2.4 ms; checking every row but decoding only the kept ones would be 20 ms,
        # but needs a hook in EventCodec.decode rather than a second copy of its check loop.
        # The filter runs on the decoded tuples: only kept events become SessionEvents.
        sid = parse_session_id(session_id)
        low, high = _window(since, until)
        wanted = checked_types(types)
        if actor is not None and not isinstance(actor, str):
            raise InvalidArgument(f"actor must be a str, got {type(actor).__name__}")
        stored = self._store.stream(sid)
        if not stored:
            raise SessionNotFound(sid)
        decoded = self._codec.decode(sid, stored)
        # the same shape checks a load makes: history never serves what get() would refuse
        replay(Session(sid), decoded)
        kept = [
            event for event in decoded
            if (low is None or event[2] >= low)
            and (high is None or event[2] < high)
            and (wanted is None or event[1] in wanted)
            and (actor is None or event[3] == actor)
        ]
        return session_events(sid, kept)

    def blame(self, session_id: str | UUID, key: str) -> list[BlameEntry]:
        """Every change to state `key`, oldest first: version, time, actor, correlation id,
        event type and the value it left (deleted=True when the event removed the key). A key
        the session never had gives an empty list."""
        sid = parse_session_id(session_id)
        if not isinstance(key, str):
            raise InvalidArgument(f"a state key is a str, got {type(key).__name__}")
        stored = self._store.stream(sid)
        if not stored:
            raise SessionNotFound(sid)
        events = session_events(sid, self._codec.decode(sid, stored))
        return blame_key(events, key, Session(sid))

    # -- all sessions ----------------------------------------------------------------------

    def timeline(
        self,
        since: TimeLike | None = None,
        until: TimeLike | None = None,
        types: Iterable[str] | str | None = None,
    ) -> Iterator[SessionEvent]:
        """Every session's events in global commit order (`position` set), with
        since <= timestamp < until and of `types`, streamed in constant memory.

        The filters run in SQL and rows arrive in batches on a connection of the scan's own.
        Each payload is decoded (CorruptedData for bytes that do not) and brought to the
        current schema, but the chain digests are not checked: a check needs every earlier
        event of each session, which a filtered, streaming feed does not read (verify() is the
        integrity check). `session_name` is filled from a bounded cache: free when the
        timeline itself passes the session's SessionStarted, else looked up for all the
        sessions of a fetched batch of rows at once. Arguments are checked when this is called,
        before the first event.
        """
        low, high = _window(since, until)
        wanted = checked_types(types)
        where, params = log_reads.timeline_where(
            low, high, None if wanted is None else sorted(wanted))
        return self._timeline(log_reads.TIMELINE.format(where=where), params)

    def _timeline(self, sql: str, params: list[Any]) -> Iterator[SessionEvent]:
        decode = self._codec.payloads.decode
        names = SessionNames(self.session_names)
        for rows in self._store.scan_batches(sql, params):
            names.prepare(rows)
            for position, sid, version, event_type, micros, actor, correlation, payload in rows:
                schema, raw = decode(payload, sid, version)
                data = current_data(sid, version, event_type, schema, raw)
                yield SessionEvent(sid, version, event_type, event_time(sid, version, micros),
                                   actor, correlation, data, position=position,
                                   session_name=names.name(sid, event_type, data))
            names.trim()

    # -- internals ---------------------------------------------------------------------------

    def _latest(self, sid: str) -> int:
        latest = self._store.latest_version(sid)
        if latest == 0:
            raise SessionNotFound(sid)
        return latest

    def session_names(self, sids: list[str], damaged_as_none: bool = False
                      ) -> dict[str, str | None]:
        """session id -> the name in its SessionStarted (None when its first event is no
        SessionStarted or its name no str; CorruptedData when it does not decode, or None with
        `damaged_as_none`), for `sids`, in a query per _NAMES_CHUNK ids."""
        found: dict[str, str | None] = dict.fromkeys(sids)
        for start in range(0, len(sids), _NAMES_CHUNK):
            chunk = sids[start:start + _NAMES_CHUNK]
            rows = self._store.query(log_reads.first_events(len(chunk)), chunk)
            for sid, event_type, payload in rows:
                if event_type != SESSION_STARTED:
                    continue
                try:
                    schema, raw = self._codec.payloads.decode(payload, sid, 1)
                    name = current_data(sid, 1, SESSION_STARTED, schema, raw).get("name")
                except CorruptedData:
                    if not damaged_as_none:
                        raise
                    name = None
                found[sid] = name if isinstance(name, str) else None
        return found

    def names_for_subscribers(self, sids: list[str]) -> dict[str, str | None]:
        """session_names() for a durable subscriber's batch: a damaged SessionStarted names
        nothing instead of stopping the subscriber at every batch that holds that session."""
        return self.session_names(sids, damaged_as_none=True)

    def _version_at(self, sid: str, micros: int, moment: datetime) -> int:
        """The last version of `sid` committed at or before `micros`; InvalidArgument when
        the session started later, SessionNotFound when it does not exist."""
        rows = self._store.query(log_reads.VERSION_AT, (sid, micros, micros, sid))
        if not rows:
            # no session, or a stream with a gap the search could not walk: ask plainly (the
            # load after this reports the gap as CorruptedData)
            self._latest(sid)
            rows = self._store.query(log_reads.VERSION_AT_SCAN, (sid, micros))
        version = int(rows[0][0] or 0)
        if version == 0:
            # the first event's time decides: checked on the chain before it is believed
            first = self._store.stream(sid, 0, 1)
            self._codec.decode(sid, first)
            started = to_datetime(first[0][2]).isoformat() if first else "later"
            raise InvalidArgument(
                # the caller's own moment: in UTC it may fall before year 1
                f"session {sid} did not exist at {moment.isoformat()}: it started "
                f"at {started}"
            )
        return version
