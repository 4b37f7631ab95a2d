"""sessionledger under test, and the exact bytes it stores (so the floors write the same bytes).

The rows are built with the engine's own codec and chain digest, from the same event data the
aggregate decides on: StateChanged {"set": {"step": n}, "delete": []} for an update and
SessionStarted {"name": ..., "tags": [], "metadata": {}, "state": {"step": 0}, "parent": None}
for a create. `check_same_bytes` compares them with what the engine really stored.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from typing import Any

from sessionledger import SessionConfig, SessionEngine
from sessionledger.domain.events import EVENT_SCHEMAS, SESSION_STARTED, STATE_CHANGED
from sessionledger.infrastructure.codec import GENESIS_DIGEST, EventRow, PayloadCodec, chain_digest

SESSION_NAME = "bench"
INITIAL_STATE: dict[str, Any] = {"step": 0}

_codec = PayloadCodec()


def _row(sid: str, version: int, event_type: str, data: dict[str, Any], head: bytes) -> EventRow:
    payload, _ = _codec.encode(data, EVENT_SCHEMAS[event_type])
    now = time.time_ns() // 1000
    digest = chain_digest(head, sid, version, event_type, now, None, None, payload)
    return (sid, version, event_type, now, None, None, payload, digest)


def started_data() -> dict[str, Any]:
    return {"name": SESSION_NAME, "tags": [], "metadata": {}, "state": dict(INITIAL_STATE),
            "parent": None}


def create_row(sid: str | None = None) -> EventRow:
    """The row create(SESSION_NAME, state=INITIAL_STATE) writes, for a new session id."""
    return _row(sid or str(uuid.uuid4()), 1, SESSION_STARTED, started_data(), GENESIS_DIGEST)


def update_rows(sid: str, count: int, first_step: int = 1) -> list[EventRow]:
    """The rows of update(sid, {"step": n}) for n = first_step..first_step+count-1, after v1."""
    rows: list[EventRow] = []
    head = create_row(sid)[7]
    for k in range(count):
        data = {"set": {"step": first_step + k}, "delete": []}
        row = _row(sid, 2 + k, STATE_CHANGED, data, head)
        head = row[7]
        rows.append(row)
    return rows


def open_engine(url: str, durability: str = "full", cached: bool = True,
                snapshot_every: int = 100) -> SessionEngine:
    """An engine with the given durability; cached=False: max_active_sessions=0 (cold loads)."""
    return SessionEngine(url, SessionConfig(
        durability=durability, max_active_sessions=1000 if cached else 0,
        snapshot_every=snapshot_every))


def populate(url: str, events: int, snapshot_every: int = 0) -> str:
    """A new session of `events` events (create + updates), written at durability normal;
    without snapshots unless `snapshot_every` says otherwise."""
    with open_engine(url, "normal", snapshot_every=snapshot_every) as engine:
        sid = engine.create(SESSION_NAME, state=dict(INITIAL_STATE))
        for step in range(1, events):
            engine.update(sid, {"step": step})
    return sid


def sqlite_settings(engine: SessionEngine) -> tuple[str, str]:
    """(journal_mode, synchronous) read back from the engine's own SQLite connection."""
    from .raw import pragma_readback

    db = engine._store._db  # read-only peek at the store's DBAPI connection
    return pragma_readback(db)


def check_same_bytes(sqlite_path: str, sid: str, floor_rows: dict[int, EventRow]) -> list[str]:
    """Differences between payloads the engine stored and the floor's rows (by version)."""
    problems: list[str] = []
    conn = sqlite3.connect(sqlite_path)
    try:
        for version, row in floor_rows.items():
            found = conn.execute(
                "SELECT type, payload, length(digest) FROM sl_events "
                "WHERE session_id = ? AND version = ?", (sid, version)).fetchone()
            if found is None:
                problems.append(f"version {version} not stored")
            elif (found[0], bytes(found[1]), found[2]) != (row[2], row[6], len(row[7])):
                problems.append(
                    f"version {version}: engine stored {found[0]} {len(found[1])} B payload, "
                    f"floor writes {row[2]} {len(row[6])} B"
                )
    finally:
        conn.close()
    return problems
