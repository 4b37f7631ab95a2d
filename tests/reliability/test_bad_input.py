"""Bad input gets a clear error and writes nothing (issue 6).

One table, CASES: (case id, description, expected error name). Each case tries one or more
variants of one kind of bad input (VARIANT_COUNT in all), and every variant must raise exactly
that error class: always a SessionLedgerError, never a raw TypeError, AttributeError or driver
error. Cases that reach a database run on a SQLite file and on PostgreSQL and prove nothing
was written: after each variant the raw row count of every sessionledger table is what it was
and the engine that took the bad call still holds the same sessions; after the case every
session's version, history length, status, state and checkpoints as a fresh engine reads them
are what they were.

Render the table for the README with::

    .venv/bin/python tests/reliability/test_bad_input.py
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from datetime import tzinfo as datetime_tzinfo
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

import sessionledger
from sessionledger import (
    CheckpointNotFound,
    CorruptedData,
    EventTooLarge,
    InvalidArgument,
    InvalidSessionId,
    InvalidTransition,
    RetentionPolicy,
    Session,
    SessionConfig,
    SessionEngine,
    SessionLedgerError,
    SessionNotFound,
    StorageError,
    UnsupportedValue,
)

ErrorSpec = type[SessionLedgerError] | tuple[type[SessionLedgerError], ...]
Check = Callable[[BaseException, "World"], None]

MIB = 1024 * 1024
#: the limit of the engine the "configured limit" oversize cases use
SMALL_EVENT_LIMIT = 256
UNREACHABLE_PG = "postgresql+psycopg://postgres@127.0.0.1:1/test"


# -- the world a store case runs in --------------------------------------------------------------


@dataclass
class World:
    """One database with sessions in every status; `engine` holds them all in its working set."""

    url: str
    sql: Callable[[str], list[tuple[Any, ...]]]
    engine: SessionEngine
    ids: dict[str, str] = field(default_factory=dict)
    opened: list[SessionEngine] = field(default_factory=list)
    #: one statement counting the rows of every sessionledger table
    count_rows: str = ""

    def fresh(self, **config: Any) -> SessionEngine:
        """Another engine on the database (nothing in its working set)."""
        engine = SessionEngine(self.url, SessionConfig(**config) if config else None)
        self.opened.append(engine)
        return engine

    @property
    def active(self) -> str:
        return self.ids["active"]


ACTIVE_VERSION = 4  # create, update, checkpoint "cp", update; never saved
ENDED_STATUSES = ("completed", "failed", "cancelled", "archived")


def build_world(url: str, sql: Callable[[str], list[tuple[Any, ...]]]) -> World:
    world = World(url, sql, SessionEngine(url))
    e = world.engine
    sid = e.create("active", state={"a": 1}, metadata={"m": 1}, tags=["t"])
    e.update(sid, {"b": 2})
    e.checkpoint(sid, "cp")
    e.update(sid, {"c": 3})
    assert e.get(sid).version == ACTIVE_VERSION
    world.ids["active"] = sid
    for status in ENDED_STATUSES:
        # each has a checkpoint and a save point, so only its status can refuse a restore
        sid = e.create(status, state={"a": 1})
        e.checkpoint(sid, "cp")
        e.save(sid)
        e.end(sid, outcome="completed" if status == "archived" else status)
        if status == "archived":
            e.archive(sid)
        assert e.get(sid).status.value == status.upper()
        world.ids[status] = sid
    tables = sorted(row[0] for row in sql(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, 3) = 'sl_'"
        if e.dialect == "sqlite" else
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = current_schema() AND substr(table_name, 1, 3) = 'sl_'"
    ))
    assert "sl_events" in tables, tables
    world.count_rows = "SELECT " + ", ".join(
        [f"(SELECT COUNT(*) FROM {table})" for table in tables]
        + ["(SELECT COALESCE(MAX(position), 0) FROM sl_events)"]
    )
    return world


def row_counts(world: World) -> tuple[Any, ...]:
    """The row count of every sessionledger table and the last event position, read raw."""
    return tuple(world.sql(world.count_rows)[0])


def footprint(world: World) -> dict[str, Any]:
    """What the store holds, read raw and through a fresh engine without a working set."""
    with SessionEngine(world.url, SessionConfig(max_active_sessions=0)) as fresh:
        sessions = {
            name: (s.version, len(fresh.history(sid)), s.status, s.state, s.checkpoints)
            for name, sid in world.ids.items()
            for s in [fresh.get(sid)]
        }
        listed = sorted(s.id for s in fresh.list_sessions(limit=1000))
    return {"rows": row_counts(world), "sessions": sessions, "listed": listed}


def held(world: World) -> dict[str, Session]:
    """The sessions as the acting engine's working set holds them."""
    return {name: world.engine.get(sid) for name, sid in world.ids.items()}


# -- the table -----------------------------------------------------------------------------------

#: one way to give a store case's bad input: (the call, extra checks on the error raised)
StoreVariant = tuple[Callable[[World], object], Check | None]
#: one way to give an open case's bad input: (the call, what to put in the directory first;
#: it returns a file whose bytes must be unchanged afterwards)
OpenVariant = tuple[Callable[[Path], object], Callable[[Path], Path] | None]


@dataclass(frozen=True)
class StoreCase:
    id: str
    description: str
    error: ErrorSpec
    variants: dict[str, StoreVariant]


@dataclass(frozen=True)
class OpenCase:
    """A bad URL, database file or config: there is no store to write to, or a file that must
    stay as it was."""

    id: str
    description: str
    error: ErrorSpec
    variants: dict[str, OpenVariant]
    max_seconds: float | None = None


