"""Unit tests of the hook machinery and the built-in hooks, on hand-built events (no engine)."""

from __future__ import annotations

import json
import logging
import math
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sessionledger.domain.errors import InvalidArgument, InvalidSessionId, SessionLedgerError
from sessionledger.domain.events import EVENT_TYPES, SessionEvent
from sessionledger.projections.hooks import (
    HookFailed,
    HookRegistry,
    HookSubscription,
    LoggingHook,
    hook_name,
)
from sessionledger.projections.metrics import MetricsHook

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
A = str(uuid.UUID(int=1))
B = str(uuid.UUID(int=2))
C = str(uuid.UUID(int=3))


class Stream:
    """Builds the events of sessions the way the engine commits them (versions, positions)."""

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}
        self.position = 0

    def __call__(self, sid: str, event_type: str, at: float = 0.0, actor: str | None = "alice",
                 **data: Any) -> SessionEvent:
        self.versions[sid] = self.versions.get(sid, 0) + 1
        self.position += 1
        return SessionEvent(
            session_id=sid, version=self.versions[sid], type=event_type,
            timestamp=T0 + timedelta(seconds=at), actor=actor, correlation_id="corr-1",
            data=data, position=self.position, session_name=f"name-{sid[-1]}",
        )


@pytest.fixture
def make() -> Stream:
    return Stream()


class Recorder:
    def __init__(self, label: str = "", log: list[tuple[str, str, int]] | None = None) -> None:
        self.label = label
        self.log = log if log is not None else []

    def __call__(self, event: SessionEvent) -> None:
        self.log.append((self.label, event.session_id, event.version))


def boom(event: SessionEvent) -> None:
    raise RuntimeError(f"boom {event.version}")


# -- subscribing and filtering ------------------------------------------------------------------


def test_active_and_subscriptions_follow_subscribe_and_unsubscribe() -> None:
    registry = HookRegistry()
    assert registry.active is False
    sub = registry.subscribe(Recorder())
    assert registry.active is True
    assert registry.subscriptions == (sub,)
    sub.unsubscribe()
    assert registry.active is False
    assert registry.subscriptions == ()


def test_no_subscribers_dispatch_is_a_no_op(make: Stream) -> None:
    for registry in (HookRegistry(), HookRegistry(on_error="raise")):
        registry.dispatch([make(A, "SessionStarted")])
        registry.dispatch([])
        assert (registry.active, registry.errors, registry.subscriptions) == (False, 0, ())


def test_events_filter_delivers_only_those_types(make: Stream) -> None:
    registry = HookRegistry()
    seen: list[str] = []
    registry.subscribe(lambda e: seen.append(e.type), events=["SessionStarted", "SessionEnded"])
    registry.dispatch([
        make(A, "SessionStarted"), make(A, "StateChanged"), make(A, "CheckpointTaken"),
        make(A, "SessionEnded", outcome="completed"),
    ])
    assert seen == ["SessionStarted", "SessionEnded"]


def test_sessions_filter_takes_str_and_uuid_in_any_spelling(make: Stream) -> None:
    registry = HookRegistry()
    seen: list[str] = []
    sub = registry.subscribe(lambda e: seen.append(e.session_id),
                             sessions=[A.upper(), uuid.UUID(B)])
    assert sub.sessions == frozenset({A, B})
    registry.dispatch([make(A, "SessionStarted"), make(C, "SessionStarted"),
                       make(B, "SessionStarted"), make(C, "StateChanged")])
    assert seen == [A, B]


def test_both_filters_must_match(make: Stream) -> None:
    registry = HookRegistry()
    seen: list[tuple[str, str]] = []
    registry.subscribe(lambda e: seen.append((e.session_id, e.type)),
                       events=("StateChanged",), sessions=(A,))
    registry.dispatch([make(A, "SessionStarted"), make(B, "SessionStarted"),
                       make(B, "StateChanged"), make(A, "StateChanged")])
    assert seen == [(A, "StateChanged")]


