"""In-process hooks end to end through SessionEngine (issue 4): delivery after commit only,
never for a failed command, version order, filters, batches, failing hooks, the built-in
LoggingHook and MetricsHook, and replays that must not fire anything.

Every test that needs a database runs on SQLite and PostgreSQL (`engine` also on SQLite in
memory); tests that read the store behind the engine's back use `backend.sql()` or a second
engine on the same database.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any
from uuid import UUID

import pytest
from _helpers import Backend
from prometheus_client.parser import text_string_to_metric_families

from sessionledger import (
    EVENT_TYPES,
    ConcurrencyConflict,
    EventTooLarge,
    InvalidArgument,
    InvalidSessionId,
    InvalidTransition,
    SessionConfig,
    SessionEngine,
    SessionEvent,
    SessionStatus,
    UnsupportedValue,
)
from sessionledger.projections.hooks import HookFailed
from sessionledger.retention import RetentionPolicy

EngineFactory = Callable[..., SessionEngine]

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """A hook that keeps every event it is given."""

    def __init__(self) -> None:
        self.events: list[SessionEvent] = []

    def __call__(self, event: SessionEvent) -> None:
        self.events.append(event)

    @property
    def keys(self) -> list[tuple[str, int, str]]:
        return [(e.session_id, e.version, e.type) for e in self.events]

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def clear(self) -> None:
        self.events.clear()


def boom(event: SessionEvent) -> None:
    raise RuntimeError(f"boom on {event.type} v{event.version}")


def quiet(**fields: Any) -> SessionConfig:
    """A config without the built-in hooks: only the test's own hooks are subscribed."""
    return SessionConfig(lifecycle_hooks=False, **fields)


def stored(backend: Backend) -> list[tuple[int, str, int, str]]:
    """(position, session id, version, type) of every stored event, in position order."""
    return [(int(p), s, int(v), t) for p, s, v, t in backend.sql(
        "SELECT position, session_id, version, type FROM sl_events ORDER BY position")]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus exposition parsed by prometheus_client: (sample name, labels) -> value."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def families(text: str) -> set[str]:
    return {family.name for family in text_string_to_metric_families(text)}


# -- delivered after the commit, and only then ---------------------------------------------------


