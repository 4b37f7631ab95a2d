"""Several writers: two engines on one database, retries, expected_version, idempotency keys,
threads sharing one engine, and the working-set LRU."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from _helpers import snapshot

from sessionledger import (
    ConcurrencyConflict,
    InvalidArgument,
    InvalidTransition,
    SessionEngine,
    SessionStatus,
)

EngineFactory = Callable[..., SessionEngine]


def assert_contiguous(engine: SessionEngine, sid: str) -> list[Any]:
    events = engine.history(sid)
    assert [e.version for e in events] == list(range(1, len(events) + 1))
    assert engine.get(sid, refresh=True).version == len(events)
    return events


def markers(events: list[Any]) -> list[str]:
    """The keys each StateChanged set, in order: every command's own key, to count them."""
    return [key for e in events if e.type == "StateChanged" for key in e.data["set"]]


# -- two engines on one database --------------------------------------------------------------


def test_interleaved_writers_both_succeed(engine_factory: EngineFactory) -> None:
    a = engine_factory()
    b = engine_factory()
    sid = a.create("shared", state={"n": 0})
    b.get(sid)  # b now holds version 1 in its working set
    expected = []
    for i in range(10):
        # each engine's view is stale by one version when it writes: it re-reads and applies
        va = a.update(sid, {f"a{i}": i})
        vb = b.update(sid, {f"b{i}": i})
        assert vb == va + 1
        expected += [f"a{i}", f"b{i}"]
    events = assert_contiguous(a, sid)
    assert len(events) == 21
    assert markers(events) == expected  # no lost and no duplicated event
    state = a.get(sid, refresh=True).state
    assert state == b.get(sid, refresh=True).state
    assert set(state) == {"n", *expected}


def test_interleaved_mixed_commands(engine_factory: EngineFactory) -> None:
    a = engine_factory()
    b = engine_factory()
    sid = a.create("shared")
    b.get(sid)
    # each command below runs on an engine whose view is one version behind
    assert a.record(sid, "x", 1) == 2
    assert b.checkpoint(sid, "cp") == 3
    assert a.update(sid, {"k": 1}) == 4
    assert b.save(sid) == 5
    assert a.restore(sid, checkpoint="cp") == 6
    assert b.record(sid, "y", 2) == 7
    assert a.suspend(sid) == 8
    assert b.save(sid) == 9
    assert a.end(sid, outcome="failed") == 10
    events = assert_contiguous(b, sid)
    assert [e.type for e in events][1:] == [
        "EventRecorded", "CheckpointTaken", "StateChanged", "SessionSaved", "SessionRestored",
        "EventRecorded", "SessionSuspended", "SessionSaved", "SessionEnded",
    ]
    assert a.get(sid).status is SessionStatus.FAILED
    assert b.get(sid, refresh=True).status is SessionStatus.FAILED
    assert b.get(sid, refresh=True).state == {}


STALE_BUT_VALID: dict[str, tuple[Callable[[SessionEngine, str], Any],
                                 Callable[[SessionEngine, str], int]]] = {
    "suspended-then-resume": (lambda e, s: e.suspend(s), lambda e, s: e.resume(s)),
    "ended-then-archive": (lambda e, s: e.end(s), lambda e, s: e.archive(s)),
    "checkpoint-then-restore-it": (lambda e, s: e.checkpoint(s, "cp"),
                                   lambda e, s: e.restore(s, checkpoint="cp")),
    "saved-then-restore-save": (lambda e, s: e.save(s), lambda e, s: e.restore(s)),
    "updated-then-restore-version": (lambda e, s: e.update(s, {"b": 1}),
                                     lambda e, s: e.restore(s, version=2)),
}


@pytest.mark.parametrize("case", list(STALE_BUT_VALID))
def test_stale_engine_applies_a_transition_valid_in_the_store(
    engine_factory: EngineFactory, case: str
) -> None:
    """Another engine moved the session on; this engine's loaded copy is older. A command that is
    valid for the session as stored must re-read and apply (retries), not be refused on the
    stale copy."""
    other_does, this_does = STALE_BUT_VALID[case]
    a = engine_factory()
    b = engine_factory()
    sid = a.create("shared")
    a.get(sid)  # a has version 1 loaded
    other_does(b, sid)  # the session is now at version 2
    assert this_does(a, sid) == 3
    assert_contiguous(b, sid)


