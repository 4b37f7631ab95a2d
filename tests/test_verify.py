"""verify(): hash chains and snapshots, the first broken link of each session."""

from __future__ import annotations

import itertools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest
from _helpers import Backend
from conftest import EngineFactory

from sessionledger import SessionConfig, SessionEngine, StorageError, VerifyReport, parallel_verify
from sessionledger.verify import Verifier, claim, merge, run_pieces, shards


def make(engine: SessionEngine, n: int = 8) -> str:
    sid = engine.create("s", state={"text": "abcdefgh"})
    for i in range(n):
        engine.update(sid, {"i": i, "text": f"value-{i}"})
    return sid


def test_clean_database_verifies(engine_factory: EngineFactory) -> None:
    engine = engine_factory(snapshot_every=3)
    sids = [make(engine) for _ in range(3)]
    report = engine.verify()
    assert report.ok and report.problems == []
    assert (report.sessions, report.events) == (3, 27)
    assert report.snapshots == 3 * 3  # versions 3, 6, 9
    assert engine.verify(sids[0]).sessions == 1


TAMPERING = {
    "changed byte": lambda b, sid: b.sql(
        "UPDATE sl_events SET payload = ? WHERE session_id = ? AND version = 5",
        (b.sql("SELECT payload FROM sl_events WHERE session_id = ? AND version = 5",
               (sid,))[0][0].replace(b"value-3", b"value-X"), sid)),
    "changed actor": lambda b, sid: b.sql(
        "UPDATE sl_events SET actor = 'mallory' WHERE session_id = ? AND version = 5", (sid,)),
    "changed time": lambda b, sid: b.sql(
        "UPDATE sl_events SET ts = ts + 1 WHERE session_id = ? AND version = 5", (sid,)),
    "deleted event": lambda b, sid: b.sql(
        "DELETE FROM sl_events WHERE session_id = ? AND version = 5", (sid,)),
    "reordered events": lambda b, sid: [
        b.sql("UPDATE sl_events SET version = -1 WHERE session_id = ? AND version = 5", (sid,)),
        b.sql("UPDATE sl_events SET version = 5 WHERE session_id = ? AND version = 6", (sid,)),
        b.sql("UPDATE sl_events SET version = 6 WHERE session_id = ? AND version = -1", (sid,)),
    ],
    "inserted event": lambda b, sid: [
        b.sql("UPDATE sl_events SET version = version + 100 WHERE session_id = ? AND version >= 5",
              (sid,)),
        b.sql("UPDATE sl_events SET version = version - 99 WHERE session_id = ? AND version > 100",
              (sid,)),
        b.sql("INSERT INTO sl_events (session_id, version, type, ts, actor, correlation_id, "
              "payload, digest) SELECT session_id, 5, type, ts, actor, correlation_id, payload, "
              "digest FROM sl_events WHERE session_id = ? AND version = 4", (sid,)),
    ],
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_tampering_is_found_at_its_first_broken_link(engine_factory: EngineFactory,
                                                     backend: Backend, how: str) -> None:
    engine = engine_factory(snapshot_every=0)
    sid = make(engine)
    other = make(engine)
    TAMPERING[how](backend, sid)
    report = engine.verify()
    assert not report.ok
    assert [p.session_id for p in report.problems] == [sid]  # the neighbour is fine
    assert report.problems[0].version == 5
    assert sid in str(report.problems[0])
    assert engine.verify(other).ok


def test_snapshot_that_does_not_match_the_events(engine_factory: EngineFactory,
                                                 backend: Backend) -> None:
    engine = engine_factory(snapshot_every=4)
    sid = make(engine)
    other = make(engine)
    # a well-formed snapshot of another session's state, copied over this one's at version 4
    backend.sql("DELETE FROM sl_snapshots WHERE session_id = ? AND version = 4", (sid,))
    backend.sql("INSERT INTO sl_snapshots (session_id, version, format_version, flags, digest, "
                "data, ts) SELECT ?, version, format_version, flags, digest, data, ts FROM "
                "sl_snapshots WHERE session_id = ? AND version = 4", (sid, other))
    backend.sql("UPDATE sl_snapshots SET digest = ? WHERE session_id = ? AND version = 8",
                (b"\x00" * 32, sid))
    report = engine.verify()
    found = {(p.session_id, p.version) for p in report.problems}
    assert found == {(sid, 4), (sid, 8)}


def test_integrity_key_protects_the_chain(engine_factory: EngineFactory) -> None:
    keyed = engine_factory(integrity_key="s3cret")
    sid = make(keyed)
    assert keyed.verify().ok
    other_key = engine_factory(integrity_key="guess")
    report = other_key.verify()
    assert not report.ok and report.problems[0].session_id == sid
    assert report.problems[0].version == 1
    assert not engine_factory().verify().ok  # no key at all: not the same chain either


@pytest.mark.timeout(120)
def test_parallel_verify_finds_the_same(engine_factory: EngineFactory, backend: Backend) -> None:
    engine = engine_factory(snapshot_every=3)
    sids = sorted(make(engine, 4) for _ in range(6))
    damaged = sids[-1]  # in the last piece (which process takes it is not fixed)
    backend.sql("UPDATE sl_events SET actor = 'mallory' WHERE session_id = ? AND version = 2",
                (damaged,))
    one = engine.verify(workers=1)
    three = engine.verify(workers=3)
    # the damaged session's snapshot lies after its broken link: not checked, not counted
    assert (three.sessions, three.events, three.snapshots) == (6, 30, 5)
    assert (one.sessions, one.events, one.snapshots) == (6, 30, 5)
    assert [(p.session_id, p.version) for p in three.problems] == [(damaged, 2)]
    assert [str(p) for p in three.problems] == [str(p) for p in one.problems]
    with pytest.raises(Exception, match="workers"):
        engine.verify(workers=0)


@pytest.mark.timeout(120)
def test_a_verify_worker_process_takes_the_pieces_nobody_took(
        engine_factory: EngineFactory, backend: Backend) -> None:
    """The worker side of a parallel verify, in a spawned process: with one piece already
    taken (as if by the engine's own process), it checks the others and reports them."""
    engine = engine_factory(snapshot_every=3)
    sids = sorted(make(engine, 4) for _ in range(6))
    backend.sql("UPDATE sl_events SET actor = 'mallory' WHERE session_id = ? AND version = 2",
                (sids[-1],))
    pieces = shards(engine._store, 3)
    assert len(pieces) == 3
    context = multiprocessing.get_context("spawn")
    counter = context.Value("i", 1)
    config = SessionConfig(lifecycle_hooks=False, auto_rebuild=False)
    with ProcessPoolExecutor(1, mp_context=context, initializer=parallel_verify.start_worker,
                             initargs=(counter,)) as pool:
        reports = pool.submit(parallel_verify.verify_pieces, backend.url, config, pieces).result()
    assert counter.value == 3 and len(reports) == 2
    worker = merge(reports)
    first = Verifier(engine._store, engine._codec, engine._repository).run(shard=pieces[0])
    whole = engine.verify(workers=1)
    assert worker.sessions + first.sessions == whole.sessions == 6
    assert worker.events + first.events == whole.events
    assert [str(p) for p in worker.problems] == [str(p) for p in whole.problems]


def test_verify_walks_with_the_garbage_collector_paused(engine_factory: EngineFactory,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    engine = engine_factory(snapshot_every=3)
    make(engine, 4)
    seen: list[bool] = []
    scan = engine._store.scan

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(gc.isenabled())
        return scan(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine._store, "scan", spy)
    assert gc.isenabled()
    assert engine.verify().ok
    assert seen == [False] and gc.isenabled()
    gc.disable()  # a caller's choice is left alone
    try:
        assert engine.verify().ok
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_pieces_cover_every_session_once_with_about_as_many_events(
        engine_factory: EngineFactory, backend: Backend) -> None:
    engine = engine_factory()
    assert shards(engine._store, 4) == [(None, None)]  # no events at all
    lengths = [1, 2, 3, 30, 4, 5, 1, 12, 6, 7, 8, 9] * 3
    sids = sorted(make(engine, n - 1) for n in lengths)
    events = {sid: len(backend.sql("SELECT version FROM sl_events WHERE session_id = ?",
                                   (sid,))) for sid in sids}
    total = sum(events.values())
    assert shards(engine._store, 1) == [(None, None)]
    for count in (2, 5, 16, 1000):
        pieces = shards(engine._store, count)
        assert pieces[0][0] is None and pieces[-1][1] is None
        assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))  # contiguous
        held = [[sid for sid in sids if (low is None or sid >= low) and
                 (high is None or sid < high)] for low, high in pieces]
        assert sorted(sid for piece in held for sid in piece) == sids  # each exactly once
        if count <= 5:
            assert len(pieces) == count
            sizes = [sum(events[sid] for sid in piece) for piece in held]
            # a piece holds its first session whole (the next cut is counted from after it)
            # plus about `step` more events, up to the end of the session it lands in
            assert max(sizes) <= -(-total // count) + 2 * max(lengths)
    # a verify over pieces finds what one pass finds
    backend.sql("UPDATE sl_events SET actor = 'x' WHERE session_id = ? AND version = 1",
                (sids[5],))
    merged = merge([Verifier(engine._store, engine._codec, engine._repository).run(shard=p)
                    for p in shards(engine._store, 7)])
    whole = engine.verify(workers=1)
    assert (merged.sessions, merged.events) == (whole.sessions, whole.events) == (
        len(sids), total)
    assert [str(p) for p in merged.problems] == [str(p) for p in whole.problems]


class _FailingVerifier:
    def __init__(self) -> None:
        self.ran: list[tuple[str | None, str | None] | None] = []

    def run(self, session_id: str | None = None,
            shard: tuple[str | None, str | None] | None = None) -> VerifyReport:
        self.ran.append(shard)
        if len(self.ran) == 2:
            raise StorageError("disk gone")
        return VerifyReport(sessions=1)


def test_a_failing_verify_process_stops_the_others_taking_pieces() -> None:
    pieces: list[tuple[str | None, str | None]] = [(None, "b"), ("b", "c"), ("c", "d"),
                                                  ("d", None)]
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    verifier = _FailingVerifier()
    with pytest.raises(StorageError):
        run_pieces(verifier, pieces, counter)  # type: ignore[arg-type]
    assert verifier.ran == pieces[:2]
    assert counter.value == len(pieces)  # nothing left for anyone else
    assert claim(counter, len(pieces)) is None
    fresh = multiprocessing.get_context("spawn").Value("i", 0)
    assert [claim(fresh, 2), claim(fresh, 2), claim(fresh, 2)] == [0, 1, None]


def test_snapshots_are_read_in_chunks_across_sessions(engine_factory: EngineFactory,
                                                      backend: Backend,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # chunks of 2 snapshots: the walk crosses chunk boundaries, skips the snapshots after a
    # broken link (the next chunk starts where it is needed) and finds a bad one in a late chunk
    from sessionledger import verify as verify_module

    monkeypatch.setattr(verify_module, "SNAPSHOT_CHUNK", 2)
    engine = engine_factory(snapshot_every=2)
    sids = sorted(make(engine, 7) for _ in range(5))  # 8 events: snapshots at 2, 4, 6, 8
    backend.sql("UPDATE sl_events SET actor = 'mallory' WHERE session_id = ? AND version = 3",
                (sids[1],))
    backend.sql("UPDATE sl_snapshots SET digest = ? WHERE session_id = ? AND version = 6",
                (b"\x00" * 32, sids[3]))
    backend.sql("DELETE FROM sl_snapshots WHERE session_id = ? AND version = 4", (sids[4],))
    report = engine.verify()
    assert [(p.session_id, p.version) for p in report.problems] == [(sids[1], 3), (sids[3], 6)]
    assert "snapshot" in report.problems[1].what
    # session 1 checks its snapshot at 2 only (its chain breaks at 3); session 4 has three left
    assert report.snapshots == 4 + 1 + 4 + 4 + 3
    assert (report.sessions, report.events) == (5, 40)


def _rewrite_snapshot(backend: Backend, sid: str, version: int, change: object) -> None:
    """Re-encode one stored (unkeyed) snapshot after `change(fields)`, with a valid digest."""
    import blake3
    import lz4.block
    import msgpack

    flags, data = backend.sql("SELECT flags, data FROM sl_snapshots WHERE session_id = ? AND "
                              "version = ?", (sid, version))[0]
    body = lz4.block.decompress(bytes(data)) if flags & 1 else bytes(data)
    fields = msgpack.unpackb(body, raw=False)
    fields = change(fields)  # type: ignore[operator]
    body = msgpack.packb(fields, use_bin_type=True)
    backend.sql("UPDATE sl_snapshots SET flags = 0, digest = ?, data = ? WHERE session_id = ? "
                "AND version = ?", (blake3.blake3(body).digest(), body, sid, version))


def test_snapshot_of_equal_values_in_another_order_verifies(engine_factory: EngineFactory,
                                                            backend: Backend,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    # verify() accepts a snapshot byte-identical to what it would write for the replayed session
    # without decoding it; one whose bytes differ only in key order must still pass (decoded and
    # compared), and one whose values differ must not
    engine = engine_factory(snapshot_every=4)
    sid = make(engine)
    other = make(engine)

    def reordered(fields: dict[str, object]) -> dict[str, object]:
        state = fields["state"]
        assert isinstance(state, dict) and len(state) > 1
        return {**dict(reversed(list(fields.items()))),
                "state": dict(reversed(list(state.items())))}

    def changed(fields: dict[str, object]) -> dict[str, object]:
        state = fields["state"]
        assert isinstance(state, dict)
        return {**fields, "state": {**state, "i": 999}}

    from sessionledger import verify as verify_module

    decoded: list[tuple[str, int]] = []
    real = verify_module.session_from_snapshot

    def counting(fields: dict[str, object], fmt: int, session_id: str, version: int) -> object:
        decoded.append((session_id, version))
        return real(fields, fmt, session_id, version)

    monkeypatch.setattr(verify_module, "session_from_snapshot", counting)
    assert engine.verify().ok
    assert decoded == []  # what the engine wrote is byte-identical to the replayed sessions
    _rewrite_snapshot(backend, sid, 4, reordered)
    _rewrite_snapshot(backend, other, 8, changed)
    report = engine.verify()
    assert sorted(decoded) == sorted([(sid, 4), (other, 8)])
    assert [(p.session_id, p.version, p.what) for p in report.problems] == [
        (other, 8, "snapshot does not match the events")]
    assert report.snapshots == 4


def test_snapshot_codec_holds_exactly() -> None:
    from sessionledger.infrastructure.codec import SnapshotCodec

    fields = {"format": 1, "state": {"a": 1, "b": [1, 2]}, "text": "x" * 2000}
    for key in (None, b"k" * 32):
        codec = SnapshotCodec(key)
        flags, digest, stored = codec.encode(fields)
        assert flags == 1  # compressed: the check decompresses
        assert codec.holds_exactly(flags, digest, stored, dict(fields))
        assert not codec.holds_exactly(flags, digest, stored, {**fields, "text": "y" * 2000})
        assert not codec.holds_exactly(flags, b"\0" * 32, stored, fields)  # digest checked
        assert not codec.holds_exactly(flags | 0x80, digest, stored, fields)  # unknown flag
        assert not codec.holds_exactly(flags, digest, stored[:-3], fields)  # does not decompress
        reordered = {"text": fields["text"], "state": fields["state"], "format": 1}
        assert not codec.holds_exactly(flags, digest, stored, reordered)  # bytes, not values
