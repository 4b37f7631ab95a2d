"""A load folds StateChanged events inline and unpacks a stream's payloads in one msgpack call
(projections.replay.replay_rows, EventCodec.checked_values). Both must give exactly what applying
each event on its own gives, whatever the mix of event types, compressed payloads and old
schemas."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sessionledger import SessionConfig, SessionEngine
from sessionledger.domain.events import to_micros
from sessionledger.domain.session import Session
from sessionledger.infrastructure.codec import EventCodec
from sessionledger.projections.replay import replay, replay_rows

KEYS = st.sampled_from(["a", "b", "c", "d", "notes"])
VALUES = st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=8), st.none(),
                   st.lists(st.integers(0, 9), max_size=3),
                   # big enough to pass a small compress_threshold
                   st.text(min_size=60, max_size=80))
COMMANDS = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.dictionaries(KEYS, VALUES, max_size=3),
                  st.lists(KEYS, max_size=2, unique=True)),
        st.tuples(st.just("checkpoint")),
        st.tuples(st.just("restore")),
        st.tuples(st.just("record")),
        st.tuples(st.just("save")),
        st.tuples(st.just("pause")),
    ),
    min_size=1, max_size=40,
)


def one_by_one(engine: SessionEngine, sid: str) -> Session:
    """The session as applying each of its events on its own gives it."""
    session = Session(sid)
    for event in engine.history(sid):
        session.apply(event.type, event.data, event.version, to_micros(event.timestamp))
    return session


def fields(session: Session) -> tuple[Any, ...]:
    return (session.state, session.version, session.status, session.checkpoints,
            session.last_saved_version, session.created_us, session.updated_us, session.name,
            session.tags)


def run(engine: SessionEngine, commands: list[tuple[Any, ...]]) -> str:
    sid = engine.create("fast-path", state={"a": 0, "notes": ["x"]})
    labels: list[str] = []
    for command in commands:
        if command[0] == "update":
            delete = [key for key in command[2] if key in engine.get(sid).state]
            if command[1] or delete:
                engine.update(sid, command[1], delete=delete)
        elif command[0] == "checkpoint":
            labels.append(f"c{len(labels)}")
            engine.checkpoint(sid, labels[-1])
        elif command[0] == "restore" and labels:
            engine.restore(sid, checkpoint=labels[0])
        elif command[0] == "record":
            engine.record(sid, "tool_call", {"tool": "search"})
        elif command[0] == "save":
            engine.save(sid)
        elif command[0] == "pause":
            engine.suspend(sid)
            engine.resume(sid)
    return sid


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=COMMANDS, threshold=st.sampled_from([32, 1024]))
def test_a_cold_load_equals_applying_each_event_on_its_own(
    tmp_path_factory: pytest.TempPathFactory, commands: list[tuple[Any, ...]], threshold: int
) -> None:
    path = tmp_path_factory.mktemp("fast") / "sessions.db"
    config = SessionConfig(max_active_sessions=0, snapshot_every=0, compress_threshold=threshold)
    with SessionEngine(f"sqlite:///{path}", config) as engine:
        sid = run(engine, commands)
        # checkpoints and saves take snapshots: without them every load replays every event
        with sqlite3.connect(path) as db:
            db.execute("DELETE FROM sl_snapshots")
        loaded = engine.get(sid)
        assert fields(loaded) == fields(one_by_one(engine, sid))
        # and the audit path (DecodedEvents through replay()) agrees at every version
        for version in range(1, loaded.version + 1):
            assert fields(engine.state_at(sid, version=version)) == fields(
                one_by_one_upto(engine, sid, version))


def one_by_one_upto(engine: SessionEngine, sid: str, version: int) -> Session:
    session = Session(sid)
    for event in engine.history(sid)[:version]:
        session.apply(event.type, event.data, event.version, to_micros(event.timestamp))
    return session


def test_the_one_call_unpack_gives_the_values_of_a_mixed_stream() -> None:
    """Compressed and plain payloads in one stream: the run decompresses the compressed ones
    behind their header bytes and gives what decoding each payload on its own gives."""
    codec = EventCodec(compress_threshold=40)
    data: list[dict[str, Any]] = [
        {"set": {"k": "y" * (100 if i % 3 == 0 else 2)}, "delete": []} for i in range(30)]
    rows = codec.encode("s", 0, b"\0" * 32, [("StateChanged", 2, d) for d in data], 1, None, None)
    assert any(row[6][0] for row in rows) and not all(row[6][0] for row in rows)
    stored = [row[1:] for row in rows]
    schemas, values = codec.checked_values("s", stored)
    assert list(schemas) == [2] * 30
    assert list(values) == data


@pytest.mark.parametrize("damage", ["short", "flags"])
def test_a_payload_the_run_cannot_split_is_decoded_on_its_own_and_named(damage: str) -> None:
    """A payload without a body or with unknown flags (chain-valid only for a writer without an
    integrity key) falls back to one decode per payload, which names it."""
    from sessionledger import CorruptedData
    from sessionledger.infrastructure.codec import chain_digest

    codec = EventCodec()
    rows = codec.encode("s", 0, b"\0" * 32,
                        [("StateChanged", 2, {"set": {"k": i}, "delete": []}) for i in range(5)],
                        1, None, None)
    stored = [list(row[1:]) for row in rows]
    stored[2][5] = b"\x00\x02" if damage == "short" else b"\x40\x02\x80"
    head = b"\0" * 32
    for row in stored:  # re-chain, as a writer without a key could
        head = chain_digest(head, "s", row[0], row[1], row[2], row[3], row[4], row[5])
        row[6] = head
    with pytest.raises(CorruptedData) as raised:
        codec.checked_values("s", [tuple(row) for row in stored])  # type: ignore[misc]
    assert raised.value.version == 3


def test_replay_of_an_empty_run_changes_nothing() -> None:
    session = Session("s")
    replay(session, [])
    replay_rows(session, [], [], [])
    assert (session.version, session.updated_us) == (0, 0)


def per_payload(codec: EventCodec, sid: str, stored: list[Any]) -> Any:
    """What decoding each payload on its own gives: (schemas, data), or the error's version."""
    from sessionledger import CorruptedData

    try:
        codec._check_chain(sid, stored, 0, b"\0" * 32)
        pairs = [codec.payloads.decode(row[5], sid, row[0]) for row in stored]
    except CorruptedData as error:
        return ("CorruptedData", error.version)
    return [schema for schema, _ in pairs], [data for _, data in pairs]