def test_without_retries_the_stale_writer_conflicts(engine_factory: EngineFactory) -> None:
    a = engine_factory()
    b = engine_factory(retries=0)
    sid = a.create("shared")
    assert b.get(sid).version == 1
    assert a.update(sid, {"a": 1}) == 2
    with pytest.raises(ConcurrencyConflict) as raised:
        b.update(sid, {"b": 1})
    assert sid in str(raised.value)
    events = assert_contiguous(a, sid)
    assert len(events) == 2
    assert markers(events) == ["a"]
    assert a.get(sid, refresh=True).state == {"a": 1}
    # having lost, b re-reads on its next command
    assert b.update(sid, {"b": 1}) == 3
    assert a.get(sid, refresh=True).state == {"a": 1, "b": 1}


@pytest.mark.parametrize("command", ["record", "checkpoint", "save", "suspend", "end"])
def test_without_retries_every_command_conflicts(engine_factory: EngineFactory,
                                                 command: str) -> None:
    a = engine_factory()
    b = engine_factory(retries=0)
    sid = a.create("shared")
    b.get(sid)
    a.update(sid, {"a": 1})
    run = {
        "record": lambda: b.record(sid, "k", 1),
        "checkpoint": lambda: b.checkpoint(sid, "cp"),
        "save": lambda: b.save(sid),
        "suspend": lambda: b.suspend(sid),
        "end": lambda: b.end(sid, outcome="cancelled"),
    }[command]
    with pytest.raises(ConcurrencyConflict):
        run()
    assert snapshot(a, sid) == (2, 2, SessionStatus.ACTIVE)


def test_retry_decides_again_on_fresh_state(engine_factory: EngineFactory) -> None:
    a = engine_factory()
    b = engine_factory()
    sid = a.create("shared")
    b.get(sid)
    a.checkpoint(sid, "cp")
    # b's stale view has no "cp": after re-reading, the label is a duplicate
    with pytest.raises(InvalidArgument):
        b.checkpoint(sid, "cp")
    a.end(sid)
    # b's view is ACTIVE, the session is ended: re-read, then refused
    with pytest.raises(InvalidTransition):
        b.update(sid, {"x": 1})
    events = assert_contiguous(a, sid)
    assert len(events) == 3


def test_retry_of_a_delta_already_applied_writes_nothing(engine_factory: EngineFactory) -> None:
    a = engine_factory()
    b = engine_factory()
    sid = a.create("shared")
    b.get(sid)
    assert a.update(sid, {"x": 1}) == 2
    assert b.update(sid, {"x": 1}) == 2  # after re-reading, nothing changes
    assert len(assert_contiguous(a, sid)) == 2


def test_threads_with_their_own_engines(engine_factory: EngineFactory) -> None:
    engines = [engine_factory(retries=1000) for _ in range(3)]
    sid = engines[0].create("shared")
    per_thread = 15
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for j in range(per_thread):
                engines[n].update(sid, {f"t{n}-{j}": j})
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    events = assert_contiguous(engines[0], sid)
    assert len(events) == 1 + per_thread * len(engines)
    written = markers(events)
    assert sorted(written) == sorted(f"t{n}-{j}" for n in range(3) for j in range(per_thread))
    for n in range(3):  # each thread's own commands stay in its order
        mine = [k for k in written if k.startswith(f"t{n}-")]
        assert mine == [f"t{n}-{j}" for j in range(per_thread)]


# -- expected_version -------------------------------------------------------------------------


def test_expected_version_matching(engine: SessionEngine) -> None:
    sid = engine.create("a")
    assert engine.update(sid, {"x": 1}, expected_version=1) == 2
    assert engine.record(sid, "k", expected_version=2) == 3
    assert engine.checkpoint(sid, "cp", expected_version=3) == 4
    assert engine.save(sid, expected_version=4) == 5
    assert engine.restore(sid, expected_version=5) == 6
    assert engine.suspend(sid, expected_version=6) == 7
    assert engine.resume(sid, expected_version=7) == 8
    assert engine.end(sid, expected_version=8) == 9
    assert engine.archive(sid, expected_version=9) == 10