STORE_CASES: list[StoreCase] = []
OPEN_CASES: list[OpenCase] = []


def store(case_id: str, description: str, error: ErrorSpec,
          variants: dict[str, StoreVariant]) -> None:
    assert variants, case_id
    STORE_CASES.append(StoreCase(case_id, description, error, variants))


def opening(case_id: str, description: str, error: ErrorSpec,
            variants: dict[str, OpenVariant], max_seconds: float | None = None) -> None:
    assert variants, case_id
    OPEN_CASES.append(OpenCase(case_id, description, error, variants, max_seconds))


def names_active(error: BaseException, world: World) -> None:
    assert world.active in str(error), f"the message does not name the session: {error}"


def names_path(path: str) -> Check:
    def check(error: BaseException, _world: World) -> None:
        assert isinstance(error, UnsupportedValue)
        assert error.path == path, f"names the path {error.path!r}, expected {path!r}: {error}"
        assert path in str(error)
    return check


def names_path_under(prefix: str) -> Check:
    def check(error: BaseException, _world: World) -> None:
        assert isinstance(error, UnsupportedValue)
        assert error.path.startswith(prefix), (
            f"names the path {error.path!r}, not a key path under {prefix!r}: {error}"
        )
    return check


def too_large(limit: int) -> Check:
    def check(error: BaseException, _world: World) -> None:
        assert isinstance(error, EventTooLarge)
        assert error.limit == limit and error.size > limit, (error.size, error.limit)
    return check


# malformed and unknown ids ----------------------------------------------------------------------

_SOME_UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"
MALFORMED_IDS: dict[str, Any] = {
    "empty": "",
    "blank": "   ",
    "word": "not-a-uuid",
    "digits": "12345",
    "one-hex-short": _SOME_UUID[:-1],
    "one-hex-long": _SOME_UUID + "0",
    "non-hex": "g" + _SOME_UUID[1:],
    "nul-inside": _SOME_UUID[:8] + "\x00" + _SOME_UUID[9:],
    "10000-chars": "a" * 10_000,
    "None": None,
    "int": 42,
    "float": 4.2,
    "bytes": _SOME_UUID.encode(),
    "list": [_SOME_UUID],
}
ID_OPERATIONS: dict[str, Callable[[SessionEngine, Any], object]] = {
    "get": lambda e, s: e.get(s),
    "history": lambda e, s: e.history(s),
    "update": lambda e, s: e.update(s, {"x": 1}),
    "record": lambda e, s: e.record(s, "k", {"x": 1}),
    "end": lambda e, s: e.end(s),
}
store("malformed-id",
      "a session id that is not a UUID ('', blank, a word, one hex digit short or long, non-hex, "
      "a NUL inside, 10,000 chars, None, int, float, bytes, list) given to get, history, "
      "update, record and end", InvalidSessionId,
      {f"{form}-{op}": (lambda w, c=call, b=bad: c(w.engine, b), None)
       for form, bad in MALFORMED_IDS.items() for op, call in ID_OPERATIONS.items()})
store("malformed-parent-id", "create(parent=) with an id that is not a UUID", InvalidSessionId,
      {"word": (lambda w: w.engine.create("child", parent="not-a-uuid"), None),
       "int": (lambda w: w.engine.create("child", parent=7), None)})

_UNKNOWN = "5b1f9e3a-7c4d-4e8f-9a0b-1c2d3e4f5a6b"
_NIL = "00000000-0000-0000-0000-000000000000"
UNKNOWN_IDS: dict[str, Any] = {
    "str": _UNKNOWN,
    "uuid-object": uuid.UUID(_UNKNOWN),
    "upper-case": _UNKNOWN.upper(),
    "braced": "{" + _UNKNOWN + "}",
    "urn": "urn:uuid:" + _UNKNOWN,
    "32-hex": _UNKNOWN.replace("-", ""),
    "nil": _NIL,
}


def names_unknown(error: BaseException, _world: World) -> None:
    assert _UNKNOWN in str(error) or _NIL in str(error), f"does not name the id: {error}"


store("unknown-id",
      "a well-formed id of no session (str, UUID object, upper case, braces, urn:uuid:, 32 hex "
      "digits, the nil UUID) given to get, history, update, record and end", SessionNotFound,
      {f"{form}-{op}": (lambda w, c=call, u=unknown: c(w.engine, u), names_unknown)
       for form, unknown in UNKNOWN_IDS.items() for op, call in ID_OPERATIONS.items()})
UNKNOWN_ID_OPERATIONS: dict[str, Callable[[SessionEngine, str], object]] = {
    "checkpoint": lambda e, s: e.checkpoint(s, "cp2"),
    "save": lambda e, s: e.save(s),
    "restore": lambda e, s: e.restore(s, version=1),
    "restore-save-point": lambda e, s: e.restore(s),
    "suspend": lambda e, s: e.suspend(s),
    "resume": lambda e, s: e.resume(s),
    "archive": lambda e, s: e.archive(s),
}
store("unknown-id-other-operations",
      "checkpoint, save, restore, suspend, resume and archive of an unknown id", SessionNotFound,
      {op: (lambda w, c=call: c(w.engine, _UNKNOWN), names_unknown)
       for op, call in UNKNOWN_ID_OPERATIONS.items()})
store("unknown-parent-id", "create(parent=) naming no session: nothing is created",
      SessionNotFound,
      {"str": (lambda w: w.engine.create("child", parent=_UNKNOWN), names_unknown),
       "uuid-object": (lambda w: w.engine.create("child", parent=uuid.UUID(_UNKNOWN)),
                       names_unknown)})

