"""Fuzz the decoders: whatever the stored bytes, only the library's errors come out (issue 6).

hypothesis feeds the event payload decoder, the stream decoder (EventCodec.decode over made-up
stored rows, chain digests recomputed so the payload really gets decoded), replay and the
history path, and the snapshot decoder, with arbitrary bytes and with valid msgpack of the wrong
shape. Each may return, or raise a SessionLedgerError naming the session; anything else
(KeyError, OverflowError, a msgpack or lz4 exception...) is a bug.

The budget is fixed and the runs derandomized, so CI is reproducible; set
SESSIONLEDGER_FUZZ_EXAMPLES (default 500 per test) for a longer run, e.g. 20000.
"""

from __future__ import annotations

import os
from datetime import UTC
from typing import Any

import blake3
import lz4.block
import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionledger import CorruptedData, SessionLedgerError
from sessionledger.domain.events import EVENT_SCHEMAS
from sessionledger.domain.session import Session
from sessionledger.infrastructure.codec import (
    FLAG_LZ4,
    GENESIS_DIGEST,
    EventCodec,
    PayloadCodec,
    SnapshotCodec,
    chain_digest,
)
from sessionledger.projections.replay import replay, session_events
from sessionledger.projections.snapshots import CURRENT_FORMAT, session_from_snapshot

EXAMPLES = int(os.environ.get("SESSIONLEDGER_FUZZ_EXAMPLES", "500"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SID = "0f8fad5b-d9cb-469f-a165-70867728950e"
EVENT_TYPES = sorted(EVENT_SCHEMAS)

#: the data fields of each event type in its current schema
FIELDS: dict[str, list[str]] = {
    "SessionStarted": ["name", "tags", "metadata", "state", "parent"],
    "StateChanged": ["set", "delete"],
    "EventRecorded": ["kind", "payload"],
    "CheckpointTaken": ["label"],
    "SessionSaved": [],
    "SessionRestored": ["to_version", "checkpoint", "state"],
    "SessionSuspended": ["reason"],
    "SessionResumed": [],
    "SessionEnded": ["outcome"],
    "SessionArchived": [],
}
assert set(FIELDS) == set(EVENT_SCHEMAS)

#: timestamps (microseconds) a datetime can hold: year 1 to 9999
SANE_TS = st.integers(-(2**55), 2**57)
#: any value of the 64-bit ts column, the edges beyond what a datetime holds included
BIGINT_TS = st.one_of(SANE_TS, st.integers(2**57, 2**63 - 1), st.integers(-(2**63), -(2**56)))

#: data of the right shape for each event type (to get past replay to the timestamps)
VALID_DATA: dict[str, dict[str, Any]] = {
    "SessionStarted": {"name": "n", "tags": [], "metadata": {}, "state": {}, "parent": None},
    "StateChanged": {"set": {"k": 1}, "delete": []},
    "EventRecorded": {"kind": "k", "payload": None},
    "CheckpointTaken": {"label": "cp"},
    "SessionSaved": {},
    "SessionRestored": {"to_version": 1, "checkpoint": None, "state": {}},
    "SessionSuspended": {"reason": None},
    "SessionResumed": {},
    "SessionEnded": {"outcome": "completed"},
    "SessionArchived": {},
}

# -- values msgpack can carry, and ext types right and wrong -----------------------------------

EXT = st.one_of(
    st.builds(msgpack.ExtType, st.sampled_from([1, 2, 3]), st.binary(max_size=24)),
    st.builds(msgpack.ExtType, st.sampled_from([1, 3]),
              st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass"))),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
    EXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=6), children, max_size=4),
        st.dictionaries(st.one_of(st.integers(-5, 5), st.binary(max_size=3)), children,
                        max_size=2),
    ),
    max_leaves=8,
)


