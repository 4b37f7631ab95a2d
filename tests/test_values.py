"""Values: every supported type round-trips exactly through state, metadata and record payloads
(read back by a new engine), large payloads are compressed, unsupported values are refused
before anything is written."""

from __future__ import annotations

import math
import os
import struct
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from _helpers import Backend, differences, same, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionledger import (
    InvalidArgument,
    SessionConfig,
    SessionEngine,
    SessionLedgerError,
    UnsupportedValue,
)
from sessionledger.domain.events import MAX_MICROS, to_datetime, to_micros

EngineFactory = Callable[..., SessionEngine]

IST = timezone(timedelta(hours=5, minutes=30))
PST = timezone(timedelta(hours=-8))

SAMPLES: dict[str, Any] = {
    "none": None,
    "true": True,
    "false": False,
    "zero": 0,
    "negative": -17,
    "int64_max": 2**63 - 1,
    "int64_min": -(2**63),
    "uint64_max": 2**64 - 1,
    "float": 1.5,
    "float_tiny": 5e-324,
    "float_negative_zero": -0.0,
    "float_inf": math.inf,
    "float_minus_inf": -math.inf,
    "float_third": 1 / 3,
    "str_empty": "",
    "str_unicode": "h\u00e9llo \u2713 \U0001d11e \u4e2d\u6587",
    "str_nul": "a\x00b",
    "bytes_empty": b"",
    "bytes": bytes(range(256)),
    "list_empty": [],
    "list_mixed": [1, "two", 3.0, None, True, b"\x01", [4, [5]]],
    "dict_empty": {},
    "dict_nested": {"a": {"b": {"c": [1, {"d": "e"}]}}, "": "empty key", "\u00e9": 1},
    "datetime_naive": datetime(2024, 2, 29, 23, 59, 58, 123456),
    "datetime_utc": datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
    "datetime_ist": datetime(2023, 6, 1, 12, 0, tzinfo=IST),
    "datetime_pst": datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=PST),
    "datetime_min": datetime.min,
    "datetime_max": datetime.max,
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "uuid_nil": uuid.UUID(int=0),
    "decimal": Decimal("3.14159265358979323846264338327950288419716939937510"),
    "decimal_trailing_zeros": Decimal("1.10"),
    "decimal_negative_zero": Decimal("-0.000"),
    "decimal_exponent": Decimal("1E+30"),
    "decimal_tiny": Decimal("-1E-40"),
    "decimal_inf": Decimal("-Infinity"),
    "decimal_nan": Decimal("NaN"),
    "decimal_in_list": [Decimal("0.1"), Decimal("0.10")],
}


def _store_in(engine: SessionEngine, where: str, values: dict[str, Any]) -> str:
    if where == "create-state":
        return engine.create("values", state=values)
    if where == "metadata":
        return engine.create("values", metadata=values)
    sid = engine.create("values")
    if where == "update-state":
        engine.update(sid, values)
    elif where == "record-payload":
        engine.record(sid, "values", values)
    return sid


def _read_back(engine: SessionEngine, where: str, sid: str) -> dict[str, Any]:
    if where in ("create-state", "update-state"):
        return engine.get(sid).state
    if where == "metadata":
        return engine.get(sid).metadata
    payload: dict[str, Any] = engine.history(sid)[-1].data["payload"]
    return payload


WHERE = ["create-state", "update-state", "metadata", "record-payload"]


@pytest.mark.parametrize("where", WHERE)
def test_every_value_type_round_trips_after_reopening(
    engine_factory: EngineFactory, where: str
) -> None:
    writer = engine_factory()
    sid = _store_in(writer, where, SAMPLES)
    writer.close()
    reader = engine_factory(max_active_sessions=0)
    assert differences(SAMPLES, _read_back(reader, where, sid)) == []
    # history() decodes the same values
    event = reader.history(sid)[-1]
    carried = {
        "create-state": lambda: event.data["state"],
        "update-state": lambda: event.data["set"],
        "metadata": lambda: event.data["metadata"],
        "record-payload": lambda: event.data["payload"],
    }[where]()
    assert differences(SAMPLES, carried) == []


def test_values_round_trip_in_memory_without_cache() -> None:
    with SessionEngine("sqlite://", SessionConfig(max_active_sessions=0)) as engine:
        sid = engine.create("values", state=SAMPLES, metadata=SAMPLES)
        engine.record(sid, "values", SAMPLES)
        s = engine.get(sid)
        assert differences(SAMPLES, s.state) == []
        assert differences(SAMPLES, s.metadata) == []
        assert differences(SAMPLES, engine.history(sid)[-1].data["payload"]) == []