def test_delivery_is_event_major_in_subscription_order(make: Stream) -> None:
    registry = HookRegistry()
    log: list[tuple[str, str, int]] = []
    registry.subscribe(Recorder("first", log))
    registry.subscribe(Recorder("second", log))
    registry.dispatch([
        make(A, "SessionStarted"), make(A, "StateChanged"), make(B, "SessionStarted"),
    ])
    assert log == [
        ("first", A, 1), ("second", A, 1),
        ("first", A, 2), ("second", A, 2),
        ("first", B, 1), ("second", B, 1),
    ]


def test_the_hook_receives_the_same_event_objects(make: Stream) -> None:
    registry = HookRegistry()
    got: list[SessionEvent] = []
    registry.subscribe(got.append)
    batch = [make(A, "SessionStarted"), make(A, "StateChanged")]
    registry.dispatch(batch)
    assert got == batch and all(g is b for g, b in zip(got, batch, strict=True))


# -- unsubscribe ----------------------------------------------------------------------------------


def test_unsubscribe_is_idempotent_and_stops_delivery(make: Stream) -> None:
    registry = HookRegistry()
    log: list[tuple[str, str, int]] = []
    sub = registry.subscribe(Recorder("x", log))
    other = registry.subscribe(Recorder("y", log))
    registry.dispatch([make(A, "SessionStarted")])
    sub.unsubscribe()
    sub.unsubscribe()
    assert not sub.active and other.active
    registry.dispatch([make(A, "StateChanged")])
    assert log == [("x", A, 1), ("y", A, 1), ("y", A, 2)]
    assert registry.subscriptions == (other,)


def test_subscription_as_context_manager(make: Stream) -> None:
    registry = HookRegistry()
    log: list[tuple[str, str, int]] = []
    with registry.subscribe(Recorder("x", log)) as sub:
        assert isinstance(sub, HookSubscription)
        registry.dispatch([make(A, "SessionStarted")])
    assert not registry.active
    registry.dispatch([make(A, "StateChanged")])
    assert log == [("x", A, 1)]


def test_a_hook_unsubscribing_itself_during_dispatch(make: Stream) -> None:
    registry = HookRegistry()
    log: list[tuple[str, str, int]] = []
    subs: list[HookSubscription] = []

    def once(event: SessionEvent) -> None:
        log.append(("once", event.session_id, event.version))
        subs[0].unsubscribe()

    subs.append(registry.subscribe(once))
    registry.subscribe(Recorder("after", log))
    registry.dispatch([make(A, "SessionStarted"), make(A, "StateChanged")])
    # the rest of the batch still reaches the other hook; the removed one gets nothing more
    assert log == [("once", A, 1), ("after", A, 1), ("after", A, 2)]


def test_a_hook_removing_a_later_hook_during_dispatch(make: Stream) -> None:
    registry = HookRegistry()
    log: list[tuple[str, str, int]] = []
    victims: list[HookSubscription] = []

    def killer(event: SessionEvent) -> None:
        log.append(("killer", event.session_id, event.version))
        victims[0].unsubscribe()

    registry.subscribe(killer)
    victims.append(registry.subscribe(Recorder("victim", log)))
    registry.dispatch([make(A, "SessionStarted"), make(A, "StateChanged")])
    assert log == [("killer", A, 1), ("killer", A, 2)]


def test_a_hook_subscribed_during_dispatch_starts_with_the_next_batch(make: Stream) -> None:
    registry = HookRegistry()
    log: list[tuple[str, str, int]] = []
    added: list[HookSubscription] = []

    def adder(event: SessionEvent) -> None:
        if not added:
            added.append(registry.subscribe(Recorder("late", log)))

    registry.subscribe(adder)
    registry.dispatch([make(A, "SessionStarted"), make(A, "StateChanged")])
    assert log == []
    registry.dispatch([make(A, "CheckpointTaken")])
    assert log == [("late", A, 3)]


