"""SessionEngine: the facade users embed.

A command travels: working set or store -> the aggregate decides (nothing written if it raises)
-> the codec encodes and chains the events -> one transaction appends them (unique
(session, version) for optimistic concurrency, the idempotency key if given) -> commit -> the
events are applied to the working-set copy.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

from sessionledger.domain.errors import (
    CheckpointNotFound,
    ConcurrencyConflict,
    InvalidSessionId,
    InvalidTransition,
    SessionNotFound,
)
from sessionledger.domain.events import (
    CHECKPOINT_TAKEN,
    EVENT_SCHEMAS,
    SESSION_SAVED,
    SessionEvent,
)
from sessionledger.domain.session import PendingEvent, Session
from sessionledger.domain.values import checked_optional_text
from sessionledger.infrastructure.codec import GENESIS_DIGEST, EventCodec, EventRow
from sessionledger.infrastructure.store import (
    EventStore,
    IdempotencyKeyUsed,
    SnapshotRow,
    VersionConflict,
    safe_url,
)
from sessionledger.projections.replay import session_events

from .config import SessionConfig
from .repository import SessionRepository

Decision = Callable[[Session], list[PendingEvent]]

_CREATE_SCOPE = "create"

#: events after which a snapshot is always written (whatever snapshot_every says)
_SNAPSHOT_ON = frozenset({SESSION_SAVED, CHECKPOINT_TAKEN})

#: errors a decision taken on a working-set copy may owe to that copy being stale (another
#: engine moved the session on): the command re-reads the store and decides again once
_STALE_DECISION_ERRORS = (InvalidTransition, CheckpointNotFound, ConcurrencyConflict)


def parse_session_id(value: object) -> str:
    """The canonical string form of a session id, or InvalidSessionId."""
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, str):
        try:
            return str(UUID(value))
        except ValueError:
            pass
    raise InvalidSessionId(value)


def _now_us() -> int:
    return time.time_ns() // 1000


class SessionEngine:
    """Keeps sessions as event-sourced aggregates in SQLite (default) or PostgreSQL.

    `url` is a SQLAlchemy URL: ``sqlite:///file.db``, ``sqlite://`` (in memory) or
    ``postgresql+psycopg://user@host/db``; a bare path means a SQLite file. Without one,
    ``$SESSIONLEDGER_URL`` is used, else ``./sessionledger.db``. Tables are created on first use.

    Every command returns the session's new version and commits atomically. Use the engine as a
    context manager, or call close(). One engine may be shared by threads.
    """

    def __init__(self, url: str | None = None, config: SessionConfig | None = None) -> None:
        self.config = config if config is not None else SessionConfig()
        self._store = EventStore(url, self.config.durability)
        self._codec = EventCodec(self.config.compress_threshold, self.config.max_event_bytes,
                                 self.config.chain_key())
        self._repository = SessionRepository(
            self._store, self._codec, strict_snapshots=self.config.strict_snapshots
        )
        self._lock = threading.RLock()
        # the working set: session id -> (session, digest of its last event), LRU order
        self._working_set: OrderedDict[str, tuple[Session, bytes]] = OrderedDict()

    # -- lifetime ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return safe_url(self._store.url)

    @property
    def dialect(self) -> str:
        """"sqlite" or "postgresql"."""
        return self._store.dialect

    def close(self) -> None:
        """Release the database connection. The engine cannot be used afterwards."""
        with self._lock:
            self._working_set.clear()
            self._store.close()

    def __enter__(self) -> SessionEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SessionEngine({self.url!r})"

    # -- commands ----------------------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
        parent: str | UUID | None = None,
        actor: str | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Start a session (status ACTIVE) and return its id.

        `state` is the initial state, part of the SessionStarted event. `parent` must be an
        existing session. Retried with an `idempotency_key` used before, it creates nothing and
        returns the first session's id.
        """
        actor, correlation_id, key = self._checked_meta(actor, correlation_id, idempotency_key)
        parent_id = None if parent is None else parse_session_id(parent)
        pending = Session.decide_start(name, tags, metadata, state, parent_id)
        with self._lock:
            if key is not None:
                used = self._store.idempotent_result(_CREATE_SCOPE, key)
                if used is not None:
                    return used[0]
            if parent_id is not None:
                self._loaded(parent_id)  # SessionNotFound for an unknown parent
            session = Session(str(uuid4()))
            now = _now_us()
            rows = self._encode(session, GENESIS_DIGEST, [pending], actor, correlation_id, now)
            idem = None if key is None else (_CREATE_SCOPE, key, session.id, 1)
            try:
                self._store.append(rows, idem)
            except IdempotencyKeyUsed as used_key:
                return used_key.session_id
            session.apply(pending[0], pending[1], 1, now)
            self._remember(session, rows[-1][7])
            return session.id

    def update(
        self,
        session_id: str | UUID,
        changes: dict[str, Any] | None = None,
        *,
        delete: list[str] | None = None,
        actor: str | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        expected_version: int | None = None,
    ) -> int:
        """Change state: set the keys of `changes`, remove the keys in `delete`.

        Writes StateChanged with only what really changes; a delta that changes nothing writes
        nothing and returns the current version. ACTIVE sessions only.
        """
        return self._command(
            session_id, lambda s: s.decide_update(changes, delete),
            actor, correlation_id, idempotency_key, expected_version,
        )

    def record(
        self,
        session_id: str | UUID,
        kind: str,
        payload: Any = None,
        *,
        actor: str | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        expected_version: int | None = None,
    ) -> int:
        """Append an application event (EventRecorded) of `kind` with `payload`. ACTIVE only."""
        return self._command(
            session_id, lambda s: s.decide_record(kind, payload),
            actor, correlation_id, idempotency_key, expected_version,
        )

    def checkpoint(
        self,
        session_id: str | UUID,
        label: str,
        *,
        actor: str | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        expected_version: int | None = None,
    ) -> int:
        """Mark the current state under `label` (unique per session) for restore(). ACTIVE only."""
        return self._command(
            session_id, lambda s: s.decide_checkpoint(label),
            actor, correlation_id, idempotency_key, expected_version,
        )

    def save(
        self,
        session_id: str | UUID,
        *,
        actor: str | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        expected_version: int | None = None,
    ) -> int:
        """Append SessionSaved: a save point restore() returns to by default.

        ACTIVE or SUSPENDED sessions.
        """
        return self._command(
            session_id, lambda s: s.decide_save(),
            actor, correlation_id, idempotency_key, expected_version,
        )

    def restore(
        self,
        session_id: str | UUID,
        *,
        checkpoint: str | None = None,
        version: int | None = None,
        actor: str | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        expected_version: int | None = None,
    ) -> int:
        """Put the state back to a checkpoint, a version, or (neither given) the last save.

        Appends SessionRestored carrying the restored state: history keeps everything.
        CheckpointNotFound when the target does not exist. ACTIVE sessions only.
        """

        def decide(session: Session) -> list[PendingEvent]:
            target = session.restore_target(checkpoint, version)
            restored = self._repository.load(session.id, target)[0].state
            return session.decide_restore(target, restored, checkpoint)

        return self._command(
            session_id, decide, actor, correlation_id, idempotency_key, expected_version
        )

    def suspend(
        self,
        session_id: str | UUID,
        *,
        reason: str | None = None,
        actor: str | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        expected_version: int | None = None,
    ) -> int:
        """ACTIVE -> SUSPENDED."""
        return self._command(
            session_id, lambda s: s.decide_suspend(reason),
            actor, correlation_id, idempotency_key, expected_version,
        )

    def resume(
        self,
        session_id: str | UUID,
        *,
        actor: str | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        expected_version: int | None = None,
    ) -> int:
        """SUSPENDED -> ACTIVE."""
        return self._command(
            session_id, lambda s: s.decide_resume(),
            actor, correlation_id, idempotency_key, expected_version,
        )

    def end(
        self,
        session_id: str | UUID,
        outcome: str = "completed",
        *,
        actor: str | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        expected_version: int | None = None,
    ) -> int:
        """End an ACTIVE or SUSPENDED session: outcome "completed", "failed" or "cancelled"."""
        return self._command(
            session_id, lambda s: s.decide_end(outcome),
            actor, correlation_id, idempotency_key, expected_version,
        )

    def archive(
        self,
        session_id: str | UUID,
        *,
        actor: str | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
        expected_version: int | None = None,
    ) -> int:
        """Archive an ended session (COMPLETED, FAILED or CANCELLED -> ARCHIVED)."""
        return self._command(
            session_id, lambda s: s.decide_archive(),
            actor, correlation_id, idempotency_key, expected_version,
        )

    # -- reads -------------------------------------------------------------------------------

    def get(self, session_id: str | UUID, *, refresh: bool = False) -> Session:
        """The session as of its latest version (a copy: changing it changes nothing stored).

        Served from the working set when loaded there; `refresh=True` reads the store, to see
        what other engines committed since.
        """
        sid = parse_session_id(session_id)
        with self._lock:
            if refresh:
                self._working_set.pop(sid, None)
            return self._loaded(sid)[0].copy()

    def history(self, session_id: str | UUID) -> list[SessionEvent]:
        """Every event of the session, in version order."""
        sid = parse_session_id(session_id)
        stored = self._store.stream(sid)
        if not stored:
            raise SessionNotFound(sid)
        return session_events(sid, self._codec.decode(sid, stored))

    def list_sessions(self, limit: int = 100) -> list[Session]:
        """The most recently created sessions, newest first, at their latest version."""
        ids = [row[0] for row in self._store.started_sessions()[: max(0, limit)]]
        return [self.get(sid) for sid in ids]

    # -- snapshots ---------------------------------------------------------------------------

    def rebuild_snapshots(self) -> int:
        """Rewrite every session's snapshots in the current format, from its events alone.

        Each session gets a current-format snapshot at its latest version and at every version
        that had a snapshot (of any format, readable or not). One transaction per session.
        Returns the number of snapshots written.
        """
        written = 0
        for sid in self._store.session_ids():
            with self._lock:
                rows = self._repository.rebuild_snapshots(sid, _now_us())
                self._store.put_snapshots(rows)
            written += len(rows)
        return written

    # -- observability -----------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """The engine's counters as a plain dict.

        snapshots_skipped: snapshots that could not be used and were read past, by reason
        ("newer_format", "corrupted").
        """
        return {"snapshots_skipped": dict(self._repository.skipped)}

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    def _checked_meta(
        actor: object, correlation_id: object, idempotency_key: object
    ) -> tuple[str | None, str | None, str | None]:
        return (
            checked_optional_text(actor, "actor"),
            checked_optional_text(correlation_id, "correlation_id"),
            checked_optional_text(idempotency_key, "idempotency_key"),
        )

    def _command(
        self,
        session_id: str | UUID,
        decide: Decision,
        actor: str | None,
        correlation_id: str | None,
        idempotency_key: str | None,
        expected_version: int | None,
    ) -> int:
        sid = parse_session_id(session_id)
        actor, correlation_id, key = self._checked_meta(actor, correlation_id, idempotency_key)
        with self._lock:
            if key is not None:
                used = self._store.idempotent_result(sid, key)
                if used is not None:
                    return used[1]
            attempt = 0
            while True:
                session, head, cached = self._loaded(sid)
                try:
                    if expected_version is not None and session.version != expected_version:
                        raise ConcurrencyConflict(
                            sid, expected_version, f"it is at version {session.version}"
                        )
                    pending = decide(session)
                    stored_version = self._store.latest_version if cached and not pending else None
                    if stored_version is not None and stored_version(sid) != session.version:
                        # "nothing to change" was decided on a stale copy: decide again
                        raise ConcurrencyConflict(sid, session.version, "stale working set")
                except _STALE_DECISION_ERRORS:
                    if not cached:
                        raise
                    self._working_set.pop(sid, None)
                    continue
                if not pending and key is None:
                    return session.version
                # never let a session's clock run backwards, whatever the writers' clocks say
                now = max(_now_us(), session.updated_us)
                rows = self._encode(session, head, pending, actor, correlation_id, now)
                last_version = rows[-1][1] if rows else session.version
                idem = None if key is None else (sid, key, sid, last_version)
                try:
                    # applied before the commit so a due snapshot holds the new state; on any
                    # failure below the session leaves the working set, so a half-applied copy
                    # is never served
                    snapshots = self._apply_committing(session, pending, rows, now)
                    self._store.append(rows, idem, snapshots)
                except VersionConflict:
                    # another engine wrote this session meanwhile: re-read it and decide again
                    self._working_set.pop(sid, None)
                    if expected_version is not None or attempt >= self.config.retries:
                        raise ConcurrencyConflict(
                            sid, last_version - len(rows),
                            "another writer committed that version first",
                        ) from None
                    attempt += 1
                    continue
                except IdempotencyKeyUsed as used_key:
                    self._working_set.pop(sid, None)
                    return used_key.version
                except BaseException:
                    # a lost connection may leave the commit's fate unknown: re-read next time
                    self._working_set.pop(sid, None)
                    raise
                if rows:
                    self._remember(session, rows[-1][7])
                return last_version

    def _apply_committing(
        self, session: Session, pending: list[PendingEvent], rows: list[EventRow], now: int
    ) -> list[SnapshotRow]:
        """Apply `pending` (stored as `rows`) to `session`; the snapshot rows now due."""
        if not rows:
            return []
        before = session.version
        for (event_type, data), row in zip(pending, rows, strict=True):
            session.apply(event_type, data, row[1], now)
        every = self.config.snapshot_every
        due = (every and before // every != session.version // every) or any(
            event_type in _SNAPSHOT_ON for event_type, _ in pending
        )
        if not due:
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

    def _loaded(self, sid: str) -> tuple[Session, bytes, bool]:
        """(session at its latest version, its chain head, whether it came from the working
        set rather than the store)."""
        entry = self._working_set.get(sid)
        if entry is not None:
            self._working_set.move_to_end(sid)
            return entry[0], entry[1], True
        session, head = self._repository.load(sid)
        self._remember(session, head)
        return session, head, False

    def _remember(self, session: Session, head: bytes) -> None:
        capacity = self.config.max_active_sessions
        if capacity == 0:
            return
        working_set = self._working_set
        working_set[session.id] = (session, head)
        working_set.move_to_end(session.id)
        while len(working_set) > capacity:
            working_set.popitem(last=False)
