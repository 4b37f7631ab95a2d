"""Every error class with its trigger; a refused command writes nothing."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _helpers import snapshot

import sessionledger
from sessionledger import (
    CheckpointNotFound,
    ConcurrencyConflict,
    CorruptedData,
    EventTooLarge,
    InvalidArgument,
    InvalidSessionId,
    InvalidTransition,
    SessionConfig,
    SessionEngine,
    SessionLedgerError,
    SessionNotFound,
    SessionStatus,
    StorageError,
    UnsupportedValue,
)

ERROR_CLASSES = [
    SessionNotFound, InvalidSessionId, InvalidTransition, CheckpointNotFound,
    ConcurrencyConflict, UnsupportedValue, InvalidArgument, EventTooLarge, StorageError,
    CorruptedData,
]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_errors_are_exported_sessionledger_errors(cls: type[Exception]) -> None:
    assert getattr(sessionledger, cls.__name__) is cls
    assert issubclass(cls, SessionLedgerError)
    assert cls is not SessionLedgerError


def test_base_error_exported() -> None:
    assert sessionledger.SessionLedgerError is SessionLedgerError
    assert issubclass(SessionLedgerError, Exception)


# -- SessionNotFound / InvalidSessionId -------------------------------------------------------

COMMANDS: dict[str, Callable[[SessionEngine, Any], Any]] = {
    "get": lambda e, s: e.get(s),
    "history": lambda e, s: e.history(s),
    "update": lambda e, s: e.update(s, {"a": 1}),
    "record": lambda e, s: e.record(s, "k", {}),
    "checkpoint": lambda e, s: e.checkpoint(s, "cp"),
    "save": lambda e, s: e.save(s),
    "restore": lambda e, s: e.restore(s, version=1),
    "suspend": lambda e, s: e.suspend(s),
    "resume": lambda e, s: e.resume(s),
    "end": lambda e, s: e.end(s, outcome="completed"),
    "archive": lambda e, s: e.archive(s),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_unknown_session_is_session_not_found(engine: SessionEngine, command: str) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(SessionNotFound) as raised:
        COMMANDS[command](engine, missing)
    assert missing in str(raised.value)
    with pytest.raises(SessionNotFound):
        engine.get(missing)  # and nothing was created by the attempt


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    "bad_id",
    ["nope", "", "1234", "12345678-1234-5678-1234-56781234567", "zzzzzzzz-1234-5678-1234-"
     "567812345678", 123, None, b"12345678123456781234567812345678"],
    ids=["word", "empty", "digits", "short-uuid", "non-hex", "int", "none", "bytes"],
)
def test_malformed_session_id(memory_engine: SessionEngine, command: str, bad_id: Any) -> None:
    engine = memory_engine
    sid = engine.create("a")
    with pytest.raises(InvalidSessionId) as raised:
        COMMANDS[command](engine, bad_id)
    assert isinstance(raised.value, InvalidArgument)
    assert snapshot(engine, sid) == (1, 1, SessionStatus.ACTIVE)


def test_malformed_parent_id(engine: SessionEngine) -> None:
    with pytest.raises(InvalidSessionId):
        engine.create("child", parent="not-a-uuid")
    assert engine.list_sessions() == []


# -- InvalidArgument: names, labels, outcomes, config -----------------------------------------

BAD_TEXT = [
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
    pytest.param("x" * 257, id="257-chars"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\nb", id="newline"),
    pytest.param("\tname", id="tab"),
    pytest.param("a\x1fb", id="unit-separator"),
    pytest.param("a\x7fb", id="del"),
    pytest.param("a\x85b", id="c1-next-line"),
    pytest.param("a\x9bb", id="c1-csi"),
    pytest.param(5, id="int"),
    pytest.param(None, id="none"),
    pytest.param(b"name", id="bytes"),
]

GOOD_TEXT = ["x" * 256, "a", "h\u00e9llo w\u00f6rld", "with spaces and-dashes_1", "\u4e2d\u6587"]


@pytest.mark.parametrize("bad", BAD_TEXT)
def test_bad_session_name(memory_engine: SessionEngine, bad: Any) -> None:
    engine = memory_engine
    with pytest.raises(InvalidArgument):
        engine.create(bad)
    assert engine.list_sessions() == []


@pytest.mark.parametrize("bad", BAD_TEXT)
def test_bad_checkpoint_label(memory_engine: SessionEngine, bad: Any) -> None:
    engine = memory_engine
    sid = engine.create("a")
    before = snapshot(engine, sid)
    with pytest.raises(InvalidArgument):
        engine.checkpoint(sid, bad)
    assert snapshot(engine, sid) == before
    assert engine.get(sid).checkpoints == {}


@pytest.mark.parametrize("bad", BAD_TEXT)
def test_bad_record_kind(memory_engine: SessionEngine, bad: Any) -> None:
    engine = memory_engine
    sid = engine.create("a")
    before = snapshot(engine, sid)
    with pytest.raises(InvalidArgument):
        engine.record(sid, bad, {"x": 1})
    assert snapshot(engine, sid) == before


@pytest.mark.parametrize("bad", [pytest.param(p.values[0], id=p.id) for p in BAD_TEXT
                                 if p.values[0] is not None])
def test_bad_tag(memory_engine: SessionEngine, bad: Any) -> None:
    engine = memory_engine
    with pytest.raises(InvalidArgument):
        engine.create("a", tags=["ok", bad])
    assert engine.list_sessions() == []


def test_tags_must_be_a_list(memory_engine: SessionEngine) -> None:
    engine = memory_engine
    with pytest.raises(InvalidArgument):
        engine.create("a", tags="agent")  # type: ignore[arg-type]


@pytest.mark.parametrize("good", GOOD_TEXT)
def test_good_names_and_labels(engine: SessionEngine, good: str) -> None:
    sid = engine.create(good, tags=[good])
    engine.checkpoint(sid, good)
    engine.record(sid, good)
    s = engine.get(sid, refresh=True)
    assert s.name == good
    assert s.tags == [good]
    assert s.checkpoints == {good: 2}
    assert engine.history(sid)[-1].data["kind"] == good


@pytest.mark.parametrize("field", ["actor", "correlation_id", "idempotency_key"])
@pytest.mark.parametrize("bad", ["", "x" * 257, "a\nb", 5], ids=["empty", "long", "ctrl", "int"])
def test_bad_actor_correlation_and_key(memory_engine: SessionEngine, field: str, bad: Any) -> None:
    engine = memory_engine
    sid = engine.create("a")
    before = snapshot(engine, sid)
    with pytest.raises(InvalidArgument):
        engine.update(sid, {"x": 1}, **{field: bad})
    with pytest.raises(InvalidArgument):
        engine.create("b", **{field: bad})
    assert snapshot(engine, sid) == before
    assert len(engine.list_sessions()) == 1


@pytest.mark.parametrize("outcome", ["done", "", None, 1, "complete", "archived"])
def test_bad_outcome(memory_engine: SessionEngine, outcome: Any) -> None:
    engine = memory_engine
    sid = engine.create("a")
    before = snapshot(engine, sid)
    with pytest.raises(InvalidArgument) as raised:
        engine.end(sid, outcome=outcome)
    assert not isinstance(raised.value, InvalidTransition)
    assert snapshot(engine, sid) == before


@pytest.mark.parametrize(
    "fields",
    [
        {"durability": "paranoid"},
        {"durability": None},
        {"max_active_sessions": -1},
        {"max_active_sessions": 1.5},
        {"max_active_sessions": True},
        {"retries": -1},
        {"retries": "3"},
        {"max_event_bytes": 0},
        {"max_event_bytes": 63},
        {"max_event_bytes": 1024.0},
        {"compress_threshold": -1},
        {"compress_threshold": None},
        {"snapshot_every": -5},
        {"integrity_key": ""},
        {"integrity_key": b""},
        {"integrity_key": 1234},
        {"hook_errors": "ignore"},
    ],
    ids=lambda f: "-".join(f"{k}={v!r}" for k, v in f.items()),
)
def test_bad_config(fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument) as raised:
        SessionConfig(**fields)
    assert next(iter(fields)) in str(raised.value)


def test_good_config_values() -> None:
    config = SessionConfig(durability="normal", max_active_sessions=0, retries=0,
                           max_event_bytes=64, compress_threshold=0, integrity_key="secret")
    assert config.retries == 0
    assert SessionConfig().retries == 3
    assert SessionConfig().compress_threshold == 1024


# -- EventTooLarge ----------------------------------------------------------------------------


def test_event_too_large_writes_nothing(engine_factory: Callable[..., SessionEngine]) -> None:
    engine = engine_factory(max_event_bytes=4096)
    sid = engine.create("a")
    before = snapshot(engine, sid)
    blob = os.urandom(5000)  # incompressible: above the limit however it is measured
    with pytest.raises(EventTooLarge) as raised:
        engine.update(sid, {"blob": blob})
    assert isinstance(raised.value, SessionLedgerError)
    assert "4096" in str(raised.value)
    with pytest.raises(EventTooLarge):
        engine.record(sid, "blob", blob)
    assert snapshot(engine, sid) == before
    assert engine.get(sid).state == {}
    # a value under the limit is accepted
    assert engine.update(sid, {"blob": os.urandom(3000)}) == 2


def test_event_too_large_on_create_writes_nothing(
    engine_factory: Callable[..., SessionEngine],
) -> None:
    engine = engine_factory(max_event_bytes=1000)
    with pytest.raises(EventTooLarge):
        engine.create("a", state={"blob": os.urandom(2000)})
    with pytest.raises(EventTooLarge):
        engine.create("a", metadata={"blob": os.urandom(2000)})
    assert engine.list_sessions() == []
    assert engine_factory().list_sessions() == []


def test_default_max_event_bytes_is_one_mebibyte(
    engine_factory: Callable[..., SessionEngine],
) -> None:
    engine = engine_factory()
    sid = engine.create("a")
    with pytest.raises(EventTooLarge):
        engine.record(sid, "blob", os.urandom(1024 * 1024 + 1))
    assert engine.record(sid, "blob", os.urandom(1000 * 1000)) == 2


# -- StorageError -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_url",
    ["foo://x", "mysql://user@localhost/db", "", "oracle://scott:tiger@host/db"],
    ids=["foo", "mysql", "empty", "oracle"],
)
def test_unsupported_url(bad_url: str) -> None:
    with pytest.raises(StorageError):
        SessionEngine(bad_url)


def test_unsupported_url_hides_password() -> None:
    with pytest.raises(StorageError) as raised:
        SessionEngine("mysql://user:hunter2@localhost/db")
    assert "hunter2" not in str(raised.value)


def test_unreachable_postgresql() -> None:
    with pytest.raises(StorageError) as raised:
        SessionEngine("postgresql+psycopg://postgres:s3cret@127.0.0.1:1/test")
    assert "s3cret" not in str(raised.value)
    with pytest.raises(StorageError):
        SessionEngine("postgresql://postgres@127.0.0.1:1/test")


def test_garbage_file_as_sqlite_database(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database " * 200 + os.urandom(4096))
    with pytest.raises(StorageError):
        SessionEngine(f"sqlite:///{path}")
    with pytest.raises(StorageError):
        SessionEngine(str(path))


def test_directory_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "s.db"
    with pytest.raises(StorageError):
        SessionEngine(f"sqlite:///{missing}")
    assert not missing.parent.exists()


def test_directory_as_database(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        SessionEngine(f"sqlite:///{tmp_path}")


def test_closed_engine_raises_storage_error(tmp_path: Path) -> None:
    engine = SessionEngine(f"sqlite:///{tmp_path / 's.db'}")
    sid = engine.create("a")
    engine.close()
    with pytest.raises(StorageError):
        engine.update(sid, {"a": 1})
    with pytest.raises(StorageError):
        engine.get(sid)