# -- failures ------------------------------------------------------------------------------------


def test_isolate_logs_counts_and_keeps_delivering(
    make: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    registry = HookRegistry()
    log: list[tuple[str, str, int]] = []
    registry.subscribe(boom)
    registry.subscribe(Recorder("ok", log))
    batch = [make(A, "SessionStarted"), make(A, "StateChanged")]
    with caplog.at_level(logging.ERROR, logger="sessionledger.hooks"):
        registry.dispatch(batch)
    assert log == [("ok", A, 1), ("ok", A, 2)]
    assert registry.errors == 2
    records = [r for r in caplog.records if r.name == "sessionledger.hooks"]
    assert len(records) == 2
    first = records[0]
    assert first.levelno == logging.ERROR
    name = hook_name(boom)
    assert name.endswith("test_hooks_unit.boom")
    message = first.getMessage()
    assert name in message and A in message and "version=1" in message
    assert "SessionStarted" in message
    assert first.exc_info is not None and isinstance(first.exc_info[1], RuntimeError)
    assert str(first.exc_info[1]) == "boom 1"
    extra = first.__dict__
    assert extra["hook"] == name
    assert extra["session_id"] == A
    assert extra["event_type"] == "SessionStarted"
    assert extra["version"] == 1
    assert extra["position"] == batch[0].position
    assert records[1].__dict__["version"] == 2


def test_raise_runs_every_hook_on_every_event_then_raises(make: Stream) -> None:
    registry = HookRegistry(on_error="raise")
    log: list[tuple[str, str, int]] = []
    registry.subscribe(Recorder("before", log))
    registry.subscribe(boom, name="boom-hook")
    registry.subscribe(Recorder("after", log))
    batch = [make(A, "SessionStarted"), make(B, "SessionStarted"), make(A, "StateChanged")]
    with pytest.raises(HookFailed) as caught:
        registry.dispatch(batch)
    assert log == [
        ("before", A, 1), ("after", A, 1),
        ("before", B, 1), ("after", B, 1),
        ("before", A, 2), ("after", A, 2),
    ]
    error = caught.value
    assert isinstance(error, SessionLedgerError)
    assert [(name, event) for name, event, _ in error.failures] == [
        ("boom-hook", batch[0]), ("boom-hook", batch[1]), ("boom-hook", batch[2]),
    ]
    assert all(isinstance(exc, RuntimeError) for _, _, exc in error.failures)
    assert error.__cause__ is error.failures[0][2]
    assert "boom-hook" in str(error) and "2 more" in str(error)
    assert registry.errors == 3


def test_raise_mode_does_not_log_and_succeeds_without_failures(
    make: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    registry = HookRegistry(on_error="raise")
    registry.subscribe(boom, events=["SessionEnded"])
    with caplog.at_level(logging.DEBUG, logger="sessionledger.hooks"):
        registry.dispatch([make(A, "SessionStarted")])  # boom filtered out: no error
        with pytest.raises(HookFailed):
            registry.dispatch([make(A, "SessionEnded", outcome="failed")])
    assert [r for r in caplog.records if r.name == "sessionledger.hooks"] == []


def test_base_exceptions_are_not_swallowed(make: Stream) -> None:
    registry = HookRegistry()

    def interrupt(event: SessionEvent) -> None:
        raise KeyboardInterrupt

    registry.subscribe(interrupt)
    with pytest.raises(KeyboardInterrupt):
        registry.dispatch([make(A, "SessionStarted")])


def test_error_observer_is_told_of_every_failure(make: Stream) -> None:
    registry = HookRegistry()
    metrics = MetricsHook()
    registry.error_observer = metrics.observe_error
    registry.subscribe(boom, name="flaky")
    registry.subscribe(metrics, name="metrics")
    registry.dispatch([make(A, "SessionStarted"), make(A, "StateChanged")])
    assert metrics.snapshot()["hook_errors_total"] == {"flaky": 2}


def _deliver(registry: HookRegistry, how: str, events: list[SessionEvent]) -> None:
    """registry.dispatch(events), or dispatch_one for each (the engine's one-event path)."""
    if how == "dispatch":
        registry.dispatch(events)
        return
    for event in events:
        registry.dispatch_one(event)


@pytest.mark.parametrize("how", ["dispatch", "dispatch_one"])
def test_a_failing_latency_observer_is_isolated_like_a_hook(
    make: Stream, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    registry = HookRegistry()
    log: list[tuple[str, str, int]] = []

    def bad_observer(name: str, ns: int) -> None:
        raise ValueError("observer broke")

    registry.latency_observer = bad_observer
    registry.subscribe(Recorder("a", log))
    registry.subscribe(Recorder("b", log))
    with caplog.at_level(logging.ERROR, logger="sessionledger.hooks"):
        _deliver(registry, how, [make(A, "SessionStarted")])
    assert log == [("a", A, 1), ("b", A, 1)]
    assert registry.errors == 2


# -- latency --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["dispatch", "dispatch_one"])
def test_latency_observer_gets_each_call_by_hook_name(make: Stream, how: str) -> None:
    registry = HookRegistry()
    calls: list[tuple[str, int]] = []
    registry.latency_observer = lambda name, ns: calls.append((name, ns))
    registry.subscribe(Recorder(), name="rec")
    registry.subscribe(boom, name="boom", events=["StateChanged"])
    registry.subscribe(Recorder(), name="other-session", sessions=[B])
    registry.subscribe(Recorder(), name="gone").unsubscribe()
    _deliver(registry, how, [make(A, "SessionStarted"), make(A, "StateChanged")])
    assert [name for name, _ in calls] == ["rec", "rec", "boom"]  # failed calls are timed too
    assert all(isinstance(ns, int) and ns >= 0 for _, ns in calls)


def test_metrics_hook_summarises_latency_per_hook() -> None:
    metrics = MetricsHook()
    metrics.observe_latency("h", 1_000)
    metrics.observe_latency("h", 3_000)
    metrics.observe_latency("g", 500)
    latency = metrics.snapshot()["hook_latency_seconds"]
    assert latency["h"]["count"] == 2
    assert latency["h"]["sum"] == pytest.approx(4e-6)
    assert latency["h"]["max"] == pytest.approx(3e-6)
    assert latency["g"] == {"count": 1, "sum": pytest.approx(5e-7), "max": pytest.approx(5e-7)}


# -- invalid arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("events", [
    "SessionStarted",                  # a bare str, not an iterable of names
    ["SessionStarted", "Nope"],        # unknown type
    ["sessionstarted"],                # names are case-sensitive
    [1],                               # not a str
    [],                                # a hook that could never run
    42,                                # not iterable
])
def test_bad_events_filter(events: Any) -> None:
    with pytest.raises(InvalidArgument) as caught:
        HookRegistry().subscribe(Recorder(), events=events)
    assert not isinstance(caught.value, InvalidSessionId)


def test_unknown_event_type_message_names_it() -> None:
    with pytest.raises(InvalidArgument, match=r"'Nope'.*expected CheckpointTaken"):
        HookRegistry().subscribe(Recorder(), events=["Nope"])


@pytest.mark.parametrize("sessions", [A, uuid.UUID(A), [], 7])
def test_bad_sessions_argument(sessions: Any) -> None:
    with pytest.raises(InvalidArgument):
        HookRegistry().subscribe(Recorder(), sessions=sessions)


@pytest.mark.parametrize("bad", ["not-a-uuid", 12, None])
def test_invalid_session_id_in_filter(bad: Any) -> None:
    with pytest.raises(InvalidSessionId):
        HookRegistry().subscribe(Recorder(), sessions=[A, bad])


def test_bad_handler_and_options() -> None:
    registry = HookRegistry()
    with pytest.raises(InvalidArgument, match="callable"):
        registry.subscribe("print")  # type: ignore[arg-type]

    async def coroutine(event: SessionEvent) -> None:
        pass

    with pytest.raises(InvalidArgument, match="async"):
        registry.subscribe(coroutine)
    with pytest.raises(InvalidArgument):
        registry.subscribe(Recorder(), name="")
    with pytest.raises(InvalidArgument, match="on_error"):
        HookRegistry(on_error="ignore")
    assert not registry.active  # nothing half-registered


def test_hook_names() -> None:
    assert hook_name(boom) == f"{__name__}.boom"
    assert hook_name(LoggingHook()) == "sessionledger.projections.hooks.LoggingHook"
    assert hook_name(MetricsHook().observe_error) == (
        "sessionledger.projections.metrics.MetricsHook.observe_error")
    assert HookRegistry().subscribe(boom).name == hook_name(boom)


# -- LoggingHook ---------------------------------------------------------------------------------


@pytest.fixture
def events_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="sessionledger.events"):
        yield caplog


