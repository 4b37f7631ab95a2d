"""The session aggregate: decides which events a command produces, and applies events.

Deciding never mutates; applying is the only way state changes, and the same apply functions
serve command handling, loading, snapshots and replay queries.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import datetime
from typing import Any

from . import events as ev
from .errors import CheckpointNotFound, CorruptedData, InvalidArgument, InvalidTransition
from .status import ENDED, OUTCOMES, SessionStatus
from .values import (
    MAX_LABEL_LENGTH,
    checked_copy,
    checked_mapping,
    checked_optional_text,
    checked_tags,
    checked_text,
    same_value,
)

#: an event a command decided on, not yet stored: (type, data)
PendingEvent = tuple[str, dict[str, Any]]


class Session:
    """A session as of one version: identity, status, state and bookkeeping."""

    __slots__ = (
        "checkpoints",
        "created_us",
        "id",
        "last_saved_version",
        "metadata",
        "name",
        "outcome",
        "parent",
        "state",
        "status",
        "tags",
        "updated_us",
        "version",
    )

    def __init__(self, session_id: str) -> None:
        self.id = session_id
        self.name = ""
        self.status = SessionStatus.ACTIVE
        self.state: dict[str, Any] = {}
        self.tags: list[str] = []
        self.metadata: dict[str, Any] = {}
        self.parent: str | None = None
        self.version = 0
        self.created_us = 0
        self.updated_us = 0
        self.checkpoints: dict[str, int] = {}
        self.last_saved_version: int | None = None
        self.outcome: str | None = None

    # -- read side -------------------------------------------------------------------------

    @property
    def created_at(self) -> datetime:
        """When the session started (UTC)."""
        return ev.to_datetime(self.created_us)

    @property
    def updated_at(self) -> datetime:
        """When the session's last event was committed (UTC)."""
        return ev.to_datetime(self.updated_us)

    def copy(self) -> Session:
        """A deep copy, so callers can never change the engine's working set."""
        other = Session.__new__(Session)
        for name in Session.__slots__:
            setattr(other, name, getattr(self, name))
        try:
            other.state = copy.deepcopy(self.state)
            other.metadata = copy.deepcopy(self.metadata)
        except RecursionError:
            # writes refuse values nested deeper than MAX_DEPTH: only a forged event (a chain
            # made without an integrity key) or damage can hold one Python cannot copy
            raise CorruptedData(self.id, self.version, "a value is nested too deeply to copy "
                                "(no command writes one: a forged or damaged event)") from None
        other.tags = list(self.tags)
        other.checkpoints = dict(self.checkpoints)
        return other

    def __repr__(self) -> str:
        return (
            f"Session(id={self.id!r}, name={self.name!r}, status={self.status.value}, "
            f"version={self.version})"
        )

    def __eq__(self, other: object) -> bool:
        """Every field the same, values compared exactly (`same_value`: 1, 1.0 and True
        differ, NaN equals NaN), as the engine compares state: verify() judges a snapshot
        against the replayed session with this."""
        if not isinstance(other, Session):
            return NotImplemented
        return all(same_value(getattr(self, n), getattr(other, n)) for n in Session.__slots__)

    __hash__ = None  # type: ignore[assignment]

    # -- deciding (pure, no mutation) --------------------------------------------------------

    @staticmethod
    def decide_start(
        name: Any,
        tags: Any = None,
        metadata: Any = None,
        state: Any = None,
        parent: str | None = None,
    ) -> PendingEvent:
        """The SessionStarted event of a new session (values checked and copied)."""
        return ev.SESSION_STARTED, {
            "name": checked_text(name, "session name"),
            "tags": checked_tags(tags),
            "metadata": checked_mapping(metadata, "metadata"),
            "state": checked_mapping(state, "state"),
            "parent": parent,
        }

    def _require(self, operation: str, *allowed: SessionStatus) -> None:
        if self.status not in allowed:
            raise InvalidTransition(self.id, self.status.value, operation)

    def decide_update(self, changes: Any, delete: Any = None) -> list[PendingEvent]:
        """StateChanged for a delta; nothing when the delta changes nothing."""
        self._require("update", SessionStatus.ACTIVE)
        to_set = checked_mapping(changes, "state")
        state = self.state
        if delete is None:
            to_delete: list[str] = []
        else:
            if isinstance(delete, str) or not isinstance(delete, list | tuple | set | frozenset):
                raise InvalidArgument("delete must be a list of state keys")
            for key in delete:
                if not isinstance(key, str):
                    raise InvalidArgument(f"delete key {key!r} is not a str")
            # a str subclass (a str-enum member) as its text, as state keys are stored
            to_delete = sorted({str.__str__(k) for k in delete
                                if k in state and k not in to_set})
        to_set = {k: v for k, v in to_set.items() if k not in state or not same_value(state[k], v)}
        if not to_set and not to_delete:
            return []
        return [(ev.STATE_CHANGED, {"set": to_set, "delete": to_delete})]

    def decide_record(self, kind: Any, payload: Any) -> list[PendingEvent]:
        """EventRecorded: an application event of `kind` with any storable payload."""
        self._require("record an event on", SessionStatus.ACTIVE)
        return [(ev.EVENT_RECORDED, {
            "kind": checked_text(kind, "event kind", MAX_LABEL_LENGTH),
            "payload": checked_copy(payload, "payload"),
        })]

    def decide_checkpoint(self, label: Any) -> list[PendingEvent]:
        """CheckpointTaken under a label unique within the session."""
        self._require("checkpoint", SessionStatus.ACTIVE)
        label = checked_text(label, "checkpoint label", MAX_LABEL_LENGTH)
        if label in self.checkpoints:
            raise InvalidArgument(
                f"session {self.id} already has a checkpoint labelled {label!r} "
                f"(version {self.checkpoints[label]})"
            )
        return [(ev.CHECKPOINT_TAKEN, {"label": label})]

    def decide_save(self) -> list[PendingEvent]:
        """SessionSaved: a save point restore() can go back to."""
        self._require("save", SessionStatus.ACTIVE, SessionStatus.SUSPENDED)
        return [(ev.SESSION_SAVED, {})]

    def decide_save_active(self) -> list[PendingEvent]:
        """SessionSaved, of an ACTIVE session only (save_all_active(): a session another engine
        suspended since it was listed is left out)."""
        self._require("save", SessionStatus.ACTIVE)
        return [(ev.SESSION_SAVED, {})]

    def restore_target(self, checkpoint: str | None, version: int | None) -> int:
        """The version restore() goes back to: a checkpoint, a version, or the last save."""
        self._require("restore", SessionStatus.ACTIVE)
        if checkpoint is not None and version is not None:
            raise InvalidArgument("give checkpoint= or version=, not both")
        if checkpoint is not None:
            if not isinstance(checkpoint, str):
                raise InvalidArgument(f"checkpoint must be a label (str), got {checkpoint!r}")
            if checkpoint not in self.checkpoints:
                raise CheckpointNotFound(self.id, f"checkpoint {checkpoint!r}")
            return self.checkpoints[checkpoint]
        if version is not None:
            if type(version) is not int or not 1 <= version <= self.version:
                raise CheckpointNotFound(
                    self.id, f"version {version!r} (versions are 1..{self.version})"
                )
            return version
        if self.last_saved_version is None:
            raise CheckpointNotFound(self.id, "save point (call save() first)")
        return self.last_saved_version

    def decide_restore(
        self, target_version: int, state: dict[str, Any], checkpoint: str | None
    ) -> list[PendingEvent]:
        """SessionRestored carrying the full state of `target_version`."""
        self._require("restore", SessionStatus.ACTIVE)
        if checkpoint is not None:
            checkpoint = str.__str__(checkpoint)  # a str-enum member: its text, as stored
        return [(ev.SESSION_RESTORED, {
            "to_version": target_version, "checkpoint": checkpoint, "state": state,
        })]

    def decide_recover(self) -> list[PendingEvent]:
        """SessionRestored marking a recovery after a restart (restore_recent()): the state is
        unchanged, so the event carries no state, only where the session was (its version and
        status)."""
        self._require("recover", SessionStatus.ACTIVE, SessionStatus.SUSPENDED)
        return [(ev.SESSION_RESTORED, {
            "to_version": self.version, "checkpoint": None, "reason": "recovery",
            "status": self.status.value,
        })]

    def decide_suspend(self, reason: Any = None) -> list[PendingEvent]:
        """SessionSuspended: ACTIVE -> SUSPENDED."""
        self._require("suspend", SessionStatus.ACTIVE)
        return [(ev.SESSION_SUSPENDED, {"reason": checked_optional_text(reason, "reason")})]

    def decide_resume(self) -> list[PendingEvent]:
        """SessionResumed: SUSPENDED -> ACTIVE."""
        self._require("resume", SessionStatus.SUSPENDED)
        return [(ev.SESSION_RESUMED, {})]

    def decide_end(self, outcome: Any) -> list[PendingEvent]:
        """SessionEnded with outcome completed, failed or cancelled."""
        if not isinstance(outcome, str) or outcome not in OUTCOMES:
            raise InvalidArgument(
                f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}"
            )
        self._require(f"end ({outcome})", SessionStatus.ACTIVE, SessionStatus.SUSPENDED)
        # a str-enum member: its text, as a reload gives it
        return [(ev.SESSION_ENDED, {"outcome": str.__str__(outcome)})]

    def decide_archive(self) -> list[PendingEvent]:
        """SessionArchived: an ended session is archived."""
        self._require("archive", *ENDED)
        return [(ev.SESSION_ARCHIVED, {})]

    # -- applying ----------------------------------------------------------------------------

    def apply(self, event_type: str, data: dict[str, Any], version: int, micros: int) -> None:
        """Apply one event (of the current schema) at `version`, committed at `micros`."""
        _APPLY[event_type](self, data)
        if version == 1:
            self.created_us = micros
        self.version = version
        self.updated_us = micros


