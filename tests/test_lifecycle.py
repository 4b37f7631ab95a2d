"""The session lifecycle: the issue's walkthrough, the status machine, update/restore semantics,
get() copies, timestamps and history contents."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import pytest
from _helpers import EVENT_TYPE_NAMES, snapshot
from conftest import EngineFactory

from sessionledger import (
    CheckpointNotFound,
    InvalidArgument,
    InvalidTransition,
    SessionEngine,
    SessionLedgerError,
    SessionNotFound,
    SessionStatus,
)

ACTIVE = SessionStatus.ACTIVE
SUSPENDED = SessionStatus.SUSPENDED
COMPLETED = SessionStatus.COMPLETED
FAILED = SessionStatus.FAILED
CANCELLED = SessionStatus.CANCELLED
ARCHIVED = SessionStatus.ARCHIVED
ALL_STATUSES = [ACTIVE, SUSPENDED, COMPLETED, FAILED, CANCELLED, ARCHIVED]


# -- the walkthrough of issue 2 ---------------------------------------------------------------


def test_issue_walkthrough(engine: SessionEngine) -> None:
    sid = engine.create("research-run", tags=["agent"], metadata={"model": "x"},
                        state={"step": 0}, actor="alice")
    assert isinstance(sid, str)
    assert str(uuid.UUID(sid)) == sid
    assert engine.update(sid, {"step": 1, "notes": ["a"]}, actor="alice") == 2
    assert engine.record(sid, "tool_call", {"tool": "search", "q": "..."}) == 3
    assert engine.checkpoint(sid, "before-merge") == 4
    assert engine.update(sid, {"step": 2}) == 5
    assert engine.get(sid).state == {"step": 2, "notes": ["a"]}
    assert engine.save(sid) == 6
    assert engine.restore(sid, checkpoint="before-merge") == 7
    assert engine.get(sid).state == {"step": 1, "notes": ["a"]}
    assert engine.suspend(sid) == 8
    assert engine.get(sid).status is SUSPENDED
    assert engine.resume(sid) == 9
    assert engine.get(sid).status is ACTIVE
    assert engine.end(sid, outcome="completed") == 10

    s = engine.get(sid)
    assert s.id == sid
    assert s.name == "research-run"
    assert s.status is COMPLETED
    assert s.state == {"step": 1, "notes": ["a"]}
    assert s.tags == ["agent"]
    assert s.metadata == {"model": "x"}
    assert s.parent is None
    assert s.version == 10
    assert s.checkpoints == {"before-merge": 4}
    assert s.created_at <= s.updated_at

    events = engine.history(sid)
    assert [e.version for e in events] == list(range(1, 11))
    assert [e.type for e in events] == [
        "SessionStarted", "StateChanged", "EventRecorded", "CheckpointTaken", "StateChanged",
        "SessionSaved", "SessionRestored", "SessionSuspended", "SessionResumed", "SessionEnded",
    ]
    assert [e.actor for e in events] == ["alice", "alice"] + [None] * 8
    assert events[0].data["state"] == {"step": 0}
    assert events[2].data["kind"] == "tool_call"
    assert events[2].data["payload"] == {"tool": "search", "q": "..."}
    assert events[0].timestamp == s.created_at
    assert events[-1].timestamp == s.updated_at


def test_end_then_archive(engine: SessionEngine) -> None:
    sid = engine.create("a")
    assert engine.end(sid, outcome="failed") == 2
    assert engine.get(sid).status is FAILED
    assert engine.archive(sid) == 3
    assert engine.get(sid).status is ARCHIVED
    assert [e.type for e in engine.history(sid)][-2:] == ["SessionEnded", "SessionArchived"]


def test_end_defaults_to_completed(engine: SessionEngine) -> None:
    sid = engine.create("a")
    engine.end(sid)
    assert engine.get(sid).status is COMPLETED


# -- the status machine: every allowed and every refused transition ---------------------------


def reach(engine: SessionEngine, status: SessionStatus) -> str:
    """A session in `status` that has a checkpoint "cp" (v3, n=1) and a save point (v4)."""
    sid = engine.create("matrix", state={"n": 0})
    engine.update(sid, {"n": 1})  # v2
    engine.checkpoint(sid, "cp")  # v3
    engine.save(sid)  # v4
    engine.update(sid, {"n": 2})  # v5
    if status is SUSPENDED:
        engine.suspend(sid)
    elif status in (COMPLETED, FAILED, CANCELLED):
        engine.end(sid, outcome=status.value.lower())
    elif status is ARCHIVED:
        engine.end(sid, outcome="cancelled")
        engine.archive(sid)
    assert engine.get(sid).status is status
    return sid


@dataclass(frozen=True)
class Operation:
    run: Callable[[SessionEngine, str], int]
    event_type: str
    allowed_from: frozenset[SessionStatus]
    leads_to: SessionStatus | None  # None: the status does not change
    word: str  # how InvalidTransition's message names the attempted operation
    state_after: dict[str, int] | None = None


def _ops() -> dict[str, Operation]:
    active = frozenset({ACTIVE})
    live = frozenset({ACTIVE, SUSPENDED})
    ended = frozenset({COMPLETED, FAILED, CANCELLED})
    return {
        "update": Operation(lambda e, s: e.update(s, {"n": 99}), "StateChanged", active, None,
                            "update", {"n": 99}),
        "record": Operation(lambda e, s: e.record(s, "tool_call", {"tool": "x"}),
                            "EventRecorded", active, None, "record"),
        "checkpoint": Operation(lambda e, s: e.checkpoint(s, "cp2"), "CheckpointTaken", active,
                                None, "checkpoint"),
        "save": Operation(lambda e, s: e.save(s), "SessionSaved", live, None, "save"),
        "restore-checkpoint": Operation(lambda e, s: e.restore(s, checkpoint="cp"),
                                        "SessionRestored", active, None, "restore", {"n": 1}),
        "restore-save": Operation(lambda e, s: e.restore(s), "SessionRestored", active, None,
                                  "restore", {"n": 1}),
        "suspend": Operation(lambda e, s: e.suspend(s), "SessionSuspended", active, SUSPENDED,
                             "suspend"),
        "resume": Operation(lambda e, s: e.resume(s), "SessionResumed", frozenset({SUSPENDED}),
                            ACTIVE, "resume"),
        "end-completed": Operation(lambda e, s: e.end(s, outcome="completed"), "SessionEnded",
                                   live, COMPLETED, "end"),
        "end-failed": Operation(lambda e, s: e.end(s, outcome="failed"), "SessionEnded", live,
                                FAILED, "end"),
        "end-cancelled": Operation(lambda e, s: e.end(s, outcome="cancelled"), "SessionEnded",
                                   live, CANCELLED, "end"),
        "archive": Operation(lambda e, s: e.archive(s), "SessionArchived", ended, ARCHIVED,
                             "archive"),
    }


OPERATIONS = _ops()
MATRIX = [
    pytest.param(status, name, id=f"{status.value}-{name}")
    for status in ALL_STATUSES
    for name in OPERATIONS
]


def test_matrix_has_allowed_and_refused_cases() -> None:
    allowed = sum(1 for s in ALL_STATUSES for op in OPERATIONS.values() if s in op.allowed_from)
    assert allowed == 18
    assert len(MATRIX) - allowed == 54


@pytest.mark.parametrize(("status", "op_name"), MATRIX)
def test_transition_matrix(engine: SessionEngine, status: SessionStatus, op_name: str) -> None:
    op = OPERATIONS[op_name]
    sid = reach(engine, status)
    version, length, _ = snapshot(engine, sid)
    state_before = engine.get(sid).state

    if status in op.allowed_from:
        new_version = op.run(engine, sid)
        assert new_version == version + 1
        expected_status = op.leads_to if op.leads_to is not None else status
        for session in (engine.get(sid), engine.get(sid, refresh=True)):
            assert session.version == new_version
            assert session.status is expected_status
            assert session.state == (op.state_after if op.state_after is not None
                                     else state_before)
        events = engine.history(sid)
        assert len(events) == length + 1
        assert events[-1].version == new_version
        assert events[-1].type == op.event_type
    else:
        with pytest.raises(InvalidTransition) as raised:
            op.run(engine, sid)
        message = str(raised.value)
        assert sid in message
        assert status.value in message
        assert re.search(rf"\b{op.word}\b", message), message
        assert isinstance(raised.value, SessionLedgerError)
        # a refused command writes nothing
        assert snapshot(engine, sid) == (version, length, status)
        assert engine.get(sid).state == state_before


@pytest.mark.parametrize("status", [s for s in ALL_STATUSES if s is not ACTIVE],
                         ids=lambda s: s.value)
def test_refused_noop_update_is_still_refused(engine: SessionEngine,
                                              status: SessionStatus) -> None:
    """Even a delta that would change nothing is refused outside ACTIVE."""
    sid = reach(engine, status)
    before = snapshot(engine, sid)
    with pytest.raises(InvalidTransition):
        engine.update(sid, {"n": 2})
    with pytest.raises(InvalidTransition):
        engine.update(sid, {})
    assert snapshot(engine, sid) == before


def test_refused_restore_is_invalid_transition_not_checkpoint_not_found(
    engine: SessionEngine,
) -> None:
    sid = engine.create("a")
    engine.suspend(sid)
    with pytest.raises(InvalidTransition):
        engine.restore(sid)  # no save point either: the status is what is wrong
    with pytest.raises(InvalidTransition):
        engine.restore(sid, checkpoint="nope")


def test_round_trip_suspend_resume_many_times(engine: SessionEngine) -> None:
    sid = engine.create("a")
    for i in range(3):
        engine.suspend(sid, reason=f"pause {i}")
        engine.save(sid)
        engine.resume(sid)
        engine.update(sid, {"i": i})
    s = engine.get(sid)
    assert s.status is ACTIVE
    assert s.version == 13
    assert s.state == {"i": 2}
    reasons = [e.data.get("reason") for e in engine.history(sid) if e.type == "SessionSuspended"]
    assert reasons == ["pause 0", "pause 1", "pause 2"]


# -- update -----------------------------------------------------------------------------------


def test_update_sets_and_deletes(engine: SessionEngine) -> None:
    sid = engine.create("a", state={"a": 1, "b": 2, "c": 3})
    assert engine.update(sid, {"a": 10, "d": 4}, delete=["b"]) == 2
    assert engine.get(sid).state == {"a": 10, "c": 3, "d": 4}
    assert engine.update(sid, delete=["c", "d"]) == 3
    assert engine.get(sid).state == {"a": 10}
    assert engine.get(sid, refresh=True).state == {"a": 10}


def test_update_writes_only_what_changes(engine: SessionEngine) -> None:
    sid = engine.create("a", state={"a": 1, "b": [1, 2]})
    engine.update(sid, {"a": 1, "b": [1, 2], "c": 3})
    last = engine.history(sid)[-1]
    assert last.type == "StateChanged"
    assert last.data["set"] == {"c": 3}


@pytest.mark.parametrize(
    ("changes", "delete"),
    [
        ({}, None),
        (None, None),
        ({"a": 1}, None),
        ({"a": 1, "b": {"x": [1, 2]}}, None),
        ({}, ["missing"]),
        (None, []),
    ],
    ids=["empty", "none", "same-scalar", "same-nested", "delete-missing", "delete-nothing"],
)
def test_update_that_changes_nothing_writes_nothing(
    engine: SessionEngine, changes: dict[str, object] | None, delete: list[str] | None
) -> None:
    sid = engine.create("a", state={"a": 1, "b": {"x": [1, 2]}})
    engine.update(sid, {"c": 1})
    before = snapshot(engine, sid)
    assert engine.update(sid, changes, delete=delete) == 2
    assert snapshot(engine, sid) == before
    assert engine.get(sid).state == {"a": 1, "b": {"x": [1, 2]}, "c": 1}


def test_update_type_change_is_a_change(engine: SessionEngine) -> None:
    sid = engine.create("a", state={"a": 1})
    assert engine.update(sid, {"a": 1.0}) == 2
    assert type(engine.get(sid, refresh=True).state["a"]) is float
    assert engine.update(sid, {"a": True}) == 3
    assert engine.get(sid, refresh=True).state["a"] is True


def test_update_set_and_delete_same_key_keeps_the_set(engine: SessionEngine) -> None:
    sid = engine.create("a", state={"a": 1})
    engine.update(sid, {"a": 2}, delete=["a"])
    assert engine.get(sid, refresh=True).state == {"a": 2}


def test_update_does_not_alias_caller_objects(engine: SessionEngine) -> None:
    notes = ["a"]
    initial = {"cfg": {"k": 1}}
    sid = engine.create("a", state=initial)
    engine.update(sid, {"notes": notes})
    notes.append("b")
    initial["cfg"]["k"] = 2
    assert engine.get(sid).state == {"cfg": {"k": 1}, "notes": ["a"]}


@pytest.mark.parametrize("delete", ["a", 5, {"a": 1}, [1]], ids=["str", "int", "dict", "int-key"])
def test_update_bad_delete_argument(engine: SessionEngine, delete: object) -> None:
    sid = engine.create("a", state={"a": 1})
    before = snapshot(engine, sid)
    with pytest.raises(InvalidArgument):
        engine.update(sid, delete=delete)  # type: ignore[arg-type]
    assert snapshot(engine, sid) == before


# -- checkpoints and restore ------------------------------------------------------------------


def test_checkpoints_map_label_to_version(engine: SessionEngine) -> None:
    sid = engine.create("a")
    v1 = engine.checkpoint(sid, "one")
    engine.update(sid, {"x": 1})
    v2 = engine.checkpoint(sid, "two")
    assert engine.get(sid).checkpoints == {"one": v1, "two": v2}
    assert engine.get(sid, refresh=True).checkpoints == {"one": 2, "two": 4}


def test_restore_to_checkpoint(engine: SessionEngine) -> None:
    sid = engine.create("a", state={"step": 0})
    engine.update(sid, {"step": 1, "tmp": "x"})
    engine.checkpoint(sid, "cp")
    engine.update(sid, {"step": 2}, delete=["tmp"])
    engine.update(sid, {"other": True})
    length = len(engine.history(sid))
    v = engine.restore(sid, checkpoint="cp")
    assert v == length + 1
    assert engine.get(sid).state == {"step": 1, "tmp": "x"}
    assert engine.get(sid, refresh=True).state == {"step": 1, "tmp": "x"}
    events = engine.history(sid)
    assert len(events) == length + 1  # history keeps everything and grows by one
    assert events[-1].type == "SessionRestored"
    assert [e.type for e in events[:length]].count("StateChanged") == 3


@pytest.mark.parametrize("target", [1, 2, 3, 4])
def test_restore_to_version(engine: SessionEngine, target: int) -> None:
    sid = engine.create("a", state={"n": 0})
    for n in (1, 2, 3):
        engine.update(sid, {"n": n})
    assert engine.restore(sid, version=target) == 5
    assert engine.get(sid).state == {"n": target - 1}
    assert engine.get(sid, refresh=True).state == {"n": target - 1}


def test_restore_defaults_to_last_save(engine: SessionEngine) -> None:
    sid = engine.create("a", state={"n": 0})
    engine.update(sid, {"n": 1})
    engine.save(sid)
    engine.update(sid, {"n": 2})
    engine.save(sid)  # the last save point: n == 2
    engine.update(sid, {"n": 3})
    engine.restore(sid)
    assert engine.get(sid).state == {"n": 2}


def test_restore_to_save_taken_while_suspended(engine: SessionEngine) -> None:
    sid = engine.create("a", state={"n": 0})
    engine.update(sid, {"n": 1})
    engine.suspend(sid)
    engine.save(sid)
    engine.resume(sid)
    engine.update(sid, {"n": 5})
    engine.restore(sid)
    assert engine.get(sid).state == {"n": 1}


def test_restore_to_an_earlier_restore_and_then_forward(engine: SessionEngine) -> None:
    sid = engine.create("a", state={"n": 0})
    engine.update(sid, {"n": 1})  # v2
    engine.checkpoint(sid, "one")  # v3
    engine.update(sid, {"n": 2})  # v4
    engine.restore(sid, checkpoint="one")  # v5: n == 1
    engine.update(sid, {"m": 1})  # v6
    engine.restore(sid, version=4)  # back to n == 2, no m
    assert engine.get(sid).state == {"n": 2}
    engine.restore(sid, version=6)  # forward again, across the first restore
    assert engine.get(sid).state == {"n": 1, "m": 1}


def test_restore_then_reopen_gives_the_same_state(engine_factory: Callable[..., SessionEngine]
                                                  ) -> None:
    first = engine_factory()
    sid = first.create("a", state={"n": 0, "keep": [1]})
    first.checkpoint(sid, "cp")
    first.update(sid, {"n": 1}, delete=["keep"])
    first.restore(sid, checkpoint="cp")
    expected = first.get(sid)
    first.close()
    second = engine_factory(max_active_sessions=0)
    assert second.get(sid).state == {"n": 0, "keep": [1]}
    assert second.get(sid).version == expected.version
    assert second.get(sid).checkpoints == {"cp": 2}


def test_restored_state_is_not_shared_with_later_updates(engine: SessionEngine) -> None:
    sid = engine.create("a", state={"xs": [1]})
    engine.checkpoint(sid, "cp")
    engine.update(sid, {"xs": [1, 2]})
    engine.restore(sid, checkpoint="cp")
    engine.update(sid, {"xs": [1, 3]})
    engine.restore(sid, checkpoint="cp")
    assert engine.get(sid).state == {"xs": [1]}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"checkpoint": "missing"},
        {"version": 0},
        {"version": -1},
        {"version": 4},
        {"version": 100},
        {},  # no save point
    ],
    ids=["unknown-label", "version-0", "version-negative", "version-beyond", "version-far",
         "no-save-point"],
)
def test_restore_to_missing_target(engine: SessionEngine, kwargs: dict[str, object]) -> None:
    sid = engine.create("a", state={"n": 0})
    engine.update(sid, {"n": 1})
    engine.checkpoint(sid, "cp")
    before = snapshot(engine, sid)
    with pytest.raises(CheckpointNotFound) as raised:
        engine.restore(sid, **kwargs)  # type: ignore[arg-type]
    assert sid in str(raised.value)
    assert snapshot(engine, sid) == before


def test_restore_with_both_label_and_version_is_refused(engine: SessionEngine) -> None:
    sid = engine.create("a")
    engine.checkpoint(sid, "cp")
    before = snapshot(engine, sid)
    with pytest.raises(InvalidArgument):
        engine.restore(sid, checkpoint="cp", version=1)
    assert snapshot(engine, sid) == before


def test_restore_current_version_still_appends_an_event(engine: SessionEngine) -> None:
    sid = engine.create("a", state={"n": 0})
    engine.update(sid, {"n": 1})
    assert engine.restore(sid, version=2) == 3
    assert engine.get(sid).state == {"n": 1}
    assert engine.history(sid)[-1].type == "SessionRestored"


def test_duplicate_checkpoint_label_is_refused(engine: SessionEngine) -> None:
    sid = engine.create("a")
    engine.checkpoint(sid, "cp")
    engine.update(sid, {"x": 1})
    before = snapshot(engine, sid)
    with pytest.raises(InvalidArgument) as raised:
        engine.checkpoint(sid, "cp")
    assert "cp" in str(raised.value)
    assert snapshot(engine, sid) == before


def test_same_checkpoint_label_in_two_sessions(engine: SessionEngine) -> None:
    a = engine.create("a")
    b = engine.create("b")
    engine.checkpoint(a, "cp")
    assert engine.checkpoint(b, "cp") == 2


# -- get() ------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, 10])
def test_changing_what_get_returned_changes_nothing_stored(engine_factory: EngineFactory,
                                                            capacity: int) -> None:
    # with no working set get() hands over the session it read without copying it: nothing
    # else holds it, so a caller changing it must still change nothing the engine serves
    engine = engine_factory(max_active_sessions=capacity)
    sid = engine.create("a", state={"s": {"y": [1]}}, metadata={"m": [1]})
    s = engine.get(sid)
    s.state["s"]["y"].append(2)
    s.metadata["m"].append(2)
    s.version = 99
    assert engine.update(sid, {"z": 1}) == 2
    fresh = engine.get(sid)
    assert fresh.state == {"s": {"y": [1]}, "z": 1}
    assert fresh.metadata == {"m": [1]}
    assert engine.get(sid) is not engine.get(sid)


def test_get_returns_a_copy(engine: SessionEngine) -> None:
    sid = engine.create("a", tags=["t"], metadata={"m": {"x": [1]}}, state={"s": {"y": [1]}})
    engine.checkpoint(sid, "cp")
    s = engine.get(sid)
    s.state["s"]["y"].append(2)
    s.state["new"] = 1
    s.metadata["m"]["x"].append(2)
    s.tags.append("u")
    s.checkpoints["fake"] = 1
    s.version = 99
    s.status = SessionStatus.ARCHIVED
    fresh = engine.get(sid)
    assert fresh.state == {"s": {"y": [1]}}
    assert fresh.metadata == {"m": {"x": [1]}}
    assert fresh.tags == ["t"]
    assert fresh.checkpoints == {"cp": 2}
    assert fresh.version == 2
    assert fresh.status is ACTIVE
    # and the engine keeps working from its own copy
    assert engine.update(sid, {"z": 1}) == 3
    with pytest.raises(CheckpointNotFound):
        engine.restore(sid, checkpoint="fake")


def test_get_unknown_and_history_unknown(engine: SessionEngine) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(SessionNotFound) as raised:
        engine.get(missing)
    assert missing in str(raised.value)
    with pytest.raises(SessionNotFound):
        engine.history(missing)
    with pytest.raises(SessionNotFound):
        engine.update(missing, {"a": 1})


def test_session_id_forms(engine: SessionEngine) -> None:
    sid = engine.create("a")
    as_uuid = uuid.UUID(sid)
    assert engine.get(as_uuid).id == sid
    assert engine.get(sid.upper()).id == sid
    assert engine.update(as_uuid, {"a": 1}) == 2
    assert len(engine.history(as_uuid)) == 2


def test_parent(engine: SessionEngine) -> None:
    parent = engine.create("parent")
    child = engine.create("child", parent=parent)
    assert engine.get(child).parent == parent
    assert engine.get(child, refresh=True).parent == parent
    grandchild = engine.create("grandchild", parent=uuid.UUID(child))
    assert engine.get(grandchild).parent == child


def test_unknown_parent_creates_nothing(engine_factory: Callable[..., SessionEngine]) -> None:
    engine = engine_factory()
    missing = str(uuid.uuid4())
    with pytest.raises(SessionNotFound):
        engine.create("child", parent=missing)
    assert engine.list_sessions() == []


# -- timestamps -------------------------------------------------------------------------------


def test_timestamps_are_aware_utc_and_non_decreasing(engine: SessionEngine) -> None:
    sid = engine.create("a")
    for i in range(20):
        engine.update(sid, {"i": i})
    engine.save(sid)
    events = engine.history(sid)
    stamps = [e.timestamp for e in events]
    for stamp in stamps:
        assert stamp.tzinfo is not None
        assert stamp.utcoffset() == timedelta(0)
    assert stamps == sorted(stamps)
    s = engine.get(sid, refresh=True)
    assert s.created_at == stamps[0]
    assert s.updated_at == stamps[-1]
    assert s.created_at.utcoffset() == timedelta(0)
    assert s.updated_at.utcoffset() == timedelta(0)


# -- history contents -------------------------------------------------------------------------


def test_history_contents(engine: SessionEngine) -> None:
    sid = engine.create("run", tags=["t1", "t2"], metadata={"model": "x"}, state={"a": 1},
                        actor="alice", correlation_id="req-1")
    engine.update(sid, {"b": 2}, delete=["a"], actor="bob", correlation_id="req-2")
    engine.record(sid, "tool_call", {"tool": "search"}, actor="agent")
    engine.checkpoint(sid, "cp", correlation_id="req-3")
    engine.save(sid, actor="carol")
    engine.restore(sid, checkpoint="cp", actor="dave")
    engine.suspend(sid, reason="lunch")
    engine.resume(sid)
    engine.end(sid, outcome="cancelled", actor="erin", correlation_id="req-9")
    engine.archive(sid, actor="janitor")

    events = engine.history(sid)
    assert [e.type for e in events] == [
        "SessionStarted", "StateChanged", "EventRecorded", "CheckpointTaken", "SessionSaved",
        "SessionRestored", "SessionSuspended", "SessionResumed", "SessionEnded",
        "SessionArchived",
    ]
    assert {e.type for e in events} == EVENT_TYPE_NAMES
    assert [e.actor for e in events] == [
        "alice", "bob", "agent", None, "carol", "dave", None, None, "erin", "janitor",
    ]
    assert [e.correlation_id for e in events] == [
        "req-1", "req-2", None, "req-3", None, None, None, None, "req-9", None,
    ]
    assert all(e.session_id == sid for e in events)
    started, changed, recorded, checkpoint, _, restored, suspended, _, ended, _ = events
    assert started.data["name"] == "run"
    assert started.data["state"] == {"a": 1}
    assert started.data["tags"] == ["t1", "t2"]
    assert started.data["metadata"] == {"model": "x"}
    assert changed.data["set"] == {"b": 2}
    assert changed.data["delete"] == ["a"]
    assert recorded.data["kind"] == "tool_call"
    assert recorded.data["payload"] == {"tool": "search"}
    assert checkpoint.data["label"] == "cp"
    assert restored.data["state"] == {"b": 2}
    assert suspended.data["reason"] == "lunch"
    assert ended.data["outcome"] == "cancelled"


def test_record_does_not_touch_state(engine: SessionEngine) -> None:
    sid = engine.create("a", state={"x": 1})
    engine.record(sid, "note")  # no payload
    engine.record(sid, "list", [1, 2, 3])
    engine.record(sid, "scalar", "text")
    assert engine.get(sid).state == {"x": 1}
    payloads = [e.data["payload"] for e in engine.history(sid)[1:]]
    assert payloads == [None, [1, 2, 3], "text"]


def test_history_is_fresh_data(engine: SessionEngine) -> None:
    sid = engine.create("a", state={"xs": [1]})
    engine.history(sid)[0].data["state"]["xs"].append(2)
    assert engine.history(sid)[0].data["state"] == {"xs": [1]}
    assert engine.get(sid).state == {"xs": [1]}


def test_new_session_ids_are_time_ordered_uuid7(engine: SessionEngine) -> None:
    # time-ordered ids keep every B-tree keyed by session id appending at its edge
    ids = [engine.create(f"s{i}") for i in range(50)]
    assert all(uuid.UUID(sid).version == 7 for sid in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert engine.get(uuid.UUID(ids[0])).id == ids[0]
    for sid in ids:
        parsed = uuid.UUID(sid)
        assert parsed.variant == uuid.RFC_4122 and str(parsed) == sid  # canonical text
    # the leading 48 bits are the millisecond the id was made (just before the session's start
    # time), or ahead of it by the ids made in bursts of several a millisecond: far less than
    # ten minutes in a test run
    first_ms = uuid.UUID(ids[0]).int >> 80
    created_ms = engine.get(ids[0]).created_us // 1000
    assert created_ms - 1000 <= first_ms <= created_ms + 600_000


def test_session_ids_are_random_beyond_their_clock() -> None:
    from sessionledger.writer import new_session_id

    ids = [uuid.UUID(new_session_id()) for _ in range(2000)]
    random_parts = {u.int & ((1 << 74) - 1) for u in ids}  # what is left without clock bits
    assert len(random_parts) == len(ids)
    low_bits = [u.int & 0xFF for u in ids]
    assert len(set(low_bits)) > 200  # 2,000 draws over 256 values: all but a few show up
