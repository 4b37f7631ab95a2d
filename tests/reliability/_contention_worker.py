"""The child side of test_contention.py: one process, one SessionEngine, M commands.

Kept apart from the test module so a "spawn" child imports only sessionledger and this file
(the parent passes its sys.path on, so ``import _contention_worker`` resolves in the child).
Everything crossing the process boundary is plain data: strings, ints, tuples.
"""

from __future__ import annotations

import random
import time
import traceback
from typing import Any

from sessionledger import ConcurrencyConflict, SessionConfig, SessionEngine

OK = "ok"
CONFLICT = "conflict"
ERROR = "error"

#: every record()'s kind; the payload carries the command's marker
RECORD_KIND = "mark"
#: every n-th record carries a payload above the 1 KiB compression threshold (lz4 on the way)
BIG_EVERY = 7

#: the longest pause between two commands: without it one process can run all its commands
#: within one scheduler time slice and the "contention" would be turns taken one after another
MAX_JITTER_SECONDS = 0.0005

#: (marker, session id, "update" | "record", OK | CONFLICT | ERROR, version or None, detail)
Outcome = tuple[str, str, str, str, int | None, str]


def update_value(worker: int, seq: int) -> int:
    """The value a command's update sets under its marker key (unique per command)."""
    return worker * 1_000_000 + seq


def record_payload(marker: str, worker: int, seq: int) -> dict[str, Any]:
    """The payload a command's record() carries (unique per command)."""
    payload: dict[str, Any] = {"marker": marker, "worker": worker, "seq": seq}
    if seq % BIG_EVERY == 0:
        payload["blob"] = (marker + "|") * (2048 // (len(marker) + 1) + 1)
    return payload


def plan(worker: int, commands: int, sessions: int, seed: int) -> list[tuple[str, int, str]]:
    """(marker, session index, operation) of each command a worker applies, reproducibly."""
    rng = random.Random(f"{seed}-{worker}")
    return [
        (f"w{worker}c{seq}", rng.randrange(sessions), rng.choice(("update", "record")))
        for seq in range(commands)
    ]


def run(
    url: str,
    worker: int,
    session_ids: list[str],
    commands: int,
    retries: int,
    seed: int,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    """Open an engine and load the sessions, say so on `ready`, wait for `go`, apply the
    commands, and report each one's outcome on `results` as (worker, outcomes, fatal error
    text or "")."""
    outcomes: list[Outcome] = []
    fatal = ""
    try:
        with SessionEngine(url, SessionConfig(retries=retries)) as engine:
            for sid in session_ids:
                engine.get(sid)  # load every session: each engine starts from its own copy
            jitter = random.Random(f"jitter-{seed}-{worker}")
            ready.put(worker)
            if not go.wait(timeout=120):
                raise TimeoutError("the parent never said go")
            for seq, (marker, index, op) in enumerate(
                plan(worker, commands, len(session_ids), seed)
            ):
                sid = session_ids[index]
                time.sleep(jitter.random() * MAX_JITTER_SECONDS)
                try:
                    if op == "update":
                        version = engine.update(sid, {marker: update_value(worker, seq)},
                                                actor=f"worker-{worker}")
                    else:
                        version = engine.record(sid, RECORD_KIND,
                                                record_payload(marker, worker, seq),
                                                actor=f"worker-{worker}")
                except ConcurrencyConflict as conflict:
                    outcomes.append((marker, sid, op, CONFLICT, None, str(conflict)))
                except Exception as error:  # reported to the parent, which fails the test
                    outcomes.append((marker, sid, op, ERROR, None, repr(error)))
                else:
                    outcomes.append((marker, sid, op, OK, version, ""))
    except BaseException:
        fatal = traceback.format_exc()
    results.put((worker, outcomes, fatal))