# values msgpack cannot carry --------------------------------------------------------------------


class Thing:
    """A user class: not storable (nothing is pickled)."""


def _deep_list(levels: int) -> Any:
    value: Any = []
    for _ in range(levels):
        value = [value]
    return value


def _deep_dict(levels: int) -> Any:
    value: Any = {}
    for _ in range(levels):
        value = {"k": value}
    return value


def value_variants(values: dict[str, Any], *, exact_paths: bool = True) -> dict[str, StoreVariant]:
    """Each value set by update, inside a list, in a record payload, as a whole payload, in
    create's state and metadata: each names its key path."""
    def path(expected: str) -> Check:
        return names_path(expected) if exact_paths else names_path_under(expected)

    out: dict[str, StoreVariant] = {}
    for name, v in values.items():
        out[f"{name}-update"] = (lambda w, v=v: w.engine.update(w.active, {"x": v}),
                                 path("state.x"))
        out[f"{name}-in-list"] = (
            lambda w, v=v: w.engine.update(w.active, {"x": [1, {"y": v}]}), path("state.x[1].y"))
        out[f"{name}-record"] = (lambda w, v=v: w.engine.record(w.active, "k", {"p": v}),
                                 path("payload.p"))
        out[f"{name}-record-whole"] = (lambda w, v=v: w.engine.record(w.active, "k", v),
                                       path("payload"))
        out[f"{name}-create-state"] = (lambda w, v=v: w.engine.create("n", state={"s": v}),
                                       path("state.s"))
        out[f"{name}-create-metadata"] = (
            lambda w, v=v: w.engine.create("n", metadata={"m": v}), path("metadata.m"))
    return out


store("value-unsupported-type",
      "a value of a type the encoding cannot carry (object(), set, frozenset, complex, a class, "
      "an instance, a lambda, a builtin function, range, Ellipsis, an exception) in update, "
      "record and create, at the top or nested", UnsupportedValue,
      value_variants({
          "object": object(), "set": {1, 2}, "frozenset": frozenset({1}), "complex": 1 + 2j,
          "class": Thing, "instance": Thing(), "lambda": lambda: None, "builtin": len,
          "range": range(3), "ellipsis": ..., "exception": ValueError("x"),
      }))
store("value-int-out-of-range", "an int beyond 64 bits (2**64, -2**63 - 1, 10**30)",
      UnsupportedValue,
      value_variants({"2**64": 2**64, "below-int64": -(2**63) - 1, "10**30": 10**30}))
store("value-nested-too-deep", "a value nested deeper than 100 levels (lists, dicts, 5,000 dicts)",
      UnsupportedValue,
      value_variants({"101-lists": _deep_list(101), "101-dicts": _deep_dict(101),
                      "5000-dicts": _deep_dict(5000)}, exact_paths=False))
store("value-lone-surrogate", "a str holding a lone surrogate (not valid Unicode)",
      UnsupportedValue, value_variants({"surrogate": "a\ud800b"}))
class _FailingZone(datetime_tzinfo):
    """A user's tzinfo that cannot say its UTC offset."""

    def utcoffset(self, dt: Any) -> Any:
        raise RuntimeError("no offset here")


store("value-datetime-failing-zone", "a datetime whose tzinfo raises from utcoffset()",
      UnsupportedValue, value_variants({"failing-zone": datetime(2026, 1, 1,
                                                                 tzinfo=_FailingZone())}))
store("value-not-a-dict", "state changes or metadata that are not a dict", UnsupportedValue,
      {"changes-list": (lambda w: w.engine.update(w.active, [("a", 1)]), names_path("state")),
       "changes-str": (lambda w: w.engine.update(w.active, "a=1"), names_path("state")),
       "metadata-list": (lambda w: w.engine.create("n", metadata=[1]), names_path("metadata")),
       "state-int": (lambda w: w.engine.create("n", state=5), names_path("state"))})

# dict keys that are not strings -----------------------------------------------------------------

BAD_KEYS: dict[str, Any] = {
    "int": 1, "tuple": (1, 2), "None": None, "bytes": b"k", "float": 1.5, "bool": True,
    "uuid": uuid.UUID(_SOME_UUID),
}
_key_variants: dict[str, StoreVariant] = {}
for _name, _key in BAD_KEYS.items():
    _key_variants[f"{_name}-update"] = (lambda w, k=_key: w.engine.update(w.active, {k: "v"}),
                                        names_path(f"state[{_key!r}]"))
    _key_variants[f"{_name}-nested"] = (
        lambda w, k=_key: w.engine.update(w.active, {"a": [{"b": {k: 1}}]}),
        names_path(f"state.a[0].b[{_key!r}]"))
    _key_variants[f"{_name}-record"] = (lambda w, k=_key: w.engine.record(w.active, "k", {k: 1}),
                                        names_path(f"payload[{_key!r}]"))
    _key_variants[f"{_name}-create-state"] = (
        lambda w, k=_key: w.engine.create("n", state={k: 1}), names_path(f"state[{_key!r}]"))
    _key_variants[f"{_name}-create-metadata"] = (
        lambda w, k=_key: w.engine.create("n", metadata={k: 1}),
        names_path(f"metadata[{_key!r}]"))
store("key-not-a-str",
      "a dict key that is not a str (int, tuple, None, bytes, float, bool, UUID) in state, "
      "nested, in a record payload and in create's state and metadata", UnsupportedValue,
      _key_variants)