def test_logging_hook_writes_one_record_per_event_with_extra_fields(
    make: Stream, events_log: pytest.LogCaptureFixture
) -> None:
    registry = HookRegistry()
    registry.subscribe(LoggingHook())
    batch = [make(A, "SessionStarted"), make(A, "StateChanged", actor=None)]
    registry.dispatch(batch)
    records = [r for r in events_log.records if r.name == "sessionledger.events"]
    assert len(records) == 2
    first, second = records
    assert first.levelno == logging.INFO
    assert first.getMessage() == f"SessionStarted session={A} version=1 actor=alice"
    assert second.getMessage() == f"StateChanged session={A} version=2 actor=None"
    fields = {k: first.__dict__[k] for k in (
        "session_id", "session_name", "event_type", "version", "actor", "correlation_id",
        "position")}
    assert fields == {
        "session_id": A, "session_name": "name-1", "event_type": "SessionStarted", "version": 1,
        "actor": "alice", "correlation_id": "corr-1", "position": batch[0].position,
    }
    assert second.__dict__["actor"] is None and second.__dict__["version"] == 2


def test_logging_hook_is_silent_when_the_logger_is_not_enabled(make: Stream) -> None:
    logger = logging.getLogger("sessionledger.test.disabled")
    logger.setLevel(logging.WARNING)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        hook = LoggingHook(logger)
        hook(make(A, "SessionStarted"))
        assert seen == []
        logger.setLevel(logging.INFO)
        hook(make(A, "StateChanged"))
        assert [r.getMessage() for r in seen] == [f"StateChanged session={A} version=2 actor=alice"]
        # logger filters still apply (Logger.handle runs them)
        logger.addFilter(lambda record: False)
        hook(make(A, "StateChanged"))
        assert len(seen) == 1
    finally:
        logger.removeHandler(handler)
        logger.filters.clear()


