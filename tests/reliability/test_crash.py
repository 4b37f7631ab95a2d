"""Crash safety (issue 6): kill -9 a writer at random moments, lose nothing it acknowledged.

A child process (_crash_child.py, a plain `python` subprocess) opens an engine on the database
(a SQLite FILE with durability="full", or a PostgreSQL schema: there the client dies mid-
transaction while the server stays up) and appends in a loop: updates and records with unique
markers on three sessions, and every fifth step a save_all_active() batch with a unique
correlation id. After each command returns it appends an fsync'ed line to an ack file. The
parent sends SIGKILL 20-300 ms after the child was told to start (sometimes while it opens the
engine, mostly mid-loop, often mid-transaction), then a fresh engine opens the database and
checks:

- every acknowledged command is there, its marker at the version it acknowledged, and no marker
  is stored twice (versions 1..K without gap or duplicate);
- no save_all_active batch is half there: for every batch that started (acknowledged or not),
  either every ACTIVE session has the batch's SessionSaved (same correlation id, once) or none
  has, the SUSPENDED session never; an acknowledged batch is there at the versions it returned;
- the sessions were created once, however often a child died during their set-up (idempotent
  create and suspend);
- engine.verify().ok (hash chains and snapshots);
- the catalog (engine.find(), caught up) matches every session's version, event count and
  status from get().

The same database is reused across kills: each child continues where the last one stopped.
Kills: 50 on SQLite, 20 on PostgreSQL by default; SESSIONLEDGER_CRASH_KILLS sets both (0.4 to
0.6 s per kill: a child's start-up is overlapped with its predecessor's run and checks).
Each run prints one summary line (see it with -s or -rA).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from _helpers import Backend

from sessionledger import SessionEngine, SessionStatus

CHILD = Path(__file__).with_name("_crash_child.py")
KILLS_ENV = "SESSIONLEDGER_CRASH_KILLS"
DEFAULT_KILLS = {"sqlite": 50, "postgresql": 20}
#: the kill comes this many seconds after the child was told to start
KILL_AFTER = (0.020, 0.300)
SEED = 6


@dataclass
class Figures:
    kills: int = 0
    acknowledged: int = 0
    committed_unacknowledged: int = 0
    batches_started: int = 0
    batches_committed: int = 0
    batches_acknowledged: int = 0
    #: where the kills landed: "opening" (no ack yet in that life: opening the engine or
    #: creating the sessions), "batch" (after a batch-begin line), "command" (anywhere else)
    landed: Counter[str] = field(default_factory=Counter)


def read_acks(path: Path) -> list[dict[str, Any]]:
    """The acks in the file. A kill can tear the line a child was writing (one write() to a
    file can stop between two pages when SIGKILL arrives: seen twice in about 1,500 kills); that
    ack was never given, and a torn line never parses (its closing brace is missing).
    end_torn_line keeps it from being glued to the next child's first line."""
    if not path.exists():
        return []
    acks = []
    for line in path.read_bytes().split(b"\n"):
        if not line:
            continue
        try:
            acks.append(json.loads(line))
        except ValueError:  # torn by a kill: not acknowledged
            continue
    return acks


