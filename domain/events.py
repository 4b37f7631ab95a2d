"""Session events: stable type names, their current schema versions and upcasters.

Stored events name their type with these strings, never a Python path, so renaming a module
never breaks a database. Each type has a schema version; an event stored with an older schema
is brought to the current shape by the upcasters below, one step at a time, when it is read.

Why not `eventsourcing.domain.Aggregate` events: the issue's load target (a 1,000-event session
in 1.5 ms, decode included) leaves about 1.5 µs per event, while a decorated eventsourcing
aggregate replays at about 21 µs per event here (see benchmarks/). Events are therefore plain
(type, data) pairs applied by one function per type, shared by loading, snapshots and queries.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from .errors import CorruptedData, InvalidArgument

SESSION_STARTED = "SessionStarted"
STATE_CHANGED = "StateChanged"
EVENT_RECORDED = "EventRecorded"
CHECKPOINT_TAKEN = "CheckpointTaken"
SESSION_SAVED = "SessionSaved"
SESSION_RESTORED = "SessionRestored"
SESSION_SUSPENDED = "SessionSuspended"
SESSION_RESUMED = "SessionResumed"
SESSION_ENDED = "SessionEnded"
SESSION_ARCHIVED = "SessionArchived"

#: stable type name -> current schema version of its data
EVENT_SCHEMAS: dict[str, int] = {
    SESSION_STARTED: 2,
    STATE_CHANGED: 2,
    EVENT_RECORDED: 1,
    CHECKPOINT_TAKEN: 1,
    SESSION_SAVED: 1,
    SESSION_RESTORED: 1,
    SESSION_SUSPENDED: 1,
    SESSION_RESUMED: 1,
    SESSION_ENDED: 1,
    SESSION_ARCHIVED: 1,
}
EVENT_TYPES = frozenset(EVENT_SCHEMAS)


def checked_event_types(value: object, what: str, *, one_str: bool = False
                        ) -> frozenset[str] | None:
    """The event type names a filter `what` keeps (None: every type). InvalidArgument for a
    name that is no event type, for an empty list (it would keep nothing: None means all), and
    for a bare str unless `one_str` (then it is one name)."""
    if value is None:
        return None
    if isinstance(value, str | bytes):
        if not one_str or isinstance(value, bytes):
            raise InvalidArgument(f"{what} must be a list of event type names, not a single "
                                  f"{type(value).__name__} (write {what}=[{value!r}])")
        names: list[Any] = [value]
    else:
        try:
            names = list(value)  # type: ignore[call-overload]
        except TypeError:
            raise InvalidArgument(f"{what} must be a list of event type names, got "
                                  f"{type(value).__name__}") from None
    unknown = [name for name in names if not isinstance(name, str) or name not in EVENT_TYPES]
    if unknown:
        raise InvalidArgument(
            f"unknown event type{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(n) for n in unknown)}: expected {', '.join(sorted(EVENT_TYPES))}")
    if not names:
        raise InvalidArgument(f"{what} is an empty list, which keeps no event: pass None for "
                              "every type")
    return frozenset(names)

#: a checked, decoded event of one stream, as storage hands it to projections:
#: (version, type, ts in microseconds, actor, correlation_id, schema version, data)
DecodedEvent = tuple[int, str, int, "str | None", "str | None", int, Any]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]



# Schema 1 was written in two shapes: the first commits of this repository wrote today's shape
# (a "parent" key; {"set", "delete"}) before schema numbers were bumped, and the legacy shape of
# tests/fixtures/legacy-format0.db has no parent and {"changes", "removed"}. Both are read.

def _started_1_to_2(data: dict[str, Any]) -> dict[str, Any]:
    # the legacy shape had no parent sessions: a stored parent is kept
    return {"parent": None, **data}


def _state_changed_1_to_2(data: dict[str, Any]) -> dict[str, Any]:
    if "changes" not in data and "set" in data:  # already today's shape
        return {"set": data["set"], "delete": list(data.get("delete", ()))}
    # the legacy shape: {"changes": {...}, "removed": [...]} ("removed" absent when empty)
    return {"set": data["changes"], "delete": list(data.get("removed", ()))}


#: (type, schema version) -> function that turns that shape into the next schema version
UPCASTERS: dict[tuple[str, int], Upcaster] = {
    (SESSION_STARTED, 1): _started_1_to_2,
    (STATE_CHANGED, 1): _state_changed_1_to_2,
}


def upcast(event_type: str, schema: int, data: dict[str, Any]) -> dict[str, Any]:
    """Bring `data` stored at `schema` to the current schema of `event_type`."""
    current = EVENT_SCHEMAS[event_type]
    while schema < current:
        data = UPCASTERS[(event_type, schema)](data)
        schema += 1
    return data


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: the latest stored timestamp a datetime can hold (9999-12-31T23:59:59.999999Z)
MAX_MICROS = (datetime.max.replace(tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)


#: below this many microseconds (2^32 s, the year 2106) micros / 1e6 is within 0.24 µs of the
#: exact value (half a float ulp), so fromtimestamp's round-half-even gives the exact microsecond
_FLOAT_EXACT_MICROS = 2**32 * 10**6
_UTC = UTC
_from_timestamp = datetime.fromtimestamp


def to_datetime(micros: int) -> datetime:
    """Microseconds since the epoch (how timestamps are stored) as an aware UTC datetime."""
    if 0 <= micros < _FLOAT_EXACT_MICROS:
        # 0.28 µs instead of 0.57: every delivered hook event and every history entry pays it
        return _from_timestamp(micros / 1e6, _UTC)
    return EPOCH + timedelta(microseconds=micros)


def stored_micros(session_id: str, version: int | None, micros: object) -> int:
    """A stored timestamp, checked: CorruptedData when it is not an int a datetime can hold
    (SQLite keeps any type in any column)."""
    if type(micros) is not int or not 0 <= micros <= MAX_MICROS:
        raise CorruptedData(session_id, version, f"timestamp {micros!r} is out of range")
    return micros


def stored_version(session_id: str, version: object) -> int:
    """A stored version, checked: CorruptedData when it is not an int (a damaged SQLite row)."""
    if type(version) is not int:
        raise CorruptedData(session_id, None, f"a stored version is {version!r}, not a number")
    return version


def event_time(session_id: str, version: int | None, micros: int) -> datetime:
    """A stored timestamp as a datetime; CorruptedData when no datetime can hold it."""
    return to_datetime(stored_micros(session_id, version, micros))


def to_micros(moment: datetime) -> int:
    """An aware datetime (naive ones are taken as UTC) as microseconds since the epoch."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // timedelta(microseconds=1)


class SessionEvent(NamedTuple):
    """One committed event of a session's stream, as history() returns it and hooks and
    subscribers receive it. Immutable.

    `position` is the event's place in the global commit order (what a durable subscriber
    tracks, and what an at-least-once handler can deduplicate on); `session_name` is the name of
    the session it belongs to. Hooks, durable subscribers and timeline() fill both in;
    history() sets neither.

    A NamedTuple rather than a frozen dataclass: building one costs about 0.3 µs instead of
    1 µs, and hooks build one per delivered event (benchmarks/subscribers_bench.py).
    """

    session_id: str
    version: int
    type: str
    timestamp: datetime
    actor: str | None
    correlation_id: str | None
    data: dict[str, Any]
    position: int | None = None
    session_name: str | None = None
