"""verify(): check every session's hash chain and every snapshot against the events.

A session's events are checked in version order: each must be the next version and match its
chain digest (blake3 over the previous digest and everything stored for the event; keyed with
SessionConfig.integrity_key). The first broken link of each session is reported: a changed
byte, a deleted, inserted or reordered event all break the chain there. Each snapshot must
decode, match its own digest and equal the session replayed from its events up to its version.

What a chain cannot show: events deleted from the end of a stream (the remaining prefix is a
valid chain). Snapshots and the catalog remember later versions, so such a truncation shows up
as a snapshot without its events.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from sessionledger.domain.errors import CorruptedData, SessionLedgerError
from sessionledger.domain.session import Session
from sessionledger.infrastructure.codec import GENESIS_DIGEST, EventCodec, chain_link
from sessionledger.infrastructure.store import EventStore
from sessionledger.projections.replay import replay
from sessionledger.projections.snapshots import CURRENT_FORMAT, session_from_snapshot

from .repository import SessionRepository

_EVENTS = ("SELECT session_id, version, type, ts, actor, correlation_id, payload, digest "
           "FROM sl_events{where} ORDER BY session_id, version")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing verify() found wrong: where, and what."""

    session_id: str
    version: int | None
    what: str

    def __str__(self) -> str:
        where = self.session_id + (f" version {self.version}" if self.version else "")
        return f"{where}: {self.what}"


@dataclass
class VerifyReport:
    """What verify() checked and found. `ok` is True when `problems` is empty."""

    sessions: int = 0
    events: int = 0
    snapshots: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every chain and every snapshot checked out."""
        return not self.problems


class Verifier:
    """Walks the log once, in (session, version) order, with constant memory per session."""

    def __init__(self, store: EventStore, codec: EventCodec,
                 repository: SessionRepository) -> None:
        self.store = store
        self.codec = codec
        self.repository = repository

    def run(self, session_id: str | None = None) -> VerifyReport:
        """Check one session (or every session) and return the report."""
        report = VerifyReport()
        where, params = (" WHERE session_id = ?", (session_id,)) if session_id else ("", ())
        snapshots = self._snapshot_versions(where, params)
        broken: dict[str, int] = {}
        link = chain_link(self.codec.chain_key)
        current = None
        head = GENESIS_DIGEST
        expected = 1
        for sid, version, event_type, micros, actor, correlation, payload, digest in (
            self.store.scan(_EVENTS.format(where=where), params)
        ):
            if sid != current:
                current, head, expected = sid, GENESIS_DIGEST, 1
                report.sessions += 1
            report.events += 1
            if sid in broken:
                continue
            if version != expected:
                what = (f"event version {expected} is missing" if version > expected
                        else f"event version {version} appears twice")
                report.problems.append(Problem(sid, expected, what))
                broken[sid] = expected
                continue
            head = link(head, sid, version, event_type, micros, actor, correlation, payload)
            if head != digest:
                report.problems.append(Problem(
                    sid, version, "the event does not match its chain digest: it was changed, "
                    "or an event before it was changed, inserted, moved or deleted"))
                broken[sid] = version
                continue
            expected += 1
        self._check_snapshots(snapshots, broken, report)
        return report

    def _snapshot_versions(self, where: str, params: tuple[str, ...]) -> dict[str, list[int]]:
        versions: dict[str, list[int]] = {}
        rows = self.store.query(
            f"SELECT session_id, version FROM sl_snapshots{where} ORDER BY session_id, version",
            params)
        for sid, version in rows:
            versions.setdefault(sid, []).append(int(version))
        return versions

    def _check_snapshots(self, snapshots: dict[str, list[int]], broken: dict[str, int],
                         report: VerifyReport) -> None:
        for sid, versions in snapshots.items():
            for problem in self._snapshot_problems(sid, versions, broken.get(sid)):
                report.problems.append(problem)
            report.snapshots += len(versions)

    def _snapshot_problems(
        self, sid: str, versions: list[int], broken_at: int | None
    ) -> Iterator[Problem]:
        stored = self.store.stream(sid)
        if broken_at is not None:
            stored = stored[: broken_at - 1]
        try:
            decoded = self.codec.decode(sid, stored)
        except CorruptedData:  # pragma: no cover - the chain walk reported it already
            return
        session = Session(sid)
        done = 0
        for version in versions:
            found = self.store.query(
                "SELECT format_version, flags, digest, data FROM sl_snapshots "
                "WHERE session_id = ? AND version = ?", (sid, version))
            if not found:
                continue  # dropped meanwhile: snapshots are a cache
            format_version, flags, digest, data = found[0]
            fmt = 0 if format_version is None else int(format_version)
            if fmt > CURRENT_FORMAT:
                yield Problem(sid, version, f"snapshot format {fmt} is newer than this release "
                                            f"reads (up to {CURRENT_FORMAT})")
                continue
            if version > len(decoded):
                yield Problem(sid, version, "snapshot of a version whose events are missing")
                continue
            try:
                fields = self.repository.snapshots.decode(int(flags), bytes(digest), bytes(data),
                                                          sid, version)
                snap, head = session_from_snapshot(fields, fmt, sid, version)
            except SessionLedgerError as error:
                yield Problem(sid, version, f"snapshot unreadable: {error}")
                continue
            replay(session, decoded[done:version])
            done = version
            if head is not None and head != stored[version - 1][6]:
                yield Problem(sid, version, "snapshot is not on the chain of the events")
            elif snap != session:
                yield Problem(sid, version, "snapshot does not match the events")
