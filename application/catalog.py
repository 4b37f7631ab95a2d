"""The catalog: a read model of every session, kept by a durable, exactly-once subscriber.

Each batch of events is folded (projections/catalog.py) into the rows of the sessions it
touches, and the rows and the subscriber's position are written in one transaction. A rebuild
replays the whole log into "_next" tables under a tracking name of its own (so an interrupted
rebuild resumes), then swaps them in; queries answer from the old tables until that commit.
A rebuild writes no tag pairs window by window: its tag table is filled from the rows' JSON
tags in one statement, in the swap's transaction.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter

from sqlalchemy.engine import Connection

from sessionledger.domain.errors import (
    CorruptedData,
    InvalidArgument,
    SessionLedgerError,
    StorageError,
)
from sessionledger.domain.events import (
    EVENT_SCHEMAS,
    MAX_MICROS,
    SESSION_STARTED,
    stored_micros,
    stored_version,
)
from sessionledger.domain.values import (
    MAX_LABEL_LENGTH,
    MAX_TAGS,
    checked_search_text,
    is_canonical_id,
    small_count,
)
from sessionledger.infrastructure.catalog_store import (
    NEXT,
    CatalogRow,
    CatalogStore,
    Totals,
    TotalsPrefetcher,
)
from sessionledger.infrastructure.codec import PayloadCodec, blob
from sessionledger.infrastructure.subscriptions import SubscriptionStore
from sessionledger.projections.catalog import (
    CATALOG_VERSION,
    NEEDS_DATA,
    SPECIAL_TYPES,
    CatalogEntry,
    SessionSummary,
    fold,
    summary,
)
from sessionledger.projections.replay import current_data

from .audit import time_filter_micros
from .gc_pause import gc_paused
from .subscribers import SubscriberRunner, WindowConsumer

log = logging.getLogger("sessionledger.catalog")

CATALOG = "catalog"
REBUILD_TRACKING = "catalog:rebuild"
VERSION_KEY = "projection:catalog"
#: sl_meta: how many rebuilds have been swapped in (a rebuild that fails tells by it whether
#: another engine's swap finished the work under it)
SWAPS_KEY = "projection:catalog:swaps"
#: a rebuild commits every REBUILD_BATCH positions: big enough that commits (which rewrite
#: pages all over a table keyed by random UUIDs) cost little per event, small enough that an
#: interrupted rebuild loses little (measured: 10,000 -> 100,000 doubled the rate on 1M events
#: in 100k sessions, benchmarks/catalog_bench.py)
REBUILD_BATCH = 100_000

#: progress(done_position, head_position, events_per_second) during a rebuild
Progress = Callable[[int, int, float], None]


class ProjectionOutdated(SessionLedgerError):
    """The stored read model was built by another version of its projection code."""


#: tags (as a tuple) -> their JSON text: sessions share a few tag sets, and json.dumps costs
#: about 3 µs a row of a rebuild's 100,000 (a lookup 0.2 µs)
_TAGS_JSON: dict[tuple[str, ...], str] = {}
_TAGS_JSON_LIMIT = 10_000


def _tags_json(tags: list[str]) -> str:
    key = tuple(tags)
    text = _TAGS_JSON.get(key)
    if text is None:
        text = json.dumps(tags, ensure_ascii=False)
        if len(_TAGS_JSON) >= _TAGS_JSON_LIMIT:
            _TAGS_JSON.clear()  # many distinct tag sets: keep memory bounded
        _TAGS_JSON[key] = text
    return text


#: windows of at least this many positions fold with the cyclic garbage collector paused
_GC_PAUSE_MIN = 10_000


def _to_entry(row: CatalogRow) -> CatalogEntry:
    try:
        tags = json.loads(row[10])
        if type(tags) is not list:
            raise ValueError(f"tags {row[10]!r} are not a list")
        return CatalogEntry(row[0], row[1], row[2], row[3], row[4], int(row[5]), int(row[6]),
                            int(row[7]), int(row[8]), row[9], tags)
    except (TypeError, ValueError) as error:  # SQLite keeps any type in any column
        raise _damaged_row(row[0], error) from None


def _damaged_row(session_id: str, error: Exception) -> CorruptedData:
    return CorruptedData(session_id, None, f"its catalog row is damaged ({error}): the catalog "
                                           "is a read model, rebuild it with "
                                           "engine.rebuild('catalog')")


@dataclass
class CatalogConsumer(WindowConsumer):
    """Folds windows of events into catalog tables (the live ones, or a rebuild's "_next")."""

    tables: CatalogStore
    payloads: PayloadCodec
    name: str = CATALOG
    suffix: str = ""

    def handle_window(self, conn: Connection, after: int, upto: int,
                      totals: Totals | None = None) -> int:
        """Fold the events with positions in (after, upto]; return how many there were.
        `totals`: the window's per-session totals as read ahead (CatalogStore.read_totals,
        outside this transaction), else they are read here."""
        if upto - after < _GC_PAUSE_MIN:
            return self._fold_window(conn, after, upto, totals)
        with gc_paused():
            return self._fold_window(conn, after, upto, totals)

    def _fold_window(self, conn: Connection, after: int, upto: int,
                     ahead: Totals | None) -> int:
        """Fold the events with positions in (after, upto]; return how many there were.

        The same result as fold() applied event by event (the tests hold the two together):
        a session's version, time and count come from the database's own GROUP BY, and only
        the events that change more than that (SPECIAL_TYPES, a few per session) are folded
        here. Relies on a session's timestamps never going backwards (commands enforce it), so
        MAX(ts) is the time of its last event.
        """
        if after == 0 and not self.suffix:
            # a live catalog built from the start of the log is this projection version's
            self.tables.set_meta(conn, VERSION_KEY, str(CATALOG_VERSION))
        totals, special = self.tables.window(conn, after, upto, SPECIAL_TYPES, ahead)
        # a session whose SessionStarted (version 1: its first event, so its first position) is
        # in this window has no stored row yet: only the others are looked up (a rebuild of
        # 500,000 events in 100,000 sessions: 3,200 ids instead of 100,000, 0.05 s -> 0.01 s)
        started = {row[0] for row in special if row[2] == SESSION_STARTED and row[1] == 1}
        stored = self.tables.load(conn, [row[0] for row in totals if row[0] not in started],
                                  self.suffix)
        entries = {row[0]: _to_entry(row) for row in stored}
        # what the stored rows hold already: their events counted, their tags as JSON
        counted = {row[0]: int(row[8]) for row in stored}
        tags_text = {row[0]: row[10] for row in stored}
        new_tags: list[tuple[str, str]] = []
        # a rebuild fills its tag table once, from the rows, just before the swap
        keep_tags = not self.suffix
        decode = self.payloads.decode
        schemas = EVENT_SCHEMAS
        for sid, version, event_type, micros, actor, payload in special:
            data = None
            if event_type in NEEDS_DATA:
                schema, data = decode(blob(payload), sid, version)
                if type(data) is not dict or schemas.get(event_type) != schema:
                    # current_data's checks and upcasts, called only when the data is not a
                    # map in its type's current schema (as in replay)
                    data = current_data(sid, version, event_type, schema, data)
            entry = entries[sid] = fold(entries.get(sid), sid, version, event_type, micros,
                                        actor, data)
            if event_type == SESSION_STARTED and keep_tags:
                new_tags.extend((tag, sid) for tag in entry.tags)
        handled = 0
        rows: list[CatalogRow] = []
        append = rows.append
        for sid, version, micros, count in totals:
            # the checks of stored_micros and stored_version, called only to raise (a call
            # each per session and window cost 0.02 s of a 1.7 s rebuild)
            if type(micros) is not int or not 0 <= micros <= MAX_MICROS:
                stored_micros(sid, None, micros)
            if type(version) is not int:
                stored_version(sid, version)
            found = entries.get(sid)
            if found is None:
                if ahead is not None and self.tables.purged(conn, sid):
                    # totals read ahead, before a purge of a session started in this window
                    # (a purge always deletes from the start of a stream): nothing to fold
                    continue
                # events of a session whose start is in no window: its log begins mid-stream
                raise CorruptedData(sid, None, "events of a session that never started")
            handled += count  # COUNT(*): an int from SQLite and from PostgreSQL
            # the row straight from the entry (no writes back into the entry, no helper call;
            # measured: 0.05 s less of 0.69 s of Python on 500,000 events): version and time are
            # the GROUP BY's, and so is the count of this window's events (the special ones
            # included), added to what the stored row had counted
            text = tags_text.get(sid)
            append((sid, found.name, found.status, found.parent, found.created_by,
                    found.created_us, max(found.updated_us, micros),
                    max(found.version, version), counted.get(sid, 0) + count,
                    found.last_checkpoint, _tags_json(found.tags) if text is None else text))
        # written in key order: B-tree inserts of sorted random-UUID keys touch each page once
        # (measured: a third less time in executemany on a 1M-event rebuild)
        # by session id alone (unique in a window): homogeneous str keys sort in about half
        # the time of whole tuples
        rows.sort(key=itemgetter(0))
        new_tags.sort()
        self.tables.write(conn, rows, new_tags, self.suffix)
        return handled


class Catalog:
    """The catalog's subscriber, queries, version check and rebuild."""

    def __init__(self, subscriptions: SubscriptionStore, tables: CatalogStore,
                 payloads: PayloadCodec, runner: SubscriberRunner) -> None:
        self.subscriptions = subscriptions
        self.tables = tables
        self.runner = runner
        self.consumer = CatalogConsumer(tables, payloads)
        self._rebuilder = CatalogConsumer(tables, payloads, name=REBUILD_TRACKING, suffix=NEXT)
        #: positions per window (and per commit) of a rebuild
        self.rebuild_batch = REBUILD_BATCH

    # -- versions ---------------------------------------------------------------------------

    def stored_version(self) -> int | None:
        """The projection version that built the stored catalog (None: never built; -1: a
        value that is no version, a damaged row, which makes the catalog outdated)."""
        value = self.tables.get_meta(VERSION_KEY)
        if value is None:
            return None
        number = small_count(str(value))
        return -1 if number is None else number

    def built_by_newer(self) -> bool:
        """True when a newer release's projection built the stored catalog."""
        stored = self.stored_version()
        return stored is not None and stored > CATALOG_VERSION

    def outdated(self) -> bool:
        """True when the stored catalog was built by another projection version."""
        stored = self.stored_version()
        if stored is None:
            # a catalog that never ran holds nothing to throw away: it is built from scratch
            return self.subscriptions.position(CATALOG) > 0
        return stored != CATALOG_VERSION

    def _set_version(self, conn: Connection) -> None:
        self.tables.set_meta(conn, VERSION_KEY, str(CATALOG_VERSION))

    # -- keeping it current -----------------------------------------------------------------

    def catch_up(self) -> int:
        """Fold every event not yet in the catalog; return how many."""
        return self.runner.catch_up(self.consumer)

    # -- queries ----------------------------------------------------------------------------

    def find(
        self,
        status: object = None,
        tags: object = None,
        name: str | None = None,
        parent: str | None = None,
        updated_after: object = None,
        updated_before: object = None,
        limit: int = 100,
        cursor: str | None = None,
        catch_up: bool = False,
    ) -> Page:
        """One page of sessions matching every filter, most recently updated first.
        catch_up=True brings the catalog up to date first, once the arguments are checked (a
        refused call writes nothing)."""
        if type(limit) is not int or not 1 <= limit <= 10_000:
            raise InvalidArgument(f"limit must be an int in 1..10000, got {limit!r}")
        statuses = _statuses(status)
        tag_list = _tags(tags)
        if name is not None:
            name = checked_search_text(name, "name")  # one a session could have
        after = time_filter_micros(updated_after, "updated_after")
        before = time_filter_micros(updated_before, "updated_before")
        keyset = _decode_cursor(cursor)
        if catch_up:
            try:
                self.catch_up()
            except StorageError as error:
                # a read-only file or a full disk: say why a query needs to write
                raise StorageError(
                    f"find() folds the events not yet in the catalog first, which writes to the "
                    f"database, and could not: {error}") from None
        rows = self.tables.find(statuses, tag_list, name, parent, after, before, limit + 1,
                                keyset)
        more = len(rows) > limit
        rows = rows[:limit]
        items = []
        for row in rows:
            entry = _to_entry(row)
            try:
                items.append(summary(entry))
            except ValueError as error:  # a status no SessionStatus has
                raise _damaged_row(entry.session_id, error) from None
        next_cursor = f"{rows[-1][6]}.{rows[-1][0]}" if more else None
        return Page(items, next_cursor)

    # -- rebuild ----------------------------------------------------------------------------

    def rebuild(self, progress: Progress | None = None) -> int:
        """Replay the whole log into fresh tables and swap them in; return the events folded
        from where it started (with engines sharing the work, theirs too).

        Resumes an interrupted rebuild from its tracked position. Engines rebuilding at the
        same time share the work (the tracked position); when another one swaps the tables in
        first, this one returns 0: the catalog was rebuilt.
        """
        subs = self.subscriptions
        swaps = self._swaps()
        with subs.transaction(REBUILD_TRACKING) as (conn, _):
            self.tables.create_next(conn)
        try:
            return self._fill_and_swap(progress, swaps)
        except SessionLedgerError:
            # Only what another engine's swap explains is not an error: it swapped the "_next"
            # tables this rebuild was filling in (and another rebuild may have made new ones
            # since). Anything else (a lost connection, a locked or read-only file) is raised.
            if self._swaps() == swaps or self.stored_version() != CATALOG_VERSION:
                raise
            log.info("catalog rebuild finished by another engine")
            return 0

    def _swaps(self, conn: Connection | None = None) -> int:
        text = str(self.tables.get_meta(SWAPS_KEY, conn) or "")
        return small_count(text) or 0

    def _window_reader(self) -> contextlib.AbstractContextManager[TotalsPrefetcher | None]:
        """A reader of the next window's totals, or None on an in-memory SQLite database (one
        connection for every thread: nothing can read beside the fold)."""
        if self.subscriptions.store.single_connection:
            return contextlib.nullcontext()
        return TotalsPrefetcher(self.tables)

    def _fold_next_window(self, reader: TotalsPrefetcher | None) -> tuple[int, int] | None:
        """Fold the next window of the log into the "_next" tables; return the events it held
        and the positions it spanned (positions have holes: purges, rolled-back inserts),
        None once there is none.

        As SubscriberRunner.step does for the live catalog, reading the totals of the window
        after it ahead (they may count sessions purged before this window commits: the fold
        skips those that start in the window, the swap drops the others, as it drops those
        purged after)."""
        subs = self.subscriptions
        with subs.transaction(REBUILD_TRACKING, hold_off_purges=True) as (conn, position):
            head = subs.head_in(conn)
            if head <= position:
                return None
            batch = self.rebuild_batch
            upto = min(head, position + batch)
            totals = None
            if reader is not None:
                totals = reader.take(position, upto)
                if upto < head:
                    reader.ask(upto, min(head, upto + batch))
            handled = self._rebuilder.handle_window(conn, position, upto, totals)
            subs.advance(conn, REBUILD_TRACKING, upto)
            return handled, upto - position

    def _fill_and_swap(self, progress: Progress | None, swaps: int) -> int:
        """Fold the log into the "_next" tables and swap them in; `swaps`: the swap count when
        this rebuild began."""
        subs = self.subscriptions
        started = time.perf_counter()
        first = subs.position(REBUILD_TRACKING)
        head = subs.head()
        folded = spanned = 0  # events, and the positions they spanned (which have holes)
        if progress is not None:  # where it starts: a bar counts from here
            progress(first, max(head, first), 0.0)
        with self._window_reader() as reader:
            while (window := self._fold_next_window(reader)) is not None:
                folded += window[0]
                spanned += window[1]
                if progress is not None:
                    done = subs.position(REBUILD_TRACKING)
                    elapsed = time.perf_counter() - started
                    rate = folded / elapsed if elapsed > 0 else 0.0
                    progress(done, max(head, done), rate)
        # the swap: fold what came meanwhile, then rename, in one transaction that holds the
        # live catalog's tracking row (no live batch can interleave)
        with subs.transaction(CATALOG, hold_off_purges=True) as (conn, _):
            if self._swaps(conn) != swaps:
                # another engine swapped this rebuild's tables in meanwhile (swaps take turns
                # on the catalog's row, held here): done. The "_next" tables and tracking row
                # there may be now are a later rebuild's, which this one must not fold into
                # (PostgreSQL: its windows and this swap deadlocked on the tables)
                log.info("catalog rebuild finished by another engine")
                return 0
            # the rebuild's tracking row locked and read in this transaction: a window another
            # engine's rebuild folds meanwhile commits first (and is read) or waits for the
            # swap (and then finds its tables gone); read outside, such a window was folded
            # twice (PostgreSQL: event counts one too high)
            rebuilt = subs.locked_position(conn, REBUILD_TRACKING)
            position = subs.head_in(conn)
            if rebuilt < position:
                folded += self._rebuilder.handle_window(conn, rebuilt, position)
                spanned += position - rebuilt
            if spanned != position - first:
                # engines shared the work: count the events from where this one started
                folded = subs.events_between(conn, first, position)
            self.tables.drop_purged_next(conn)
            self.tables.fill_next_tags(conn)
            self.tables.swap(conn)
            subs.advance(conn, CATALOG, position)
            subs.forget(conn, REBUILD_TRACKING)
            self._set_version(conn)
            # (read on the swap's connection: the store's may be held by a command waiting
            # for the write lock this transaction holds)
            self.tables.set_meta(conn, SWAPS_KEY, str(self._swaps(conn) + 1))
        return folded


@dataclass(frozen=True)
class Page:
    """One page of find(): the sessions, and the cursor of the next page (None: last page)."""

    items: list[SessionSummary]
    next_cursor: str | None

    def __iter__(self) -> Iterator[SessionSummary]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> SessionSummary:
        return self.items[index]


def _statuses(status: object) -> list[str] | None:
    from sessionledger.domain.status import SessionStatus

    if status is None:
        return None
    values = [status] if isinstance(status, str | SessionStatus) else status
    if not hasattr(values, "__iter__"):
        raise InvalidArgument(f"status must be a SessionStatus or a list of them, got {status!r}")
    out = []
    for value in values:
        try:
            out.append(SessionStatus(str(value).upper()).value)
        except ValueError:
            raise InvalidArgument(
                f"unknown status {value!r}: expected one of "
                f"{', '.join(s.value for s in SessionStatus)}"
            ) from None
    if not out:
        raise InvalidArgument("status is an empty list, which no session matches: pass None "
                              "for every status")
    return sorted(set(out))


def _tags(tags: object) -> list[str] | None:
    if tags is None:
        return None
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list | tuple | set | frozenset) or not all(
        isinstance(t, str) for t in tags
    ):
        raise InvalidArgument(f"tags must be a list of str, got {str(tags)[:80]}")
    # each one a tag could be (valid Unicode, no control characters), or InvalidArgument
    wanted = sorted({checked_search_text(tag, "tag", MAX_LABEL_LENGTH) for tag in tags})
    if len(wanted) > MAX_TAGS:  # (a filter clause each: no session has that many)
        raise InvalidArgument(f"find() takes at most {MAX_TAGS} tags (a session's most)")
    return wanted


def _decode_cursor(cursor: str | None) -> tuple[int, str] | None:
    if cursor is None:
        return None
    text, _, sid = str(cursor).partition(".")
    micros = small_count(text)
    if micros is None or micros > MAX_MICROS or not is_canonical_id(sid):
        raise InvalidArgument(f"invalid cursor {str(cursor)[:80]!r}: pass a Page.next_cursor")
    return micros, sid