def test_logging_hook_arguments() -> None:
    assert LoggingHook("custom.name").logger.name == "custom.name"
    assert LoggingHook(level=logging.DEBUG).level == logging.DEBUG
    with pytest.raises(InvalidArgument):
        LoggingHook(42)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        LoggingHook(level="INFO")  # type: ignore[arg-type]


# -- MetricsHook ---------------------------------------------------------------------------------


def lifecycle(make: Stream) -> list[SessionEvent]:
    """Three sessions: A completes after 90 s (suspended on the way) and is archived, B fails
    after 2 s, C stays suspended."""
    return [
        make(A, "SessionStarted", at=0),
        make(B, "SessionStarted", at=1),
        make(A, "StateChanged", at=2),
        make(A, "CheckpointTaken", at=3),
        make(A, "SessionSuspended", at=4, reason=None),
        make(C, "SessionStarted", at=5),
        make(A, "SessionResumed", at=10),
        make(B, "SessionEnded", at=3, outcome="failed"),
        make(A, "SessionSaved", at=20),
        make(A, "SessionEnded", at=90, outcome="completed"),
        make(C, "SessionSuspended", at=100),
        make(A, "SessionArchived", at=200),
    ]


def test_metrics_counts_a_realistic_sequence(make: Stream) -> None:
    metrics = MetricsHook()
    registry = HookRegistry()
    registry.subscribe(metrics)
    registry.dispatch(lifecycle(make))
    snap = metrics.snapshot()
    assert snap["events_total"] == {
        "SessionStarted": 3, "StateChanged": 1, "EventRecorded": 0, "CheckpointTaken": 1,
        "SessionSaved": 1, "SessionRestored": 0, "SessionSuspended": 2, "SessionResumed": 1,
        "SessionEnded": 2, "SessionArchived": 1,
    }
    assert set(snap["events_total"]) == EVENT_TYPES
    assert snap["sessions"] == {
        "ACTIVE": 0, "SUSPENDED": 1, "COMPLETED": 0, "FAILED": 1, "CANCELLED": 0, "ARCHIVED": 1,
    }
    duration = snap["session_duration_seconds"]
    assert duration["count"] == 2
    assert duration["sum"] == pytest.approx(92.0)
    assert duration["min"] == pytest.approx(2.0)
    assert duration["max"] == pytest.approx(90.0)
    assert duration["buckets"]["1.0"] == 0
    assert duration["buckets"]["5.0"] == 1
    assert duration["buckets"]["60.0"] == 1
    assert duration["buckets"]["300.0"] == 2
    assert duration["buckets"]["+Inf"] == 2
    json.dumps(snap)  # plain JSON-able