def test_working_set_copy_matches_stored_values(engine: SessionEngine) -> None:
    """What the engine serves from memory is what it stored (no type drift before reopening)."""
    sid = engine.create("values", state=SAMPLES)
    assert differences(SAMPLES, engine.get(sid).state) == []
    assert differences(SAMPLES, engine.get(sid, refresh=True).state) == []


def test_nan_round_trips(engine_factory: EngineFactory) -> None:
    writer = engine_factory()
    sid = writer.create("nan", state={"nan": math.nan, "nested": [math.nan]})
    reader = engine_factory(max_active_sessions=0)
    state = reader.get(sid).state
    assert isinstance(state["nan"], float) and math.isnan(state["nan"])
    assert isinstance(state["nested"][0], float) and math.isnan(state["nested"][0])


def test_tuples_come_back_as_lists(engine_factory: EngineFactory) -> None:
    writer = engine_factory()
    sid = writer.create("t", state={"t": (1, (2, 3), [4, (5,)])}, metadata={"m": ()})
    writer.record(sid, "tuple", (1, 2))
    reader = engine_factory(max_active_sessions=0)
    s = reader.get(sid)
    assert s.state == {"t": [1, [2, 3], [4, [5]]]}
    assert type(s.state["t"]) is list
    assert type(s.state["t"][1]) is list
    assert s.metadata == {"m": []}
    assert type(s.metadata["m"]) is list
    payload = reader.history(sid)[-1].data["payload"]
    assert payload == [1, 2] and type(payload) is list
    # and the engine that wrote them serves lists too
    assert type(writer.get(sid).state["t"]) is list


def test_datetime_offsets_are_kept(engine_factory: EngineFactory) -> None:
    moment = datetime(2024, 3, 10, 12, 0, tzinfo=IST)
    writer = engine_factory()
    sid = writer.create("dt", state={"aware": moment, "naive": moment.replace(tzinfo=None)})
    state = engine_factory(max_active_sessions=0).get(sid).state
    assert state["aware"] == moment
    assert state["aware"].utcoffset() == timedelta(hours=5, minutes=30)
    assert state["naive"].tzinfo is None
    assert state["naive"] == datetime(2024, 3, 10, 12, 0)


# -- large values: compressed above compress_threshold ----------------------------------------


def _payload_flags(backend: Backend, sid: str) -> dict[int, int]:
    rows = backend.sql("SELECT version, payload FROM sl_events WHERE session_id = ?", (sid,))
    return {version: bytes(payload)[0] for version, payload in rows}


def test_large_values_round_trip_and_are_compressed(
    engine_factory: EngineFactory, backend: Backend
) -> None:
    big_text = "sessionledger " * 20_000  # ~280 kB, compresses well
    big_list = [{"i": i, "name": f"item-{i}", "when": datetime(2024, 1, 1, tzinfo=UTC)}
                for i in range(2000)]
    random_bytes = os.urandom(50_000)  # does not compress
    writer = engine_factory()
    sid = writer.create("big", state={"text": big_text})
    writer.update(sid, {"list": big_list})
    writer.record(sid, "blob", {"bytes": random_bytes})
    writer.update(sid, {"small": 1})
    reader = engine_factory(max_active_sessions=0)
    s = reader.get(sid)
    assert s.state["text"] == big_text
    assert same(big_list, s.state["list"])
    assert reader.history(sid)[2].data["payload"]["bytes"] == random_bytes

    flags = _payload_flags(backend, sid)
    assert flags[1] & 0x01, "a 280 kB compressible SessionStarted payload must be lz4-compressed"
    assert flags[2] & 0x01, "a large StateChanged payload must be lz4-compressed"
    assert flags[4] & 0x01 == 0, "a tiny payload must not be compressed"
    sizes = dict(backend.sql(
        "SELECT version, LENGTH(payload) FROM sl_events WHERE session_id = ?", (sid,)))
    assert sizes[1] < len(big_text) // 10


def test_values_just_around_the_compress_threshold(engine_factory: EngineFactory) -> None:
    writer = engine_factory()
    sid = writer.create("edge")
    values = {f"s{n}": "x" * n for n in (1000, 1010, 1020, 1024, 1025, 1030, 1100)}
    for key, value in values.items():
        writer.update(sid, {key: value})
    assert engine_factory(max_active_sessions=0).get(sid).state == values


@pytest.mark.parametrize("threshold", [0, 64])
def test_compress_threshold_config(engine_factory: EngineFactory, threshold: int) -> None:
    writer = engine_factory(compress_threshold=threshold)
    sid = writer.create("c", state={"a": "abc" * 100})
    writer.update(sid, {"b": "z" * 5000})
    assert engine_factory(max_active_sessions=0).get(sid).state == {
        "a": "abc" * 100, "b": "z" * 5000,
    }


# -- generated nested values ------------------------------------------------------------------