def end_torn_line(path: Path) -> None:
    """End a line the killed child left unfinished, before the next child appends."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as file:
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":
                file.write(b"\n")


def check_database(url: str, acks: list[dict[str, Any]], figures: Figures) -> None:
    """A fresh engine on the database after a kill: everything acknowledged is there, every
    batch is all there or not at all, verify() passes, the catalog matches."""
    with SessionEngine(url) as engine:
        rows = engine.find(limit=10_000).items  # the catalog, caught up first
        by_name = Counter(row.name for row in rows)
        assert all(n == 1 for n in by_name.values()), f"a session created twice: {by_name}"
        setups = [a for a in acks if a["op"] == "setup"]
        assert all(s == setups[0] for s in setups), "the set-up gave other sessions after a kill"
        stored_ids = {s.id for s in engine.list_sessions(limit=10_000)}
        assert {row.id for row in rows} == stored_ids, "the catalog and the store disagree"

        # every event, per session, with its marker or batch
        markers: dict[str, tuple[str, int, str]] = {}  # marker -> (session, version, type)
        saves: dict[str, list[tuple[str, int]]] = {}  # correlation id -> [(session, version)]
        for row in rows:
            history = engine.history(row.id)
            versions = [e.version for e in history]
            assert versions == list(range(1, len(history) + 1)), f"{row.id}: {versions}"
            session = engine.get(row.id)
            assert (row.version, row.event_count, row.status) == (
                session.version, len(history), session.status
            ), f"catalog row {row} disagrees with get(): v{session.version} {session.status}"
            for event in history:
                marker = None
                if event.type == "StateChanged":
                    marker = event.data["set"].get("marker")
                elif event.type == "EventRecorded":
                    marker = event.data["payload"]["marker"]
                elif event.type == "SessionSaved" and event.correlation_id is not None:
                    saves.setdefault(event.correlation_id, []).append((row.id, event.version))
                if marker is not None:
                    assert marker not in markers, f"marker {marker} stored twice"
                    markers[marker] = (row.id, event.version, event.type)

        # every acknowledged command is there, at the version it acknowledged
        expected_type = {"update": "StateChanged", "record": "EventRecorded"}
        acked = {a["marker"]: a for a in acks if a["op"] in expected_type}
        for marker, a in acked.items():
            assert markers.get(marker) == (a["sid"], a["version"], expected_type[a["op"]]), (
                f"acknowledged {a} but the database has {markers.get(marker)}")

        # batches: all or nothing, never the suspended session
        started = {a["cid"] for a in acks if a["op"] == "batch-begin"}
        assert set(saves) <= started, f"saves of unknown batches: {set(saves) - started}"
        if setups:
            active = set(setups[0]["active"])
            for cid in started:
                hits = saves.get(cid, [])
                sessions = [sid for sid, _ in hits]
                assert len(sessions) == len(set(sessions)), f"batch {cid} saved a session twice"
                assert setups[0]["parked"] not in sessions, f"batch {cid} saved a SUSPENDED one"
                assert not hits or set(sessions) == active, (
                    f"batch {cid} is half there: it saved {sorted(sessions)} of {sorted(active)}")
        for a in acks:
            if a["op"] == "batch":
                assert dict(saves.get(a["cid"], [])) == a["versions"], (
                    f"acknowledged batch {a['cid']} is not there as returned")
        if setups:
            parked = engine.get(setups[0]["parked"])
            assert parked.status is SessionStatus.SUSPENDED

        report = engine.verify()
        assert report.ok, f"verify() after a kill: {report.problems}"

    figures.acknowledged = len(acked)
    figures.committed_unacknowledged = len(set(markers) - set(acked))
    figures.batches_started = len(started)
    figures.batches_committed = len(saves)
    figures.batches_acknowledged = sum(1 for a in acks if a["op"] == "batch")


def settle(backend: Backend) -> None:
    """Wait until the server has ended the killed client's transaction. Its COMMIT may still be
    under way on the server when the client is gone: checked meanwhile, the catalog (caught up
    to the head find() saw) lagged the event committed just after it (seen once in a full run:
    a catalog row at version 2, get() at 3)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        busy = backend.sql(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND state IN ('active', 'idle in transaction', "
            "'idle in transaction (aborted)') AND backend_type = 'client backend'")
        if busy[0][0] == 0:
            return
        time.sleep(0.01)


def spawn(url: str, ack_path: Path, log: BinaryIO) -> subprocess.Popen[bytes]:
    """A child that imports everything, says "ready", then waits for a line on stdin."""
    return subprocess.Popen(
        [sys.executable, str(CHILD), url, str(ack_path), "--wait"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
    )


def reap(process: subprocess.Popen[bytes]) -> int:
    """Wait for a (killed) child and close its pipes; its exit code."""
    code = process.wait(timeout=30)
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()
    return code


def tail(path: Path) -> str:
    """The end of the children's stderr."""
    return path.read_text(errors="replace")[-3000:]


@pytest.mark.timeout(300)
def test_kill_9_loses_nothing_acknowledged(backend: Backend, tmp_path: Path) -> None:
    kills = int(os.environ.get(KILLS_ENV, "") or DEFAULT_KILLS[backend.kind])
    rng = random.Random(SEED)
    ack_path = tmp_path / "acks.jsonl"
    log_path = tmp_path / "children.log"
    figures = Figures()
    before: list[dict[str, Any]] = []
    started = time.perf_counter()
    with log_path.open("wb") as log:
        child: subprocess.Popen[bytes] | None = None
        standby: subprocess.Popen[bytes] | None = spawn(backend.url, ack_path, log)
        try:
            for _ in range(kills):
                child, standby = standby, None
                assert child is not None and child.stdin is not None and child.stdout is not None
                if child.stdout.readline() != b"ready\n":  # imports done
                    child.wait(timeout=30)
                    pytest.fail(f"a child failed to start:\n{tail(log_path)}")
                child.stdin.write(b"go\n")
                child.stdin.flush()
                standby = spawn(backend.url, ack_path, log)  # imports while `child` runs
                time.sleep(rng.uniform(*KILL_AFTER))
                child.send_signal(signal.SIGKILL)
                code = reap(child)
                if code != -signal.SIGKILL:
                    pytest.fail(f"a child exited with {code} before it was killed:\n"
                                f"{tail(log_path)}")
                figures.kills += 1
                end_torn_line(ack_path)
                acks = read_acks(ack_path)
                life = acks[len(before):]
                figures.landed["opening" if not life else
                               "batch" if life[-1]["op"] == "batch-begin" else "command"] += 1
                before = acks
                if backend.kind == "postgresql":
                    settle(backend)
                check_database(backend.url, acks, figures)
        finally:
            for process in (child, standby):
                if process is not None:
                    process.kill()
                    reap(process)
    elapsed = time.perf_counter() - started
    print(f"\ncrash [{backend.kind}]: {figures.kills} kills survived, "
          f"{figures.acknowledged} commands acknowledged (all there; "
          f"{figures.committed_unacknowledged} more committed unacknowledged), "
          f"{figures.batches_started} batches started, {figures.batches_committed} committed "
          f"whole, {figures.batches_acknowledged} acknowledged, none half there; kills "
          f"landed {dict(figures.landed)}; {elapsed:.1f} s")
    if kills >= 5:  # the test proved something only if the children got that far
        assert figures.acknowledged > 0, "no child got a command acknowledged before its kill"
        assert figures.batches_started > 0, "no batch ever started"


def test_a_line_torn_by_a_kill_is_ended_and_never_read_as_an_ack(tmp_path: Path) -> None:
    path = tmp_path / "acks.jsonl"
    assert read_acks(path) == []
    path.write_bytes(b'{"op": "setup", "active": []}\n{"op": "update", ')  # the kill tore it
    end_torn_line(path)
    end_torn_line(path)  # a line already ended is left alone
    with path.open("ab") as file:  # the next child's first ack
        file.write(b'{"op": "record", "version": 3}\n')
    assert read_acks(path) == [{"op": "setup", "active": []}, {"op": "record", "version": 3}]
