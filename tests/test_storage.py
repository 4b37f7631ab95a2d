"""The store: URLs, tables created on first use, reopening, the stored format (stable type names,
msgpack not pickle, blake3 chain digests) and damaged data."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import lz4.block
import msgpack
import pytest
from _helpers import EVENT_TYPE_NAMES, SQLITE, Backend, differences
from sqlalchemy.engine import make_url

from sessionledger import (
    CorruptedData,
    SessionConfig,
    SessionEngine,
    SessionLedgerError,
    SessionStatus,
)
from sessionledger.infrastructure.codec import GENESIS_DIGEST, chain_digest

EngineFactory = Callable[..., SessionEngine]


def full_lifecycle(engine: SessionEngine, **create: Any) -> str:
    """A session that went through every event type."""
    sid = engine.create("full", tags=["t"], metadata={"m": 1}, state={"step": 0},
                        actor="alice", correlation_id="c-1", **create)
    engine.update(sid, {"step": 1, "when": datetime(2024, 5, 6, tzinfo=UTC)},
                  actor="bob")
    engine.record(sid, "tool_call", {"tool": "search", "price": Decimal("9.99")})
    engine.checkpoint(sid, "cp")
    engine.update(sid, {"step": 2, "big": "x" * 5000})
    engine.save(sid)
    engine.restore(sid, checkpoint="cp", correlation_id="c-2")
    engine.suspend(sid, reason="wait")
    engine.resume(sid)
    engine.end(sid, outcome="completed")
    engine.archive(sid)
    return sid


# -- URLs -------------------------------------------------------------------------------------


def test_bare_path_is_a_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "bare.db"
    with SessionEngine(str(path)) as engine:
        assert engine.dialect == "sqlite"
        sid = engine.create("a", state={"x": 1})
    assert path.is_file()
    with SessionEngine(f"sqlite:///{path}") as engine:
        assert engine.get(sid).state == {"x": 1}


def test_relative_bare_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with SessionEngine("relative.db") as engine:
        engine.create("a")
    assert (tmp_path / "relative.db").is_file()


def test_default_url_is_sessionledger_db_in_cwd(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SESSIONLEDGER_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    with SessionEngine() as engine:
        assert engine.dialect == "sqlite"
        sid = engine.create("a")
    assert (tmp_path / "sessionledger.db").is_file()
    with SessionEngine(str(tmp_path / "sessionledger.db")) as engine:
        assert engine.get(sid).name == "a"


def test_default_url_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "from-env.db"
    monkeypatch.setenv("SESSIONLEDGER_URL", f"sqlite:///{target}")
    monkeypatch.chdir(tmp_path)
    with SessionEngine() as engine:
        sid = engine.create("a")
    assert target.is_file()
    assert not (tmp_path / "sessionledger.db").exists()
    with SessionEngine(f"sqlite:///{target}") as engine:
        assert engine.get(sid).name == "a"


def test_memory_url() -> None:
    with SessionEngine("sqlite://") as engine:
        assert engine.dialect == "sqlite"
        sid = engine.create("a")
        assert engine.get(sid, refresh=True).version == 1
    with SessionEngine("sqlite://") as other:
        assert other.list_sessions() == []  # a new in-memory database


@pytest.mark.postgresql
def test_postgresql_scheme_is_mapped_to_psycopg(pg_backend: Backend) -> None:
    backend = pg_backend
    plain = make_url(backend.url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    assert plain.startswith("postgresql://")
    with SessionEngine(plain) as engine:
        assert engine.dialect == "postgresql"
        assert engine.url.startswith("postgresql+psycopg://")
        sid = engine.create("a", state={"x": 1})
    with SessionEngine(backend.url) as engine:
        assert engine.get(sid).state == {"x": 1}


def _tables(backend: Backend) -> set[str]:
    if backend.kind == SQLITE:
        rows = backend.sql("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        rows = backend.sql("SELECT table_name FROM information_schema.tables "
                           "WHERE table_schema = ?", (backend.pg_schema,))
    return {row[0] for row in rows}


def test_tables_are_created_on_first_use(backend: Backend) -> None:
    assert "sl_events" not in _tables(backend)
    with SessionEngine(backend.url) as engine:
        assert {"sl_events", "sl_idempotency"} <= _tables(backend)
        sid = engine.create("a")
    with SessionEngine(backend.url) as engine:  # opening again keeps the data
        assert engine.get(sid).name == "a"
    assert backend.sql("SELECT COUNT(*) FROM sl_events")[0][0] == 1


def test_many_engines_open_a_new_database_at_once(backend: Backend) -> None:
    engines: list[SessionEngine] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def open_one() -> None:
        try:
            engine = SessionEngine(backend.url)
            with lock:
                engines.append(engine)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == []
        sids = [engine.create(f"s{i}") for i, engine in enumerate(engines)]
        assert len({s.id for s in engines[0].list_sessions()}) == len(sids) == 4
    finally:
        for engine in engines:
            engine.close()


# -- reopening --------------------------------------------------------------------------------


def test_reopening_gives_the_same_sessions(engine_factory: EngineFactory) -> None:
    first = engine_factory()
    sids = [full_lifecycle(first) for _ in range(2)]
    live = first.create("live", state={"n": 1})
    first.update(live, {"n": 2})
    expected = {sid: (first.get(sid), first.history(sid)) for sid in [*sids, live]}
    first.close()

    second = engine_factory(max_active_sessions=0)
    for sid, (session, history) in expected.items():
        assert second.get(sid) == session
        assert second.history(sid) == history
    assert second.get(sids[0]).status is SessionStatus.ARCHIVED
    assert second.get(live).state == {"n": 2}
    assert second.update(live, {"n": 3}) == 3
    assert [s.id for s in second.list_sessions()] == [live, sids[1], sids[0]]


def test_durability_normal_persists(engine_factory: EngineFactory) -> None:
    first = engine_factory(durability="normal")
    sid = first.create("a", state={"x": 1})
    first.update(sid, {"x": 2})
    first.close()
    assert engine_factory().get(sid).state == {"x": 2}


# -- the stored format ------------------------------------------------------------------------


def _rows(backend: Backend, sid: str) -> list[tuple[Any, ...]]:
    return backend.sql(
        "SELECT version, type, ts, actor, correlation_id, payload, digest FROM sl_events "
        "WHERE session_id = ? ORDER BY version", (sid,))


def test_stored_type_names_are_stable_strings(engine_factory: EngineFactory,
                                              backend: Backend) -> None:
    sid = full_lifecycle(engine_factory())
    types = [row[1] for row in _rows(backend, sid)]
    assert types == [
        "SessionStarted", "StateChanged", "EventRecorded", "CheckpointTaken", "StateChanged",
        "SessionSaved", "SessionRestored", "SessionSuspended", "SessionResumed", "SessionEnded",
        "SessionArchived",
    ]
    assert set(types) == EVENT_TYPE_NAMES


def _body(payload: bytes) -> bytes:
    flags = payload[0]
    assert flags in (0, 1), f"unexpected payload flags {flags}"
    return lz4.block.decompress(payload[2:]) if flags & 1 else payload[2:]


def test_payloads_are_msgpack_not_pickle(engine_factory: EngineFactory, backend: Backend) -> None:
    sid = full_lifecycle(engine_factory())
    rows = _rows(backend, sid)
    ext_codes: set[int] = set()

    def ext_hook(code: int, data: bytes) -> msgpack.ExtType:
        ext_codes.add(code)
        return msgpack.ExtType(code, data)

    for version, event_type, _, _, _, payload, _ in rows:
        payload = bytes(payload)
        assert not payload.startswith(b"\x80"), "a pickle protocol header"
        for marker in (b"builtins", b"copyreg", b"__reduce", b"sessionledger."):
            assert marker not in _body(payload), (version, marker)
        data = msgpack.unpackb(_body(payload), ext_hook=ext_hook, raw=False)
        assert isinstance(data, dict), (version, event_type)
    assert ext_codes  # datetime and Decimal travelled as msgpack ext types
    started = msgpack.unpackb(_body(bytes(rows[0][5])), raw=False,
                              ext_hook=lambda c, d: msgpack.ExtType(c, d))
    assert started["name"] == "full"
    assert started["state"] == {"step": 0}


def test_stored_timestamps_and_metadata_columns(engine_factory: EngineFactory,
                                                backend: Backend) -> None:
    engine = engine_factory()
    sid = full_lifecycle(engine)
    rows = _rows(backend, sid)
    history = engine.history(sid)
    assert [row[3] for row in rows] == [e.actor for e in history]
    assert [row[4] for row in rows] == [e.correlation_id for e in history]
    assert rows[0][3] == "alice" and rows[0][4] == "c-1"
    stamps = [row[2] for row in rows]
    assert stamps == sorted(stamps)
    assert [e.timestamp for e in history] == [
        datetime.fromtimestamp(ts // 1_000_000, UTC).replace(microsecond=ts % 1_000_000)
        for ts in stamps
    ]


def _recompute_chain(rows: list[tuple[Any, ...]], sid: str, key: bytes | None) -> list[bool]:
    head = GENESIS_DIGEST
    matches = []
    for version, event_type, ts, actor, correlation_id, payload, digest in rows:
        head = chain_digest(head, sid, version, event_type, ts, actor, correlation_id,
                            bytes(payload), key)
        matches.append(head == bytes(digest))
    return matches


def test_chain_digests_recompute(engine_factory: EngineFactory, backend: Backend) -> None:
    a = engine_factory()
    b = engine_factory(max_active_sessions=1)
    sid = full_lifecycle(a)
    other = a.create("other")
    # writes through two engines, one with a working set of one, and through retries
    for i in range(5):
        b.update(other, {"b": i})
        b.get(sid)
        a.record(other, "a", i)
    for s in (sid, other):
        rows = _rows(backend, s)
        assert len(rows) >= 11
        assert all(_recompute_chain(rows, s, None)), s
        assert len({bytes(row[6]) for row in rows}) == len(rows)
        assert all(len(bytes(row[6])) == 32 for row in rows)


def test_chain_digests_are_keyed_by_integrity_key(engine_factory: EngineFactory,
                                                  backend: Backend) -> None:
    config = SessionConfig(integrity_key="s3cret")
    engine = engine_factory(config)
    sid = full_lifecycle(engine)
    rows = _rows(backend, sid)
    assert all(_recompute_chain(rows, sid, config.chain_key()))
    assert not any(_recompute_chain(rows, sid, None))
    assert not any(_recompute_chain(rows, sid, SessionConfig(integrity_key="other").chain_key()))
    # an engine with the same key keeps extending the same chain
    engine.close()
    again = engine_factory(config)
    live = again.create("live")
    again.update(live, {"x": 1})
    again.close()
    again = engine_factory(config)
    again.update(live, {"x": 2})
    assert all(_recompute_chain(_rows(backend, live), live, config.chain_key()))


# -- damaged data -----------------------------------------------------------------------------


@pytest.fixture
def damaged(engine_factory: EngineFactory, backend: Backend) -> Iterator[dict[str, Any]]:
    """A session of 4 events (v3 compressed) plus an undamaged neighbour, writer closed."""
    writer = engine_factory()
    sid = writer.create("victim", state={"name": "abcdef"})
    writer.update(sid, {"k": "zzzzzz"})  # v2
    writer.update(sid, {"big": "ab" * 5000})  # v3, lz4-compressed
    writer.update(sid, {"k": "yyyyyy"})  # v4
    neighbour = writer.create("neighbour", state={"ok": True})
    writer.close()
    yield {"sid": sid, "neighbour": neighbour, "backend": backend}


def _set_payload(backend: Backend, sid: str, version: int, payload: bytes) -> None:
    backend.sql("UPDATE sl_events SET payload = ? WHERE session_id = ? AND version = ?",
                (payload, sid, version))


def _payload(backend: Backend, sid: str, version: int) -> bytes:
    return bytes(backend.sql("SELECT payload FROM sl_events WHERE session_id = ? AND version = ?",
                             (sid, version))[0][0])


CORRUPTIONS: dict[str, tuple[int, Callable[[bytes], bytes]]] = {
    "invalid-msgpack": (2, lambda p: p[:2] + b"\xc1\xc1\xc1"),
    "truncated": (2, lambda p: p[: len(p) // 2]),
    "empty": (2, lambda p: b""),
    "one-byte": (4, lambda p: p[:1]),
    "unknown-flags": (2, lambda p: b"\x80" + p[1:]),
    "not-a-map": (4, lambda p: p[:2] + msgpack.packb([1, 2, 3])),
    "bad-lz4": (3, lambda p: p[:6] + b"\xff" * 64),
    "newer-schema": (2, lambda p: p[:1] + b"\x63" + p[2:]),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_undecodable_payload_is_corrupted_data(engine_factory: EngineFactory,
                                               damaged: dict[str, Any], case: str) -> None:
    sid, backend = damaged["sid"], damaged["backend"]
    version, damage = CORRUPTIONS[case]
    _set_payload(backend, sid, version, damage(_payload(backend, sid, version)))
    reader = engine_factory(max_active_sessions=0)
    with pytest.raises(CorruptedData) as raised:
        reader.get(sid)
    assert isinstance(raised.value, SessionLedgerError)
    assert sid in str(raised.value)
    assert f"version {version}" in str(raised.value)
    with pytest.raises(CorruptedData) as raised:
        reader.history(sid)
    assert sid in str(raised.value)
    with pytest.raises(CorruptedData):
        reader.update(sid, {"x": 1})
    # nothing was written on top of the damage, and other sessions are fine
    assert backend.sql("SELECT COUNT(*) FROM sl_events WHERE session_id = ?", (sid,))[0][0] == 4
    assert reader.get(damaged["neighbour"]).state == {"ok": True}


def _forge(backend: Backend, sid: str, version: int, payload: bytes) -> None:
    """Replace one payload and write the chain again from there, as someone with write access
    and no integrity key could: the chain holds, only the decoder can object."""
    rows = _rows(backend, sid)
    head = GENESIS_DIGEST
    for row_version, event_type, ts, actor, correlation_id, stored, _digest in rows:
        body = payload if row_version == version else bytes(stored)
        head = chain_digest(head, sid, row_version, event_type, ts, actor, correlation_id, body)
        backend.sql("UPDATE sl_events SET payload = ?, digest = ? WHERE session_id = ? AND "
                    "version = ?", (body, head, sid, row_version))


# Payloads that pass the chain but are not one value each: loads unpack the bodies of a stream
# together and must still name the event at fault (they decode one at a time to find it)
FORGED: dict[str, tuple[int, Callable[[bytes], bytes]]] = {
    "two values": (2, lambda p: p + msgpack.packb({"set": {}, "delete": []})),
    "no body": (2, lambda p: p[:2]),
    "one byte": (4, lambda p: p[:1]),
    "invalid msgpack": (4, lambda p: p[:2] + b"\xc1"),
    "half a value": (2, lambda p: p[: len(p) - 3]),
    "bad ext value": (4, lambda p: p[:2] + msgpack.packb(msgpack.ExtType(1, b"not a time"))),
    "bad lz4 body": (3, lambda p: b"\x01" + p[1:2] + b"\xff" * 16),
    "unknown flags": (3, lambda p: b"\x80" + p[1:]),
    "lz4 of two values": (2, lambda p: b"\x01" + p[1:2] + lz4.block.compress(p[2:] + p[2:])),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_payloads_forged_onto_the_chain_are_named_by_version(
        engine_factory: EngineFactory, backend: Backend, case: str) -> None:
    writer = engine_factory()
    sid = writer.create("victim", state={"name": "abcdef"})
    for value in ("zzzzzz", "xxxxxx", "yyyyyy", "wwwwww"):  # no payload compressed
        writer.update(sid, {"k": value})
    version, damage = FORGED[case]
    _forge(backend, sid, version, damage(_payload(backend, sid, version)))
    reader = engine_factory(max_active_sessions=0)
    with pytest.raises(CorruptedData) as raised:
        reader.get(sid)
    assert sid in str(raised.value) and f"version {version}" in str(raised.value)
    problems = reader.verify(sid).problems
    assert [(p.session_id, p.version) for p in problems] == [(sid, version)]


def test_streams_of_plain_and_compressed_payloads_load_alike(
        engine_factory: EngineFactory, damaged: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixture's version 3 is lz4-compressed: loads decompress it into the joined buffer
    and unpack the whole stream in one run (no payload decoded on its own), and give the state
    the writer had."""
    from sessionledger.infrastructure.codec import PayloadCodec

    sid = damaged["sid"]
    reader = engine_factory(max_active_sessions=0)
    decoded_alone: list[int | None] = []
    one_at_a_time = PayloadCodec.decode

    def spy(self: PayloadCodec, payload: bytes, session_id: str,
            version: int | None) -> tuple[int, Any]:
        decoded_alone.append(version)
        return one_at_a_time(self, payload, session_id, version)

    monkeypatch.setattr(PayloadCodec, "decode", spy)
    assert reader.get(sid).state == {"name": "abcdef", "k": "yyyyyy", "big": "ab" * 5000}
    assert reader.state_at(sid, version=2).state == {"name": "abcdef", "k": "zzzzzz"}
    assert decoded_alone == []
    assert [e.data for e in reader.history(sid)][1] == {"set": {"k": "zzzzzz"}, "delete": []}


