"""The snapshot projection: a session at one version as a plain map, and back.

A snapshot is a cache of what replaying the session's events up to its version gives; it is
always safe to drop. Each format this release has ever written keeps a reader here, so a snapshot
written by an older release still loads; one written by a newer release is refused by the caller
(and, unless strict, the session loads from its events instead).

Format 1 (this release): {"format": 1, "id", "version", "name", "status", "state", "tags",
"metadata", "parent", "created_us", "updated_us", "checkpoints", "saved", "outcome", "head"}.
"head" is the chain digest of the event at `version`, so reading on from a snapshot still checks
the chain.

Format 0 (the first release wrote no "format" field): {"id", "version", "name", "status",
"state", "tags", "metadata", "parent", "created_at", "updated_at" (datetimes), "checkpoints",
"last_saved"}; no chain head and no outcome (derived from the status).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sessionledger.domain.errors import SnapshotCorrupted
from sessionledger.domain.events import MAX_MICROS, to_micros
from sessionledger.domain.session import Session
from sessionledger.domain.status import OUTCOMES, SessionStatus

#: the format snapshot_fields() writes
CURRENT_FORMAT = 1

_OUTCOME_OF = {status: outcome for outcome, status in OUTCOMES.items()}


def snapshot_fields(session: Session, head: bytes) -> dict[str, Any]:
    """The session as a format-1 snapshot map (values shared, not copied: encode it at once)."""
    return {
        "format": CURRENT_FORMAT,
        "id": session.id,
        "version": session.version,
        "name": session.name,
        "status": session.status.value,
        "state": session.state,
        "tags": session.tags,
        "metadata": session.metadata,
        "parent": session.parent,
        "created_us": session.created_us,
        "updated_us": session.updated_us,
        "checkpoints": session.checkpoints,
        "saved": session.last_saved_version,
        "outcome": session.outcome,
        "head": head,
    }


def _read_format_1(session: Session, fields: dict[str, Any]) -> bytes | None:
    session.name = fields["name"]
    session.status = SessionStatus(fields["status"])
    session.state = fields["state"]
    session.tags = list(fields["tags"])
    session.metadata = fields["metadata"]
    session.parent = fields["parent"]
    session.created_us = int(fields["created_us"])
    session.updated_us = int(fields["updated_us"])
    session.checkpoints = dict(fields["checkpoints"])
    session.last_saved_version = fields["saved"]
    session.outcome = fields["outcome"]
    head = fields["head"]
    if type(head) is not bytes:
        raise TypeError("head is not bytes")
    return head


def _read_format_0(session: Session, fields: dict[str, Any]) -> bytes | None:
    session.name = fields["name"]
    session.status = SessionStatus(fields["status"])
    session.state = fields["state"]
    session.tags = list(fields["tags"])
    session.metadata = fields["metadata"]
    session.parent = fields["parent"]
    created: datetime = fields["created_at"]
    updated: datetime = fields["updated_at"]
    session.created_us = to_micros(created)
    session.updated_us = to_micros(updated)
    session.checkpoints = dict(fields["checkpoints"])
    session.last_saved_version = fields["last_saved"]
    session.outcome = _OUTCOME_OF.get(session.status)
    return None


def lacks_outcome(session: Session) -> bool:
    """True for a session read from a snapshot that could not hold its outcome: format 0 kept
    none, and took it from the status, which an archived session's no longer gives."""
    return session.status is SessionStatus.ARCHIVED and session.outcome is None


#: format -> reader filling a Session from the snapshot map; returns the chain head if stored
READERS: dict[int, Callable[[Session, dict[str, Any]], bytes | None]] = {
    0: _read_format_0,
    1: _read_format_1,
}
assert max(READERS) == CURRENT_FORMAT


def session_from_snapshot(
    fields: dict[str, Any], format_version: int, session_id: str, version: int
) -> tuple[Session, bytes | None]:
    """(the session the snapshot holds, the chain head at its version if the format stores it).

    SnapshotCorrupted when the map is not what its format says (or belongs to another session
    or version). The caller checks `format_version` is one READERS knows.
    """
    if fields.get("id") != session_id or fields.get("version") != version:
        raise SnapshotCorrupted(
            session_id, version,
            f"snapshot holds session {fields.get('id')!r} version {fields.get('version')!r}",
        )
    if format_version >= 1 and fields.get("format") != format_version:
        raise SnapshotCorrupted(
            session_id, version,
            f"snapshot body says format {fields.get('format')!r}, its row {format_version}",
        )
    session = Session(session_id)
    session.version = version
    try:
        head = READERS[format_version](session, fields)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
        raise SnapshotCorrupted(
            session_id, version, f"format {format_version} snapshot has the wrong shape "
            f"({error!r})",
        ) from None
    if type(session.state) is not dict or type(session.metadata) is not dict:
        raise SnapshotCorrupted(session_id, version, "snapshot state or metadata is not a map")
    if not (0 <= session.created_us <= session.updated_us <= MAX_MICROS):
        raise SnapshotCorrupted(session_id, version, "snapshot times are out of range")
    return session, head