def test_a_hook_sees_its_event_already_committed(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    writer = engine_factory(quiet())
    reader = engine_factory(quiet())
    checks: list[tuple[str, int, int, int, list[Any]]] = []

    def look(event: SessionEvent) -> None:
        # another engine (its own connection) and a raw connection: only committed data shows
        seen = reader.get(event.session_id, refresh=True)
        rows = backend.sql("SELECT session_id, version, type FROM sl_events WHERE position = ?",
                           (event.position,))
        checks.append((event.type, event.version, seen.version, len(reader.history(
            event.session_id)), rows))

    writer.hooks.subscribe(look)
    sid = writer.create("committed", state={"n": 0})
    writer.update(sid, {"n": 1})
    writer.checkpoint(sid, "cp")
    writer.end(sid)
    assert [c[:2] for c in checks] == [("SessionStarted", 1), ("StateChanged", 2),
                                       ("CheckpointTaken", 3), ("SessionEnded", 4)]
    for event_type, version, seen_version, history_length, rows in checks:
        assert seen_version == version
        assert history_length == version
        assert rows == [(sid, version, event_type)]


def test_hooks_see_the_commit_also_for_batches(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    engine = engine_factory(quiet())
    ids = [engine.create(f"s{i}") for i in range(3)]
    visible: list[bool] = []

    def look(event: SessionEvent) -> None:
        visible.append(bool(backend.sql(
            "SELECT 1 FROM sl_events WHERE session_id = ? AND version = ?",
            (event.session_id, event.version))))

    engine.hooks.subscribe(look)
    assert set(engine.save_all_active()) == set(ids)
    assert visible == [True, True, True]


# -- never for a command that failed --------------------------------------------------------------


def test_no_delivery_for_refused_commands(engine: SessionEngine) -> None:
    recorder = Recorder()
    sid = engine.create("refused", state={"a": 1})
    engine.checkpoint(sid, "cp")
    engine.hooks.subscribe(recorder)
    engine.end(sid)
    recorder.clear()
    with pytest.raises(InvalidTransition):
        engine.update(sid, {"a": 2})
    with pytest.raises(InvalidTransition):
        engine.record(sid, "late", {"x": 1})
    with pytest.raises(InvalidTransition):
        engine.resume(sid)
    with pytest.raises(InvalidTransition):
        engine.end(sid)
    with pytest.raises(InvalidArgument):
        engine.create("")
    with pytest.raises(UnsupportedValue):
        engine.create("bad", state={"x": object()})
    with pytest.raises(ConcurrencyConflict):
        engine.archive(sid, expected_version=1)
    assert recorder.events == []
    assert engine.get(sid, refresh=True).version == 3


def test_no_delivery_for_an_event_too_large(engine_backend: Backend) -> None:
    recorder = Recorder()
    with SessionEngine(engine_backend.url, quiet(max_event_bytes=512)) as engine:
        sid = engine.create("big")
        engine.hooks.subscribe(recorder)
        with pytest.raises(EventTooLarge):
            engine.record(sid, "blob", {"bytes": os.urandom(4096)})  # random: lz4 cannot shrink
        with pytest.raises(EventTooLarge):
            engine.create("big2", state={"bytes": os.urandom(4096)})
        assert recorder.events == []
        assert engine.get(sid, refresh=True).version == 1
        engine.record(sid, "small", {"n": 1})  # the engine still works and delivers
        assert recorder.keys == [(sid, 2, "EventRecorded")]


def test_no_delivery_when_the_store_refuses_a_stale_write(engine_factory: EngineFactory) -> None:
    a = engine_factory(quiet())
    b = engine_factory(quiet())
    sid = a.create("race", state={"n": 0})
    a.get(sid)  # a holds version 1 in its working set
    b.update(sid, {"n": 1})  # the store is at version 2 now
    recorder = Recorder()
    a.hooks.subscribe(recorder)
    # a decides on its stale copy; the store's unique (session, version) refuses the append
    with pytest.raises(ConcurrencyConflict):
        a.update(sid, {"n": 99}, expected_version=1)
    assert recorder.events == []
    assert [e.version for e in a.history(sid)] == [1, 2]
    assert a.update(sid, {"n": 2}) == 3  # a re-reads; this one is delivered once
    assert recorder.keys == [(sid, 3, "StateChanged")]


def test_no_delivery_for_an_idempotent_retry(engine_factory: EngineFactory) -> None:
    a = engine_factory(quiet())
    b = engine_factory(quiet())
    rec_a, rec_b = Recorder(), Recorder()
    a.hooks.subscribe(rec_a)
    b.hooks.subscribe(rec_b)
    sid = a.create("idem", idempotency_key="create-1")
    assert a.create("idem", idempotency_key="create-1") == sid
    assert b.create("idem", idempotency_key="create-1") == sid
    v = a.update(sid, {"n": 1}, idempotency_key="k1")
    assert a.update(sid, {"n": 1}, idempotency_key="k1") == v
    assert b.update(sid, {"n": 1}, idempotency_key="k1") == v
    assert b.record(sid, "other", {"x": 1}, idempotency_key="k1") == v  # same key, other command
    assert a.update(sid, {"n": 1}) == v  # a delta that changes nothing writes nothing
    assert rec_a.keys == [(sid, 1, "SessionStarted"), (sid, 2, "StateChanged")]
    assert rec_b.events == []
    assert [e.version for e in a.history(sid)] == [1, 2]


# -- order, position, session name ----------------------------------------------------------------


def test_version_order_per_session_and_increasing_positions(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    engine = engine_factory(quiet())
    recorder = Recorder()
    engine.hooks.subscribe(recorder)
    a = engine.create("alpha", state={"i": 0})
    b = engine.create("beta")
    for i in range(1, 6):
        engine.update(a, {"i": i})
        engine.record(b, "tick", {"i": i})
    engine.checkpoint(a, "cp")
    engine.suspend(b)
    engine.save_all_active()
    engine.resume(b)
    engine.end(a, outcome="failed")
    per_session: dict[str, list[int]] = {}
    for event in recorder.events:
        per_session.setdefault(event.session_id, []).append(event.version)
    for sid, versions in per_session.items():
        assert versions == list(range(1, len(versions) + 1)), sid
        assert len(versions) == len(engine.history(sid))
    positions = [e.position for e in recorder.events]
    assert all(isinstance(p, int) for p in positions)
    # exactly the stored rows, in the stored (commit) order
    assert [(e.position, e.session_id, e.version, e.type) for e in recorder.events] == stored(
        backend)
    assert {e.session_name for e in recorder.events if e.session_id == a} == {"alpha"}
    assert {e.session_name for e in recorder.events if e.session_id == b} == {"beta"}


def test_delivered_events_equal_history(engine: SessionEngine) -> None:
    recorder = Recorder()
    engine.hooks.subscribe(recorder)
    sid = engine.create("same", tags=["t"], metadata={"m": 1}, state={"x": [1, 2]},
                        actor="alice", correlation_id="c-1")
    engine.update(sid, {"x": [3]}, delete=[], actor="bob")
    engine.record(sid, "tool_call", {"tool": "search", "q": "?"}, correlation_id="c-2")
    engine.checkpoint(sid, "cp")
    engine.restore(sid, checkpoint="cp")
    engine.suspend(sid, reason="lunch")
    engine.resume(sid)
    engine.end(sid, outcome="cancelled")
    engine.archive(sid)
    history = engine.history(sid)
    assert len(recorder.events) == len(history) == 9
    for delivered, replayed in zip(recorder.events, history, strict=True):
        assert (delivered.session_id, delivered.version, delivered.type, delivered.timestamp,
                delivered.actor, delivered.correlation_id, delivered.data) == (
            replayed.session_id, replayed.version, replayed.type, replayed.timestamp,
            replayed.actor, replayed.correlation_id, replayed.data)
        assert delivered.session_name == "same"
    assert recorder.types() == ["SessionStarted", "StateChanged", "EventRecorded",
                                "CheckpointTaken", "SessionRestored", "SessionSuspended",
                                "SessionResumed", "SessionEnded", "SessionArchived"]


# -- filters and the handle ----------------------------------------------------------------------


def test_events_and_sessions_filters(engine: SessionEngine) -> None:
    by_type, by_session, both, by_uuid = Recorder(), Recorder(), Recorder(), Recorder()
    a = engine.create("a")
    b = engine.create("b")
    engine.hooks.subscribe(by_type, events=["SessionEnded", "CheckpointTaken"])
    engine.hooks.subscribe(by_session, sessions=[b])
    engine.hooks.subscribe(both, events=("StateChanged",), sessions={a})
    engine.hooks.subscribe(by_uuid, sessions=[UUID(a)])
    engine.update(a, {"n": 1})
    engine.update(b, {"n": 1})
    engine.checkpoint(b, "cp")
    engine.end(a)
    engine.end(b)
    c = engine.create("c")
    engine.end(c)
    assert by_type.keys == [(b, 3, "CheckpointTaken"), (a, 3, "SessionEnded"),
                            (b, 4, "SessionEnded"), (c, 2, "SessionEnded")]
    assert by_session.keys == [(b, 2, "StateChanged"), (b, 3, "CheckpointTaken"),
                               (b, 4, "SessionEnded")]
    assert both.keys == [(a, 2, "StateChanged")]
    assert by_uuid.keys == [(a, 2, "StateChanged"), (a, 3, "SessionEnded")]


@pytest.mark.parametrize("kwargs, error", [
    ({"events": "SessionEnded"}, InvalidArgument),
    ({"events": ["NoSuchEvent"]}, InvalidArgument),
    ({"events": []}, InvalidArgument),
    ({"sessions": "0b1d3c4e-0000-4000-8000-000000000000"}, InvalidArgument),
    ({"sessions": []}, InvalidArgument),
    ({"sessions": ["not-a-uuid"]}, InvalidSessionId),
])
def test_bad_subscriptions_are_refused(
    memory_engine: SessionEngine, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    before = memory_engine.hooks.subscriptions
    with pytest.raises(error):
        memory_engine.hooks.subscribe(Recorder(), **kwargs)
    with pytest.raises(InvalidArgument):
        memory_engine.hooks.subscribe("not callable")  # type: ignore[arg-type]
    assert memory_engine.hooks.subscriptions == before


def test_every_event_type_can_be_filtered_on(memory_engine: SessionEngine) -> None:
    handles = [memory_engine.hooks.subscribe(Recorder(), events=[t]) for t in EVENT_TYPES]
    assert len(handles) == len(EVENT_TYPES)


def test_unsubscribe_stops_delivery(engine: SessionEngine) -> None:
    kept, dropped, scoped = Recorder(), Recorder(), Recorder()
    engine.hooks.subscribe(kept)
    handle = engine.hooks.subscribe(dropped)
    sid = engine.create("u")
    with engine.hooks.subscribe(scoped):
        engine.update(sid, {"n": 1})
    handle.unsubscribe()
    handle.unsubscribe()  # idempotent
    assert not handle.active
    engine.update(sid, {"n": 2})
    engine.end(sid)
    assert [e.version for e in kept.events] == [1, 2, 3, 4]
    assert [e.version for e in dropped.events] == [1, 2]
    assert [e.version for e in scoped.events] == [2]


def test_a_hook_unsubscribing_during_a_batch_gets_nothing_further(engine: SessionEngine) -> None:
    ids = [engine.create(f"s{i}") for i in range(3)]
    got: list[str] = []
    handle: Any = None

    def once(event: SessionEvent) -> None:
        got.append(event.session_id)
        handle.unsubscribe()

    handle = engine.hooks.subscribe(once)
    assert len(engine.save_all_active()) == 3
    assert len(got) == 1 and got[0] in ids


def test_no_hooks_no_events_built(engine: SessionEngine) -> None:
    # without lifecycle hooks and subscribers the registry is inactive: commands skip delivery
    with SessionEngine("sqlite://", quiet()) as bare:
        assert bare.hooks.active is False
        sid = bare.create("bare")
        bare.update(sid, {"n": 1})
        assert bare.get(sid).version == 2
    assert engine.hooks.active is True  # the default engine has the built-in hooks


# -- batch operations deliver every event they wrote ---------------------------------------------


def test_save_all_active_delivers_every_save(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    engine = engine_factory(quiet())
    active = [engine.create(f"active-{i}", state={"i": i}) for i in range(4)]
    suspended = engine.create("suspended")
    engine.suspend(suspended)
    ended = engine.create("ended")
    engine.end(ended)
    engine.update(active[0], {"i": 10})
    recorder = Recorder()
    engine.hooks.subscribe(recorder)
    versions = engine.save_all_active()
    assert set(versions) == set(active)
    assert sorted(recorder.keys) == sorted((sid, v, "SessionSaved") for sid, v in versions.items())
    positions = [int(e.position or 0) for e in recorder.events]
    assert positions == list(range(positions[0], positions[0] + 4))  # one transaction
    assert {e.session_id: e.session_name for e in recorder.events} == {
        sid: f"active-{i}" for i, sid in enumerate(active)}
    rows = stored(backend)
    assert [(e.position, e.session_id, e.version, e.type) for e in recorder.events] == rows[-4:]


def test_restore_recent_delivers_every_recovery_after_a_restart(
    engine_factory: EngineFactory,
) -> None:
    first = engine_factory(quiet())
    ids = [first.create(f"r{i}", state={"i": i}) for i in range(4)]
    first.suspend(ids[1])
    first.end(ids[3])
    first.close()
    engine = engine_factory(quiet())
    recorder = Recorder()
    engine.hooks.subscribe(recorder)
    restored = engine.restore_recent(10)
    assert {s.id for s in restored} == set(ids[:3])
    assert sorted(recorder.keys) == sorted(
        (s.id, s.version, "SessionRestored") for s in restored)
    assert all(e.data["reason"] == "recovery" for e in recorder.events)
    recorder.clear()
    assert len(engine.restore_recent(2)) == 2
    assert recorder.types() == ["SessionRestored"] * 2
    recorder.clear()
    assert engine.restore_recent(0) == []
    assert recorder.events == []


def test_cleanup_archive_delivers_every_archive(engine_factory: EngineFactory) -> None:
    engine = engine_factory(quiet())
    ended = []
    for i, outcome in enumerate(("completed", "failed", "cancelled")):
        sid = engine.create(f"e{i}")
        engine.end(sid, outcome=outcome)
        ended.append(sid)
    live = engine.create("live")
    recorder = Recorder()
    engine.hooks.subscribe(recorder)
    dry = engine.cleanup(RetentionPolicy(keep_last=0, dry_run=True))
    assert sorted(dry.session_ids) == sorted(ended)
    assert recorder.events == []  # a dry run writes and delivers nothing
    report = engine.cleanup(RetentionPolicy(keep_last=0, archive=True))
    assert sorted(report.archived) == sorted(ended)
    assert sorted(recorder.keys) == sorted((sid, 3, "SessionArchived") for sid in ended)
    assert live not in {e.session_id for e in recorder.events}
    assert all(engine.get(sid, refresh=True).status is SessionStatus.ARCHIVED for sid in ended)


# -- failing hooks ------------------------------------------------------------------------------


def test_a_failing_hook_is_isolated_logged_and_counted(
    engine_factory: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_factory()  # the built-in hooks too: the failure is counted in metrics()
    other = engine_factory(quiet())
    before, after = Recorder(), Recorder()
    engine.hooks.subscribe(before)
    failing = engine.hooks.subscribe(boom)
    engine.hooks.subscribe(after)
    caplog.set_level(logging.ERROR, logger="sessionledger.hooks")
    sid = engine.create("fragile", state={"n": 0})
    v2 = engine.update(sid, {"n": 1})
    engine.save_all_active()
    engine.end(sid)
    assert [e.version for e in before.events] == [e.version for e in after.events] == [1, 2, 3, 4]
    # nothing was rolled back: the store and another engine see every event
    assert [e.version for e in other.history(sid)] == [1, 2, 3, 4]
    assert other.get(sid, refresh=True).state == {"n": 1}
    assert engine.get(sid).version == 4 and v2 == 2
    records = [r for r in caplog.records if r.name == "sessionledger.hooks"]
    assert len(records) == 4
    for record, version, event_type in zip(
        records, [1, 2, 3, 4], ["SessionStarted", "StateChanged", "SessionSaved", "SessionEnded"],
        strict=True,
    ):
        message = record.getMessage()
        assert failing.name in message and "boom" in failing.name
        assert event_type in message and sid in message
        assert record.levelno == logging.ERROR
        assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
        assert (record.hook, record.session_id, record.version, record.event_type) == (  # type: ignore[attr-defined]
            failing.name, sid, version, event_type)
    figures = engine.metrics()
    assert figures["hook_errors_total"] == {failing.name: 4}
    assert figures["events_total"]["SessionStarted"] == 1  # the built-in hooks still ran
    prom = samples(engine.metrics(format="prometheus"))
    assert prom[("sessionledger_hook_errors_total", frozenset({("hook", failing.name)}))] == 4


def test_hook_errors_raise_reaches_the_caller_after_every_hook_ran(
    engine_factory: EngineFactory,
) -> None:
    engine = engine_factory(quiet(hook_errors="raise"))
    other = engine_factory(quiet())
    before, after = Recorder(), Recorder()
    engine.hooks.subscribe(before)
    failing = engine.hooks.subscribe(boom)
    engine.hooks.subscribe(after)

    with pytest.raises(HookFailed) as created:
        engine.create("loud", state={"n": 0})
    sid = created.value.failures[0][1].session_id
    assert after.keys == [(sid, 1, "SessionStarted")]
    assert other.get(sid, refresh=True).version == 1  # committed before the hooks ran

    with pytest.raises(HookFailed) as updated:
        engine.update(sid, {"n": 1})
    assert [(name, e.version) for name, e, _ in updated.value.failures] == [(failing.name, 2)]
    assert isinstance(updated.value.__cause__, RuntimeError)
    assert after.keys[-1] == (sid, 2, "StateChanged")
    assert other.get(sid, refresh=True).state == {"n": 1}

    # the engine is not confused by the error: the next command follows on
    s2 = other.create("second")
    with pytest.raises(HookFailed) as batch:
        engine.save_all_active()
    assert sorted(e.session_id for _, e, _ in batch.value.failures) == sorted([sid, s2])
    assert sorted(k[0] for k in after.keys[-2:]) == sorted([sid, s2])  # all delivered first
    with pytest.raises(HookFailed):
        engine.end(sid)
    assert engine.get(sid).version == 4
    assert [e.type for e in other.history(sid)] == [
        "SessionStarted", "StateChanged", "SessionSaved", "SessionEnded"]
    assert [e.version for e in before.events] == [e.version for e in after.events]


def test_hook_errors_raise_collects_several_failures() -> None:
    engine2 = SessionEngine("sqlite://", quiet(hook_errors="raise"))
    try:
        def boom2(event: SessionEvent) -> None:
            raise ValueError("second")

        engine2.hooks.subscribe(boom)
        engine2.hooks.subscribe(boom2)
        with pytest.raises(HookFailed) as failed:
            engine2.create("two failures")
        assert [type(error) for _, _, error in failed.value.failures] == [RuntimeError,
                                                                          ValueError]
        assert "1 more hook failure" in str(failed.value)
    finally:
        engine2.close()


def test_invalid_hook_errors_setting() -> None:
    with pytest.raises(InvalidArgument):
        SessionConfig(hook_errors="ignore")


# -- built-in hooks -------------------------------------------------------------------------------


def test_logging_hook_records_each_event_with_structured_fields(
    engine: SessionEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sessionledger.events")
    sid = engine.create("logged", actor="alice", correlation_id="c-9")
    engine.update(sid, {"secret": "do-not-log"}, actor="bob")
    engine.end(sid)
    records = [r for r in caplog.records if r.name == "sessionledger.events"]
    fields = [(r.session_id, r.event_type, r.version, r.actor)  # type: ignore[attr-defined]
              for r in records]
    assert fields == [(sid, "SessionStarted", 1, "alice"), (sid, "StateChanged", 2, "bob"),
                      (sid, "SessionEnded", 3, None)]
    assert all(r.levelno == logging.INFO for r in records)
    assert records[0].correlation_id == "c-9"  # type: ignore[attr-defined]
    assert records[0].session_name == "logged"  # type: ignore[attr-defined]
    positions = [r.position for r in records]  # type: ignore[attr-defined]
    assert all(isinstance(p, int) for p in positions) and positions == sorted(positions)
    assert len(set(positions)) == 3
    assert "SessionStarted" in records[0].getMessage() and sid in records[0].getMessage()
    assert all("do-not-log" not in r.getMessage() for r in records)


def test_metrics_count_events_and_sessions_by_status(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    engine = engine_factory()
    s1 = engine.create("one", state={"n": 0})
    engine.update(s1, {"n": 1})
    engine.checkpoint(s1, "cp")
    engine.update(s1, {"n": 2})
    engine.restore(s1, checkpoint="cp")
    engine.save(s1)
    engine.end(s1)
    engine.archive(s1)
    s2 = engine.create("two")
    engine.suspend(s2)
    s3 = engine.create("three")
    engine.suspend(s3)
    engine.resume(s3)
    engine.end(s3, outcome="failed")
    s4 = engine.create("four")
    engine.record(s4, "tool_call", {"tool": "x"})
    s5 = engine.create("five")
    engine.end(s5, outcome="cancelled")
    with pytest.raises(InvalidTransition):
        engine.update(s5, {"n": 1})  # refused: counted nowhere

    expected_events = {
        "SessionStarted": 5, "StateChanged": 2, "CheckpointTaken": 1, "SessionRestored": 1,
        "SessionSaved": 1, "SessionEnded": 3, "SessionArchived": 1, "SessionSuspended": 2,
        "SessionResumed": 1, "EventRecorded": 1,
    }
    expected_sessions = {"ACTIVE": 1, "SUSPENDED": 1, "COMPLETED": 0, "FAILED": 1,
                         "CANCELLED": 1, "ARCHIVED": 1}
    total = sum(expected_events.values())
    assert total == len(stored(backend))

    # a snapshot this release cannot use: the engine loads past it and counts it
    backend.sql("UPDATE sl_snapshots SET format_version = 99 WHERE session_id = ?", (s1,))
    assert engine.get(s1, refresh=True).status is SessionStatus.ARCHIVED

    figures = engine.metrics()
    assert figures["events_total"] == expected_events
    assert figures["sessions"] == expected_sessions
    duration = figures["session_duration_seconds"]
    assert duration["count"] == 3 and duration["buckets"]["+Inf"] == 3
    assert 0 <= duration["min"] <= duration["max"] < 60
    latency = figures["hook_latency_seconds"]
    assert {name: stats["count"] for name, stats in latency.items()} == {
        "LoggingHook": total, "MetricsHook": total}
    assert figures["hook_errors_total"] == {}
    assert figures["snapshots_skipped"] == {"newer_format": 1}

    text = engine.metrics(format="prometheus")
    prom = samples(text)
    for event_type, n in expected_events.items():
        assert prom[("sessionledger_events_total", frozenset({("type", event_type)}))] == n
    for status, n in expected_sessions.items():
        assert prom[("sessionledger_sessions", frozenset({("status", status)}))] == n
    assert prom[("sessionledger_session_duration_seconds_count", frozenset())] == 3
    assert prom[("sessionledger_session_duration_seconds_bucket",
                 frozenset({("le", "+Inf")}))] == 3
    assert prom[("sessionledger_hook_latency_seconds_count",
                 frozenset({("hook", "MetricsHook")}))] == total
    assert prom[("sessionledger_snapshots_skipped_total",
                 frozenset({("reason", "newer_format")}))] == 1
    assert {"sessionledger_events", "sessionledger_sessions",
            "sessionledger_session_duration_seconds", "sessionledger_hook_latency_seconds",
            "sessionledger_hook_errors", "sessionledger_snapshots_skipped"} <= families(text)


def test_metrics_after_a_restart_and_restore_recent_keep_suspended_sessions_suspended(
    engine_factory: EngineFactory,
) -> None:
    """restore_recent() is how an application picks its sessions up after a restart: the new
    engine's MetricsHook first sees them through the recovery's SessionRestored. A SUSPENDED
    session stays SUSPENDED (recovery does not resume it), so the gauge must say so."""
    first = engine_factory()
    paused = first.create("paused")
    first.suspend(paused)
    running = first.create("running")
    first.close()
    engine = engine_factory()
    recovered = {s.id: s.status for s in engine.restore_recent(10)}
    assert recovered == {paused: SessionStatus.SUSPENDED, running: SessionStatus.ACTIVE}
    figures = engine.metrics()
    assert figures["events_total"]["SessionRestored"] == 2
    assert figures["sessions"]["ACTIVE"] == 1
    assert figures["sessions"]["SUSPENDED"] == 1
    engine.resume(paused)
    assert engine.metrics()["sessions"]["ACTIVE"] == 2
    assert engine.metrics()["sessions"]["SUSPENDED"] == 0


def test_metrics_are_per_engine_and_see_only_its_own_commits(
    engine_factory: EngineFactory,
) -> None:
    a = engine_factory()
    b = engine_factory()
    sid = a.create("mine")
    b.update(sid, {"n": 1})
    assert a.metrics()["events_total"]["StateChanged"] == 0
    assert b.metrics()["events_total"]["StateChanged"] == 1
    assert a.metrics()["events_total"]["SessionStarted"] == 1
    assert b.metrics()["events_total"]["SessionStarted"] == 0


def test_metrics_format_is_checked(memory_engine: SessionEngine) -> None:
    with pytest.raises(InvalidArgument):
        memory_engine.metrics(format="json")  # type: ignore[call-overload]


def test_without_lifecycle_hooks_nothing_is_logged_or_counted(
    engine_factory: EngineFactory, backend: Backend, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="sessionledger.events")
    engine = engine_factory(quiet())
    assert engine.hooks.subscriptions == ()
    sid = engine.create("silent")
    engine.save(sid)
    engine.end(sid)
    assert [r for r in caplog.records if r.name == "sessionledger.events"] == []
    assert engine.metrics() == {"snapshots_skipped": {}}
    backend.sql("UPDATE sl_snapshots SET format_version = 99")
    engine.get(sid, refresh=True)
    assert engine.metrics() == {"snapshots_skipped": {"newer_format": 1}}
    text = engine.metrics(format="prometheus")
    assert families(text) == {"sessionledger_snapshots_skipped"}
    # every reason from 0 (a series born at its first count hides it from rate())
    assert samples(text) == {("sessionledger_snapshots_skipped_total",
                              frozenset({("reason", reason)})): count
                             for reason, count in (("newer_format", 1.0), ("corrupted", 0.0),
                                                   ("incomplete", 0.0))}


def test_lifecycle_hooks_on_by_default_and_logging_goes_nowhere_unconfigured(
    engine: SessionEngine, caplog: pytest.LogCaptureFixture
) -> None:
    names = [s.name for s in engine.hooks.subscriptions]
    assert names == ["LoggingHook", "MetricsHook"]
    # at the default WARNING level the INFO records are not even built
    caplog.set_level(logging.WARNING)
    engine.create("default")
    assert [r for r in caplog.records if r.name == "sessionledger.events"] == []
    assert engine.metrics()["events_total"]["SessionStarted"] == 1


# -- replays never fire hooks ----------------------------------------------------------------------


def test_replays_deliver_nothing(engine_factory: EngineFactory) -> None:
    engine = engine_factory(snapshot_every=3)
    sid = engine.create("replayed", state={"n": 0})
    for n in range(1, 8):
        engine.update(sid, {"n": n})
    engine.checkpoint(sid, "cp")
    engine.save(sid)
    other = engine.create("other")
    engine.end(other)
    recorder = Recorder()
    engine.hooks.subscribe(recorder)
    counted = engine.metrics()["events_total"]

    assert engine.get(sid, refresh=True).version == 10
    assert len(engine.history(sid)) == 10
    assert len(engine.history(sid, types=["StateChanged"])) == 7
    # the audit queries replay old versions: they must not fire anything either
    assert engine.state_at(sid, version=4).state == {"n": 3}
    assert engine.state_at(sid, version=1).version == 1
    assert len(engine.diff(sid, 1, 8).changed) == 1
    assert [entry.version for entry in engine.blame(sid, "n")][-1] == 8
    assert len(list(engine.timeline())) == 12
    assert engine.verify().ok
    assert engine.rebuild_snapshots() >= 2
    assert engine.rebuild("catalog") == 12
    assert len(engine.find()) == 2
    assert len(engine.list_sessions()) == 2
    engine.run_subscribers(until_idle=True)
    assert engine.restore_recent(0) == []
    # a restart: a new engine loads everything and delivers nothing to its own hooks
    fresh = engine_factory()
    fresh_recorder = Recorder()
    fresh.hooks.subscribe(fresh_recorder)
    assert fresh.get(sid).state == {"n": 7}
    assert fresh.get(other).status is SessionStatus.COMPLETED
    assert recorder.events == [] and fresh_recorder.events == []
    assert engine.metrics()["events_total"] == counted
    assert sum(fresh.metrics()["events_total"].values()) == 0

    # a restore replays old versions to build the state, but delivers only its own event
    engine.restore(sid, checkpoint="cp")
    assert recorder.keys == [(sid, 11, "SessionRestored")]


# -- what a hook may do ---------------------------------------------------------------------------


def test_a_hook_mutating_the_event_changes_nothing_stored(engine: SessionEngine) -> None:
    def vandal(event: SessionEvent) -> None:
        data = event.data
        if "state" in data:
            data["state"]["hacked"] = True
        if "set" in data:
            data["set"]["n"] = "hacked"
        data["extra"] = "x"

    engine.hooks.subscribe(vandal)
    sid = engine.create("guarded", state={"n": 0, "nested": {"a": [1]}})
    engine.update(sid, {"n": 1})
    engine.record(sid, "r", {"payload": [1, 2]})
    assert engine.get(sid).state == {"n": 1, "nested": {"a": [1]}}
    assert engine.get(sid, refresh=True).state == {"n": 1, "nested": {"a": [1]}}
    history = engine.history(sid)
    assert history[0].data["state"] == {"n": 0, "nested": {"a": [1]}}
    assert history[1].data["set"] == {"n": 1}
    assert all("extra" not in e.data for e in history)
    assert engine.update(sid, {"n": 2}) == 4  # the working set still decides correctly


def test_a_hook_that_issues_a_command_works(engine: SessionEngine) -> None:
    def follow_up(event: SessionEvent) -> None:
        if event.type == "SessionStarted":
            engine.record(event.session_id, "welcome", {"name": event.session_name})
        elif event.type == "SessionEnded" and event.data["outcome"] == "failed":
            engine.archive(event.session_id)

    engine.hooks.subscribe(follow_up)
    sid = engine.create("reentrant", state={"n": 0})
    assert engine.get(sid).version == 2
    assert [e.type for e in engine.history(sid)] == ["SessionStarted", "EventRecorded"]
    assert engine.history(sid)[1].data == {"kind": "welcome", "payload": {"name": "reentrant"}}
    engine.update(sid, {"n": 1})
    engine.end(sid, outcome="failed")
    assert engine.get(sid).status is SessionStatus.ARCHIVED
    assert engine.get(sid, refresh=True).version == 5
    figures = engine.metrics()
    assert figures["events_total"]["EventRecorded"] == 1
    assert figures["sessions"]["ARCHIVED"] == 1


def test_hooks_after_a_reentrant_hook_still_see_version_order(engine: SessionEngine) -> None:
    """A command issued from a hook commits while the outer events are still being delivered:
    the hooks subscribed after the re-entrant one must still get each session's events in
    version order (issue 4: "in version order per session")."""

    def follow_up(event: SessionEvent) -> None:
        if event.type == "SessionStarted":
            engine.record(event.session_id, "welcome", {})

    recorder = Recorder()
    engine.hooks.subscribe(follow_up)
    engine.hooks.subscribe(recorder)
    sid = engine.create("ordered")
    assert engine.get(sid).version == 2
    assert [(e.version, e.type) for e in recorder.events] == [
        (1, "SessionStarted"), (2, "EventRecorded")]
    assert [e.position for e in recorder.events] == sorted(
        e.position for e in recorder.events)  # type: ignore[type-var]


def test_hooks_from_several_threads_sharing_one_engine(engine: SessionEngine) -> None:
    recorder = Recorder()
    engine.hooks.subscribe(recorder)
    ids = [engine.create(f"t{i}") for i in range(4)]

    def work(sid: str) -> None:
        for n in range(15):
            engine.update(sid, {"n": n})

    threads = [threading.Thread(target=work, args=(sid,)) for sid in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    per_session: dict[str, list[int]] = {}
    for event in recorder.events:
        per_session.setdefault(event.session_id, []).append(event.version)
    assert per_session == {sid: list(range(1, 17)) for sid in ids}
    positions = [e.position for e in recorder.events]
    assert positions == sorted(positions)  # type: ignore[type-var]
    assert len(set(positions)) == len(positions)
    assert engine.metrics()["events_total"]["StateChanged"] == 60


def test_a_hook_mutating_nested_values_changes_no_session(engine: SessionEngine) -> None:
    """Hooks may get an event's own data when the session keeps nothing mutable of it; a list
    or map inside a state value must still be the hook's own copy."""
    def vandal(event: SessionEvent) -> None:
        for container in (event.data.get("set", {}), event.data.get("state", {}),
                          event.data.get("metadata", {})):
            for value in container.values():
                if isinstance(value, list):
                    value.append("hacked")
                elif isinstance(value, dict):
                    value["hacked"] = True

    engine.hooks.subscribe(vandal)
    sid = engine.create("nested", metadata={"m": {"k": 1}}, state={"notes": ["a"]})
    engine.checkpoint(sid, "cp")
    engine.update(sid, {"notes": ["a", "b"], "cfg": {"x": 1}, "n": 1})
    engine.restore(sid, checkpoint="cp")
    session = engine.get(sid)
    assert session.state == {"notes": ["a"]}
    assert session.metadata == {"m": {"k": 1}}
    assert engine.state_at(sid, version=3).state == {"notes": ["a", "b"], "cfg": {"x": 1},
                                                      "n": 1}
    assert engine.get(sid, refresh=True) == session


def test_raise_mode_delivers_what_a_failing_hook_issued_then_raises(
        engine_factory: EngineFactory) -> None:
    """A hook that issues a command and then raises, on a one-event command (the lean path):
    the command it issued is delivered to every hook, then HookFailed reaches the caller."""
    engine = engine_factory(quiet(hook_errors="raise"))
    recorder = Recorder()

    def noisy(event: SessionEvent) -> None:
        if event.type == "StateChanged":
            engine.record(event.session_id, "noticed", {})
            raise RuntimeError("after issuing a command")

    engine.hooks.subscribe(noisy)
    engine.hooks.subscribe(recorder)
    sid = engine.create("raising", state={"n": 0})
    with pytest.raises(HookFailed, match="after issuing a command") as raised:
        engine.update(sid, {"n": 1})
    assert len(raised.value.failures) == 1
    assert [(e.version, e.type) for e in recorder.events] == [
        (1, "SessionStarted"), (2, "StateChanged"), (3, "EventRecorded")]
    assert engine.get(sid, refresh=True).version == 3  # nothing rolled back


def test_metrics_forget_the_sessions_this_engine_purges(engine_factory: EngineFactory) -> None:
    """A purged session is no session: it leaves the status it was counted in, and the
    hook's memory (it stayed counted COMPLETED for good, one dict entry each)."""
    engine = engine_factory()
    ended = [engine.create(f"e{i}") for i in range(5)]
    for sid in ended:
        engine.end(sid, outcome="completed")
    kept = engine.create("kept")
    before = engine.metrics()["sessions"]
    assert (before["COMPLETED"], before["ACTIVE"]) == (5, 1)
    purged = engine.cleanup(RetentionPolicy(max_age=0, purge=True)).session_ids
    assert sorted(purged) == sorted(ended)
    after = engine.metrics()["sessions"]
    assert (after["COMPLETED"], after["ACTIVE"]) == (0, 1)
    assert engine._metrics_hook is not None
    assert set(engine._metrics_hook._status_of) == {kept}