def test_changed_payload_bytes_are_corrupted_data(engine_factory: EngineFactory,
                                                  damaged: dict[str, Any]) -> None:
    """Bytes changed in place that still decode (a bit flip inside a string): the blake3 chain
    stored with every event no longer matches, so loading must not serve the altered value."""
    sid, backend = damaged["sid"], damaged["backend"]
    payload = _payload(backend, sid, 4)
    assert b"yyyyyy" in payload
    _set_payload(backend, sid, 4, payload.replace(b"yyyyyy", b"yyyyyq"))
    reader = engine_factory(max_active_sessions=0)
    with pytest.raises(CorruptedData) as raised:
        reader.get(sid)
    assert sid in str(raised.value)
    assert "version 4" in str(raised.value)


def test_unknown_stored_type_is_corrupted_data(engine_factory: EngineFactory,
                                               damaged: dict[str, Any]) -> None:
    sid, backend = damaged["sid"], damaged["backend"]
    backend.sql("UPDATE sl_events SET type = ? WHERE session_id = ? AND version = ?",
                ("SessionExploded", sid, 3))
    reader = engine_factory(max_active_sessions=0)
    with pytest.raises(CorruptedData) as raised:
        reader.get(sid)
    assert "version 3" in str(raised.value)


def test_deleted_middle_event_is_a_gap(engine_factory: EngineFactory,
                                       damaged: dict[str, Any]) -> None:
    sid, backend = damaged["sid"], damaged["backend"]
    backend.sql("DELETE FROM sl_events WHERE session_id = ? AND version = ?", (sid, 2))
    reader = engine_factory(max_active_sessions=0)
    with pytest.raises(CorruptedData) as raised:
        reader.get(sid)
    assert sid in str(raised.value)
    assert "version 2" in str(raised.value)
    with pytest.raises(CorruptedData):
        reader.update(sid, {"x": 1})
    assert reader.get(damaged["neighbour"]).version == 1


