"""The child process of test_crash.py: appends to one database in a loop until it is killed.

    python tests/reliability/_crash_child.py URL ACKFILE [--wait]

It opens a SessionEngine on URL (SQLite with durability="full", or PostgreSQL), makes sure its
sessions exist (three ACTIVE ones, "crash-0".."crash-2", and one SUSPENDED, "crash-parked"),
all created and suspended with idempotency keys, so a child killed half way through the
set-up and the next one that finishes it end up with the same four sessions), then appends
forever: an update or a record with a unique marker on one of the three sessions, and every
BATCH_EVERY-th step a save_all_active() batch with a unique correlation id.

After each command returns it appends one JSON line to ACKFILE (one write on an O_APPEND
descriptor, then fsync): what it did and the version it got. Before each batch it also writes
a "batch-begin" line, so the parent knows every batch that may have reached the database,
acknowledged or not. Lines:

    {"op": "setup", "active": [id, id, id], "parked": id}
    {"op": "update" | "record", "sid": id, "marker": hex, "version": n}
    {"op": "batch-begin", "cid": cid}
    {"op": "batch", "cid": cid, "versions": {id: n, ...}}

--wait: import everything, print "ready", then wait for a line on stdin before touching the
database (the parent starts the next child while the current one runs, so the imports take
nothing from the kill window).
"""

from __future__ import annotations

import json
import os
import random
import sys
import uuid
from typing import Any

from sessionledger import SessionConfig, SessionEngine

SESSIONS = 3
BATCH_EVERY = 5


def main(argv: list[str]) -> int:
    args = [a for a in argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    url, ack_path = args
    if "--wait" in argv:
        if url.startswith("postgresql"):
            # what opening the engine would import: the kill window is for the engine's work
            import psycopg  # noqa: F401
            import sqlalchemy.dialects.postgresql.psycopg  # noqa: F401
        print("ready", flush=True)
        sys.stdin.readline()
    fd = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def ack(**fields: Any) -> None:
        os.write(fd, (json.dumps(fields) + "\n").encode())
        os.fsync(fd)

    engine = SessionEngine(url, SessionConfig(durability="full"))
    active = [
        engine.create(f"crash-{i}", state={"marker": None}, idempotency_key=f"setup-create-{i}")
        for i in range(SESSIONS)
    ]
    parked = engine.create("crash-parked", idempotency_key="setup-create-parked")
    engine.suspend(parked, idempotency_key="setup-suspend-parked")
    ack(op="setup", active=active, parked=parked)

    rng = random.Random(int.from_bytes(os.urandom(8), "big"))
    step = 0
    while True:
        step += 1
        if step % BATCH_EVERY == 0:
            cid = f"batch-{uuid.uuid4().hex}"
            ack(op="batch-begin", cid=cid)
            versions = engine.save_all_active(correlation_id=cid)
            ack(op="batch", cid=cid, versions=versions)
            continue
        sid = rng.choice(active)
        marker = uuid.uuid4().hex
        if rng.random() < 0.5:
            version = engine.update(sid, {"marker": marker})
            ack(op="update", sid=sid, marker=marker, version=version)
        else:
            version = engine.record(sid, "mark", {"marker": marker})
            ack(op="record", sid=sid, marker=marker, version=version)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
