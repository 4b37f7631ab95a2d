"""Cost of the replay queries on SQLite: python -m benchmarks.audit_bench

Builds a 100,000-event session through the engine (SessionConfig(durability="normal"),
snapshot_every=100: one update per command, as an application writes them; about 10 s on a
small machine, printed), then times, interleaved in rotating order with the garbage collector
paused:

- state_at(version=50,000): a snapshot sits at that version (target: at most 2 ms);
- state_at(version=50,099): the snapshot at 50,000 and 99 events replayed, the worst version
  of a snapshot interval (same target, shown for honesty);
- state_at(at=<the time of version 50,099>): the same plus finding the version by time;
- the raw floor of each: a plain sqlite3 connection running the same two SELECTs the load runs
  (the snapshot at or below, the events after it), rows fetched, nothing decoded;
- a plain replay of events 1..50,000 without snapshots (few samples), for scale.

Then the choice made for filtered history (application/audit.py): on a 10,000-event session, a
filter that keeps 1% of the events, the whole stream checked and decoded (what history() does)
next to a SQL-side filter that skips the chain check (not used: it could serve tampered data).

``measure()`` returns the rows; ``--json PATH`` writes them.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sessionledger import SessionConfig, SessionEngine
from sessionledger.audit import AuditQueries
from sessionledger.domain.events import to_datetime
from sessionledger.domain.session import Session
from sessionledger.projections.replay import replay, session_events

from .timing import Stats, interleave

EVENTS = 100_000
SNAPSHOT_EVERY = 100
TARGET_US = 2000.0
HISTORY_EVENTS = 10_000


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _build(engine: SessionEngine, events: int, actor_of: Callable[[int], str]) -> str:
    """A session of `events` events: create, then one update per command (a rolling key set
    of about 50 keys, so the state has a realistic size)."""
    sid = engine.create("bench", state={"step": 0}, actor=actor_of(1))
    for n in range(2, events + 1):
        engine.update(sid, {"step": n, f"k{n % 50}": n}, actor=actor_of(n))
    return sid


def _row(case: str, stats: Stats, target_us: float | None = None, note: str = "") -> dict[str, Any]:
    return {
        "case": case, "n": stats.n, "median_us": round(stats.median_us, 1),
        "p10_us": round(stats.p10_us, 1), "p90_us": round(stats.p90_us, 1),
        "target_us": target_us,
        "passed": None if target_us is None else stats.median_us <= target_us,
        "note": note,
    }


def measure(rounds: int = 10, per_round: int = 50, directory: str | None = None
            ) -> list[dict[str, Any]]:
    """Time the replay queries (see the module docstring); one dict per case, µs."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slaudit-", dir=directory) as tmp:
        path = Path(tmp) / "audit.db"
        config = SessionConfig(durability="normal", snapshot_every=SNAPSHOT_EVERY)
        with SessionEngine(f"sqlite:///{path}", config) as engine:
            started = time.perf_counter()
            sid = _build(engine, EVENTS, lambda n: "alice")
            setup_s = time.perf_counter() - started
            _progress(f"set-up: {EVENTS:,} events through the engine in {setup_s:.1f} s "
                      f"({EVENTS / setup_s:,.0f} commands/s)")
            queries = AuditQueries(engine._store, engine._repository, engine._codec)
            store = engine._store
            mid, worst = EVENTS // 2, EVENTS // 2 + SNAPSHOT_EVERY - 1
            worst_at = store.query(
                "SELECT ts FROM sl_events WHERE session_id = ? AND version = ?", (sid, worst)
            )[0][0]
            moment = to_datetime(worst_at)
            assert queries.state_at(sid, at=moment).version == worst

            raw = sqlite3.connect(path)
            snap_sql = ("SELECT version, format_version, flags, digest, data FROM sl_snapshots "
                        "WHERE session_id = ? AND version <= ? ORDER BY version DESC LIMIT 1")
            events_sql = ("SELECT version, type, ts, actor, correlation_id, payload, digest "
                          "FROM sl_events WHERE session_id = ? AND version > ? AND version <= ? "
                          "ORDER BY version")

            def floor(version: int) -> Callable[[int], object]:
                def read(_: int) -> object:
                    snap = raw.execute(snap_sql, (sid, version)).fetchone()
                    return raw.execute(events_sql, (sid, snap[0] - 1, version)).fetchall()
                return read

            cases: dict[str, Callable[[int], object]] = {
                "state_at(version=50,000)": lambda _: queries.state_at(sid, mid),
                "raw floor, version 50,000 (1 snapshot + 1 row)": floor(mid),
                "state_at(version=50,099)": lambda _: queries.state_at(sid, worst),
                "raw floor, version 50,099 (1 snapshot + 100 rows)": floor(worst),
                "state_at(at=time of 50,099)": lambda _: queries.state_at(sid, at=moment),
            }
            _progress(f"timing state_at: {rounds} rounds x {per_round} calls per case")
            measured = interleave(cases, rounds=rounds, per_round=per_round, warmup=20)
            stats = measured.stats
            rows.append(_row("state_at(version=50,000)", stats["state_at(version=50,000)"],
                             TARGET_US, "a snapshot at that version"))
            rows.append(_row("  raw floor (snapshot + 1 row, no decoding)",
                             stats["raw floor, version 50,000 (1 snapshot + 1 row)"]))
            rows.append(_row("state_at(version=50,099)", stats["state_at(version=50,099)"],
                             TARGET_US, "snapshot 50,000 + 99 events replayed"))
            rows.append(_row("  raw floor (snapshot + 100 rows, no decoding)",
                             stats["raw floor, version 50,099 (1 snapshot + 100 rows)"]))
            rows.append(_row("state_at(at=time of 50,099)", stats["state_at(at=time of 50,099)"],
                             None, "version found by time, then as above"))

            def plain(_: int) -> object:
                session = Session(sid)
                replay(session, engine._codec.decode(sid, store.stream(sid, 0, mid)))
                return session

            assert plain(0) == queries.state_at(sid, mid)
            _progress("timing a plain replay of 1..50,000 (for scale)")
            rows.append(_row("plain replay 1..50,000 (no snapshot)",
                             interleave({"plain": plain}, rounds=3, per_round=2).stats["plain"],
                             None, "what state_at avoids"))
            raw.close()

            _progress(f"set-up: a {HISTORY_EVENTS:,}-event session for filtered history")
            hid = _build(engine, HISTORY_EVENTS, lambda n: "carol" if n % 100 == 0 else "bob")
            unchecked_sql = (
                "SELECT version, type, ts, actor, correlation_id, payload, digest FROM sl_events "
                "WHERE session_id = ? AND actor = ? ORDER BY version")
            payload_decode = engine._codec.payloads.decode

            def unchecked(_: int) -> object:
                kept = store.query(unchecked_sql, (hid, "carol"))
                return session_events(hid, [(v, t, ts, a, c, *payload_decode(p, hid, v))
                                            for v, t, ts, a, c, p, _d in kept])

            checked_case = "history(actor=...) 1% kept, whole stream checked (used)"
            unchecked_case = "SQL filter, chain NOT checked (not used)"
            assert unchecked(0) == queries.history(hid, actor="carol")
            history = interleave(
                {checked_case: lambda _: queries.history(hid, actor="carol"),
                 unchecked_case: unchecked},
                rounds=5, per_round=5, warmup=2,
            ).stats
            rows.append(_row(checked_case, history[checked_case], None,
                             f"{HISTORY_EVENTS:,}-event session"))
            rows.append(_row("  " + unchecked_case, history[unchecked_case], None,
                             "could serve tampered events"))
    rows.insert(0, {"case": "set-up", "n": 1, "median_us": round(setup_s * 1e6),
                    "p10_us": None, "p90_us": None, "target_us": None, "passed": None,
                    "note": f"{EVENTS:,} events through the engine, durability=normal"})
    return rows


def _fmt(us: float | None) -> str:
    if us is None:
        return "—"
    if us >= 1_000_000:
        return f"{us / 1e6:,.1f} s"
    if us >= 1000:
        return f"{us / 1000:,.2f} ms"
    return f"{us:,.0f} µs"


def render(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    headers = ["case", "median", "p10", "p90", "target", "verdict", "note"]
    body = [[r["case"], _fmt(r["median_us"]), _fmt(r["p10_us"]), _fmt(r["p90_us"]),
             "—" if r["target_us"] is None else f"≤ {_fmt(r['target_us'])}",
             "info" if r["passed"] is None else ("PASS" if r["passed"] else "FAIL"), r["note"]]
            for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(row) for row in body)])


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the table; with --strict exit 1 when a target fails."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.audit_bench",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="rounds (default 10)")
    parser.add_argument("--per-round", type=int, default=50,
                        help="calls per case per round (default 50)")
    parser.add_argument("--dir", metavar="DIR", help="where to put the temporary SQLite file")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args(argv)
    rows = measure(args.rounds, args.per_round, args.dir)
    print(render(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    failed = any(row["passed"] is False for row in rows)
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
