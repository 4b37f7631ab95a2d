"""MetricsHook: counters and gauges of the committed event stream, as a dict or Prometheus text.

Every figure is **as seen by this engine since it started** (since the MetricsHook was made):
nothing is read back from the store, so events other engines wrote, and sessions this engine
has not touched since it started, are not counted. In detail:

- ``events_total``: committed events by type.
- ``sessions``: sessions by current status, for the sessions this hook has seen a lifecycle
  event of (SessionStarted -> ACTIVE, SessionSuspended -> SUSPENDED, SessionResumed -> ACTIVE,
  SessionEnded -> COMPLETED / FAILED / CANCELLED by its outcome, SessionArchived -> ARCHIVED).
  StateChanged, EventRecorded, CheckpointTaken and SessionRestored are only allowed while a
  session is ACTIVE, so one of them for a session not seen before counts it as ACTIVE. A status
  another engine gives a session later is not seen here.
- ``session_duration_seconds``: from the SessionStarted to the SessionEnded timestamp, for
  sessions whose start this hook saw (time spent suspended included).
- ``hook_latency_seconds`` and ``hook_errors_total``: per hook, fed by the HookRegistry through
  ``observe_latency`` and ``observe_error``.

Memory: one dict entry per session seen and not yet purged, plus one per started session until
it ends. A session this engine purges leaves the status it had (ARCHIVED included).

The hot path (``__call__``, ``observe_latency``) uses plain ints and dicts and takes no lock:
the engine delivers events one transaction at a time under its own lock. ``snapshot()`` and
``prometheus()`` copy each dict before reading it, so they are safe to call from another thread
(a scrape may then be one event behind on one figure and not on another).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, cast

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.utils import floatToGoString

from sessionledger.domain import events as ev
from sessionledger.domain.errors import InvalidArgument
from sessionledger.domain.events import EVENT_TYPES, SessionEvent
from sessionledger.domain.status import OUTCOMES, SessionStatus

__all__ = ["DEFAULT_DURATION_BUCKETS", "MetricsCollector", "MetricsHook"]

#: upper bounds (seconds) of the session duration histogram: 1 s to 1 day
DEFAULT_DURATION_BUCKETS: tuple[float, ...] = (
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0,
    86400.0,
)

_ACTIVE = SessionStatus.ACTIVE.value
_SUSPENDED = SessionStatus.SUSPENDED.value
_ARCHIVED = SessionStatus.ARCHIVED.value
_STATUSES = tuple(status.value for status in SessionStatus)
_OUTCOME_STATUS = {outcome: status.value for outcome, status in OUTCOMES.items()}
_NS = 1e-9
#: how prometheus_client writes a bucket bound ("1.0", "+Inf"); the library leaves it untyped
_le = cast(Callable[[float], str], floatToGoString)


class MetricsHook:
    """A hook (callable taking one SessionEvent) that counts what the engine commits.

    Subscribe it to every event type; wire ``observe_latency`` / ``observe_error`` /
    ``forget_hook`` to the registry's ``latency_observer`` / ``error_observer`` /
    ``release_observer`` for the hook figures (kept while a hook of that name is subscribed;
    the engine wires them). Read the figures
    with :meth:`snapshot` (a JSON-able dict) or :meth:`prometheus` (text exposition), or register
    :attr:`collector` in a prometheus_client registry of your own.
    """

    def __init__(self, duration_buckets: Sequence[float] = DEFAULT_DURATION_BUCKETS) -> None:
        bounds = tuple(duration_buckets)
        if (
            not bounds
            or any(not isinstance(b, (int, float)) or isinstance(b, bool) for b in bounds)
            or any(not math.isfinite(b) or b <= 0 for b in bounds)
            or any(a >= b for a, b in itertools.pairwise(bounds))
        ):
            raise InvalidArgument(
                "duration_buckets must be increasing positive finite numbers of seconds, "
                f"got {duration_buckets!r}"
            )
        self._bounds = tuple(float(b) for b in bounds)
        # every known type starts at 0 so the exposition always lists them (rate() works)
        self._events: dict[str, int] = dict.fromkeys(sorted(EVENT_TYPES), 0)
        self._status_of: dict[str, str] = {}
        self._by_status: dict[str, int] = dict.fromkeys(_STATUSES, 0)
        self._started_at: dict[str, datetime] = {}  # session id -> SessionStarted timestamp
        # duration: per bucket (non-cumulative, the last is +Inf), count, sum, min, max
        self._duration_buckets = [0] * (len(self._bounds) + 1)
        self._duration_count = 0
        self._duration_sum = 0.0
        self._duration_min = math.inf
        self._duration_max = -math.inf
        # hook name -> [calls, total ns, max ns]
        self._latency: dict[str, list[int]] = {}
        self._hook_errors: dict[str, int] = {}
        #: the names of the hooks subscribed now (set by the engine), listed in the exposition
        #: before their first call or error
        self.hook_names: Callable[[], Iterable[str]] | None = None
        #: whether a hook of that name is subscribed now (set by the engine)
        self.hook_subscribed: Callable[[str], bool] | None = None
        # event type -> what it does to the status gauge, looked up once per event
        self._lifecycle: dict[str, Callable[[SessionEvent], None]] = {
            ev.SESSION_STARTED: self._on_started,
            ev.SESSION_SUSPENDED: self._on_suspended,
            ev.SESSION_RESUMED: self._on_resumed,
            ev.SESSION_ENDED: self._on_ended,
            ev.SESSION_ARCHIVED: self._on_archived,
            ev.STATE_CHANGED: self._on_active_only,
            ev.EVENT_RECORDED: self._on_active_only,
            ev.CHECKPOINT_TAKEN: self._on_active_only,
            ev.SESSION_RESTORED: self._on_restored,
        }
        self.collector = MetricsCollector(self)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self.collector)

    # -- the hook -------------------------------------------------------------------------------

    def __call__(self, event: SessionEvent) -> None:
        """Count one committed event."""
        events = self._events
        event_type = event.type
        events[event_type] = events.get(event_type, 0) + 1
        on = self._lifecycle.get(event_type)
        if on is not None:
            on(event)

    def _set_status(self, session_id: str, status: str) -> None:
        by_status = self._by_status
        old = self._status_of.get(session_id)
        if old is not None:
            by_status[old] -= 1
        self._status_of[session_id] = status
        by_status[status] += 1

    def _on_started(self, event: SessionEvent) -> None:
        self._set_status(event.session_id, _ACTIVE)
        self._started_at[event.session_id] = event.timestamp

    def _on_suspended(self, event: SessionEvent) -> None:
        self._set_status(event.session_id, _SUSPENDED)

    def _on_resumed(self, event: SessionEvent) -> None:
        self._set_status(event.session_id, _ACTIVE)

    def _on_active_only(self, event: SessionEvent) -> None:
        # only an ACTIVE session takes these: ACTIVE whatever this hook saw before (another
        # engine may have resumed it)
        if self._status_of.get(event.session_id) != _ACTIVE:
            self._set_status(event.session_id, _ACTIVE)

    def _on_restored(self, event: SessionEvent) -> None:
        # a restore needs ACTIVE; a recovery after a restart (restore_recent) says the status,
        # which another engine may have changed since this hook last saw the session
        status = event.data.get("status", _ACTIVE)
        if status not in _STATUSES:
            status = _ACTIVE
        if self._status_of.get(event.session_id) != status:
            self._set_status(event.session_id, status)

    def _on_ended(self, event: SessionEvent) -> None:
        status = _OUTCOME_STATUS.get(event.data.get("outcome", ""))
        if status is not None:
            self._set_status(event.session_id, status)
        started = self._started_at.pop(event.session_id, None)
        if started is not None:
            # a clock stepped back between start and end must not yield a negative duration
            self._observe_duration(max(0.0, (event.timestamp - started).total_seconds()))

    def _on_archived(self, event: SessionEvent) -> None:
        # still remembered: a purge later takes it out of ARCHIVED (archive-then-purge is the
        # usual retention, and a gauge that only grows would be useless)
        self._set_status(event.session_id, _ARCHIVED)
        self._started_at.pop(event.session_id, None)

    def forget_session(self, session_id: str) -> None:
        """A session purged for good: it leaves the status it was counted in and the hook's
        memory."""
        old = self._status_of.pop(session_id, None)
        if old is not None:
            self._by_status[old] -= 1
        self._started_at.pop(session_id, None)

    def _observe_duration(self, seconds: float) -> None:
        self._duration_buckets[bisect.bisect_left(self._bounds, seconds)] += 1
        self._duration_count += 1
        self._duration_sum += seconds
        if seconds < self._duration_min:
            self._duration_min = seconds
        if seconds > self._duration_max:
            self._duration_max = seconds

    # -- fed by the HookRegistry ----------------------------------------------------------------

    def observe_latency(self, hook_name: str, nanoseconds: int) -> None:
        """Record one handler call of `hook_name` that took `nanoseconds`."""
        stats = self._latency.get(hook_name)
        if stats is None:
            if not self._subscribed(hook_name):
                return
            self._latency[hook_name] = [1, nanoseconds, nanoseconds]
            return
        stats[0] += 1
        stats[1] += nanoseconds
        if nanoseconds > stats[2]:
            stats[2] = nanoseconds

    def observe_error(self, hook_name: str) -> None:
        """Record one handler call of `hook_name` that raised."""
        errors = self._hook_errors
        if hook_name in errors or self._subscribed(hook_name):
            errors[hook_name] = errors.get(hook_name, 0) + 1

    def _subscribed(self, hook_name: str) -> bool:
        """False for a hook that no subscription has any more: one that unsubscribed in its own
        call was forgotten (forget_hook) before that call's figures came, which otherwise
        stayed for good. Asked only as a name's figures begin."""
        subscribed = self.hook_subscribed
        return subscribed is None or subscribed(hook_name)

    def forget_hook(self, hook_name: str) -> None:
        """Drop the figures of `hook_name`, which no subscription has any more: a hook per
        session, each with its own name, made them (and the exposition) grow for good. (A call
        of that hook still running in another thread may record one more figure.)"""
        self._latency.pop(hook_name, None)
        self._hook_errors.pop(hook_name, None)

    # -- reading --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Every figure as a plain JSON-able dict (see the module docstring for their meaning).

        ``{"events_total": {type: n}, "sessions": {status: n},
        "session_duration_seconds": {"count", "sum", "min", "max", "buckets": {le: n}},
        "hook_latency_seconds": {hook: {"count", "sum", "max"}},
        "hook_errors_total": {hook: n}}``; min and max are None before the first observation,
        buckets are cumulative as in Prometheus (keys "1.0", ..., "+Inf").
        """
        count = self._duration_count
        cumulative = 0
        buckets: dict[str, int] = {}
        for bound, n in zip((*self._bounds, math.inf), list(self._duration_buckets), strict=True):
            cumulative += n
            buckets[_le(bound)] = cumulative
        latency = {
            name: {"count": stats[0], "sum": stats[1] * _NS, "max": stats[2] * _NS}
            for name, stats in dict(self._latency).items()
        }
        return {
            "events_total": dict(self._events),
            "sessions": dict(self._by_status),
            "session_duration_seconds": {
                "count": count,
                "sum": self._duration_sum,
                "min": self._duration_min if count else None,
                "max": self._duration_max if count else None,
                "buckets": buckets,
            },
            "hook_latency_seconds": latency,
            "hook_errors_total": dict(self._hook_errors),
        }

    @property
    def registry(self) -> CollectorRegistry:
        """The prometheus_client registry prometheus() renders (register more collectors)."""
        return self._registry

    def prometheus(self) -> str:
        """The figures in the Prometheus text exposition format (via prometheus_client)."""
        return generate_latest(self._registry).decode()

    def __repr__(self) -> str:
        return f"<MetricsHook {sum(self._events.values())} events, {len(self._status_of)} sessions>"


class MetricsCollector:
    """A prometheus_client collector over one MetricsHook's plain counters.

    Metrics: sessionledger_events_total{type}, sessionledger_sessions{status},
    sessionledger_session_duration_seconds (histogram), sessionledger_hook_latency_seconds{hook}
    (summary: count and sum), sessionledger_hook_errors_total{hook}.
    """

    def __init__(self, hook: MetricsHook) -> None:
        self._hook = hook

    def collect(self) -> Iterator[Metric]:
        """Build the metric families from a snapshot of the hook."""
        snap = self._hook.snapshot()
        events = CounterMetricFamily(
            "sessionledger_events", "Committed session events by type, as seen by this engine.",
            labels=["type"])
        for event_type, n in sorted(snap["events_total"].items()):
            events.add_metric([event_type], n)
        yield events

        sessions = GaugeMetricFamily(
            "sessionledger_sessions",
            "Sessions by current status, among those this engine saw since it started.",
            labels=["status"])
        for status in _STATUSES:
            sessions.add_metric([status], snap["sessions"].get(status, 0))
        yield sessions

        duration = snap["session_duration_seconds"]
        yield HistogramMetricFamily(
            "sessionledger_session_duration_seconds",
            "Time from SessionStarted to SessionEnded, for sessions this engine saw start.",
            buckets=list(duration["buckets"].items()), sum_value=duration["sum"])

        latency = SummaryMetricFamily(
            "sessionledger_hook_latency_seconds", "Time spent in each in-process hook call.",
            labels=["hook"])
        for name, stats in sorted(snap["hook_latency_seconds"].items()):
            latency.add_metric([name], stats["count"], stats["sum"])
        yield latency

        errors = CounterMetricFamily(
            "sessionledger_hook_errors", "In-process hook calls that raised, by hook.",
            labels=["hook"])
        # every hook there is, from 0: a series born at its first error hides that error
        # from rate() and increase()
        counted = snap["hook_errors_total"]
        known = set(counted) | set(snap["hook_latency_seconds"])
        if self._hook.hook_names is not None:
            known.update(self._hook.hook_names())
        for name in sorted(known):
            errors.add_metric([name], counted.get(name, 0))
        yield errors
