"""Review round 17 (values): exact equality where the engine judges sessions, str subclasses
as their text in every argument, and the last two value types that escaped the value rules."""

from __future__ import annotations

import enum
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any

import lz4.block
import pytest
from _helpers import Backend
from conftest import EngineFactory

from sessionledger import SessionEngine, UnsupportedValue
from sessionledger.infrastructure.codec import SnapshotCodec


def _rewrite_snapshot(backend: Backend, sid: str, change: Any) -> None:
    """Re-encode the session's one (unkeyed) snapshot as `change(fields)` gives it:
    (fields, format_version), with a digest that matches, as a writer without the key could."""
    codec = SnapshotCodec()
    flags, data = backend.sql("SELECT flags, data FROM sl_snapshots WHERE session_id = ?",
                              (sid,))[0]
    body = lz4.block.decompress(bytes(data)) if flags & 1 else bytes(data)
    fields, fmt = change(codec.transcoder.decode(body))
    flags, digest, stored = codec.encode(fields)
    backend.sql("UPDATE sl_snapshots SET format_version = ?, flags = ?, digest = ?, data = ? "
                "WHERE session_id = ?", (fmt, flags, digest, stored, sid))


@pytest.mark.parametrize("before, forged", [
    ({"count": 1}, {"count": True}),
    ({"price": Decimal("1.50")}, {"price": Decimal("1.5")}),
    ({"x": 0.0}, {"x": -0.0}),
    ({"at": datetime(2026, 1, 1, 12, tzinfo=UTC)},
     {"at": datetime(2026, 1, 1, 13, tzinfo=timezone(timedelta(hours=1)))}),
], ids=["1-True", "decimal-scale", "negative-zero", "utc-offset"])
def test_verify_finds_a_snapshot_whose_values_differ_from_the_events_only_by_type(
    engine_factory: EngineFactory, backend: Backend, before: dict[str, Any],
    forged: dict[str, Any],
) -> None:
    # == says these are equal; the engine stores them as different values, and the forged
    # snapshot served them (get() gave True where history() says 1)
    engine = engine_factory()
    sid = engine.create("n", state=before)
    engine.save(sid)

    def forge(fields: dict[str, Any]) -> tuple[dict[str, Any], int]:
        return {**fields, "state": forged}, 1

    _rewrite_snapshot(backend, sid, forge)
    report = engine_factory(max_active_sessions=0).verify()
    assert [(p.session_id, p.version, p.what) for p in report.problems] == [
        (sid, 2, "snapshot does not match the events")]


def _format0(fields: dict[str, Any]) -> tuple[dict[str, Any], None]:
    """The fields as the first release wrote them (no format, datetimes, no head)."""
    def at(micros: int) -> datetime:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    return {"id": fields["id"], "version": fields["version"], "name": fields["name"],
            "status": fields["status"], "state": fields["state"], "tags": fields["tags"],
            "metadata": fields["metadata"], "parent": fields["parent"],
            "created_at": at(fields["created_us"]), "updated_at": at(fields["updated_us"]),
            "checkpoints": fields["checkpoints"], "last_saved": fields["saved"]}, None


@pytest.mark.parametrize("value", [float("nan"), Decimal("NaN"), Decimal("sNaN")],
                         ids=["float-nan", "decimal-nan", "decimal-snan"])
def test_verify_accepts_a_first_release_snapshot_of_a_state_holding_nan(
    engine_factory: EngineFactory, backend: Backend, value: Any
) -> None:
    # a format-0 snapshot is never byte-identical to what this release writes, so verify()
    # compares it with the replay: NaN == NaN is False (a false problem) and an sNaN comparison
    # raised decimal.InvalidOperation out of verify()
    engine = engine_factory()
    sid = engine.create("n", state={"x": value}, metadata={"m": value})
    engine.save(sid)
    _rewrite_snapshot(backend, sid, _format0)
    reader = engine_factory(max_active_sessions=0)
    assert str(reader.get(sid).state["x"]) == str(value)
    report = reader.verify()
    assert report.ok, report.problems
    assert report.snapshots == 1


def test_sessions_holding_nan_are_equal_to_their_replay(engine: SessionEngine) -> None:
    sid = engine.create("n", state={"f": float("nan"), "d": Decimal("sNaN")})
    version = engine.update(sid, {"step": 1})
    assert engine.get(sid) == engine.state_at(sid, version=version)
    assert engine.get(sid) != engine.state_at(sid, version=1)


def test_values_differing_only_by_type_make_sessions_unequal(engine: SessionEngine) -> None:
    a = engine.create("n", state={"v": 1})
    b = engine.create("n", state={"v": 1})
    one, other = engine.get(a), engine.get(b)
    other.id, other.created_us, other.updated_us = one.id, one.created_us, one.updated_us
    assert one == other
    other.state["v"] = True
    assert one != other
    other.state["v"] = 1.0
    assert one != other


class Label(str, enum.Enum):
    COMPLETED = "completed"
    A = "a"


def test_str_enum_arguments_are_stored_and_delivered_as_their_text(
    engine: SessionEngine,
) -> None:
    # names, labels and actors were made plain text already; delete keys, a restore's
    # checkpoint and an outcome reached hooks and the working set as the enum member (its
    # f-string is "Label.COMPLETED") while a reload gave plain text
    seen: list[Any] = []
    engine.hooks.subscribe(seen.append)
    sid = engine.create("n", state={"a": 1})
    engine.checkpoint(sid, "a")
    engine.update(sid, delete=[Label.A])
    engine.restore(sid, checkpoint=Label.A)
    engine.end(sid, outcome=Label.COMPLETED)
    delete = seen[-3].data["delete"][0]
    checkpoint = seen[-2].data["checkpoint"]
    outcome = seen[-1].data["outcome"]
    held = engine.get(sid).outcome
    assert [type(delete), type(checkpoint), type(outcome), type(held)] == [str] * 4
    assert f"{outcome}" == "completed"
    assert engine.get(sid, refresh=True) == engine.get(sid)


class _NoOffset(tzinfo):
    """A tzinfo that knows no offset: its datetimes are naive."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None


def test_a_datetime_whose_tzinfo_gives_no_offset_is_held_as_a_reload_gives_it(
    engine: SessionEngine,
) -> None:
    moment = datetime(2020, 1, 1, 12, 30, tzinfo=_NoOffset())
    sid = engine.create("n", state={"d": moment})
    held = engine.get(sid).state["d"]
    reloaded = engine.get(sid, refresh=True).state["d"]
    assert held.tzinfo is None and reloaded.tzinfo is None
    assert held == reloaded == moment.replace(tzinfo=None)


def test_a_released_memoryview_is_an_unsupported_value(engine: SessionEngine) -> None:
    sid = engine.create("n")
    view = memoryview(b"ab")
    view.release()
    with pytest.raises(UnsupportedValue, match=r"at state\.x: memoryview"):
        engine.update(sid, {"x": view})
    assert engine.get(sid).version == 1