store("key-lone-surrogate",
      "a str dict key holding a lone surrogate: the error names the key path", UnsupportedValue,
      {"update": (lambda w: w.engine.update(w.active, {"a\udc80": 1}), names_path_under("state")),
       "record": (lambda w: w.engine.record(w.active, "k", {"a\udc80": 1}),
                  names_path_under("payload")),
       "create-metadata": (lambda w: w.engine.create("n", metadata={"\ud800": 1}),
                           names_path_under("metadata"))})

# oversize events --------------------------------------------------------------------------------


def _small(w: World) -> SessionEngine:
    return w.fresh(max_event_bytes=SMALL_EVENT_LIMIT)


store("oversize-configured-limit",
      f"an event above SessionConfig(max_event_bytes={SMALL_EVENT_LIMIT}): update, record and "
      "create of 1,000 bytes", EventTooLarge,
      {"update": (lambda w: _small(w).update(w.active, {"x": "y" * 1000}),
                  too_large(SMALL_EVENT_LIMIT)),
       "record": (lambda w: _small(w).record(w.active, "k", os.urandom(1000)),
                  too_large(SMALL_EVENT_LIMIT)),
       "create": (lambda w: _small(w).create("n", state={"x": "y" * 1000}),
                  too_large(SMALL_EVENT_LIMIT))})
store("oversize-default-limit",
      "an event above the default 1 MiB: a 2 MiB bytes value (random, or zeros lz4 would "
      "shrink), a 2 MiB str payload, 2 MiB of initial state, 200,000 small keys",
      EventTooLarge,
      {"update-2MiB-bytes": (lambda w: w.engine.update(w.active, {"x": os.urandom(2 * MIB)}),
                             too_large(MIB)),
       "update-2MiB-zeros": (lambda w: w.engine.update(w.active, {"x": bytes(2 * MIB)}),
                             too_large(MIB)),
       "record-2MiB-str": (lambda w: w.engine.record(w.active, "k", "z" * (2 * MIB)),
                           too_large(MIB)),
       "create-2MiB-state": (lambda w: w.engine.create("n", state={"x": os.urandom(2 * MIB)}),
                             too_large(MIB)),
       "update-200000-keys": (
           lambda w: w.engine.update(w.active, {f"k{i}": i for i in range(200_000)}),
           too_large(MIB))})

# names and labels -------------------------------------------------------------------------------

TEXT_TARGETS: dict[str, Callable[[World, Any], object]] = {
    "session-name": lambda w, t: w.engine.create(t),
    "checkpoint-label": lambda w, t: w.engine.checkpoint(w.active, t),
    "record-kind": lambda w, t: w.engine.record(w.active, t, {}),
    "tag": lambda w, t: w.engine.create("n", tags=["ok", t]),
}
OPTIONAL_TEXT_TARGETS: dict[str, Callable[[World, Any], object]] = {
    "actor": lambda w, t: w.engine.update(w.active, {"x": 1}, actor=t),
    "create-actor": lambda w, t: w.engine.create("n", actor=t),
    "correlation-id": lambda w, t: w.engine.record(w.active, "k", {}, correlation_id=t),
    "idempotency-key": lambda w, t: w.engine.update(w.active, {"x": 1}, idempotency_key=t),
    "create-idempotency-key": lambda w, t: w.engine.create("n", idempotency_key=t),
    "suspend-reason": lambda w, t: w.engine.suspend(w.active, reason=t),
}


def text_variants(texts: dict[str, Any], *, optional_too: bool = True) -> dict[str, StoreVariant]:
    targets = dict(TEXT_TARGETS)
    if optional_too:
        targets.update(OPTIONAL_TEXT_TARGETS)
    return {f"{target}-{name}": (lambda w, c=call, t=text: c(w, t), None)
            for target, call in targets.items() for name, text in texts.items()}


store("text-empty",
      "an empty or blank session name, checkpoint label, record kind, tag, actor, "
      "correlation id, idempotency key or suspend reason", InvalidArgument,
      text_variants({"empty": "", "blank": "   ", "whitespace": "\t\n"}))
store("text-too-long", "the same of 10,000 characters (or 257: the limit is 256)",
      InvalidArgument, text_variants({"10000-chars": "x" * 10_000, "257-chars": "x" * 257}))
store("text-control-characters", "the same holding a NUL, a newline or DEL", InvalidArgument,
      text_variants({"nul": "a\x00b", "newline": "a\nb", "del": "a\x7fb"}))
store("text-not-a-str", "a name, label, kind or tag that is None or an int", InvalidArgument,
      text_variants({"None": None, "int": 42}, optional_too=False))
store("text-tags-not-a-list", "create(tags=) given a dict or a str", InvalidArgument,
      {"dict": (lambda w: w.engine.create("n", tags={"a": 1}), None),
       "str": (lambda w: w.engine.create("n", tags="abc"), None)})
store("text-too-many-tags", "create(tags=) with 65 tags, or 2,049 characters of tags together",
      InvalidArgument,
      {"65-tags": (lambda w: w.engine.create("n", tags=[f"t{i}" for i in range(65)]), None),
       "2049-chars": (lambda w: w.engine.create(
           "n", tags=["x" * 200 + f"{i:02d}" for i in range(10)] + ["y" * 29]), None)})

# duplicate checkpoint label ---------------------------------------------------------------------

store("duplicate-label", "checkpoint() with a label the session already has", InvalidArgument,
      {"same-engine": (lambda w: w.engine.checkpoint(w.active, "cp"), names_active),
       "fresh-engine": (lambda w: w.fresh().checkpoint(w.active, "cp"), names_active)})

# restore targets that do not exist --------------------------------------------------------------

