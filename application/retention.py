"""Retention: which ended sessions cleanup() archives or purges."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from datetime import timedelta

from sessionledger.domain.errors import InvalidArgument
from sessionledger.domain.events import SESSION_ENDED
from sessionledger.domain.values import checked_flag
from sessionledger.infrastructure import log_reads
from sessionledger.infrastructure.store import EventStore


@dataclass(frozen=True)
class RetentionPolicy:
    """What engine.cleanup() does to ended sessions (COMPLETED, FAILED, CANCELLED).

    max_age: sessions whose last event is older than this (a timedelta or seconds; an age
        longer than the time since 1970, math.inf included, matches no session).
    keep_last: keep the N ended sessions that ended last, whatever their age (any int >= 0;
        ranked by when each ended, so an archived session ranks by its end, not its archive).
    At least one of the two must be given; with both, a session must be older than max_age and
    not among the keep_last that ended last.
    archive: append SessionArchived to each, the default action (archive=True says so
        explicitly and refuses purge=True beside it; archive=False, which would leave nothing
        to do, needs purge=True).
    purge=True: delete each session's events, snapshots and idempotency keys for good, leaving a
        tombstone (id, name, final status, time of purge); archived sessions are purged too.
    dry_run=True: list what would be done and touch nothing.
    """

    max_age: timedelta | float | int | None = None
    keep_last: int | None = None
    archive: bool | None = None
    purge: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        if self.max_age is None and self.keep_last is None:
            raise InvalidArgument("a RetentionPolicy needs max_age, keep_last or both")
        if self.max_age is not None:
            if isinstance(self.max_age, bool) or not isinstance(
                self.max_age, timedelta | int | float
            ):
                raise InvalidArgument(f"max_age must be a timedelta or seconds, got "
                                      f"{self.max_age!r}")
            seconds = self.max_age_seconds
            if seconds is not None and math.isnan(seconds):
                raise InvalidArgument("max_age must be a number of seconds, got NaN")
            if seconds is not None and seconds < 0:
                raise InvalidArgument("max_age must not be negative")
        if self.keep_last is not None and (type(self.keep_last) is not int or self.keep_last < 0):
            raise InvalidArgument(f"keep_last must be an int >= 0, got {self.keep_last!r}")
        for name in ("purge", "dry_run"):
            checked_flag(getattr(self, name), name)
        if self.archive is not None:
            checked_flag(self.archive, "archive")
            if self.archive and self.purge:
                raise InvalidArgument("a RetentionPolicy either archives or purges, not both")
            if not self.archive and not self.purge:
                raise InvalidArgument("a RetentionPolicy with archive=False needs purge=True: "
                                      "it either archives or purges")

    @property
    def action(self) -> str:
        """"purge" or "archive"."""
        return "purge" if self.purge else "archive"

    @property
    def max_age_seconds(self) -> float | None:
        """max_age in seconds (None when not set)."""
        if self.max_age is None:
            return None
        if isinstance(self.max_age, timedelta):
            return self.max_age.total_seconds()
        try:
            return float(self.max_age)
        except OverflowError:  # an int beyond any float: older than anything can be
            return math.inf if self.max_age > 0 else -math.inf


@dataclass(frozen=True)
class CleanupReport:
    """What cleanup() did (or, with dry_run, would do): the action and the sessions."""

    action: str
    session_ids: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def archived(self) -> list[str]:
        """Sessions archived (none for a purge or a dry run)."""
        return self.session_ids if self.action == "archive" and not self.dry_run else []

    @property
    def purged(self) -> list[str]:
        """Sessions purged (none for an archive or a dry run)."""
        return self.session_ids if self.action == "purge" and not self.dry_run else []

    def __len__(self) -> int:
        return len(self.session_ids)


def last_ended(store: EventStore, population: set[str], count: int) -> set[str]:
    """The `count` sessions of `population` that ended last, by the commit order of their
    SessionEnded: an archived session ranks by when it ended, not when it was archived (its
    last event), so a purge run keeps the sessions an archive run with the same keep_last kept.
    Reads the log backwards only until it has them."""
    if count >= len(population):
        return set(population)
    kept: set[str] = set()
    batches = store.scan_batches(log_reads.SESSIONS_BY_EVENT_NEWEST_FIRST, (SESSION_ENDED,))
    with contextlib.closing(batches):  # ends the scan (and frees its connection) at once
        for batch in batches:
            for (sid,) in batch:
                if sid in population:
                    kept.add(sid)
                    if len(kept) == count:
                        return kept
    return kept
