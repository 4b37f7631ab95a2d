"""A purge is final, whatever other engines do.

Three writer processes (each with its own engine, the shared sessions in its working set) run
commands and save_all_active batches on 32 sessions while a purger process ends one of the first
16 at a time and purges every ended session, in a loop. Afterwards a fresh engine must find:
every session either purged whole (a tombstone, no event, no snapshot, no catalog row,
SessionPurged from get) or whole (versions 1..K, readable); no snapshot without its event; the
catalog readable, rebuildable and equal to the sessions left; verify() ok. Before appends
checked for the tombstone, a writer's stale copy appended to purged streams and every catalog
read failed from then on (a 5-process run wedged it within 15 s).

SESSIONLEDGER_PURGE_STRESS_SECONDS sets the run's length (default 4 s per backend).
"""

from __future__ import annotations

import multiprocessing
import os
import queue

import _purge_worker as worker
import pytest
from _helpers import Backend

from sessionledger import SessionConfig, SessionEngine, SessionPurged

SECONDS = float(os.environ.get("SESSIONLEDGER_PURGE_STRESS_SECONDS", "4"))
SESSIONS = 32
WRITERS = 3


def run_workers(url: str, session_ids: list[str]) -> dict[str, dict[str, int]]:
    """Run the writers and the purger; return the counts of outcomes per role."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    roles = [f"writer-{i}" for i in range(WRITERS)] + ["purger"]
    children = [ctx.Process(target=worker.run,
                            args=(url, role if role == "purger" else "writer", index,
                                  session_ids, SECONDS, results), name=role)
                for index, role in enumerate(roles)]
    for child in children:
        child.start()
    reports = []
    try:
        for _ in children:
            try:
                reports.append(results.get(timeout=SECONDS + 120))
            except queue.Empty:
                pytest.fail("a purge-stress worker neither finished nor reported in time")
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    errors = [text for _, _, texts in reports for text in texts]
    assert not errors, "\n".join(errors)
    counts: dict[str, dict[str, int]] = {}
    for role, role_counts, _ in reports:
        merged = counts.setdefault(role, {})
        for outcome, n in role_counts.items():
            merged[outcome] = merged.get(outcome, 0) + n
    return counts


def test_a_purge_is_final_whatever_other_engines_do(backend: Backend) -> None:
    with SessionEngine(backend.url) as setup:
        session_ids = [setup.create(f"shared-{i}", state={"n": 0}) for i in range(SESSIONS)]
    counts = run_workers(backend.url, session_ids)
    writer_counts = counts["writer"]
    assert writer_counts.get("SessionPurged", 0) > 0, f"no writer met a purge: {counts}"
    with SessionEngine(backend.url, SessionConfig(max_active_sessions=0)) as reader:
        left = {s.id for s in reader.find(limit=10_000)}
        reader.rebuild("catalog")
        assert {s.id for s in reader.find(limit=10_000)} == left
        purged = 0
        for sid in session_ids:
            events = backend.sql("SELECT version FROM sl_events WHERE session_id = ? "
                                 "ORDER BY version", (sid,))
            snapshots = backend.sql("SELECT version FROM sl_snapshots WHERE session_id = ?",
                                    (sid,))
            if backend.sql("SELECT 1 FROM sl_tombstones WHERE session_id = ?", (sid,)):
                purged += 1
                assert (events, snapshots, sid in left) == ([], [], False), sid
                with pytest.raises(SessionPurged):
                    reader.get(sid)
                continue
            versions = [v for (v,) in events]
            assert versions == list(range(1, len(versions) + 1)), (sid, versions)
            assert {v for (v,) in snapshots} <= set(versions), sid
            assert reader.get(sid).version == len(versions) and sid in left
        report = reader.verify()
        assert report.ok, report.problems[:5]
    assert 0 < purged <= SESSIONS // 2
    print(f"\npurge stress {backend.kind}: {SECONDS:g} s, {purged} of {SESSIONS} sessions "
          f"purged; writers {dict(sorted(writer_counts.items()))}; purger {counts['purger']}")