store("restore-version-missing",
      f"restore(version=) to 0, -1, the end + 1, 10**12 or 2**70 (the session has versions "
      f"1..{ACTIVE_VERSION})", CheckpointNotFound,
      {**{name: (lambda w, v=v: w.engine.restore(w.active, version=v), names_active)
          for name, v in {"0": 0, "-1": -1, "end+1": ACTIVE_VERSION + 1, "10**12": 10**12,
                          "2**70": 2**70}.items()},
       "end+1-fresh-engine": (
           lambda w: w.fresh().restore(w.active, version=ACTIVE_VERSION + 1), names_active)})
store("restore-version-not-an-int", "restore(version=) given '1', 1.0 or True",
      CheckpointNotFound,
      {name: (lambda w, v=v: w.engine.restore(w.active, version=v), names_active)
       for name, v in {"str": "1", "float": 1.0, "bool": True}.items()})
store("restore-unknown-checkpoint", "restore(checkpoint=) to a label the session does not have",
      CheckpointNotFound,
      {"label": (lambda w: w.engine.restore(w.active, checkpoint="nope"), names_active),
       "fresh-engine": (lambda w: w.fresh().restore(w.active, checkpoint="nope"), names_active)})
store("restore-no-save-point", "restore() of a session never saved", CheckpointNotFound,
      {"no-save": (lambda w: w.engine.restore(w.active), names_active)})
store("restore-both-targets", "restore(checkpoint='cp', version=1)", InvalidArgument,
      {"both": (lambda w: w.engine.restore(w.active, checkpoint="cp", version=1), None)})

# operations the status does not allow -----------------------------------------------------------

#: operation -> (call, the word the message must contain)
STATUS_OPERATIONS: dict[str, tuple[Callable[[SessionEngine, str], object], str]] = {
    "update": (lambda e, s: e.update(s, {"new": 1}), "update"),
    "update-empty": (lambda e, s: e.update(s, {}), "update"),
    "update-delete": (lambda e, s: e.update(s, delete=["a"]), "update"),
    "record": (lambda e, s: e.record(s, "k", {}), "record"),
    "checkpoint": (lambda e, s: e.checkpoint(s, "new-label"), "checkpoint"),
    "save": (lambda e, s: e.save(s), "save"),
    "restore-version": (lambda e, s: e.restore(s, version=1), "restore"),
    "restore-checkpoint": (lambda e, s: e.restore(s, checkpoint="cp"), "restore"),
    "restore-save-point": (lambda e, s: e.restore(s), "restore"),
    "suspend": (lambda e, s: e.suspend(s), "suspend"),
    "resume": (lambda e, s: e.resume(s), "resume"),
    "end": (lambda e, s: e.end(s, outcome="completed"), "end"),
    "end-failed": (lambda e, s: e.end(s, outcome="failed"), "end"),
    "archive": (lambda e, s: e.archive(s), "archive"),
}


def transition_check(status: str, word: str) -> Check:
    def check(error: BaseException, world: World) -> None:
        assert isinstance(error, InvalidTransition)
        sid = world.ids[status]
        message = str(error)
        assert error.session_id == sid and sid in message, f"session not named: {message}"
        assert error.status == status.upper() and status.upper() in message, (
            f"status not named: {message}")
        assert word in error.operation and word in message, f"operation not named: {message}"
    return check


def status_variants(status: str) -> dict[str, StoreVariant]:
    out: dict[str, StoreVariant] = {}
    for op, (call, word) in STATUS_OPERATIONS.items():
        if op == "archive" and status != "archived":
            continue  # archiving an ended session is allowed
        out[op] = (lambda w, c=call: c(w.engine, w.ids[status]), transition_check(status, word))
        out[f"{op}-fresh-engine"] = (lambda w, c=call: c(w.fresh(), w.ids[status]),
                                     transition_check(status, word))
    return out


for _status in ENDED_STATUSES:
    _kind = "an archived" if _status == "archived" else f"an ended ({_status.upper()})"
    store(f"{_status}-session",
          f"every operation on {_kind} session, from the engine that put it there and from a "
          "fresh one; the message names session, status and operation", InvalidTransition,
          status_variants(_status))
store("active-session", "resume or archive of an ACTIVE session", InvalidTransition,
      {"resume": (lambda w: w.engine.resume(w.active), transition_check("active", "resume")),
       "archive": (lambda w: w.engine.archive(w.active), transition_check("active", "archive"))})

# arguments of the wrong kind --------------------------------------------------------------------

store("end-outcome", "end(outcome=) not completed, failed or cancelled", InvalidArgument,
      {name: (lambda w, o=o: w.engine.end(w.active, outcome=o), None)
       for name, o in {"unknown": "done", "upper-case": "COMPLETED", "None": None,
                       "list": ["completed"]}.items()})
store("restore-checkpoint-not-a-label", "restore(checkpoint=) given a list, a dict or an int",
      InvalidArgument,
      {name: (lambda w, c=c: w.engine.restore(w.active, checkpoint=c), None)
       for name, c in {"list": ["cp"], "dict": {}, "int": 3}.items()})
store("expected-version-not-a-version", "expected_version= given True, 1.0, Decimal(1), '1', "
      "[1], 0 or -1 (True, 1.0 and Decimal(1) equal the version 1 under ==)", InvalidArgument,
      {name: (lambda w, v=v: w.engine.update(w.active, {"x": 1}, expected_version=v), None)
       for name, v in {"True": True, "float": float(ACTIVE_VERSION),
                       "Decimal": Decimal(ACTIVE_VERSION), "str": str(ACTIVE_VERSION),
                       "list": [ACTIVE_VERSION], "zero": 0, "negative": -1}.items()})