_FIXED_OFFSETS = st.sampled_from([
    UTC, IST, PST, timezone(timedelta(hours=14)), timezone(timedelta(hours=-12)),
    timezone(timedelta(minutes=45)),
])

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.datetimes(),
    st.datetimes(timezones=_FIXED_OFFSETS),
    st.uuids(),
    st.decimals(allow_nan=True, allow_infinity=True),
)

VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=8), children, max_size=5),
    ),
    max_leaves=25,
)

STATES = st.dictionaries(st.text(max_size=8), VALUES, max_size=6)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=STATES, payload=VALUES)
def test_generated_values_round_trip(engine_factory: EngineFactory, state: dict[str, Any],
                                     payload: Any) -> None:
    engine = engine_factory(max_active_sessions=0)  # every read goes through the store
    sid = engine.create("generated", state=state, metadata=state)
    engine.record(sid, "payload", payload)
    s = engine.get(sid)
    assert differences(state, s.state) == []
    assert differences(state, s.metadata) == []
    assert same(payload, engine.history(sid)[-1].data["payload"])
    engine.close()


# -- values the engine must refuse ------------------------------------------------------------


class _Thing:
    pass


UNSUPPORTED = [
    pytest.param({"a": {"b": [0, {1, 2}]}}, "state.a.b[1]", id="set"),
    pytest.param({"a": {"b": [0, frozenset()]}}, "state.a.b[1]", id="frozenset"),
    pytest.param({"a": {"b": [0, _Thing()]}}, "state.a.b[1]", id="object"),
    pytest.param({"a": {"b": [0, 1j]}}, "state.a.b[1]", id="complex"),
    pytest.param({"a": {"b": [0, date(2024, 1, 1)]}}, "state.a.b[1]", id="date"),
    pytest.param({"a": {"b": [0, 2**64]}}, "state.a.b[1]", id="int-2**64"),
    pytest.param({"a": {"b": [0, -(2**63) - 1]}}, "state.a.b[1]", id="int-below-int64"),
    pytest.param({"a": {"b": [0, 10**30]}}, "state.a.b[1]", id="huge-int"),
    pytest.param({"a": {"b": [0, lambda: 0]}}, "state.a.b[1]", id="function"),
    pytest.param({"a": {1: "x"}}, "state.a", id="int-key"),
    pytest.param({"a": {None: "x"}}, "state.a", id="none-key"),
    pytest.param({"a": {("t",): "x"}}, "state.a", id="tuple-key"),
    pytest.param({"a": {b"k": "x"}}, "state.a", id="bytes-key"),
    pytest.param({"top": {1, 2}}, "state.top", id="top-level-set"),
]


@pytest.mark.parametrize(("value", "path"), UNSUPPORTED)
def test_unsupported_value_in_update(engine: SessionEngine, value: dict[str, Any],
                                     path: str) -> None:
    sid = engine.create("a", state={"a": {"b": [0]}})
    before = snapshot(engine, sid)
    with pytest.raises(UnsupportedValue) as raised:
        engine.update(sid, value)
    assert path in str(raised.value)
    assert isinstance(raised.value, SessionLedgerError)
    assert snapshot(engine, sid) == before
    assert engine.get(sid).state == {"a": {"b": [0]}}


@pytest.mark.parametrize(("value", "path"), UNSUPPORTED)
def test_unsupported_value_in_create_writes_nothing(
    engine: SessionEngine, value: dict[str, Any], path: str
) -> None:
    with pytest.raises(UnsupportedValue) as raised:
        engine.create("a", state=value)
    assert path in str(raised.value)
    with pytest.raises(UnsupportedValue) as raised:
        engine.create("a", metadata=value)
    assert path.replace("state", "metadata", 1) in str(raised.value)
    assert engine.list_sessions() == []


def test_unsupported_value_in_record_payload(engine: SessionEngine) -> None:
    sid = engine.create("a")
    before = snapshot(engine, sid)
    with pytest.raises(UnsupportedValue) as raised:
        engine.record(sid, "k", {"x": [1, {"y": object()}]})
    assert "payload.x[1].y" in str(raised.value)
    with pytest.raises(UnsupportedValue):
        engine.record(sid, "k", {1, 2})
    with pytest.raises(UnsupportedValue):
        engine.record(sid, "k", [2**64])
    assert snapshot(engine, sid) == before


@pytest.mark.parametrize("bad", ["not a dict", ["a"], 3], ids=["str", "list", "int"])
def test_state_and_metadata_must_be_dicts(engine: SessionEngine, bad: Any) -> None:
    with pytest.raises(InvalidArgument):
        engine.create("a", state=bad)
    with pytest.raises(InvalidArgument):
        engine.create("a", metadata=bad)
    sid = engine.create("a")
    with pytest.raises(InvalidArgument):
        engine.update(sid, bad)
    assert engine.get(sid, refresh=True).version == 1