EXPECTED_COMMANDS: dict[str, Callable[[SessionEngine, str, int], int]] = {
    "update": lambda e, s, v: e.update(s, {"x": 2}, expected_version=v),
    "record": lambda e, s, v: e.record(s, "k", expected_version=v),
    "checkpoint": lambda e, s, v: e.checkpoint(s, "cp2", expected_version=v),
    "save": lambda e, s, v: e.save(s, expected_version=v),
    "restore": lambda e, s, v: e.restore(s, checkpoint="cp", expected_version=v),
    "suspend": lambda e, s, v: e.suspend(s, expected_version=v),
    "end": lambda e, s, v: e.end(s, expected_version=v),
}


@pytest.mark.parametrize("command", list(EXPECTED_COMMANDS))
@pytest.mark.parametrize("wrong", [2, 4, 100])
def test_expected_version_mismatch(engine: SessionEngine, command: str, wrong: int) -> None:
    sid = engine.create("a")
    engine.update(sid, {"x": 1})
    engine.checkpoint(sid, "cp")  # the session is at version 3
    before = snapshot(engine, sid)
    with pytest.raises(ConcurrencyConflict) as raised:
        EXPECTED_COMMANDS[command](engine, sid, wrong)
    assert sid in str(raised.value)
    assert snapshot(engine, sid) == before


def test_expected_version_never_retries(engine_factory: EngineFactory) -> None:
    a = engine_factory()
    b = engine_factory(retries=10)
    sid = a.create("shared")
    b.get(sid)
    a.update(sid, {"a": 1})
    with pytest.raises(ConcurrencyConflict):
        b.update(sid, {"b": 1}, expected_version=1)  # b believed version 1: stale
    assert snapshot(a, sid) == (2, 2, SessionStatus.ACTIVE)
    assert a.get(sid, refresh=True).state == {"a": 1}


def test_expected_version_is_checked_against_the_store(engine_factory: EngineFactory) -> None:
    """The session IS at N (another engine wrote it): expected_version=N must apply, even when
    this engine loaded the session earlier."""
    a = engine_factory()
    b = engine_factory()
    sid = a.create("shared")
    b.get(sid)  # b has version 1 loaded
    v = a.update(sid, {"a": 1})  # the session is now at version 2
    assert b.update(sid, {"b": 1}, expected_version=v) == v + 1
    assert a.get(sid, refresh=True).state == {"a": 1, "b": 1}


# -- idempotency keys -------------------------------------------------------------------------


def test_idempotent_update_same_engine(engine: SessionEngine) -> None:
    sid = engine.create("a")
    assert engine.update(sid, {"n": 1}, idempotency_key="k1") == 2
    assert engine.update(sid, {"n": 1}, idempotency_key="k1") == 2
    assert engine.update(sid, {"n": 99}, idempotency_key="k1") == 2  # even with another delta
    assert snapshot(engine, sid) == (2, 2, SessionStatus.ACTIVE)
    assert engine.get(sid).state == {"n": 1}


IDEMPOTENT_COMMANDS: dict[str, Callable[[SessionEngine, str, str], int]] = {
    "update": lambda e, s, k: e.update(s, {"x": 1}, idempotency_key=k),
    "record": lambda e, s, k: e.record(s, "tool_call", {"q": 1}, idempotency_key=k),
    "checkpoint": lambda e, s, k: e.checkpoint(s, "cp", idempotency_key=k),
    "save": lambda e, s, k: e.save(s, idempotency_key=k),
    "restore": lambda e, s, k: e.restore(s, version=1, idempotency_key=k),
    "suspend": lambda e, s, k: e.suspend(s, idempotency_key=k),
    "end": lambda e, s, k: e.end(s, outcome="failed", idempotency_key=k),
}


@pytest.mark.parametrize("command", list(IDEMPOTENT_COMMANDS))
def test_every_command_is_idempotent_with_a_key(engine: SessionEngine, command: str) -> None:
    sid = engine.create("a")
    run = IDEMPOTENT_COMMANDS[command]
    first = run(engine, sid, "key")
    assert first == 2
    assert run(engine, sid, "key") == first  # a second record/save/... would be a new event
    assert snapshot(engine, sid)[:2] == (2, 2)


