"""Inputs at the edges that are not errors: subclasses of the value types, limits beyond any
store, times before year 1, and what verify() says of a session that is not there.

(Inputs that are errors are in tests/reliability/test_bad_input.py.)
"""

from __future__ import annotations

import enum
import math
import subprocess
import sys
import textwrap
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from conftest import EngineFactory

from sessionledger import (
    InvalidArgument,
    RetentionPolicy,
    SessionNotFound,
    SessionPurged,
)


class Kind(str, enum.Enum):
    """A str-enum: str() of a member is "Kind.TOOL", its value "tool_call"."""

    TOOL = "tool_call"


class Level(enum.IntEnum):
    HIGH = 3


class LyingTime(datetime):
    def isoformat(self, *args: Any, **kwargs: Any) -> str:
        return "not a time"


class LyingDecimal(Decimal):
    def __str__(self) -> str:
        return "not a number"


class LyingFloat(float):
    def __float__(self) -> float:
        return 99.0


class SubUUID(uuid.UUID):
    pass


def test_str_enum_members_are_stored_as_their_text(engine_factory: EngineFactory) -> None:
    engine = engine_factory(max_active_sessions=0)
    sid = engine.create(Kind.TOOL, tags=[Kind.TOOL], state={"k": Kind.TOOL, Kind.TOOL: 1},
                        metadata={"m": [Kind.TOOL]}, actor=Kind.TOOL)
    engine.record(sid, Kind.TOOL, {"p": Kind.TOOL}, actor=Kind.TOOL)
    engine.checkpoint(sid, Kind.TOOL)
    session = engine_factory().get(sid)
    assert session.name == "tool_call" and session.tags == ["tool_call"]
    assert session.state == {"k": "tool_call", "tool_call": 1}
    assert session.metadata == {"m": ["tool_call"]}
    assert session.checkpoints == {"tool_call": 3}
    events = engine.history(sid)
    assert [e.actor for e in events] == ["tool_call", "tool_call", None]
    assert events[1].data == {"kind": "tool_call", "payload": {"p": "tool_call"}}
    assert [s.id for s in engine.find(name="tool_call", tags=[Kind.TOOL])] == [sid]
    # plain str everywhere, in the engine that wrote them too
    held = engine.get(sid).state
    assert [type(key) for key in held] == [str, str] and type(held["k"]) is str


def test_subclasses_of_value_types_are_stored_as_their_base_values(
    engine_factory: EngineFactory,
) -> None:
    moment = LyingTime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    values = {"time": moment, "decimal": LyingDecimal("1.25"), "float": LyingFloat(2.5),
              "uuid": SubUUID(int=7), "level": Level.HIGH}
    expected = {"time": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
                "decimal": Decimal("1.25"), "float": 2.5, "uuid": uuid.UUID(int=7), "level": 3}
    writer = engine_factory()
    sid = writer.create("s", state=values)
    writer.update(sid, {"again": dict(values)})
    for state in (writer.get(sid).state, engine_factory(max_active_sessions=0).get(sid).state):
        assert state == {**expected, "again": expected}
        assert {k: type(v) for k, v in state.items() if k != "again"} == {
            k: type(v) for k, v in expected.items()}
    assert writer.verify(sid).ok
    # the same values again are no change: nothing is written
    assert writer.update(sid, {"again": dict(values)}) == 2


def test_retention_ages_and_counts_beyond_any_store_match_nothing(
    engine_factory: EngineFactory,
) -> None:
    engine = engine_factory()
    ended = engine.create("old")
    engine.end(ended, outcome="completed")
    for policy in (RetentionPolicy(max_age=math.inf), RetentionPolicy(max_age=1e300),
                   RetentionPolicy(max_age=10**400), RetentionPolicy(max_age=timedelta.max),
                   RetentionPolicy(keep_last=2**63), RetentionPolicy(max_age=0, keep_last=2**70)):
        assert engine.cleanup(policy).session_ids == [], policy
    assert engine.cleanup(RetentionPolicy(max_age=0)).session_ids == [ended]


def test_list_sessions_takes_any_limit(engine_factory: EngineFactory) -> None:
    engine = engine_factory()
    ids = [engine.create(f"s{i}") for i in range(3)]
    assert sorted(s.id for s in engine.list_sessions(2**63)) == sorted(ids)


def test_find_reads_times_as_history_does(engine_factory: EngineFactory) -> None:
    engine = engine_factory()
    sid = engine.create("s")
    day = datetime.now(UTC).date()
    assert [s.id for s in engine.find(updated_after=day - timedelta(days=1))] == [sid]
    assert [s.id for s in engine.find(updated_before=day - timedelta(days=1))] == []
    assert [s.id for s in engine.find(updated_after="2000-01-01T00:00:00z")] == [sid]


def test_state_at_a_moment_before_year_one_in_utc(engine_factory: EngineFactory) -> None:
    engine = engine_factory()
    sid = engine.create("s")
    early = datetime.min.replace(tzinfo=timezone(timedelta(hours=1)))
    with pytest.raises(InvalidArgument, match=r"did not exist at 0001-01-01T00:00:00\+01:00"):
        engine.state_at(sid, at=early)


def test_verify_of_a_session_that_is_not_there(engine_factory: EngineFactory) -> None:
    engine = engine_factory()
    with pytest.raises(SessionNotFound):
        engine.verify(str(uuid.uuid4()))
    sid = engine.create("s")
    engine.end(sid, outcome="failed")
    assert engine.verify(sid).ok
    engine.cleanup(RetentionPolicy(max_age=0, purge=True))
    with pytest.raises(SessionPurged):
        engine.verify(sid)


def test_parallel_verify_leaves_no_worker_failing_behind(tmp_path: Path) -> None:
    """A worker that is still starting when verify() returns must not fail: it opens the
    pieces' shared counter as it starts (it printed FileNotFoundError at exit)."""
    script = textwrap.dedent(f"""
        from sessionledger import SessionEngine

        if __name__ == "__main__":
            with SessionEngine({f"sqlite:///{tmp_path / 'v.db'}"!r}) as engine:
                for i in range(20):
                    engine.update(engine.create("s"), {{"i": i}})
                report = engine.verify(workers=2)
                print(report.ok, report.events)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "40"]
    assert done.stderr == ""
