"""Audit projections: what changed in a session's state between two versions, and who changed
one state key, as pure functions of the event stream.

Only three event types touch state keys:

- SessionStarted: every key of the initial state;
- StateChanged: the keys it sets and the keys it deletes;
- SessionRestored: it carries the whole restored state, so a key is touched when its value
  differs from the one before (exact comparison, `same_value`) or it appears or disappears.

Knowing "the value before" needs the state folded along the way: events are applied with the
aggregate's own apply functions through `projections.replay` (never re-implemented here), so an
audit answer always agrees with what loading the session gives.

Pure: no I/O; imports the domain and its sibling projection `replay` (itself domain-only).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sessionledger.domain.errors import InvalidArgument
from sessionledger.domain.events import (
    EVENT_SCHEMAS,
    SESSION_RESTORED,
    SESSION_STARTED,
    STATE_CHANGED,
    SessionEvent,
    to_micros,
)
from sessionledger.domain.session import Session
from sessionledger.domain.values import same_value

from .replay import replay


@dataclass(frozen=True, slots=True)
class KeyTouch:
    """One event that touched a state key: when, by whom, and of which type."""

    version: int
    timestamp: datetime
    actor: str | None
    type: str

    @property
    def time(self) -> datetime:
        """The event's timestamp (another name for `timestamp`)."""
        return self.timestamp


@dataclass(frozen=True, slots=True)
class Change:
    """How one state key differs between two versions.

    `old` is the value at the diff's `from_version` and `new` the value at its `to_version`;
    for an added key `old` is None, for a removed key `new` is None (which of the diff's maps
    the change sits in says whether the key existed). `changes` lists every event between the
    two versions that touched the key, in version order (a key set and set back again is in no
    map: the diff is between the two states).
    """

    old: Any
    new: Any
    changes: tuple[KeyTouch, ...] = ()


@dataclass(frozen=True, slots=True)
class StateDiff:
    """The state keys added, changed and removed going from `from_version` to `to_version`.

    Maps are keyed by state key, in sorted key order. Version 0 means "before the session
    started" (an empty state). `from_version` may be above `to_version`: the diff then goes
    back in time (`old` is still the value at `from_version`) and the `changes` are the events
    between the two versions, in version order.
    """

    session_id: str
    from_version: int
    to_version: int
    added: dict[str, Change] = field(default_factory=dict)
    changed: dict[str, Change] = field(default_factory=dict)
    removed: dict[str, Change] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """True when the two states are exactly equal."""
        return not (self.added or self.changed or self.removed)

    def reversed(self) -> StateDiff:
        """The same diff read the other way (from `to_version` back to `from_version`)."""

        def flip(changes: dict[str, Change]) -> dict[str, Change]:
            return {k: Change(c.new, c.old, c.changes) for k, c in changes.items()}

        return StateDiff(self.session_id, self.to_version, self.from_version,
                         added=flip(self.removed), changed=flip(self.changed),
                         removed=flip(self.added))


@dataclass(frozen=True, slots=True)
class BlameEntry:
    """One change to one state key: the event that made it and the value it left.

    `value` is the key's value after the event (None when `deleted`: the event removed the key,
    by a StateChanged delete or a restore to a state without it).
    """

    version: int
    timestamp: datetime
    actor: str | None
    correlation_id: str | None
    type: str
    value: Any
    deleted: bool

    @property
    def time(self) -> datetime:
        """The event's timestamp (another name for `timestamp`)."""
        return self.timestamp


#: the marker of an absent key while comparing (None is a value a key can hold)
_ABSENT: Any = object()


def _touches(
    start: Session, events: Sequence[SessionEvent]
) -> Iterator[tuple[SessionEvent, dict[str, Any], list[str]]]:
    """Fold `events` (which follow `start.version` one by one) onto a copy of `start`; per
    event: (event, the state after it, the keys it touched). `start` is never changed."""
    session = start.copy()
    for event in events:
        if event.version != session.version + 1:
            raise InvalidArgument(
                f"events of session {start.id} must follow version {session.version} one by "
                f"one, got version {event.version}"
            )
        before = session.state
        # the data of a SessionEvent is already in the current schema: replay's upcast is a no-op
        # but its checks and error wrapping (CorruptedData naming the version) still apply
        replay(session, ((event.version, event.type, to_micros(event.timestamp), event.actor,
                          event.correlation_id, EVENT_SCHEMAS.get(event.type, 0), event.data),))
        after = session.state
        touched: list[str]
        if event.type == STATE_CHANGED:
            touched = [*event.data["set"], *event.data["delete"]]
        elif event.type == SESSION_STARTED:
            touched = list(after)
        elif event.type == SESSION_RESTORED:
            # apply replaced the state dict, so `before` still holds the state before the event
            touched = [k for k in after if k not in before or not same_value(before[k], after[k])]
            touched.extend(k for k in before if k not in after)
        else:
            touched = []
        yield event, after, touched


def diff_states(start: Session, events: Sequence[SessionEvent]) -> StateDiff:
    """The state diff from `start` (a session at some version, e.g. 0 for a fresh
    `Session(sid)`) to the session after `events`, which must follow `start.version` one by one
    (InvalidArgument otherwise). Values compare exactly (`same_value`: 1, 1.0 and True differ).
    """
    touched_by: dict[str, list[KeyTouch]] = {}
    final = start.state
    for event, state, touched in _touches(start, events):
        final = state
        if touched:
            touch = KeyTouch(event.version, event.timestamp, event.actor, event.type)
            for key in touched:
                touched_by.setdefault(key, []).append(touch)
    old = start.state
    added: dict[str, Change] = {}
    changed: dict[str, Change] = {}
    removed: dict[str, Change] = {}
    # only touched keys can differ: the rest were never written between the two versions
    for key in sorted(touched_by):
        before = old.get(key, _ABSENT)
        after = final.get(key, _ABSENT)
        history = tuple(touched_by[key])
        if before is _ABSENT:
            if after is not _ABSENT:
                added[key] = Change(None, after, history)
        elif after is _ABSENT:
            removed[key] = Change(before, None, history)
        elif not same_value(before, after):
            changed[key] = Change(before, after, history)
    to_version = events[-1].version if events else start.version
    return StateDiff(start.id, start.version, to_version, added, changed, removed)


def blame_key(
    events: Sequence[SessionEvent], key: str, start: Session | None = None
) -> list[BlameEntry]:
    """Every event of `events` that touched state `key`, oldest first, with the value it left.

    `events` follow `start` (default: an empty session, so the events start at version 1).
    """
    if not isinstance(key, str):
        raise InvalidArgument(f"a state key is a str, got {type(key).__name__}")
    if start is None:
        start = Session(events[0].session_id if events else "")
    entries: list[BlameEntry] = []
    for event, state, touched in _touches(start, events):
        if key in touched:
            value = state.get(key, _ABSENT)
            deleted = value is _ABSENT
            entries.append(BlameEntry(event.version, event.timestamp, event.actor,
                                      event.correlation_id, event.type,
                                      None if deleted else value, deleted))
    return entries