def _started(s: Session, d: dict[str, Any]) -> None:
    s.name = d["name"]
    s.tags = list(d["tags"])
    s.metadata = d["metadata"]
    s.state = dict(d["state"])
    s.parent = d["parent"]
    s.status = SessionStatus.ACTIVE


def _state_changed(s: Session, d: dict[str, Any]) -> None:
    state = s.state
    state.update(d["set"])
    for key in d["delete"]:
        state.pop(key, None)


def _recorded(s: Session, d: dict[str, Any]) -> None:
    pass


def _checkpoint(s: Session, d: dict[str, Any]) -> None:
    s.checkpoints[d["label"]] = s.version + 1


def _saved(s: Session, d: dict[str, Any]) -> None:
    s.last_saved_version = s.version + 1


def _restored(s: Session, d: dict[str, Any]) -> None:
    if "state" in d:
        s.state = dict(d["state"])


def _suspended(s: Session, d: dict[str, Any]) -> None:
    s.status = SessionStatus.SUSPENDED


def _resumed(s: Session, d: dict[str, Any]) -> None:
    s.status = SessionStatus.ACTIVE


def _ended(s: Session, d: dict[str, Any]) -> None:
    s.outcome = d["outcome"]
    s.status = OUTCOMES[d["outcome"]]


def _archived(s: Session, d: dict[str, Any]) -> None:
    s.status = SessionStatus.ARCHIVED


_APPLY: dict[str, Callable[[Session, dict[str, Any]], None]] = {
    ev.SESSION_STARTED: _started,
    ev.STATE_CHANGED: _state_changed,
    ev.EVENT_RECORDED: _recorded,
    ev.CHECKPOINT_TAKEN: _checkpoint,
    ev.SESSION_SAVED: _saved,
    ev.SESSION_RESTORED: _restored,
    ev.SESSION_SUSPENDED: _suspended,
    ev.SESSION_RESUMED: _resumed,
    ev.SESSION_ENDED: _ended,
    ev.SESSION_ARCHIVED: _archived,
}
assert set(_APPLY) == ev.EVENT_TYPES