def test_status_gauge_step_by_step(make: Stream) -> None:
    metrics = MetricsHook()

    def statuses() -> dict[str, int]:
        return {k: v for k, v in metrics.snapshot()["sessions"].items() if v}

    metrics(make(A, "SessionStarted"))
    assert statuses() == {"ACTIVE": 1}
    metrics(make(A, "SessionSuspended"))
    assert statuses() == {"SUSPENDED": 1}
    metrics(make(A, "SessionSaved"))  # allowed while suspended: no change
    assert statuses() == {"SUSPENDED": 1}
    metrics(make(A, "SessionResumed"))
    assert statuses() == {"ACTIVE": 1}
    metrics(make(B, "SessionStarted"))
    assert statuses() == {"ACTIVE": 2}
    metrics(make(A, "SessionEnded", outcome="cancelled"))
    assert statuses() == {"ACTIVE": 1, "CANCELLED": 1}
    metrics(make(A, "SessionArchived"))
    assert statuses() == {"ACTIVE": 1, "ARCHIVED": 1}
    metrics(make(B, "SessionEnded", outcome="completed"))
    metrics(make(B, "SessionArchived"))
    assert statuses() == {"ARCHIVED": 2}


def test_sessions_whose_start_was_not_seen(make: Stream) -> None:
    """A session created before this engine started: counted from its first event seen here,
    with no duration (its start was not seen)."""
    metrics = MetricsHook()
    make.versions[A] = 7
    make.versions[B] = 3
    metrics(make(A, "StateChanged", at=50))         # only allowed while ACTIVE
    metrics(make(B, "SessionSuspended", at=51))
    snap = metrics.snapshot()["sessions"]
    assert snap["ACTIVE"] == 1 and snap["SUSPENDED"] == 1
    metrics(make(A, "SessionEnded", at=60, outcome="failed"))
    metrics(make(B, "SessionSaved", at=61))         # allowed while SUSPENDED: stays SUSPENDED
    snap2 = metrics.snapshot()
    assert snap2["sessions"]["FAILED"] == 1 and snap2["sessions"]["SUSPENDED"] == 1
    assert snap2["sessions"]["ACTIVE"] == 0
    assert snap2["session_duration_seconds"]["count"] == 0
    assert snap2["session_duration_seconds"]["min"] is None