store("find-bad-filter", "find() with a name or tag no session can have (a lone surrogate, a "
      "NUL, not a str), status=[], or a cursor out of range", InvalidArgument,
      {name: (lambda w, f=f: w.engine.find(**f), None) for name, f in {
          "name-surrogate": {"name": "\ud800"}, "name-nul": {"name": "a\x00b"},
          "name-list": {"name": [1]}, "name-int": {"name": 5},
          "tag-surrogate": {"tags": ["\ud800"]}, "status-empty": {"status": []},
          "cursor-30-digits": {"cursor": "9" * 30 + "." + _SOME_UUID},
          "cursor-2**63": {"cursor": f"{2**63}.{_SOME_UUID}"},
          "cursor-surrogate-id": {"cursor": "1." + "\ud800" * 36}}.items()})
store("types-not-names", "history(types=) / timeline(types=) holding a list (unhashable)",
      InvalidArgument,
      {"history": (lambda w: w.engine.history(w.active, types=[["StateChanged"]]), None),
       "timeline": (lambda w: list(w.engine.timeline(types=[["StateChanged"]])), None)})
store("subscriber-arguments", "subscribe(events=[[...]]), subscribe(transactional='no'), "
      "unsubscribe([1]), run_subscribers(batch_size=2**63)", InvalidArgument,
      {"events-unhashable": (lambda w: w.engine.subscribe("s", print, events=[["x"]]), None),
       "transactional-str": (lambda w: w.engine.subscribe("s", print, transactional="no"),
                             None),
       "unsubscribe-list": (lambda w: w.engine.unsubscribe([1]), None),  # type: ignore[arg-type]
       "batch-size-huge": (lambda w: w.engine.run_subscribers(True, batch_size=2**63), None)})
store("rebuild-progress-not-callable", "rebuild('catalog', progress=5): refused before any "
      "work (no half-built tables left behind)", InvalidArgument,
      {"int": (lambda w: w.engine.rebuild("catalog", progress=5), None)})  # type: ignore[arg-type]
store("retention-max-age-nan", "RetentionPolicy(max_age=nan)", InvalidArgument,
      {"nan": (lambda w: w.engine.cleanup(RetentionPolicy(max_age=float("nan"))), None)})
store("retention-no-action", "RetentionPolicy(archive=False) without purge=True (it would do "
      "nothing)", InvalidArgument,
      {"archive-false": (lambda w: w.engine.cleanup(RetentionPolicy(max_age=0, archive=False)),
                         None)})
store("delete-keys", "update(delete=) given a str or a list holding an int", InvalidArgument,
      {"str": (lambda w: w.engine.update(w.active, {"x": 1}, delete="a"), None),
       "int-key": (lambda w: w.engine.update(w.active, delete=[1]), None)})
store("list-limit", "list_sessions(limit=) given a str or None", InvalidArgument,
      {"str": (lambda w: w.engine.list_sessions(limit="10"), None),
       "None": (lambda w: w.engine.list_sessions(limit=None), None)})

# URLs, database files, config -------------------------------------------------------------------


def _engine(url: str) -> Callable[[Path], object]:
    return lambda _p: SessionEngine(url)


opening("url-unsupported", "a URL of a database sessionledger does not support (mysql, oracle, "
        "mssql, http, a made-up scheme)", StorageError,
        {name: (_engine(url), None) for name, url in {
            "mysql": "mysql://user@localhost/db", "oracle": "oracle://scott:tiger@host/db",
            "mssql": "mssql+pyodbc://u@h/db", "http": "http://example.com/db",
            "made-up": "foo://x"}.items()})
opening("url-garbage", "an empty, blank or unparsable URL, one naming a driver that is not "
        "installed, or one holding a NUL or a lone surrogate (an undecodable file name)",
        StorageError,
        {name: (_engine(url), None) for name, url in {
            "empty": "", "blank": "   ", "only-separator": "://",
            "sqlite-missing-driver": "sqlite+nosuchdriver:///x.db",
            "postgresql-missing-driver": "postgresql+nosuchdriver://u@h/db",
            "sqlite-root": "sqlite:////",
            # what an undecodable file name becomes in Python, and a NUL
            "surrogate-path": "sqlite:////tmp/x\udcff.db", "surrogate-bare-path": "x\udcff.db",
            "nul-path": "sqlite:////tmp/x\x00.db"}.items()})
opening("url-not-a-str", "SessionEngine(123) or SessionEngine(b'sqlite://')", StorageError,
        {"int": (_engine(123), None), "bytes": (_engine(b"sqlite://"), None)})
opening("url-bad-sqlite-path", "a SQLite file in a directory that does not exist, or a "
        "directory as the file", StorageError,
        {"missing-directory": (lambda p: SessionEngine(f"sqlite:///{p / 'no' / 'such' / 's.db'}"),
                               None),
         "directory": (lambda p: SessionEngine(f"sqlite:///{p}"), None)})
opening("postgresql-unreachable", f"PostgreSQL that does not answer ({UNREACHABLE_PG}, also as "
        "postgresql://), within 10 s", StorageError,
        {"psycopg-scheme": (_engine(UNREACHABLE_PG), None),
         "plain-scheme": (_engine("postgresql://postgres@127.0.0.1:1/test"), None)},
        max_seconds=10)


def _file(content: Callable[[], bytes]) -> Callable[[Path], Path]:
    def prepare(directory: Path) -> Path:
        path = directory / "garbage.db"
        path.write_bytes(content())
        return path
    return prepare