def plausible(field: str) -> st.SearchStrategy[Any]:
    """Values near what the field holds, and anything at all."""
    near: dict[str, st.SearchStrategy[Any]] = {
        "outcome": st.sampled_from(["completed", "failed", "cancelled", "COMPLETED", "", "x"]),
        "set": st.dictionaries(st.text(max_size=4), VALUES, max_size=3),
        "delete": st.lists(st.text(max_size=4), max_size=3),
        "state": st.dictionaries(st.text(max_size=4), VALUES, max_size=3),
        "metadata": st.dictionaries(st.text(max_size=4), VALUES, max_size=3),
        "tags": st.lists(st.text(max_size=4), max_size=3),
        "to_version": st.integers(-3, 10),
        "parent": st.one_of(st.none(), st.just(SID)),
    }
    return st.one_of(near[field], VALUES) if field in near else VALUES


@st.composite
def event_data(draw: st.DrawFn, event_type: str) -> Any:
    """The event's fields with values right or wrong, some missing or extra; or any value."""
    if draw(st.integers(0, 4)) == 0:
        return draw(VALUES)
    data = {f: draw(plausible(f)) for f in FIELDS[event_type]
            if draw(st.integers(0, 9)) > 0}  # a field is missing one time in ten
    if draw(st.booleans()):
        data.update(draw(st.dictionaries(st.text(max_size=5), VALUES, max_size=2)))
    return data


def pack(data: Any) -> bytes:
    packed: bytes = msgpack.packb(data, use_bin_type=True)
    return packed


def payload(flags: int, schema: int, body: bytes) -> bytes:
    if flags & FLAG_LZ4:
        body = lz4.block.compress(body, store_size=True)
    return bytes((flags, schema)) + body


def chained(events: list[tuple[str, int, str | None, bytes]], key: bytes | None = None
            ) -> list[tuple[int, str, int, str | None, str | None, bytes, bytes]]:
    """Stored rows (version, type, ts, actor, correlation_id, payload, digest) of `events`
    ((type, ts, actor, payload), ...) with correct chain digests."""
    rows = []
    head = GENESIS_DIGEST
    for version, (event_type, ts, actor, body) in enumerate(events, 1):
        head = chain_digest(head, SID, version, event_type, ts, actor, None, body, key)
        rows.append((version, event_type, ts, actor, None, body, head))
    return rows


def only_library_errors(action: Any) -> SessionLedgerError | None:
    """Run `action`; it may return or raise a SessionLedgerError naming SID (returned)."""
    try:
        action()
    except SessionLedgerError as error:
        assert SID in str(error), f"{type(error).__name__} does not name the session: {error}"
        return error
    return None


def load_everything(rows: list[Any]) -> None:
    """What get() and history() do with a stream: check and decode it, replay it into a
    session, read it as history, and read the session's timestamps."""
    decoded = EventCodec().decode(SID, rows)
    session = Session(SID)
    replay(session, decoded)
    session_events(SID, decoded)
    session.copy()
    _ = (session.created_at, session.updated_at)


# -- the payload decoder -----------------------------------------------------------------------

ARBITRARY_PAYLOADS = st.one_of(
    st.binary(max_size=300),
    # the right header bytes, then anything
    st.builds(lambda f, s, b: bytes((f, s)) + b, st.sampled_from([0, 1, 2, 0x80, 0xFF]),
              st.sampled_from([0, 1, 2, 3, 255]), st.binary(max_size=300)),
    # an lz4 block of arbitrary bytes, or of valid msgpack, possibly cut short
    st.builds(lambda b, cut: (bytes((FLAG_LZ4, 1)) + lz4.block.compress(b, store_size=True))
              [: None if cut == 0 else -cut], st.binary(max_size=300), st.integers(0, 5)),
    st.builds(lambda v: bytes((FLAG_LZ4, 1)) + lz4.block.compress(pack(v), store_size=True),
              VALUES),
    # a stored size that lies
    st.builds(lambda size, b: bytes((FLAG_LZ4, 1)) + size.to_bytes(4, "little") + b,
              st.integers(0, 2**32 - 1), st.binary(max_size=64)),
    # msgpack's own ext type -1 (timestamp) with data of any length
    st.builds(lambda d: bytes((0, 1)) + b"\xc7" + bytes((len(d),)) + b"\xff" + d,
              st.binary(max_size=16)),
    # valid msgpack, whole or cut short
    st.builds(lambda v, cut: (bytes((0, 1)) + pack(v))[: None if cut == 0 else -cut], VALUES,
              st.integers(0, 3)),
)