def test_resume_and_archive_are_idempotent_with_a_key(engine: SessionEngine) -> None:
    sid = engine.create("a")
    engine.suspend(sid)
    assert engine.resume(sid, idempotency_key="r") == 3
    assert engine.resume(sid, idempotency_key="r") == 3  # not InvalidTransition
    engine.end(sid)
    assert engine.archive(sid, idempotency_key="z") == 5
    assert engine.archive(sid, idempotency_key="z") == 5
    assert snapshot(engine, sid) == (5, 5, SessionStatus.ARCHIVED)


def test_idempotency_key_across_engines(engine_factory: EngineFactory) -> None:
    a = engine_factory()
    b = engine_factory()
    sid = a.create("a")
    assert a.record(sid, "payment", {"amount": 10}, idempotency_key="pay-1") == 2
    a.update(sid, {"later": True})
    assert b.record(sid, "payment", {"amount": 10}, idempotency_key="pay-1") == 2
    events = assert_contiguous(b, sid)
    assert [e.type for e in events].count("EventRecorded") == 1


def test_idempotency_key_after_reopening(engine_factory: EngineFactory) -> None:
    first = engine_factory()
    sid = first.create("a")
    assert first.record(sid, "payment", idempotency_key="pay-1") == 2
    for i in range(5):
        first.update(sid, {"i": i})
    first.close()
    second = engine_factory()
    assert second.record(sid, "payment", idempotency_key="pay-1") == 2
    assert snapshot(second, sid)[:2] == (7, 7)


def test_idempotency_key_after_the_session_ended(engine_factory: EngineFactory) -> None:
    engine = engine_factory()
    sid = engine.create("a")
    assert engine.update(sid, {"x": 1}, idempotency_key="k") == 2
    assert engine.end(sid, idempotency_key="end") == 3
    engine.archive(sid)
    # a keyed retry returns the original version instead of InvalidTransition
    assert engine.update(sid, {"x": 1}, idempotency_key="k") == 2
    assert engine.end(sid, idempotency_key="end") == 3
    assert engine_factory().update(sid, {"x": 1}, idempotency_key="k") == 2
    assert snapshot(engine, sid) == (4, 4, SessionStatus.ARCHIVED)


def test_idempotency_keys_are_per_session(engine: SessionEngine) -> None:
    a = engine.create("a")
    b = engine.create("b")
    assert engine.update(a, {"x": 1}, idempotency_key="same") == 2
    assert engine.update(b, {"x": 1}, idempotency_key="same") == 2
    assert engine.update(b, {"y": 1}, idempotency_key="other") == 3
    assert engine.get(b).state == {"x": 1, "y": 1}


def test_idempotency_key_of_a_refused_command_is_not_used(engine: SessionEngine) -> None:
    sid = engine.create("a")
    engine.suspend(sid)
    with pytest.raises(InvalidTransition):
        engine.update(sid, {"x": 1}, idempotency_key="k")
    engine.resume(sid)
    assert engine.update(sid, {"x": 1}, idempotency_key="k") == 4
    assert engine.get(sid).state == {"x": 1}


def test_idempotency_key_with_expected_version(engine: SessionEngine) -> None:
    sid = engine.create("a")
    assert engine.update(sid, {"x": 1}, idempotency_key="k", expected_version=1) == 2
    # the retry of that very command (same expected_version) returns its result
    assert engine.update(sid, {"x": 1}, idempotency_key="k", expected_version=1) == 2
    assert snapshot(engine, sid)[:2] == (2, 2)


def test_keyed_noop_update_retried_later_writes_nothing(engine: SessionEngine) -> None:
    """The first keyed command changed nothing and returned version 2; its retry, however much
    later, writes nothing and returns 2 as well."""
    sid = engine.create("a")
    assert engine.update(sid, {"a": 1}) == 2
    assert engine.update(sid, {"a": 1}, idempotency_key="k") == 2  # changes nothing
    assert engine.update(sid, {"a": 2}) == 3
    assert engine.update(sid, {"a": 1}, idempotency_key="k") == 2  # the retry
    assert snapshot(engine, sid)[:2] == (3, 3)
    assert engine.get(sid).state == {"a": 2}