def test_lone_surrogate_string_is_refused_with_its_key_path(engine: SessionEngine) -> None:
    """A str that is not valid Unicode (a lone surrogate) cannot travel as msgpack UTF-8: it is
    an unsupported value, refused before writing, and the message names where it is."""
    sid = engine.create("a")
    before = snapshot(engine, sid)
    with pytest.raises(UnsupportedValue) as raised:
        engine.update(sid, {"a": {"b": ["ok", "\ud800"]}})
    assert "state.a.b[1]" in str(raised.value)
    assert snapshot(engine, sid) == before


def test_lone_surrogate_in_actor_is_a_sessionledger_error(engine: SessionEngine) -> None:
    """Every error raised on purpose is a SessionLedgerError; a bad actor string must not leak a
    raw UnicodeEncodeError out of the hash chain, and must write nothing."""
    sid = engine.create("a")
    before = snapshot(engine, sid)
    with pytest.raises(SessionLedgerError):
        engine.update(sid, {"x": 1}, actor="\udcff")
    assert snapshot(engine, sid) == before


# -- a delta compares values exactly, not with Python's loose == --------------------------------

EQUAL_BUT_DIFFERENT = [
    pytest.param([1], [1.0], id="nested-int-to-float"),
    pytest.param({"k": 1}, {"k": True}, id="nested-int-to-bool"),
    pytest.param(Decimal("1.0"), Decimal("1.00"), id="decimal-precision"),
    pytest.param(datetime(2024, 1, 1, 12, 0, tzinfo=UTC),
                 datetime(2024, 1, 1, 17, 30, tzinfo=IST), id="datetime-offset"),
]


@pytest.mark.parametrize(("old", "new"), EQUAL_BUT_DIFFERENT)
def test_update_to_an_equal_but_different_value_is_stored(
    engine_factory: EngineFactory, old: Any, new: Any
) -> None:
    """Python calls these equal, yet they do not round-trip as each other: setting `new` must
    store `new` (values round-trip exactly), so it is a change, not a no-op."""
    engine = engine_factory()
    sid = engine.create("a", state={"v": old})
    assert engine.update(sid, {"v": new}) == 2
    reader = engine_factory(max_active_sessions=0)
    assert same(new, reader.get(sid).state["v"]), reader.get(sid).state["v"]


def test_update_with_the_same_nan_changes_nothing(engine: SessionEngine) -> None:
    """NaN != NaN in Python, but setting a NaN over the same NaN changes nothing."""
    sid = engine.create("a", state={"v": math.nan})
    assert engine.update(sid, {"v": math.nan}) == 1
    # any NaN: inf - inf has its sign bit set (on x86), -nan too, and one with a payload
    payload_nan = struct.unpack("<d", b"\x01\0\0\0\0\0\xf8\x7f")[0]
    other_nans = [math.inf - math.inf, -math.nan, payload_nan]
    for other in other_nans:
        assert math.isnan(other)
        assert engine.update(sid, {"v": other}) == 1
    assert len(engine.history(sid)) == 1
    assert engine.diff(sid, 1, 1).changed == {}
    assert engine.update(sid, {"v": 0.0}) == 2  # a number is a change


# -- stored timestamps ----------------------------------------------------------------------------

_EXACT_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@given(st.integers(min_value=0, max_value=MAX_MICROS))
@settings(max_examples=3000, deadline=None)
def test_to_datetime_is_exact_at_every_microsecond(micros: int) -> None:
    # to_datetime takes a float shortcut below the year 2106: it must never be a microsecond off
    assert to_datetime(micros) == _EXACT_EPOCH + timedelta(microseconds=micros)
    assert to_micros(to_datetime(micros)) == micros


@pytest.mark.parametrize("micros", [
    0, 1, 999_999, 1_000_000, 1_764_089_181_999_999, 2**32 * 10**6 - 1, 2**32 * 10**6,
    2**33 * 10**6 + 999_999, MAX_MICROS,
])
def test_to_datetime_at_the_edges(micros: int) -> None:
    assert to_datetime(micros) == _EXACT_EPOCH + timedelta(microseconds=micros)
    assert to_datetime(micros).tzinfo is not None


def test_session_id_forms_all_mean_the_canonical_id() -> None:
    from sessionledger.domain.values import parse_session_id

    canonical = "0192f3a4-5b6c-7d8e-9f01-23456789abcd"
    forms = [canonical, canonical.upper(), "{" + canonical + "}", "urn:uuid:" + canonical,
             canonical.replace("-", ""), uuid.UUID(canonical)]
    for form in forms:
        assert parse_session_id(form) == canonical, form
    for bad in [canonical + "\n", " " + canonical, canonical[:-1] + "g", canonical[:-1]]:
        with pytest.raises(InvalidArgument):
            parse_session_id(bad)