@FUZZ
@given(ARBITRARY_PAYLOADS, st.integers(1, 10**6))
def test_payload_decoder_raises_only_corrupted_data(stored: bytes, version: int) -> None:
    try:
        PayloadCodec().decode(stored, SID, version)
    except CorruptedData as error:
        assert SID in str(error) and f"version {version}" in str(error), error


# -- the stream decoder over made-up rows ------------------------------------------------------


@st.composite
def made_up_rows(draw: st.DrawFn) -> list[Any]:
    """Rows of one stream: arbitrary payloads and types, correct digests most of the time,
    and sometimes a version out of place or a digest changed."""
    count = draw(st.integers(1, 5))
    events = [
        (draw(st.one_of(st.sampled_from(EVENT_TYPES), st.text(max_size=12))),
         draw(SANE_TS),
         draw(st.one_of(st.none(), st.text(max_size=8))),
         draw(ARBITRARY_PAYLOADS))
        for _ in range(count)
    ]
    rows = chained(events)
    tamper = draw(st.integers(0, 5))
    if tamper == 1:  # a version out of place
        i = draw(st.integers(0, count - 1))
        row = rows[i]
        rows[i] = (draw(st.integers(-3, 10)), *row[1:])
    elif tamper == 2:  # a digest of the wrong length or value
        i = draw(st.integers(0, count - 1))
        rows[i] = (*rows[i][:6], draw(st.binary(max_size=40)))
    elif tamper == 3:  # rows missing or repeated
        rows = draw(st.lists(st.sampled_from(rows), min_size=1, max_size=6))
    return rows


@FUZZ
@given(made_up_rows())
def test_stream_decoder_and_replay_raise_only_library_errors(rows: list[Any]) -> None:
    only_library_errors(lambda: load_everything(rows))


# -- valid msgpack of the wrong shape, right flags and schema bytes -----------------------------


@st.composite
def shaped_streams(draw: st.DrawFn, any_schema: bool = False, ts: Any = SANE_TS,
                   valid_data: bool = False) -> list[Any]:
    """A stream whose payloads are valid msgpack with the right flags and schema bytes (or,
    `any_schema`, any schema byte), data near or far from each type's shape (or,
    `valid_data`, always right)."""
    events = []
    for _ in range(draw(st.integers(1, 4))):
        event_type = draw(st.sampled_from(EVENT_TYPES))
        if events == [] and draw(st.booleans()):
            event_type = "SessionStarted"
        schema = draw(st.integers(0, 255)) if any_schema else EVENT_SCHEMAS[event_type]
        flags = draw(st.sampled_from([0, FLAG_LZ4]))
        data = VALID_DATA[event_type] if valid_data else draw(event_data(event_type))
        body = payload(flags, schema, pack(data))
        events.append((event_type, draw(ts), draw(st.one_of(st.none(), st.text(max_size=6))),
                       body))
    return chained(events)


@FUZZ
@given(shaped_streams())
def test_replay_of_wrong_shapes_raises_only_corrupted_data(rows: list[Any]) -> None:
    error = only_library_errors(lambda: load_everything(rows))
    assert error is None or isinstance(error, CorruptedData), repr(error)


@FUZZ
@given(shaped_streams(any_schema=True))
def test_any_schema_byte_raises_only_corrupted_data(rows: list[Any]) -> None:
    # schema bytes newer than this release, and older ones with no upcaster or the wrong shape
    error = only_library_errors(lambda: load_everything(rows))
    assert error is None or isinstance(error, CorruptedData), repr(error)


@FUZZ
@given(shaped_streams(ts=BIGINT_TS, valid_data=True))
def test_any_stored_timestamp_raises_only_library_errors(rows: list[Any]) -> None:
    # the ts column is a 64-bit integer; a datetime holds years 1..9999 only
    only_library_errors(lambda: load_everything(rows))


# -- snapshots -----------------------------------------------------------------------------------