def _damaged_database(damage: Callable[[bytes], bytes]) -> Callable[[Path], Path]:
    """A real sessionledger database (everything checkpointed into the file), then damaged."""
    def prepare(directory: Path) -> Path:
        path = directory / "garbage.db"
        with SessionEngine(f"sqlite:///{path}") as engine:
            sids = [engine.create(f"s{i}", state={"x": "y" * 3000}) for i in range(40)]
        db = sqlite3.connect(path)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        (directory / "sids").write_text("\n".join(sids))
        path.write_bytes(damage(path.read_bytes()))
        return path
    return prepare


def _scramble(data: bytes) -> bytes:
    out = bytearray(data)
    for i in range(4096, len(out), 509):
        out[i] ^= 0xA5
    return bytes(out)


def _open_garbage(directory: Path) -> object:
    return SessionEngine(f"sqlite:///{directory / 'garbage.db'}")


def _use_database(directory: Path) -> None:
    """Open the damaged file and read every session in it."""
    with SessionEngine(f"sqlite:///{directory / 'garbage.db'}") as engine:
        for sid in (directory / "sids").read_text().split():
            engine.get(sid)
            engine.history(sid)
        engine.list_sessions()


opening("file-not-a-database", "a file that is not a SQLite database given as one (text, "
        "random bytes, the SQLite magic header then random bytes, 6 bytes); it is left as it was",
        (StorageError, CorruptedData),
        {"text": (_open_garbage, _file(lambda: b"this is not a database\n" * 200)),
         "random": (_open_garbage, _file(lambda: os.urandom(4096))),
         "header-then-garbage": (_open_garbage,
                                 _file(lambda: b"SQLite format 3\x00" + os.urandom(8000))),
         "six-bytes": (_open_garbage, _file(lambda: b"SQLite")),
         "bare-path": (lambda p: SessionEngine(str(p / "garbage.db")),
                       _file(lambda: os.urandom(4096)))})