def test_deleted_middle_event_is_a_gap_in_history(engine_factory: EngineFactory,
                                                  damaged: dict[str, Any]) -> None:
    """history() must not present a stream with a hole in it as the session's history."""
    sid, backend = damaged["sid"], damaged["backend"]
    backend.sql("DELETE FROM sl_events WHERE session_id = ? AND version = ?", (sid, 2))
    reader = engine_factory(max_active_sessions=0)
    with pytest.raises(CorruptedData) as raised:
        reader.history(sid)
    assert "version 2" in str(raised.value)


def test_deleted_first_event_is_corrupted_data(engine_factory: EngineFactory,
                                               damaged: dict[str, Any]) -> None:
    sid, backend = damaged["sid"], damaged["backend"]
    backend.sql("DELETE FROM sl_events WHERE session_id = ? AND version = ?", (sid, 1))
    reader = engine_factory(max_active_sessions=0)
    with pytest.raises(CorruptedData):
        reader.get(sid)


def test_values_survive_reopening_exactly(engine_factory: EngineFactory) -> None:
    values = {
        "uuid": uuid.uuid4(),
        "decimal": Decimal("-12345.678900"),
        "aware": datetime(2030, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        "naive": datetime(2030, 1, 1),
        "bytes": os.urandom(64),
        "nested": {"t": (1, 2), "l": [None, True, 2.5]},
    }
    first = engine_factory()
    sid = first.create("v", state=values, metadata=values)
    first.record(sid, "v", values)
    first.close()
    second = engine_factory()
    s = second.get(sid)
    assert differences(values, s.state) == []
    assert differences(values, s.metadata) == []
    assert differences(values, second.history(sid)[-1].data["payload"]) == []
