"""SessionEngine: the facade users embed.

It validates arguments and hands commands to the write path (writer.py: working set, decide,
encode, append, hooks), reads to the repository and the audit queries, and wires the catalog,
durable subscribers, retention and verify together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from datetime import date, datetime
from typing import Any, Literal, overload
from uuid import UUID

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from sessionledger.domain.errors import (
    InvalidArgument,
    SessionNotFound,
    SessionPurged,
    StorageError,
)
from sessionledger.domain.events import (
    SessionEvent,
)
from sessionledger.domain.session import PendingEvent, Session
from sessionledger.domain.status import ENDED, SessionStatus
from sessionledger.domain.values import checked_flag, parse_session_id
from sessionledger.infrastructure.catalog_store import CatalogStore
from sessionledger.infrastructure.codec import EventCodec
from sessionledger.infrastructure.store import (
    EventStore,
    SessionGone,
    safe_url,
)
from sessionledger.infrastructure.subscriptions import SubscriptionStore, Waker
from sessionledger.projections.audit import BlameEntry, StateDiff
from sessionledger.projections.catalog import CATALOG_VERSION
from sessionledger.projections.hooks import HookRegistry, LoggingHook
from sessionledger.projections.metrics import MetricsHook

from .audit import AuditQueries
from .catalog import CATALOG as CATALOG_NAME
from .catalog import REBUILD_TRACKING as REBUILD_NAME
from .catalog import Catalog, Page, ProjectionOutdated
from .catalog import Progress as RebuildProgress
from .config import SessionConfig
from .parallel_verify import MAX_WORKERS, spawn_reruns_main, start_method, verify_in_processes
from .repository import SKIP_REASONS, SessionRepository
from .retention import CleanupReport, RetentionPolicy, last_ended
from .session_names import SessionNames
from .subscribers import (
    DEFAULT_BATCH,
    MAX_BATCH,
    Consumer,
    HandlerSubscriber,
    SubscriberFailed,
    SubscriberRunner,
    SubscriberStatus,
    SubscriberThread,
    checked_subscription,
)
from .verify import Verifier, VerifyReport
from .writer import Decision, SessionWriter, checked_meta, now_us

#: a log longer than this is verified by several processes by default
_PARALLEL_VERIFY_FROM = 200_000
#: the engines open in this process, for the fork handler (the end of this module)
_open_engines: weakref.WeakSet[SessionEngine] = weakref.WeakSet()
#: in a forked process, the runners its engines had from the parent (see _after_fork_in_child)
_inherited_runners: list[Any] = []


#: restore_recent() brings back at most this many sessions per call
RESTORE_RECENT_LIMIT = 10_000


def _warn_unclosed(url: str) -> None:
    warnings.warn(f"SessionEngine({url}) was dropped without close(): use it in a with block "
                  "or call close()", ResourceWarning, stacklevel=1)


class _EngineCollector(Collector):
    """The engine's own counters for Prometheus (next to the MetricsHook's)."""

    def __init__(self, engine: SessionEngine) -> None:
        # the counts, not the engine: the engine holds the registry that holds this, and that
        # cycle kept an engine dropped without close() (and its connections) until the
        # garbage collector's next full pass
        self._skipped = engine._repository.skipped

    def collect(self) -> Iterator[CounterMetricFamily]:
        skipped = CounterMetricFamily(
            "sessionledger_snapshots_skipped",
            "Snapshots this engine could not use and loaded past, by reason.",
            labels=["reason"])
        counted = self._skipped
        # every reason, from 0: a series born at its first count hides it from rate()
        for reason in sorted(set(SKIP_REASONS) | set(counted)):
            skipped.add_metric([reason], counted.get(reason, 0))
        yield skipped


class SessionEngine:
    """Keeps sessions as event-sourced aggregates in SQLite (default) or PostgreSQL.

    `url` is a SQLAlchemy URL: ``sqlite:///file.db``, ``sqlite://`` (in memory) or
    ``postgresql+psycopg://user@host/db``; a bare path means a SQLite file. Without one,
    ``$SESSIONLEDGER_URL`` is used, else ``./sessionledger.db``. Tables are created on first use.

    Every command returns the session's new version and commits atomically. Use the engine as a
    context manager, or call close(). One engine may be shared by threads.
    """

    def __init__(self, url: str | None = None, config: SessionConfig | None = None) -> None:
        if config is not None and not isinstance(config, SessionConfig):
            raise InvalidArgument(
                f"config must be a SessionConfig, got {type(config).__name__}"
            )
        self.config = config if config is not None else SessionConfig()
        self._store = EventStore(url, self.config.durability)
        self._codec = EventCodec(self.config.compress_threshold, self.config.max_event_bytes,
                                 self.config.chain_key())
        self._repository = SessionRepository(
            self._store, self._codec, strict_snapshots=self.config.strict_snapshots
        )
        #: the audit replay queries (state_at, diff, history filters, timeline, blame)
        self.audit = AuditQueries(self._store, self._repository, self._codec)
        #: in-process hooks: subscribe(handler, events=None, sessions=None)
        self.hooks = HookRegistry(on_error=self.config.hook_errors)
        self._writer = SessionWriter(self.config, self._store, self._codec, self._repository,
                                     self.hooks)
        self._lock = self._writer.lock
        self._metrics_hook: MetricsHook | None = None
        if self.config.lifecycle_hooks:
            self._install_lifecycle_hooks()
        self._subscriptions = SubscriptionStore(self._store, self._writer.lock)
        self._runner = SubscriberRunner(self._subscriptions)
        self._catalog = Catalog(self._subscriptions, CatalogStore(self._store),
                                self._codec.payloads, self._runner)
        self._durable: dict[str, HandlerSubscriber] = {}
        #: background runners run_subscribers() started: close() stops them
        self._runners: list[SubscriberThread] = []
        # the runners list, and whether close() began: a runner started while close() ran was
        # left running against the closed engine, for good
        self._runners_lock = threading.Lock()
        self._closing = False
        #: the runner one of whose handlers called close(): it closes the store as it ends
        self._closed_by: SubscriberThread | None = None
        #: threads waiting for parallel verifies' workers to exit (joined by close())
        self._verify_closers: list[threading.Thread] = []
        #: .depth: run_subscribers(until_idle=True) calls under way on this thread
        self._delivering = threading.local()
        #: close() was called by a handler under run_subscribers(until_idle=True): the store
        #: closes as that call returns
        self._close_when_delivered = False
        self._catalog_outdated = False
        try:
            if self._catalog.outdated():
                # a newer release's catalog is never rebuilt back unasked (during a rolling
                # upgrade old and new engines would take turns for as long as both run)
                if self.config.auto_rebuild and not self._catalog.built_by_newer():
                    self._catalog.rebuild()
                else:
                    self._catalog_outdated = True
        except BaseException:
            self._store.close()
            raise
        _open_engines.add(self)
        # as an unclosed file does: a ResourceWarning when the engine is dropped open (its
        # connections are released with it); none at the interpreter's exit
        self._unclosed = weakref.finalize(self, _warn_unclosed, self.url)
        self._unclosed.atexit = False

    def _after_fork_in_child(self) -> None:
        """In a forked process (the store connects anew by itself): fresh locks, and no
        runner (its thread did not come along; its objects are kept, unused, since
        finalizing a runner's listening connection would end the parent's)."""
        self._runners_lock._at_fork_reinit()  # type: ignore[attr-defined]
        self.hooks.after_fork_in_child()
        self._subscriptions.after_fork_in_child()
        _inherited_runners.append(self._runners)
        self._runners = []
        self._verify_closers = []
        self._writer.after_fork_in_child()

    def _install_lifecycle_hooks(self) -> None:
        metrics = MetricsHook()
        self.hooks.latency_observer = metrics.observe_latency
        self.hooks.error_observer = metrics.observe_error
        self.hooks.release_observer = metrics.forget_hook
        metrics.hook_subscribed = self.hooks.has_hook_named
        metrics.hook_names = self.hooks.hook_names
        self.hooks.subscribe(LoggingHook(), name="LoggingHook")
        self.hooks.subscribe(metrics, name="MetricsHook")
        metrics.registry.register(_EngineCollector(self))
        self._metrics_hook = metrics

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
        """Stop the background subscriber runners this engine started (waiting up to 10 s for
        each: a runner whose handler still runs then is left to end its batch, with a logged
        warning) and release the database connection. The engine cannot be used afterwards.
        Called by a durable handler (on a background runner, or under
        ``run_subscribers(until_idle=True)``), it returns at once, and the engine closes when
        that handler's batch has committed."""
        # A durable handler on a background runner closing the engine: that runner cannot
        # wait for itself; it stops, and closes the store, once its batch has committed (the
        # store closed under it, its position would not move, and the handler would see the
        # same event again, its close() too, at every start). A close() from another thread
        # meanwhile waits for that runner, as for the others, before it closes the store.
        self._unclosed.detach()
        with self._runners_lock:
            self._closing = True
            runners, self._runners = self._runners, []
            if self._closed_by is None:
                self._closed_by = next((r for r in runners if r.on_its_thread), None)
            closed_by = self._closed_by
        own = closed_by if closed_by is not None and closed_by.on_its_thread else None
        if closed_by is not None and own is None and closed_by not in runners:
            runners.append(closed_by)
        try:
            if own is None:
                self._stop_runners(runners)
        finally:  # (interrupted while it waited: closed all the same)
            if own is not None:
                # the other runners may wait for this batch (its tracking row, the command
                # lock): asked to stop now, waited for once it has committed (waiting here
                # stalled this handler for their 10 s timeout)
                for runner in runners:
                    runner.request_stop()
                own.after_stop = lambda: self._stop_runners_and_close(runners)
            elif getattr(self._delivering, "depth", 0):
                # a durable handler under run_subscribers(until_idle=True) on this thread: as
                # for a runner's, the store closes once that batch has committed
                self._close_when_delivered = True
            else:
                self._close_store()

    def _stop_runners(self, runners: list[SubscriberThread]) -> None:
        # outside the engine's lock: a runner takes it to list its subscribers
        for runner in runners:
            if runner.running:  # (one its owner stopped may still end its batch: wait too)
                runner.stop()
        # the worker processes of parallel verifies exit now: wait here, where a Ctrl-C is the
        # caller's to handle, not in the interpreter's exit ("Exception ignored")
        for closer in self._verify_closers:
            closer.join()
        self._verify_closers.clear()

    def _stop_runners_and_close(self, runners: list[SubscriberThread]) -> None:
        try:
            self._stop_runners(runners)
        finally:
            self._close_store()

    def _close_store(self) -> None:
        with self._lock:
            self._writer.clear()
            self._store.close()
        _open_engines.discard(self)

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
        actor, correlation_id, key = checked_meta(actor, correlation_id, idempotency_key)
        parent_id = None if parent is None else parse_session_id(parent)
        pending = Session.decide_start(name, tags, metadata, state, parent_id)
        return self._writer.create(pending, parent_id, key, actor, correlation_id)

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
            if checked_flag(refresh, "refresh"):
                self._writer.forget(sid)
            session, _, cached = self._writer.loaded(sid)
            if not cached and self.config.max_active_sessions == 0:
                # read from the store and kept nowhere (no working set): already the caller's
                # own, so no copy (a deep copy of state is a fifth of a cold 10-event load)
                return session
            return session.copy()

    def history(
        self,
        session_id: str | UUID,
        since: datetime | date | str | None = None,
        until: datetime | date | str | None = None,
        types: list[str] | str | None = None,
        actor: str | None = None,
    ) -> list[SessionEvent]:
        """The session's events in version order, optionally only those with since <= time <
        until, of `types`, by `actor`. The whole stream is read and chain-checked first, so a
        filter never serves an event that fails the check."""
        with self._tombstones_named():
            return self.audit.history(session_id, since, until, types, actor)

    def state_at(
        self, session_id: str | UUID, version: int | None = None,
        at: datetime | date | str | None = None,
    ) -> Session:
        """The session as it was at `version`, or at time `at` (its last version then): the
        nearest snapshot at or below plus the events after it, exactly what replaying events
        1..N gives. Give one of the two (a naive datetime means UTC)."""
        with self._tombstones_named():
            return self.audit.state_at(session_id, version, at)

    def diff(self, session_id: str | UUID, a: int, b: int) -> StateDiff:
        """State keys added, changed and removed from version `a` to `b`, each with the events
        (version, time, actor, type) that touched it between them."""
        with self._tombstones_named():
            return self.audit.diff(session_id, a, b)

    def blame(self, session_id: str | UUID, key: str) -> list[BlameEntry]:
        """Every change to one state key: version, time, actor, value (or its deletion)."""
        with self._tombstones_named():
            return self.audit.blame(session_id, key)

    @contextlib.contextmanager
    def _tombstones_named(self) -> Iterator[None]:
        """SessionNotFound raised inside becomes SessionPurged for a purged session (naming
        its tombstone), as get() raises it."""
        try:
            yield
        except SessionNotFound as missing:
            raise self._writer.not_found(missing.session_id) from None

    def timeline(
        self,
        since: datetime | date | str | None = None,
        until: datetime | date | str | None = None,
        types: list[str] | str | None = None,
    ) -> Iterator[SessionEvent]:
        """Events of every session in global commit order, streamed (constant memory),
        optionally only those with since <= time < until, of `types`; each carries its
        position. Payloads are decoded but chains are not checked here: verify() does that."""
        return self.audit.timeline(since, until, types)

    def list_sessions(self, limit: int = 100) -> list[Session]:
        """The most recently created sessions, newest first, at their latest version (a
        session purged by another engine while this reads them is left out)."""
        if type(limit) is not int or limit < 0:
            raise InvalidArgument(f"limit must be an int >= 0, got {limit!r}")
        sessions = []
        # (a LIMIT the databases take: no store holds 2**62 sessions)
        for sid in self._store.newest_session_ids(min(limit, 2**62)):
            try:
                sessions.append(self.get(sid))
            except SessionPurged:
                continue
        return sessions

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
                try:
                    rows = self._repository.rebuild_snapshots(sid, now_us())
                    self._store.put_snapshots(rows)
                except SessionGone:
                    continue  # purged by another engine meanwhile: nothing to snapshot
            written += len(rows)
        return written

    # -- durable subscribers -----------------------------------------------------------------

    def subscribe(
        self,
        name: str,
        handler: Callable[..., Any],
        events: list[str] | None = None,
        *,
        transactional: bool = False,
    ) -> None:
        """Register a durable subscriber: `handler` receives every committed event after the
        position tracked under `name`, in global commit order, when run_subscribers() runs.

        transactional=False: ``handler(event)``, at least once (deduplicate on
        ``event.position``). transactional=True: ``handler(event, connection)`` inside the
        transaction that moves the position; what it writes through that SQLAlchemy connection
        commits with it: exactly once. `events` filters by type.
        """
        text, types = checked_subscription(name, handler, events)
        if text in (CATALOG_NAME, REBUILD_NAME):
            raise InvalidArgument(f"subscriber name {text!r} is reserved")
        checked_flag(transactional, "transactional")
        with self._lock:
            self._durable[text] = HandlerSubscriber(
                text, handler, types, transactional, self._codec.payloads,
                SessionNames(self.audit.names_for_subscribers),
            )

    def unsubscribe(self, name: str) -> None:
        """Stop running the durable subscriber `name` here (its position stays tracked)."""
        if not isinstance(name, str):
            raise InvalidArgument(f"subscriber name must be a str, got {type(name).__name__}")
        with self._lock:
            self._durable.pop(name, None)

    @overload
    def run_subscribers(self, until_idle: Literal[True], *,
                        batch_size: int = ...) -> dict[str, int]: ...
    @overload
    def run_subscribers(self, until_idle: Literal[False] = ..., *,
                        batch_size: int = ...) -> SubscriberThread: ...
    @overload
    def run_subscribers(self, until_idle: bool = ..., *,
                        batch_size: int = ...) -> dict[str, int] | SubscriberThread: ...

    def run_subscribers(
        self, until_idle: bool = False, *, batch_size: int = DEFAULT_BATCH
    ) -> dict[str, int] | SubscriberThread:
        """Deliver pending events to the durable subscribers (and the catalog).

        until_idle=True: deliver everything pending and return {name: events delivered}; a
        failing handler raises SubscriberFailed (the first failure, once every other subscriber
        has caught up). Otherwise start a background thread that keeps
        delivering (woken by LISTEN/NOTIFY on PostgreSQL, a 50 ms poll on SQLite) and return
        its handle: ``handle.stop()``. `batch_size`: events read per batch, 1..1,000,000.
        """
        if type(batch_size) is not int or not 1 <= batch_size <= MAX_BATCH:
            raise InvalidArgument(
                f"batch_size must be an int in 1..{MAX_BATCH:,}, got {batch_size!r}")
        runner = SubscriberRunner(self._subscriptions, batch_size)
        if checked_flag(until_idle, "until_idle"):
            self._store.check_open()
            delivering = self._delivering
            delivering.depth = getattr(delivering, "depth", 0) + 1
            try:
                delivered = {}
                failed: SubscriberFailed | None = None
                for consumer in self._consumers():
                    if self._close_when_delivered:
                        break
                    try:
                        delivered[consumer.name] = runner.catch_up(
                            consumer, stop=lambda: self._close_when_delivered)
                    except SubscriberFailed as failure:
                        # the others still catch up, as on a background runner (stopping here
                        # left every subscriber after a broken one without its events)
                        failed = failed or failure
                if failed is not None:
                    raise failed
                return delivered
            finally:
                delivering.depth -= 1
                if not delivering.depth and self._close_when_delivered:
                    self._close_store()
        with self._runners_lock:
            self._store.check_open()
            if self._closing:
                raise StorageError("the engine is closed")
            lock = self._store.commands_lock
            thread = SubscriberThread(runner, self._consumers, Waker(self._store),
                                      engine_lock_held_here=getattr(lock, "_is_owned",
                                                                    lambda: False))
            self._runners = [r for r in self._runners if r.running] + [thread]
        return thread

    def _consumers(self) -> list[Consumer]:
        with self._lock:
            users: list[Consumer] = list(self._durable.values())
        return [self._catalog.consumer, *users]

    def subscribers(self) -> list[SubscriberStatus]:
        """Every tracked or registered durable subscriber with its position and lag."""
        positions = self._subscriptions.positions()
        with self._lock:
            registered = set(self._durable) | {CATALOG_NAME}
        # lag counts the events still to deliver: positions have holes (purges, and sequence
        # numbers of rolled-back inserts on PostgreSQL), so head - position would not
        return [
            SubscriberStatus(name, positions.get(name, 0),
                             self._subscriptions.pending(positions.get(name, 0)),
                             name in registered)
            for name in sorted(set(positions) | registered)
        ]

    # -- the catalog ---------------------------------------------------------------------------

    def find(
        self,
        status: SessionStatus | str | list[SessionStatus | str] | None = None,
        tags: list[str] | None = None,
        name: str | None = None,
        parent: str | UUID | None = None,
        updated_after: datetime | date | str | None = None,
        updated_before: datetime | date | str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """Sessions from the catalog matching every filter, most recently updated first.

        `status` one or several statuses; `tags` sessions carrying all of them; `name` exact;
        `parent` the children of a session; `updated_after` / `updated_before` datetimes or
        ISO 8601 strings. Keyset pagination: pass the page's `next_cursor` to get the next.
        The catalog is brought up to date first (read your own writes).
        """
        if self._catalog_outdated:
            if self._catalog.built_by_newer():
                raise ProjectionOutdated(
                    "the catalog was built by a newer release of sessionledger (projection "
                    f"version {self._catalog.stored_version()}; this release builds "
                    f"{CATALOG_VERSION}): upgrade, or run engine.rebuild('catalog') to rebuild "
                    "it with this release's projection")
            raise ProjectionOutdated(
                "the catalog was built by another version of its projection and "
                "auto_rebuild is off: run engine.rebuild('catalog') "
                "(or `sessionledger rebuild catalog`)"
            )
        parent_id = None if parent is None else parse_session_id(parent)
        return self._catalog.find(status, tags, name, parent_id, updated_after,
                                  updated_before, limit, cursor, catch_up=True)

    def rebuild(self, projection: str, progress: RebuildProgress | None = None) -> int:
        """Rebuild a read model from the whole log and swap it in; return the events folded.

        Only "catalog" exists. Queries answer from the old tables until the swap; an
        interrupted rebuild resumes from its tracked position. `progress(done_position,
        head_position, events_per_second)` is called after each batch.
        """
        if projection != CATALOG_NAME:
            raise InvalidArgument(f"unknown projection {projection!r}: expected 'catalog'")
        if progress is not None and not callable(progress):
            raise InvalidArgument(f"progress must be a callable or None, got {progress!r}")
        folded = self._catalog.rebuild(progress)
        self._catalog_outdated = False
        return folded

    # -- batch operations ----------------------------------------------------------------------

    def save_all_active(self, *, actor: str | None = None,
                        correlation_id: str | None = None) -> dict[str, int]:
        """Save every ACTIVE session in one transaction: a SessionSaved event and a snapshot
        each, all written or none. Returns {session id: its new version}."""
        actor, correlation_id, _ = checked_meta(actor, correlation_id, None)
        with self._lock:
            self._catalog.catch_up()
            ids = self._catalog_ids([SessionStatus.ACTIVE.value])
            return self._writer.batch(ids, Session.decide_save_active, actor, correlation_id)

    def restore_recent(self, count: int, *, actor: str | None = None,
                       correlation_id: str | None = None) -> list[Session]:
        """Bring the `count` most recently updated ACTIVE or SUSPENDED sessions back into the
        working set (after a restart), append a SessionRestored marking the recovery to each
        (one transaction) and return them (copies), most recent first."""
        if type(count) is not int or not 0 <= count <= RESTORE_RECENT_LIMIT:
            raise InvalidArgument(
                f"count must be an int from 0 to {RESTORE_RECENT_LIMIT:,}, got {count!r}")
        actor, correlation_id, _ = checked_meta(actor, correlation_id, None)
        with self._lock:
            if count == 0:
                return []
            self._catalog.catch_up()
            page = self._catalog.find([SessionStatus.ACTIVE, SessionStatus.SUSPENDED], None,
                                      None, None, None, None, count, None)
            ids = [item.id for item in page]
            for sid in ids:  # a recovery reads the store, not what this engine held
                self._writer.forget(sid)
            recovered = self._writer.batch(ids, Session.decide_recover, actor, correlation_id)
            # those the batch recovered: one ended or purged by another engine since it was
            # listed is left out
            return [self._writer.loaded(sid)[0].copy() for sid in ids if sid in recovered]

    def cleanup(self, policy: RetentionPolicy) -> CleanupReport:
        """Apply a retention policy to ended sessions: archive them (SessionArchived) or purge
        them (events and snapshots deleted for good, a tombstone left). See RetentionPolicy."""
        if not isinstance(policy, RetentionPolicy):
            raise InvalidArgument("cleanup() takes a RetentionPolicy")
        with self._lock:
            self._catalog.catch_up()
            statuses = [s.value for s in ENDED]
            if policy.action == "purge":
                statuses.append(SessionStatus.ARCHIVED.value)
            cutoff = None
            age = policy.max_age_seconds
            if age is not None:
                now = now_us()
                # an age reaching back before 1970 (up to inf) leaves no session old enough
                cutoff = now - int(age * 1_000_000) if age * 1_000_000 < now else 0
            candidates = self._catalog.tables.find(statuses, None, None, None, None, cutoff,
                                                   1_000_000_000, None)
            # keep_last counts every ended session, old or not: the N that ended last stay
            keep = set()
            if policy.keep_last:
                # (without max_age the candidates are every ended session already)
                population = ({row[0] for row in candidates} if cutoff is None
                              else set(self._catalog_ids(statuses)))
                keep = last_ended(self._store, population, policy.keep_last)
            chosen = [row for row in candidates if row[0] not in keep]
            ids = [row[0] for row in chosen]
            if policy.dry_run:
                return CleanupReport(policy.action, ids, dry_run=True)
            if policy.action == "archive":
                archived = self._writer.batch(ids, Session.decide_archive, None, None)
                done = [sid for sid in ids if sid in archived]
            else:
                done = [row[0] for row in chosen if self._purge_if_due(row[0], cutoff)]
                if done:
                    # the purged pages were zeroed in the database; older copies of them stay
                    # in SQLite's WAL until a checkpoint empties it
                    self._store.checkpoint()
            # what this call did: another engine may have archived or purged some meanwhile
            return CleanupReport(policy.action, done, dry_run=False)

    def _catalog_ids(self, statuses: list[str]) -> list[str]:
        rows = self._catalog.tables.find(statuses, None, None, None, None, None,
                                         1_000_000_000, None)
        return [row[0] for row in rows]

    def _purge_if_due(self, sid: str, cutoff: int | None) -> bool:
        """Purge `sid` as the store has it now (the catalog listed it a moment ago): its final
        status for the tombstone, and still older than `cutoff` (an archive by another engine
        meanwhile made it recent). True when this call purged it."""
        for _ in range(1 + self.config.retries):
            self._writer.forget(sid)
            try:
                session = self._writer.loaded(sid)[0]
            except SessionNotFound:
                return False  # purged by another engine meanwhile
            if session.status not in ENDED and session.status is not SessionStatus.ARCHIVED:
                return False
            if cutoff is not None and session.updated_us >= cutoff:
                return False
            # at the version read: a session archived since then is not purged over (its
            # tombstone would say ENDED, its archive be gone); it is read and judged again
            if self._purge(sid, session.name, session.status.value, session.version):
                return True
            if self._store.tombstone(sid) is not None:
                return False  # another engine purged it first
        return False

    def _purge(self, sid: str, name: str, status: str, version: int | None = None) -> bool:
        self._writer.forget(sid)
        purged = self._store.purge(sid, name, status, now_us(),
                                   lambda conn: self._catalog.tables.delete(conn, sid), version)
        # gone (by this call or another engine's): metrics stop counting it; a session left
        # standing (its version moved on) keeps its place
        if self._metrics_hook is not None and (
            purged or self._store.tombstone(sid) is not None
        ):
            self._metrics_hook.forget_session(sid)
        return purged

    # -- tamper evidence ------------------------------------------------------------------------

    def verify(
        self, session_id: str | UUID | None = None, *, workers: int | None = None,
        sid: str | UUID | None = None,
    ) -> VerifyReport:
        """Check the hash chain, the events and the snapshots of every session (or one).

        Returns a VerifyReport: ``report.ok``, and ``report.problems`` naming session, version
        and what is wrong (the first broken link of each session). SessionNotFound (or
        SessionPurged) when `session_id` names no session; `sid=` is another name for
        `session_id` (the audit issue's), and passing both is an InvalidArgument. `workers` > 1
        checks the sessions in that many processes (this one included), which take pieces of
        the log (by session id) as they get free; by default a log of more than 200,000 events
        on a file or server database uses up to 4 (the CPUs there are). The workers are
        forked on Linux from a process that runs one thread, else spawned; a spawned worker
        imports the main module again, so from a script (not the CLI or ``python -m``) the
        default then stays one process: pass `workers` from a script whose entry point is
        guarded by ``if __name__ == "__main__":``.
        """
        if sid is not None:
            if session_id is not None:
                raise InvalidArgument("pass the session as session_id or as sid, not both")
            session_id = sid
        sid = None if session_id is None else parse_session_id(session_id)
        if workers is not None and (type(workers) is not int or not 1 <= workers <= MAX_WORKERS):
            raise InvalidArgument(f"workers must be an int from 1 to {MAX_WORKERS}, got "
                                  f"{workers!r}")
        shared = not self._store.single_connection
        chosen = workers is None
        if workers is None:
            workers = self._auto_verify_workers()
        method = "spawn"
        if sid is None and shared and workers > 1:
            # an earlier verify's closer thread (its workers are exiting) would make this
            # process look multi-threaded, and the workers would be spawned, not forked
            joined = bool(self._verify_closers)
            for closer in self._verify_closers:
                closer.join()
            method = start_method(just_joined=joined)
            if chosen and method == "spawn" and spawn_reruns_main():
                workers = 1
        verifier = Verifier(self._store, self._codec, self._repository)
        if sid is not None:
            report = verifier.run(sid)
            if report.sessions == 0 and report.ok:  # no events, no snapshots: no such session
                raise self._writer.not_found(sid)
            return report
        if workers == 1 or not shared:
            return verifier.run()
        url = self._store.url.render_as_string(hide_password=False)
        config = dataclasses.replace(self.config, lifecycle_hooks=False, auto_rebuild=False)
        self._verify_closers[:] = [t for t in self._verify_closers if t.is_alive()]
        return verify_in_processes(verifier, self._store, url, config, workers, method,
                                   self._verify_closers)

    def _auto_verify_workers(self) -> int:
        """How many processes verify() uses when not told: several for a big log on a file or
        server database (verify() then keeps to one where spawned workers would run the main
        module again)."""
        if self._store.single_connection:
            return 1
        if self._subscriptions.head() <= _PARALLEL_VERIFY_FROM:
            return 1
        return min(os.cpu_count() or 1, 4)

    # -- observability -------------------------------------------------------------------------

    @overload
    def metrics(self, format: Literal["dict"] = ...) -> dict[str, Any]: ...
    @overload
    def metrics(self, format: Literal["prometheus"]) -> str: ...
    @overload
    def metrics(self, format: str = ...) -> dict[str, Any] | str: ...

    def metrics(self, format: str = "dict") -> dict[str, Any] | str:
        """The engine's figures: a plain dict, or Prometheus text exposition
        (``format="prometheus"``).

        With the built-in MetricsHook (``lifecycle_hooks=True``): events_total by type,
        sessions by status, session_duration_seconds, hook_latency_seconds, hook_errors_total,
        as seen by this engine since it started; always: snapshots_skipped by reason.
        """
        if format not in ("dict", "prometheus"):
            raise InvalidArgument(f"format must be 'dict' or 'prometheus', got {format!r}")
        if format == "prometheus":
            if self._metrics_hook is None:
                registry = CollectorRegistry(auto_describe=False)
                registry.register(_EngineCollector(self))
                return generate_latest(registry).decode()
            return self._metrics_hook.prometheus()
        figures = self._metrics_hook.snapshot() if self._metrics_hook is not None else {}
        figures["snapshots_skipped"] = dict(self._repository.skipped)
        return figures

    # -- internals ---------------------------------------------------------------------------

    def _command(
        self, session_id: str | UUID, decide: Decision, actor: str | None,
        correlation_id: str | None, idempotency_key: str | None, expected_version: int | None,
    ) -> int:
        return self._writer.command(session_id, decide, actor, correlation_id,
                                    idempotency_key, expected_version)


def _engines_after_fork_in_child() -> None:
    for engine in list(_open_engines):
        try:
            engine._after_fork_in_child()
        except Exception as error:  # logged: an at-fork handler has nobody to raise to
            logging.getLogger("sessionledger").warning(
                "after a fork, the engine on %s could not reset its locks and state (it must "
                "not be used here): %r", engine.url, error)


os.register_at_fork(after_in_child=_engines_after_fork_in_child)