opening("file-damaged-database", "a real database cut to half its size, or with bytes flipped "
        "across its pages, then opened and read", (StorageError, CorruptedData),
        {"truncated": (_use_database, _damaged_database(lambda d: d[: len(d) // 2])),
         "scrambled": (_use_database, _damaged_database(_scramble))})

BAD_CONFIGS: dict[str, dict[str, Any]] = {
    "durability-unknown": {"durability": "fast"},
    "durability-None": {"durability": None},
    "retries-negative": {"retries": -1},
    "retries-str": {"retries": "3"},
    "retries-float": {"retries": 1.5},
    "retries-bool": {"retries": True},
    "max-active-sessions-negative": {"max_active_sessions": -1},
    "max-event-bytes-0": {"max_event_bytes": 0},
    "max-event-bytes-63": {"max_event_bytes": 63},
    "max-event-bytes-str": {"max_event_bytes": "1MiB"},
    "compress-threshold-negative": {"compress_threshold": -1},
    "integrity-key-empty": {"integrity_key": ""},
    "integrity-key-empty-bytes": {"integrity_key": b""},
    "integrity-key-int": {"integrity_key": 123},
    "integrity-key-surrogate": {"integrity_key": "\ud800"},
    "snapshot-every-negative": {"snapshot_every": -1},
    "hook-errors-unknown": {"hook_errors": "ignore"},
}
opening("config-bad-value", "SessionConfig with a value out of range or of the wrong type "
        "(durability, retries, max_active_sessions, max_event_bytes, compress_threshold, "
        "integrity_key, snapshot_every, hook_errors)", InvalidArgument,
        {name: (lambda _p, f=fields: SessionConfig(**f), None)
         for name, fields in BAD_CONFIGS.items()})
opening("config-not-a-sessionconfig", "SessionEngine(url, {'retries': 1}): a dict, not a "
        "SessionConfig", InvalidArgument,
        {"dict": (lambda p: SessionEngine(f"sqlite:///{p / 's.db'}", {"retries": 1}), None)})


def error_name(error: ErrorSpec) -> str:
    if isinstance(error, tuple):
        return " or ".join(e.__name__ for e in error)
    return error.__name__


#: (case id, description, expected error name) of every case: the table for the README
CASES: list[tuple[str, str, str]] = [
    (c.id, c.description, error_name(c.error)) for c in [*STORE_CASES, *OPEN_CASES]
]
#: how many bad inputs one run tries (store variants run once per backend)
VARIANT_COUNT = sum(len(c.variants) for c in [*STORE_CASES, *OPEN_CASES])

#: the kinds of bad input the issue names -> the case ids that cover each
CATEGORIES: dict[str, tuple[str, ...]] = {
    "malformed ids": ("malformed-id", "malformed-parent-id"),
    "unknown ids": ("unknown-id", "unknown-id-other-operations", "unknown-parent-id"),
    "values msgpack cannot carry": ("value-unsupported-type", "value-int-out-of-range",
                                    "value-nested-too-deep"),
    "keys that are not strings": ("key-not-a-str",),
    "an oversize event": ("oversize-configured-limit", "oversize-default-limit"),
    "empty or 10,000-character names and labels": ("text-empty", "text-too-long"),
    "a duplicate checkpoint label": ("duplicate-label",),
    "restore to a version that does not exist": ("restore-version-missing",),
    "operations on ended sessions": ("completed-session", "failed-session",
                                     "cancelled-session"),
    "operations on archived sessions": ("archived-session",),
    "a wrong URL": ("url-unsupported", "url-garbage"),
    "unreachable PostgreSQL": ("postgresql-unreachable",),
    "a garbage file as the SQLite database": ("file-not-a-database",),
    "bad config values": ("config-bad-value",),
}


def markdown_table() -> str:
    lines = ["| case | bad input | error |", "|---|---|---|"]
    lines += [f"| `{cid}` | {desc.replace('|', '/')} | `{err}` |" for cid, desc, err in CASES]
    return "\n".join(lines)


# -- running the cases ---------------------------------------------------------------------------


def outcome(action: Callable[[], object]) -> tuple[BaseException | None, float]:
    started = time.perf_counter()
    try:
        result = action()
    except Exception as error:
        return error, time.perf_counter() - started
    if isinstance(result, SessionEngine):
        result.close()
    return None, time.perf_counter() - started


def wrong_error(error: BaseException | None, expected: ErrorSpec) -> str | None:
    """Why `error` is not the clear error expected (None when it is)."""
    name = error_name(expected)
    if error is None:
        return f"nothing was raised, expected {name}"
    if not isinstance(error, SessionLedgerError):
        return (f"raised {type(error).__module__}.{type(error).__name__}: {error} "
                f"(not a SessionLedgerError; expected {name})")
    if not isinstance(error, expected):
        return f"raised {type(error).__name__}: {error}; expected {name}"
    if not str(error).strip():
        return f"{type(error).__name__} without a message"
    return None


def short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def raw_sql(backend: Any) -> Iterator[Callable[[str], list[tuple[Any, ...]]]]:
    """One raw connection to the backend's database for the whole test (read-only use)."""
    if backend.sqlite_path is not None:
        db = sqlite3.connect(backend.sqlite_path, isolation_level=None)
        try:
            yield lambda statement: db.execute(statement).fetchall()
        finally:
            db.close()
        return
    import psycopg

    with psycopg.connect(backend.pg_url, autocommit=True,
                         options=f"-csearch_path={backend.pg_schema}") as pg:
        yield lambda statement: pg.execute(statement).fetchall()


@pytest.fixture
def world(backend: Any) -> Iterator[World]:
    with raw_sql(backend) as sql:
        built = build_world(backend.url, sql)
        try:
            yield built
        finally:
            for engine in [built.engine, *built.opened]:
                engine.close()


@pytest.mark.parametrize("case", STORE_CASES, ids=[c.id for c in STORE_CASES])
def test_bad_input_raises_and_writes_nothing(world: World, case: StoreCase) -> None:
    failures: list[str] = []
    initial = footprint(world)
    for variant, (act, check) in case.variants.items():
        before = row_counts(world)
        before_held = held(world)
        error, _ = outcome(lambda act=act: act(world))
        problem = wrong_error(error, case.error)
        if problem is None and check is not None:
            assert error is not None
            try:
                check(error, world)
            except AssertionError as failed:
                problem = str(failed).split("\nassert")[0]
        if problem is not None:
            failures.append(f"{variant}: {short(problem)}")
        if row_counts(world) != before:
            failures.append(f"{variant}: the refused call wrote rows")
        if held(world) != before_held:
            failures.append(f"{variant}: the refused call changed the engine's working set")
    final = footprint(world)
    if final != initial:
        failures.append(f"the store changed: {initial} became {final}")
    assert not failures, (
        f"{case.id} ({case.description}), {len(case.variants)} variants tried:\n"
        + "\n".join(failures)
    )


@pytest.mark.parametrize("case", OPEN_CASES, ids=[c.id for c in OPEN_CASES])
def test_bad_url_file_or_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                case: OpenCase) -> None:
    failures: list[str] = []
    for variant, (act, prepare) in case.variants.items():
        directory = tmp_path / variant
        directory.mkdir()
        monkeypatch.chdir(directory)  # a URL taken for a bare path would leave a file here
        path = prepare(directory) if prepare is not None else None
        original = path.read_bytes() if path is not None else None
        before = {p.name for p in directory.iterdir()}
        error, seconds = outcome(lambda act=act, d=directory: act(d))
        problem = wrong_error(error, case.error)
        if problem is not None:
            failures.append(f"{variant}: {short(problem)}")
        if case.max_seconds is not None and seconds >= case.max_seconds:
            failures.append(f"{variant}: took {seconds:.1f} s to fail")
        if path is not None and path.read_bytes() != original:
            failures.append(f"{variant}: the database file was changed")
        after = {p.name for p in directory.iterdir()
                 if not p.name.endswith(("-wal", "-shm", "-journal"))}
        if after - before:
            failures.append(f"{variant}: left {sorted(after - before)} behind")
    assert not failures, (
        f"{case.id} ({case.description}), {len(case.variants)} variants tried:\n"
        + "\n".join(failures)
    )


def test_case_table_stands_on_its_own() -> None:
    """CASES is the source of the README's table, not the other way round: every row is
    complete, every expected error is an exported SessionLedgerError, and every kind of bad
    input the issue names has its cases (nothing here reads the README)."""
    ids = [cid for cid, _, _ in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(CASES) == len(STORE_CASES) + len(OPEN_CASES)
    for cid, description, name in CASES:
        assert cid and description.strip(), cid
        for part in name.split(" or "):
            cls = getattr(sessionledger, part)
            assert issubclass(cls, SessionLedgerError), (cid, part)
    for category, covering in CATEGORIES.items():
        missing = [cid for cid in covering if cid not in ids]
        assert not missing, f"{category}: no case {missing}"
    table = markdown_table().splitlines()
    assert len(table) == len(CASES) + 2
    assert all(row.count("|") == 4 for row in table), "a description breaks the table"
    print(f"\nbad input: {len(CASES)} cases, {VARIANT_COUNT} variants "
          f"({sum(len(c.variants) for c in STORE_CASES)} on each backend)")


if __name__ == "__main__":  # pragma: no cover - renders the README table
    print(markdown_table())
    print(f"\n{len(CASES)} cases, {VARIANT_COUNT} bad inputs")