@st.composite
def stored_snapshots(draw: st.DrawFn) -> tuple[int, bytes, bytes]:
    """(flags, digest, stored bytes): arbitrary, or a valid body with its digest."""
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return (draw(st.integers(-(2**15), 2**15 - 1)), draw(st.binary(max_size=40)),
                draw(st.binary(max_size=300)))
    body = pack(draw(VALUES)) if choice == 1 else draw(st.binary(max_size=300))
    digest = blake3.blake3(body).digest()
    if draw(st.booleans()):
        return FLAG_LZ4, digest, lz4.block.compress(body, store_size=True)
    return 0, digest, body


@FUZZ
@given(stored_snapshots())
def test_snapshot_decoder_raises_only_library_errors(stored: tuple[int, bytes, bytes]) -> None:
    flags, digest, data = stored
    only_library_errors(lambda: SnapshotCodec().decode(flags, digest, data, SID, 5))


SNAPSHOT_FIELDS = {
    1: ["format", "id", "version", "name", "status", "state", "tags", "metadata", "parent",
        "created_us", "updated_us", "checkpoints", "saved", "outcome", "head"],
    0: ["id", "version", "name", "status", "state", "tags", "metadata", "parent", "created_at",
        "updated_at", "checkpoints", "last_saved"],
}
assert max(SNAPSHOT_FIELDS) == CURRENT_FORMAT


#: a right value for each snapshot field (format 1 and format 0)
GOOD_SNAPSHOT_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "id": st.just(SID),
    "version": st.just(5),
    "name": st.text(min_size=1, max_size=8),
    "status": st.sampled_from(["ACTIVE", "SUSPENDED", "COMPLETED", "ARCHIVED"]),
    "state": st.dictionaries(st.text(max_size=4), VALUES, max_size=3),
    "tags": st.lists(st.text(min_size=1, max_size=4), max_size=2),
    "metadata": st.dictionaries(st.text(max_size=4), VALUES, max_size=2),
    "parent": st.none(),
    "created_us": SANE_TS,
    "updated_us": SANE_TS,
    "created_at": st.datetimes(timezones=st.just(UTC)),
    "updated_at": st.datetimes(timezones=st.just(UTC)),
    "checkpoints": st.dictionaries(st.text(max_size=4), st.integers(1, 5), max_size=2),
    "saved": st.one_of(st.none(), st.integers(1, 5)),
    "last_saved": st.one_of(st.none(), st.integers(1, 5)),
    "outcome": st.none(),
    "head": st.binary(min_size=32, max_size=32),
}
#: wrong values worth trying besides any value at all
ODD_SNAPSHOT_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "status": st.sampled_from(["active", "", "HIJACKED"]),
    "created_us": st.one_of(BIGINT_TS, st.floats()),
    "updated_us": st.one_of(BIGINT_TS, st.floats()),
    "created_at": st.datetimes(),  # naive
    "updated_at": st.datetimes(),
    "head": st.binary(max_size=40),
}


@st.composite
def snapshot_maps(draw: st.DrawFn) -> tuple[int, dict[str, Any]]:
    """A snapshot map of format 0 or 1 for SID at version 5: each field right (mostly), odd,
    any value, or missing."""
    fmt = draw(st.sampled_from(sorted(SNAPSHOT_FIELDS)))
    fields: dict[str, Any] = {"format": fmt} if fmt >= 1 else {}
    for name in SNAPSHOT_FIELDS[fmt]:
        if name == "format":
            continue
        pick = draw(st.integers(0, 19))
        if pick == 0:
            continue  # missing
        if pick == 1:
            fields[name] = draw(VALUES)
        elif pick <= 4 and name in ODD_SNAPSHOT_VALUES:
            fields[name] = draw(ODD_SNAPSHOT_VALUES[name])
        else:
            fields[name] = draw(GOOD_SNAPSHOT_VALUES[name])
    return fmt, fields


@FUZZ
@given(snapshot_maps())
def test_snapshot_reader_raises_only_library_errors(snapshot: tuple[int, dict[str, Any]]
                                                    ) -> None:
    fmt, fields = snapshot

    def read() -> None:
        # the map travels through the codec as the store would give it back
        codec = SnapshotCodec()
        flags, digest, data = codec.encode(fields)
        decoded = codec.decode(flags, digest, data, SID, 5)
        session, _head = session_from_snapshot(decoded, fmt, SID, 5)
        session.copy()
        _ = (session.created_at, session.updated_at)

    only_library_errors(read)