def test_idempotent_create(engine_factory: EngineFactory) -> None:
    a = engine_factory()
    sid = a.create("run", state={"n": 1}, idempotency_key="create-1")
    assert a.create("run", state={"n": 1}, idempotency_key="create-1") == sid
    assert a.create("other", idempotency_key="create-1") == sid
    a.update(sid, {"n": 2})
    b = engine_factory()
    assert b.create("run", idempotency_key="create-1") == sid
    a.close()
    c = engine_factory()
    assert c.create("run", idempotency_key="create-1") == sid
    c.end(sid)
    assert c.create("run", idempotency_key="create-1") == sid
    assert [s.id for s in c.list_sessions()] == [sid]
    assert c.get(sid).state == {"n": 2}
    other = c.create("run", idempotency_key="create-2")
    assert other != sid
    assert len(c.list_sessions()) == 2


def test_create_key_and_command_key_do_not_collide(engine: SessionEngine) -> None:
    sid = engine.create("a", idempotency_key="k")
    assert engine.update(sid, {"x": 1}, idempotency_key="k") == 2
    other = engine.create("b", idempotency_key="k2")
    assert engine.update(other, {"x": 1}, idempotency_key="k") == 2


# -- threads sharing one engine ---------------------------------------------------------------


def test_threads_share_one_engine(engine: SessionEngine) -> None:
    sid = engine.create("threads")
    errors: list[BaseException] = []
    returned: list[int] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        try:
            for j in range(50):
                v = engine.update(sid, {f"t{n}": j})
                with lock:
                    returned.append(v)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sorted(returned) == list(range(2, 202))  # every command got its own version
    events = assert_contiguous(engine, sid)
    assert len(events) == 201
    assert engine.get(sid).version == 201
    assert engine.get(sid).state == {f"t{n}": 49 for n in range(4)}


def test_threads_create_and_read_sessions(engine: SessionEngine) -> None:
    errors: list[BaseException] = []
    created: list[str] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        try:
            for j in range(10):
                sid = engine.create(f"s{n}-{j}", state={"n": n})
                engine.record(sid, "k", j)
                assert engine.get(sid).version == 2
                assert len(engine.history(sid)) == 2
                with lock:
                    created.append(sid)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(set(created)) == 40
    assert {s.id for s in engine.list_sessions(limit=100)} == set(created)


# -- the working set --------------------------------------------------------------------------


def test_working_set_of_one_session_stays_correct(engine_factory: EngineFactory) -> None:
    engine = engine_factory(max_active_sessions=1)
    sids = [engine.create(f"s{i}", state={"i": i}) for i in range(3)]
    for round_ in range(5):
        for i, sid in enumerate(sids):
            assert engine.update(sid, {"round": round_}) == round_ + 2
            assert engine.get(sid).state == {"i": i, "round": round_}
    engine.checkpoint(sids[0], "cp")
    engine.update(sids[1], {"x": 1})
    engine.update(sids[0], {"round": 100})
    engine.restore(sids[0], checkpoint="cp")
    assert engine.get(sids[0]).state == {"i": 0, "round": 4}
    for sid in sids:
        assert_contiguous(engine, sid)


def test_evicted_session_is_read_again_from_the_store(engine_factory: EngineFactory) -> None:
    a = engine_factory(max_active_sessions=1)
    b = engine_factory()
    first = a.create("first")
    second = a.create("second")  # evicts "first" from a's working set of one
    b.update(first, {"by": "b"})
    assert a.get(first).state == {"by": "b"}  # not cached any more: read from the store
    assert a.get(first).version == 2
    assert a.update(second, {"x": 1}) == 2


def test_no_working_set_always_reads_the_store(engine_factory: EngineFactory) -> None:
    a = engine_factory(max_active_sessions=0)
    b = engine_factory()
    sid = a.create("a")
    assert a.get(sid).version == 1
    b.update(sid, {"by": "b"})
    assert a.get(sid).state == {"by": "b"}
    assert a.update(sid, {"by": "a"}, expected_version=2) == 3


def test_refresh_sees_another_engines_writes(engine_factory: EngineFactory) -> None:
    a = engine_factory()
    b = engine_factory()
    sid = a.create("a", state={"n": 0})
    assert a.get(sid).state == {"n": 0}
    b.update(sid, {"n": 1})
    b.suspend(sid)
    fresh = a.get(sid, refresh=True)
    assert fresh.state == {"n": 1}
    assert fresh.version == 3
    assert fresh.status is SessionStatus.SUSPENDED