def test_duration_uses_event_timestamps_and_never_goes_negative(make: Stream) -> None:
    metrics = MetricsHook(duration_buckets=[0.5, 10])
    metrics(make(A, "SessionStarted", at=100))
    metrics(make(A, "SessionEnded", at=112.25, outcome="completed"))
    metrics(make(B, "SessionStarted", at=100))
    metrics(make(B, "SessionEnded", at=99, outcome="completed"))  # a clock stepped back
    duration = metrics.snapshot()["session_duration_seconds"]
    assert duration["count"] == 2
    assert duration["sum"] == pytest.approx(12.25)
    assert duration["min"] == 0.0
    assert duration["buckets"] == {"0.5": 1, "10.0": 1, "+Inf": 2}


def test_metrics_hook_bad_buckets() -> None:
    for bad in ([], [5, 1], [1, 1], [0, 1], [1, math.inf], [True], ["1"]):
        with pytest.raises(InvalidArgument):
            MetricsHook(duration_buckets=bad)  # type: ignore[arg-type]


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("sessionledger_")
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_prometheus_exposition_parses_back_to_the_figures(make: Stream) -> None:
    metrics = MetricsHook()
    registry = HookRegistry()
    registry.latency_observer = metrics.observe_latency
    registry.error_observer = metrics.observe_error
    registry.subscribe(metrics, name="metrics")
    registry.subscribe(boom, name="boom", events=["SessionArchived"])
    registry.dispatch(lifecycle(make))
    text = metrics.prometheus()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families == {
        "sessionledger_events": "counter",
        "sessionledger_sessions": "gauge",
        "sessionledger_session_duration_seconds": "histogram",
        "sessionledger_hook_latency_seconds": "summary",
        "sessionledger_hook_errors": "counter",
    }
    s = samples_of(text)
    assert s[("sessionledger_events_total", (("type", "SessionStarted"),))] == 3
    assert s[("sessionledger_events_total", (("type", "SessionSuspended"),))] == 2
    assert s[("sessionledger_events_total", (("type", "EventRecorded"),))] == 0
    assert s[("sessionledger_sessions", (("status", "SUSPENDED"),))] == 1
    assert s[("sessionledger_sessions", (("status", "FAILED"),))] == 1
    assert s[("sessionledger_sessions", (("status", "ARCHIVED"),))] == 1
    assert s[("sessionledger_sessions", (("status", "ACTIVE"),))] == 0
    assert s[("sessionledger_session_duration_seconds_count", ())] == 2
    assert s[("sessionledger_session_duration_seconds_sum", ())] == pytest.approx(92.0)
    assert s[("sessionledger_session_duration_seconds_bucket", (("le", "5.0"),))] == 1
    assert s[("sessionledger_session_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    assert s[("sessionledger_hook_latency_seconds_count", (("hook", "metrics"),))] == 12
    assert s[("sessionledger_hook_latency_seconds_count", (("hook", "boom"),))] == 1
    assert 0 < s[("sessionledger_hook_latency_seconds_sum", (("hook", "metrics"),))] < 1
    assert s[("sessionledger_hook_errors_total", (("hook", "boom"),))] == 1
    assert registry.errors == 1


def test_collector_can_join_another_prometheus_registry(make: Stream) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    metrics = MetricsHook()
    metrics(make(A, "SessionStarted"))
    other = CollectorRegistry()
    other.register(metrics.collector)
    s = samples_of(generate_latest(other).decode())
    assert s[("sessionledger_sessions", (("status", "ACTIVE"),))] == 1


def test_builtin_hooks_together(make: Stream, events_log: pytest.LogCaptureFixture) -> None:
    """The wiring the engine uses: both built-in hooks on one registry with observers."""
    registry = HookRegistry()
    metrics = MetricsHook()
    registry.latency_observer = metrics.observe_latency
    registry.error_observer = metrics.observe_error
    registry.subscribe(LoggingHook(), name="LoggingHook")
    registry.subscribe(metrics, name="MetricsHook")
    registry.dispatch(lifecycle(make))
    assert len([r for r in events_log.records if r.name == "sessionledger.events"]) == 12
    latency = metrics.snapshot()["hook_latency_seconds"]
    assert latency["LoggingHook"]["count"] == latency["MetricsHook"]["count"] == 12
    assert registry.errors == 0


# -- hooks indexed by session (review round 9: a hook per session scaled per event) -----------


def test_session_hooks_and_global_hooks_run_in_subscription_order(make: Stream) -> None:
    registry = HookRegistry()
    log: list[tuple[str, str, int]] = []
    registry.subscribe(Recorder("all-1", log))
    registry.subscribe(Recorder("a-1", log), sessions=[A])
    registry.subscribe(Recorder("all-2", log))
    registry.subscribe(Recorder("a-or-b", log), sessions=[A, B])
    registry.subscribe(Recorder("b-1", log), sessions=[B])
    registry.dispatch([make(A, "SessionStarted"), make(B, "SessionStarted")])
    registry.dispatch_one(make(C, "SessionStarted"))
    assert [(label, sid) for label, sid, _ in log] == [
        ("all-1", A), ("a-1", A), ("all-2", A), ("a-or-b", A),
        ("all-1", B), ("all-2", B), ("a-or-b", B), ("b-1", B),
        ("all-1", C), ("all-2", C)]
    assert len(registry.subscriptions) == 5


def test_an_event_is_offered_only_to_its_session_s_hooks_and_the_global_ones(
    make: Stream, monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = HookRegistry()
    for i in range(1000):  # a hook per session, as a caller watching each of its sessions
        registry.subscribe(Recorder(), sessions=[str(uuid.UUID(int=1000 + i))])
    registry.subscribe(Recorder())
    offered: list[int] = []
    deliver = registry._deliver

    def counting(event: SessionEvent, subscriptions: Any, *rest: Any) -> Any:
        offered.append(len(subscriptions))
        return deliver(event, subscriptions, *rest)

    monkeypatch.setattr(registry, "_deliver", counting)
    registry.dispatch_one(make(A, "SessionStarted"))
    registry.dispatch([make(str(uuid.UUID(int=1500)), "SessionStarted")])
    assert offered == [1, 2]


def test_a_session_hook_subscribed_mid_dispatch_waits_for_the_next(make: Stream) -> None:
    registry = HookRegistry()
    log: list[tuple[str, str, int]] = []

    def adds_one(event: SessionEvent) -> None:
        if event.version == 1:
            registry.subscribe(Recorder("late", log), sessions=[A])

    registry.subscribe(adds_one, sessions=[A])
    registry.dispatch([make(A, "SessionStarted"), make(A, "StateChanged")])
    assert log == []
    registry.dispatch_one(make(A, "StateChanged"))
    assert log == [("late", A, 3)]


def test_unsubscribing_session_hooks_stops_them_and_leaves_the_others(make: Stream) -> None:
    registry = HookRegistry()
    log: list[tuple[str, str, int]] = []
    handles = [registry.subscribe(Recorder(f"h{i}", log), sessions=[A, B]) for i in range(50)]
    everywhere = registry.subscribe(Recorder("all", log))
    for handle in handles[::2]:
        handle.unsubscribe()
    registry.dispatch_one(make(B, "SessionStarted"))
    assert [label for label, _, _ in log] == [f"h{i}" for i in range(1, 50, 2)] + ["all"]
    for handle in handles:
        handle.unsubscribe()
    everywhere.unsubscribe()
    assert registry.active is False and registry.subscriptions == ()
    registry.dispatch_one(make(A, "SessionStarted"))
    assert len(log) == 26