@settings(max_examples=400, deadline=None)
@example(header=b"\x00\x02", at=1, threshold=1024)  # as written: loads
@example(header=b"\x00\xc3", at=2, threshold=1024)  # schema byte 195 unpacked as True
@example(header=b"\x00\xcc\x02", at=2, threshold=1024)
@example(header=b"\xcc\x00\x02", at=2, threshold=1024)
@example(header=b"\x00\x80", at=2, threshold=1024)
@given(header=st.binary(max_size=3), at=st.integers(0, 5),
       threshold=st.sampled_from([16, 1024]))
def test_a_forged_header_is_judged_as_decoding_each_payload_alone_judges_it(
        header: bytes, at: int, threshold: int) -> None:
    """Review round 16 (fast path): a payload whose two header bytes were replaced, re-chained
    as a writer without an integrity key could, loaded: 00 c3 unpacked as True (schema 1),
    00 cc 02 as 2 and cc 00 as flags 0 in the one-call run, so loads accepted what decoding
    each payload alone refuses (and 00 80 gave blame() and diff() a raw TypeError)."""
    from sessionledger import CorruptedData
    from sessionledger.infrastructure.codec import chain_digest

    codec = EventCodec(compress_threshold=threshold)
    data = [{"set": {"k": "v" * (3 + 20 * (i % 2))}, "delete": []} for i in range(6)]
    rows = codec.encode("s", 0, b"\0" * 32, [("StateChanged", 2, d) for d in data], 1, None,
                        None)
    stored = [list(row[1:]) for row in rows]
    stored[at][5] = header + stored[at][5][2:]
    head = b"\0" * 32
    for row in stored:
        head = chain_digest(head, "s", row[0], row[1], row[2], row[3], row[4], row[5])
        row[6] = head
    forged = [tuple(row) for row in stored]
    expected = per_payload(codec, "s", forged)
    try:
        schemas, values = codec.checked_values("s", forged)  # type: ignore[arg-type]
        got: Any = (list(schemas), list(values))
    except CorruptedData as error:
        got = ("CorruptedData", error.version)
    assert got == expected
