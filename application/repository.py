"""Loading sessions from the store: the nearest snapshot, then the checked events after it.

Snapshots are a cache. A snapshot this release cannot use (a newer format, a digest that does not
match, bytes that do not decompress, a chain head that does not match the events) is skipped with
a warning and counted, and the session loads from its events, so nothing is lost; with
`SessionConfig(strict_snapshots=True)` it raises SnapshotVersionError or SnapshotCorrupted.
"""

from __future__ import annotations

import logging
from collections import Counter

from sessionledger.domain.errors import (
    SessionNotFound,
    SnapshotCorrupted,
    SnapshotVersionError,
)
from sessionledger.domain.session import Session
from sessionledger.infrastructure.codec import EventCodec, SnapshotCodec, StoredEvent
from sessionledger.infrastructure.store import EventStore, SnapshotRow, StoredSnapshot
from sessionledger.projections.replay import replay, replay_rows
from sessionledger.projections.snapshots import (
    CURRENT_FORMAT,
    lacks_outcome,
    session_from_snapshot,
    snapshot_fields,
)

log = logging.getLogger("sessionledger.snapshots")


#: why a snapshot is skipped (the metrics' snapshots_skipped reasons)
NEWER_FORMAT, CORRUPTED, INCOMPLETE = "newer_format", "corrupted", "incomplete"
SKIP_REASONS = (NEWER_FORMAT, CORRUPTED, INCOMPLETE)


class SessionRepository:
    """Reads sessions (snapshot + events) and builds the snapshot rows commands write."""

    def __init__(
        self, store: EventStore, codec: EventCodec, *, strict_snapshots: bool = False
    ) -> None:
        self.store = store
        self.codec = codec
        self.snapshots = SnapshotCodec(codec.chain_key)
        self.strict_snapshots = strict_snapshots
        #: snapshots skipped because they could not be used, by reason ("newer_format", ...)
        self.skipped: Counter[str] = Counter()

    # -- reading ---------------------------------------------------------------------------

    def load(self, sid: str, upto: int | None = None) -> tuple[Session, bytes]:
        """The session at its latest version (or at `upto`) with its chain head.

        SessionNotFound when it has no events (or fewer than `upto`).
        """
        stored_snapshot, stored = self.store.snapshot_and_stream(sid, upto)
        if stored_snapshot is not None:
            loaded = self._from_snapshot(sid, stored_snapshot, stored, upto)
            if loaded is not None:
                return loaded
            stored = self.store.stream(sid, 0, upto)  # past an unusable snapshot: every event
        return self._from_events(sid, stored, upto)

    def _from_events(
        self, sid: str, stored: list[StoredEvent], upto: int | None
    ) -> tuple[Session, bytes]:
        if not stored:
            raise SessionNotFound(sid)
        session = Session(sid)
        replay_rows(session, stored, *self.codec.checked_values(sid, stored))
        if upto is not None and session.version != upto:
            raise SessionNotFound(sid)
        return session, stored[-1][6]

    def _from_snapshot(
        self, sid: str, snapshot: StoredSnapshot, stored: list[StoredEvent], upto: int | None
    ) -> tuple[Session, bytes] | None:
        """Snapshot + the events after it (`stored`: from the snapshot's own version on), or
        None when the snapshot cannot be used."""
        version, format_version, flags, digest, data = snapshot
        fmt = 0 if format_version is None else format_version
        try:
            if type(fmt) is not int:  # SQLite keeps any type in any column
                raise SnapshotCorrupted(sid, version, f"snapshot format {fmt!r} is not a number")
            if fmt > CURRENT_FORMAT:
                raise SnapshotVersionError(sid, version, fmt, CURRENT_FORMAT)
            fields = self.snapshots.decode(flags, digest, data, sid, version)
            session, head = session_from_snapshot(fields, fmt, sid, version)
            if lacks_outcome(session):
                # sound, but a format 0 snapshot of an archived session holds no outcome (the
                # status no longer tells it): the events do
                self.skipped[INCOMPLETE] += 1
                log.info("snapshot without the outcome of an archived session, loading from "
                         "events", extra={"session_id": sid, "version": version,
                                          "reason": INCOMPLETE})
                return None
            # the events from the snapshot's own version on: that first one proves the snapshot
            # sits on this chain (its digest is the snapshot's head)
            if not stored and self.store.tombstone(sid) is not None:
                # purged between the two reads (SQLite reads the snapshot and the events
                # apart): the session is gone, the snapshot was sound
                raise SessionNotFound(sid)
            if not stored or stored[0][0] != version:
                raise SnapshotCorrupted(sid, version, "no event at the snapshot's version")
            if head is not None and stored[0][6] != head:
                raise SnapshotCorrupted(
                    sid, version, "snapshot does not match the chain of the events"
                )
        except (SnapshotVersionError, SnapshotCorrupted) as problem:
            if self.strict_snapshots:
                raise
            reason = NEWER_FORMAT if isinstance(problem, SnapshotVersionError) else CORRUPTED
            self.skipped[reason] += 1
            log.warning("snapshot skipped, loading from events: %s", problem,
                        extra={"session_id": sid, "version": version, "reason": reason})
            return None
        head = stored[0][6]
        if len(stored) > 1:
            following = stored[1:]
            replay_rows(session, following,
                        *self.codec.checked_values(sid, following, version, head))
            head = stored[-1][6]
        if upto is not None and session.version != upto:
            raise SessionNotFound(sid)
        return session, head

    # -- writing ---------------------------------------------------------------------------

    def rebuild_snapshots(self, sid: str, micros: int) -> list[SnapshotRow]:
        """Current-format snapshots of `sid` from its events alone: one at each version that
        has a snapshot now, and one at its latest version."""
        stored = self.store.stream(sid)
        if not stored:
            return []
        wanted = set(self.store.snapshot_versions(sid))
        wanted.add(stored[-1][0])
        session = Session(sid)
        decoded = self.codec.decode(sid, stored)
        rows: list[SnapshotRow] = []
        done = 0
        for version in sorted(v for v in wanted if v <= len(decoded)):
            replay(session, decoded[done:version])
            done = version
            rows.append(self.snapshot_row(session, stored[version - 1][6], micros))
        return rows

    def snapshot_row(self, session: Session, head: bytes, micros: int) -> SnapshotRow:
        """The stored row of a current-format snapshot of `session` (at its version)."""
        flags, digest, data = self.snapshots.encode(snapshot_fields(session, head))
        return (session.id, session.version, CURRENT_FORMAT, flags, digest, data, micros)

