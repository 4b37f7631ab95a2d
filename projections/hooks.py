"""In-process hooks: callables subscribed to the committed event stream of one engine.

The engine calls :meth:`HookRegistry.dispatch` with the events of each transaction after it
commits (never before, so a hook never sees an event that was rolled back), in version order per
session. Before it builds any event object it reads :attr:`HookRegistry.active`, so an engine
with no hooks pays nothing. Replays (state_at, rebuilds, snapshots) never reach a registry.

A hook is any callable taking one :class:`~sessionledger.domain.events.SessionEvent`. A hook
that raises never stops the other hooks or the other events of the batch: with
``on_error="isolate"`` the failure is logged (hook name, session, version, type, traceback) and
counted; with ``on_error="raise"`` every hook still gets every event and then :class:`HookFailed`
carries all the failures to the caller. The data is committed either way.

This module is pure: it depends on the domain package and the standard library only.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from uuid import UUID

from sessionledger.domain.errors import InvalidArgument, SessionLedgerError
from sessionledger.domain.events import SessionEvent, checked_event_types
from sessionledger.domain.values import checked_text, escaped_unprintable, parse_session_id

__all__ = [
    "ON_ERROR_MODES",
    "HookFailed",
    "HookRegistry",
    "HookSubscription",
    "LoggingHook",
    "hook_name",
]

Handler = Callable[[SessionEvent], object]
#: (hook name, nanoseconds spent in one handler call)
LatencyObserver = Callable[[str, int], object]
#: (hook name) of a handler call that raised
ErrorObserver = Callable[[str], object]
#: (hook name) that no subscription has any more
ReleaseObserver = Callable[[str], object]
#: one failed handler call: (hook name, event, exception)
Failure = tuple[str, SessionEvent, Exception]

ON_ERROR_MODES = frozenset({"isolate", "raise"})


class HookFailed(SessionLedgerError):
    """One or more hooks raised while ``on_error="raise"``; raised after every hook ran.

    The events were committed before any hook ran: this error never means data was lost.
    ``failures`` lists every failed call as (hook name, event, exception) in delivery order;
    the first exception is ``__cause__``.
    """

    def __init__(self, failures: Sequence[Failure]) -> None:
        if not failures:
            raise InvalidArgument("HookFailed needs at least one failure")
        self.failures: list[Failure] = list(failures)
        name, event, error = self.failures[0]
        more = len(self.failures) - 1
        super().__init__(
            f"hook {name} failed on {_describe(event)}: {error!r}"
            + (f" (and {more} more hook failure{'s' if more > 1 else ''})" if more else "")
        )


def _describe(event: SessionEvent) -> str:
    return f"{event.type} session={event.session_id} version={event.version}"


def hook_name(handler: object) -> str:
    """A readable, stable name for `handler` in logs and metrics: module.qualname.

    Functions and methods use their own qualified name; an instance of a callable class (such as
    LoggingHook()) uses its class's.
    """
    qualname = getattr(handler, "__qualname__", None)
    if not isinstance(qualname, str):
        qualname = type(handler).__qualname__
    module = getattr(handler, "__module__", None)
    name = f"{module}.{qualname}" if isinstance(module, str) and module else qualname
    # made from code, not checked like a given name: what is not printable (a lone surrogate
    # broke every Prometheus exposition, a newline split a log line) is escaped
    return escaped_unprintable(name)


def _session_filter(sessions: Iterable[str | UUID] | None) -> frozenset[str] | None:
    if sessions is None:
        return None
    if isinstance(sessions, (str, bytes, UUID)):
        raise InvalidArgument(
            "sessions must be an iterable of session ids, not a single id "
            f"(write sessions=[{sessions!r}])"
        )
    try:
        ids = list(sessions)
    except TypeError:
        raise InvalidArgument(
            f"sessions must be an iterable of session ids, got {type(sessions).__name__}"
        ) from None
    if not ids:
        raise InvalidArgument(
            "sessions is empty: the hook would never run (sessions=None means all)"
        )
    return frozenset(parse_session_id(value) for value in ids)


class HookSubscription:
    """The handle :meth:`HookRegistry.subscribe` returns.

    ``unsubscribe()`` (idempotent) stops delivery at once, also in the middle of a dispatch; as
    a context manager the subscription ends when the block exits.
    """

    __slots__ = ("_active", "_registry", "_seq", "events", "handler", "name", "sessions")

    def __init__(
        self,
        registry: HookRegistry,
        handler: Handler,
        name: str,
        events: frozenset[str] | None,
        sessions: frozenset[str] | None,
    ) -> None:
        self._registry = registry
        self._active = True
        self._seq = 0  # its place in subscription order (set by the registry)
        #: the subscribed callable
        self.handler = handler
        #: the hook's name in logs, metrics and HookFailed
        self.name = name
        #: event types delivered, None for every type
        self.events = events
        #: session ids delivered, None for every session
        self.sessions = sessions

    @property
    def active(self) -> bool:
        """True until unsubscribe() is called."""
        return self._active

    def unsubscribe(self) -> None:
        """Stop delivering events to this hook; calling it again does nothing."""
        if self._active:
            self._active = False  # read by dispatch: no further event reaches the handler
            self._registry._remove(self)

    def __enter__(self) -> HookSubscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unsubscribe()

    def __repr__(self) -> str:
        state = "active" if self._active else "unsubscribed"
        return f"<HookSubscription {self.name} {state}>"


def checked_plain_callable(handler: object, what: str, refusal: str) -> None:
    """InvalidArgument unless `handler` is a callable that runs when called: an async function
    (or an instance with an async __call__) would only create a coroutine nobody awaits."""
    if not callable(handler):
        raise InvalidArgument(f"{what} must be callable, got {type(handler).__name__}")
    if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        type(handler).__call__
    ):
        raise InvalidArgument(f"{what} must be a plain callable; {refusal}")


def _subscription_order(subscription: HookSubscription) -> int:
    return subscription._seq


class HookRegistry:
    """The in-process hooks of one engine, and the loop that delivers events to them.

    Subscribing and unsubscribing are thread-safe and may happen inside a hook: a dispatch
    delivers to the hooks subscribed when it began (copy-on-write tuples, and a subscription
    number that later ones exceed). A hook subscribed during a dispatch receives the next batch,
    not the rest of the current one; a hook unsubscribed during a dispatch receives nothing
    further.

    Hooks with a session filter are indexed by session id: an event is offered to the hooks
    without one and to those of its own session only, so a hook per session (thousands of
    them) costs an event nothing, and subscribing or unsubscribing one costs no copy of all.

    ``latency_observer(hook_name, nanoseconds)`` and ``error_observer(hook_name)``, when set,
    are told about every handler call and every failed one, and ``release_observer(hook_name)``
    when no subscription has that name any more (the MetricsHook has ``observe_latency``,
    ``observe_error`` and ``forget_hook`` for that).
    """

    def __init__(self, on_error: str = "isolate", logger_name: str = "sessionledger.hooks") -> None:
        if on_error not in ON_ERROR_MODES:
            raise InvalidArgument(
                f"on_error must be 'isolate' or 'raise', got {on_error!r}"
            )
        if not isinstance(logger_name, str) or not logger_name:
            raise InvalidArgument(f"logger_name must be a non-empty str, got {logger_name!r}")
        self.on_error = on_error
        self.logger = logging.getLogger(logger_name)
        #: called with (hook name, ns) after every handler call; None measures nothing
        self.latency_observer: LatencyObserver | None = None
        #: called with (hook name) after every failed handler call
        self.error_observer: ErrorObserver | None = None
        #: called with (hook name) once no subscription has that name any more
        self.release_observer: ReleaseObserver | None = None
        #: hook name -> how many subscriptions have it
        self._name_counts: dict[str, int] = {}
        #: every subscription by its number (in subscription order)
        self._all: dict[int, HookSubscription] = {}
        #: the subscriptions without a session filter, in order (replaced, never mutated)
        self._everywhere: tuple[HookSubscription, ...] = ()
        #: session id -> the subscriptions whose filter names it, in order (values replaced)
        self._by_session: dict[str, tuple[HookSubscription, ...]] = {}
        self._next_seq = 1
        # serialises subscribing, unsubscribing and listing; dispatch never takes it
        self._lock = threading.Lock()
        self._errors = 0

    def after_fork_in_child(self) -> None:
        """In a forked process: a fresh lock (one another thread of the parent held stays
        held for good)."""
        self._lock._at_fork_reinit()  # type: ignore[attr-defined]

    @property
    def active(self) -> bool:
        """True when at least one hook is subscribed (the engine skips building events if not)."""
        return bool(self._all)

    def has_hook_named(self, name: str) -> bool:
        """True while a subscription has that hook name."""
        return name in self._name_counts

    def hook_names(self) -> list[str]:
        """The names the current subscriptions have (each once)."""
        with self._lock:
            return list(self._name_counts)

    @property
    def subscriptions(self) -> tuple[HookSubscription, ...]:
        """The current subscriptions, in delivery order."""
        with self._lock:
            return tuple(self._all.values())

    @property
    def errors(self) -> int:
        """How many hook calls (and latency observer calls) have raised since the registry was
        made (an error observer that raises is logged, not counted)."""
        return self._errors

    def subscribe(
        self,
        handler: Handler,
        events: Iterable[str] | None = None,
        sessions: Iterable[str | UUID] | None = None,
        *,
        name: str | None = None,
    ) -> HookSubscription:
        """Deliver each committed event to `handler`, optionally only some types or sessions.

        `events`: event type names (see sessionledger.domain.events.EVENT_TYPES); `sessions`:
        session ids (str or UUID). None means all. `name` overrides the hook's name in logs and
        metrics (default: module.qualname of the handler). Hooks run in subscription order.
        Raises InvalidArgument for a handler that is not callable (or is async), an unknown or
        empty event filter, or a bare string where an iterable is expected; InvalidSessionId for
        a session id that is not a UUID.
        """
        checked_plain_callable(handler, "handler", "async hooks are not supported")
        # (a name goes into log records and Prometheus labels: text that encodes)
        name = hook_name(handler) if name is None else checked_text(name, "hook name")
        subscription = HookSubscription(
            self, handler, name, checked_event_types(events, "events"), _session_filter(sessions)
        )
        with self._lock:
            subscription._seq = self._next_seq
            self._next_seq += 1
            self._all[subscription._seq] = subscription
            self._name_counts[name] = self._name_counts.get(name, 0) + 1
            if subscription.sessions is None:
                self._everywhere = (*self._everywhere, subscription)
            else:
                index = self._by_session
                for sid in subscription.sessions:
                    index[sid] = (*index.get(sid, ()), subscription)
        return subscription

    def _remove(self, subscription: HookSubscription) -> None:
        with self._lock:
            if self._all.pop(subscription._seq, None) is None:
                return
            name = subscription.name
            released = self._name_counts[name] == 1
            if released:
                del self._name_counts[name]
            else:
                self._name_counts[name] -= 1
            if subscription.sessions is None:
                self._everywhere = tuple(s for s in self._everywhere if s is not subscription)
            else:
                index = self._by_session
                for sid in subscription.sessions:
                    left = tuple(s for s in index.get(sid, ()) if s is not subscription)
                    if left:
                        index[sid] = left
                    else:
                        index.pop(sid, None)
        observe = self.release_observer
        if released and observe is not None:
            observe(name)

    def _offered(self, session_id: str, everywhere: tuple[HookSubscription, ...],
                 before: int) -> tuple[HookSubscription, ...]:
        """The hooks an event of `session_id` goes to, in subscription order: those without a
        session filter, and those of that session subscribed before number `before`."""
        own = self._by_session.get(session_id)
        if not own:
            return everywhere
        own = tuple(s for s in own if s._seq < before)
        if not everywhere:
            return own
        return tuple(sorted((*everywhere, *own), key=_subscription_order))

    def dispatch_one(self, event: SessionEvent) -> None:
        """dispatch([event]), for the engine's commonest case: a command that wrote one event
        (no batch loop around it: a no-op hook may cost at most 2 µs an event on the append
        path, and every tenth of a microsecond counts there: benchmarks/subscribers_bench.py).
        """
        subscriptions = self._everywhere
        if self._by_session:
            subscriptions = self._offered(event.session_id, subscriptions, self._next_seq)
        failures = self._deliver(event, subscriptions, None, self.latency_observer)
        if failures:
            raise HookFailed(failures) from failures[0][2]

    def _deliver(self, event: SessionEvent, subscriptions: tuple[HookSubscription, ...],
                 failures: list[Failure] | None,
                 observer: LatencyObserver | None) -> list[Failure] | None:
        """One event to every matching hook: the two filter tests and the call, timed and told
        to `observer` when there is one (the engine's default, for the MetricsHook). Returns
        `failures` with this event's failures added."""
        event_type = event.type
        session_id = event.session_id
        for sub in subscriptions:
            types = sub.events
            if types is not None and event_type not in types:
                continue
            ids = sub.sessions
            if ids is not None and session_id not in ids:
                continue
            if not sub._active:
                continue
            started = 0 if observer is None else time.perf_counter_ns()
            try:
                sub.handler(event)
            except Exception as error:
                # the clock stops before the failure is logged: a slow log handler is not the
                # hook's latency
                elapsed = 0 if observer is None else time.perf_counter_ns() - started
                failures = self._failed(sub.name, event, error, failures)
                if observer is None:
                    continue
            else:
                if observer is None:  # no clock read at all without an observer
                    continue
                elapsed = time.perf_counter_ns() - started
            try:
                observer(sub.name, elapsed)
            except Exception as error:
                # A broken observer must not cost the other hooks their events either.
                failures = self._failed(hook_name(observer), event, error, failures)
        return failures

    def dispatch(self, events: Sequence[SessionEvent]) -> None:
        """Deliver `events` (committed, in order) to every matching hook, event by event.

        Every event goes to every matching hook before the next event. A raising hook is
        isolated (logged and counted) or, with on_error="raise", reported by HookFailed once
        every hook has had every event.
        """
        # the snapshot: writers replace these tuples, never mutate them, and number the hooks
        # they add after `before`
        everywhere, before = self._everywhere, self._next_seq
        if not self._all or not events:
            return
        failures: list[Failure] | None = None
        observer = self.latency_observer
        by_session = self._by_session
        for event in events:
            subscriptions = (self._offered(event.session_id, everywhere, before) if by_session
                             else everywhere)
            failures = self._deliver(event, subscriptions, failures, observer)
        if failures:
            raise HookFailed(failures) from failures[0][2]

    def _failed(
        self, name: str, event: SessionEvent, error: Exception, failures: list[Failure] | None
    ) -> list[Failure] | None:
        """Count one failed call; log it (isolate) or keep it for HookFailed (raise)."""
        self._errors += 1
        observe = self.error_observer
        if observe is not None:
            try:
                observe(name)
            except Exception:
                self.logger.exception("hook error observer %s failed", hook_name(observe))
        if self.on_error == "raise":
            if failures is None:
                failures = []
            failures.append((name, event, error))
            return failures
        self.logger.error(
            "hook %s failed on %s session=%s version=%d",
            name, event.type, event.session_id, event.version,
            exc_info=error,
            extra={
                "hook": name,
                "session_id": event.session_id,
                "event_type": event.type,
                "version": event.version,
                "position": event.position,
            },
        )
        return failures

    def __repr__(self) -> str:
        return (f"<HookRegistry {len(self._all)} hook(s) on_error={self.on_error!r} "
                f"errors={self._errors}>")


class LoggingHook:
    """One stdlib logging record per event, on logger ``sessionledger.events`` at INFO.

    The message reads ``SessionStarted session=<id> version=1 actor=alice`` (formatted lazily,
    only if a handler formats it) and the record carries the structured ``extra`` fields
    session_id, session_name, event_type, version, actor, correlation_id and position, for JSON
    or other structured handlers. Event data (state, payloads) is never logged: it may be large
    or sensitive.

    The record is built with Logger.makeRecord and passed to Logger.handle, skipping the caller
    lookup that Logger.info does (a stack walk costing about 1.5 µs per event that would always
    point at this method); the logger's filters and handlers and the record factory apply as
    usual.
    """

    __slots__ = ("_lineno", "level", "logger")

    def __init__(self, logger: logging.Logger | str = "sessionledger.events",
                 level: int = logging.INFO) -> None:
        if isinstance(logger, str):
            logger = logging.getLogger(logger)
        elif not isinstance(logger, logging.Logger):
            raise InvalidArgument(f"logger must be a Logger or a logger name, got {logger!r}")
        if not isinstance(level, int) or isinstance(level, bool):
            raise InvalidArgument(f"level must be a logging level int, got {level!r}")
        self.logger = logger
        self.level = level
        self._lineno = type(self).__call__.__code__.co_firstlineno

    def __call__(self, event: SessionEvent) -> None:
        """Log `event` (nothing at all when the logger is not enabled for the level)."""
        logger = self.logger
        if not logger.isEnabledFor(self.level):  # cached by logging: the cheap exit
            return
        record = logger.makeRecord(
            logger.name, self.level, __file__, self._lineno,
            "%s session=%s version=%d actor=%s",
            (event.type, event.session_id, event.version, event.actor),
            None, "LoggingHook.__call__",
        )
        # The structured fields, set as makeRecord(extra=...) would set them, minus its check
        # for clashes with LogRecord's own attributes (these fixed names never clash): ~1 µs.
        fields = record.__dict__
        fields["session_id"] = event.session_id
        fields["session_name"] = event.session_name
        fields["event_type"] = event.type
        fields["version"] = event.version
        fields["actor"] = event.actor
        fields["correlation_id"] = event.correlation_id
        fields["position"] = event.position
        logger.handle(record)

    def __repr__(self) -> str:
        return f"<LoggingHook logger={self.logger.name!r} level={logging.getLevelName(self.level)}>"

