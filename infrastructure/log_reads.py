"""Read statements over the event log and the snapshots for the audit queries, verify() and
retention (qmark parameters: EventStore.query and EventStore.scan adapt them to the dialect).

They live here, with the storage, so that the application layer names no table or column.
"""

from __future__ import annotations

# The last version of a session whose timestamp is <= ?, by binary search over versions, in one
# statement: about log2(n) seeks on the unique (session_id, version) index, one round trip
# (40 µs on a 100,000-event SQLite session, where MAX(version) ... WHERE ts <= ? reads the whole
# session: 15-40 ms). It relies on what the write path guarantees: a session's timestamps never
# decrease (every command stamps max(now, the session's last timestamp)), so the versions with
# ts <= at are a prefix 1..N. (lo, hi): lo is a version known to be <= at (0: none), hi the
# highest still possible; a missing version (damage) stops the search without a `lo = hi` row.
# The recursive reference sits in the FROM list, not in a subquery: PostgreSQL requires that.
VERSION_AT = """
WITH RECURSIVE bs(lo, hi) AS (
    SELECT 0, MAX(version) FROM sl_events WHERE session_id = ?
    UNION ALL
    SELECT CASE WHEN e.ts <= ? THEN (bs.lo + bs.hi + 1) / 2 ELSE bs.lo END,
           CASE WHEN e.ts <= ? THEN bs.hi ELSE (bs.lo + bs.hi + 1) / 2 - 1 END
    FROM bs JOIN sl_events e ON e.session_id = ? AND e.version = (bs.lo + bs.hi + 1) / 2
    WHERE bs.lo < bs.hi
)
SELECT lo FROM bs WHERE lo = hi
"""
#: the same answer by definition, for a stream the search could not walk (a missing version)
VERSION_AT_SCAN = "SELECT MAX(version) FROM sl_events WHERE session_id = ? AND ts <= ?"
#: every session's events in commit order ({where}: a WHERE clause or nothing)
TIMELINE = (
    "SELECT position, session_id, version, type, ts, actor, correlation_id, payload "
    "FROM sl_events{where} ORDER BY position"
)


def first_events(count: int) -> str:
    """The SessionStarted rows (type, payload) of `count` sessions named as parameters."""
    return ("SELECT session_id, type, payload FROM sl_events WHERE version = 1 AND "
            f"session_id IN ({', '.join('?' * count)})")


def timeline_where(low: int | None, high: int | None,
                   types: list[str] | None) -> tuple[str, list[object]]:
    """The WHERE clause of TIMELINE (and its parameters): ts in [low, high), type in types."""
    clauses: list[str] = []
    params: list[object] = []
    if low is not None:
        clauses.append("ts >= ?")
        params.append(low)
    if high is not None:
        clauses.append("ts < ?")
        params.append(high)
    if types is not None:
        clauses.append(f"type IN ({', '.join('?' * len(types))})")
        params.extend(types)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

#: the sessions of every event of one type (?), the last committed first
SESSIONS_BY_EVENT_NEWEST_FIRST = (
    "SELECT session_id FROM sl_events WHERE type = ? ORDER BY position DESC")


# -- verify ------------------------------------------------------------------------------------

#: the events to check, in (session, version) order ({where}: from events_where)
EVENTS_BY_SESSION = (
    "SELECT session_id, version, type, ts, actor, correlation_id, payload, digest "
    "FROM sl_events{where} ORDER BY session_id, version")

#: the highest position, to size the pieces of a parallel verify
MAX_POSITION = "SELECT MAX(position) FROM sl_events"

#: session ids at every `step`-th event in (session, version) order, found by the database: each
#: step seeks past the last cut and counts `step` index entries (no id list reaches Python)
CUTS = (
    "WITH RECURSIVE cuts(id) AS ("
    " SELECT (SELECT session_id FROM sl_events ORDER BY session_id, version LIMIT 1 OFFSET ?)"
    " UNION ALL"
    " SELECT (SELECT session_id FROM sl_events WHERE session_id > cuts.id"
    " ORDER BY session_id, version LIMIT 1 OFFSET ?) FROM cuts WHERE cuts.id IS NOT NULL"
    ") SELECT id FROM cuts WHERE id IS NOT NULL"
)

#: the versions of every stored snapshot (of the sessions {where} picks), in walk order
SNAPSHOT_VERSIONS = (
    "SELECT session_id, version FROM sl_snapshots{where} ORDER BY session_id, version")
def tombstones_beside_events(where: str) -> str:
    """The sessions that have a tombstone and events (events_where's clause, whose parameters
    follow it): a purge deletes the events and writes the tombstone in one transaction, so
    such a tombstone is damage, or a forgery that makes commands refuse a live session."""
    extra = where.replace(" WHERE ", " AND ", 1)
    return ("SELECT session_id FROM sl_tombstones WHERE EXISTS (SELECT 1 FROM sl_events e "
            f"WHERE e.session_id = sl_tombstones.session_id){extra} ORDER BY session_id")
#: the stored snapshots from one (session, version) to another, in walk order
SNAPSHOTS_BETWEEN = (
    "SELECT session_id, version, format_version, flags, digest, data "
    "FROM sl_snapshots WHERE (session_id, version) >= (?, ?) "
    "AND (session_id, version) <= (?, ?) ORDER BY session_id, version")


def events_where(session_id: str | None,
                 shard: tuple[str | None, str | None] | None) -> tuple[str, tuple[str, ...]]:
    """The WHERE clause (and parameters) of EVENTS_BY_SESSION and SNAPSHOT_VERSIONS: one
    session, the session ids of a shard ([low, high); None: open end), or everything."""
    if session_id is not None:
        return " WHERE session_id = ?", (session_id,)
    if shard is None:
        return "", ()
    clauses, params = [], []
    if shard[0] is not None:
        clauses.append("session_id >= ?")
        params.append(shard[0])
    if shard[1] is not None:
        clauses.append("session_id < ?")
        params.append(shard[1])
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)
