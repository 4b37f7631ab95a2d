"""The child side of test_purge_stress.py: one process, one SessionEngine, one role.

"writer": commands on the shared sessions (they stay in its working set, so a purge by another
process makes its copies stale), sometimes a save_all_active batch; "purger": ends one of the
victims (the first half of the sessions) and purges every ended session, in a loop. Only plain
data crosses the process boundary.
"""

from __future__ import annotations

import contextlib
import random
import time
import traceback
from typing import Any

from sessionledger import (
    CheckpointNotFound,
    ConcurrencyConflict,
    InvalidTransition,
    RetentionPolicy,
    SessionConfig,
    SessionEngine,
    SessionLedgerError,
    SessionPurged,
)

#: what a writer may meet on a session others end and purge: outcomes, not failures
EXPECTED = (ConcurrencyConflict, InvalidTransition, CheckpointNotFound, SessionPurged)
#: the purger's pause between rounds: about half the victims are purged in a 4-second run
PURGE_PAUSE = 0.15


def run(url: str, role: str, seed: int, session_ids: list[str], seconds: float,
        results: Any) -> None:
    """Play `role` for `seconds`; put (role, counts by outcome, unexpected errors) on
    `results`."""
    rng = random.Random(f"{seed}-{role}")
    counts: dict[str, int] = {}
    errors: list[str] = []
    try:
        engine = SessionEngine(url, SessionConfig(durability="normal", retries=1))
    except Exception as error:  # pragma: no cover - reported to the parent
        results.put((role, counts, [f"open: {error!r}"]))
        return
    deadline = time.monotonic() + seconds
    with engine:
        while time.monotonic() < deadline:
            operation = "purge" if role == "purger" else rng.choice(
                ("update", "update", "record", "checkpoint", "save", "get", "batch"))
            sid = rng.choice(session_ids)
            try:
                if operation == "purge":
                    with contextlib.suppress(*EXPECTED):
                        engine.end(rng.choice(session_ids[:len(session_ids) // 2]))
                    engine.cleanup(RetentionPolicy(max_age=0, purge=True))
                    time.sleep(PURGE_PAUSE)
                elif operation == "update":
                    engine.update(sid, {"n": rng.randrange(1000)})
                elif operation == "record":
                    engine.record(sid, "mark", {"r": rng.randrange(1000)})
                elif operation == "checkpoint":
                    engine.checkpoint(sid, f"c{rng.randrange(10**9)}")
                elif operation == "save":
                    engine.save(sid)
                elif operation == "get":
                    engine.get(sid)
                else:
                    engine.save_all_active()
                outcome = operation
            except EXPECTED as error:
                outcome = type(error).__name__
            except SessionLedgerError as error:
                outcome = type(error).__name__
                errors.append(f"{role}/{operation}: {outcome}: {error}")
            except Exception:  # pragma: no cover - reported to the parent
                outcome = "crash"
                errors.append(f"{role}/{operation}: {traceback.format_exc()[-800:]}")
            counts[outcome] = counts.get(outcome, 0) + 1
    results.put((role, counts, errors[:10]))
