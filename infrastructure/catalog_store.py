"""SQL of the catalog read model: batch upserts, keyset-paginated queries, the rebuild swap.

Rows travel as plain tuples in CATALOG_COLUMNS order (the projection that folds them lives in
projections/catalog.py; storage does not know its classes).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateIndex, CreateTable

from sessionledger.domain.errors import StorageError

from . import schema
from .store import EventStore, columns, drop_if_broken, secure_delete

CATALOG_COLUMNS = ("session_id", "name", "status", "parent", "created_by", "created_ts",
                   "updated_ts", "version", "event_count", "last_checkpoint", "tags")
#: one catalog row, in CATALOG_COLUMNS order
CatalogRow = tuple[str, str, str, str | None, str | None, int, int, int, int, str | None, str]

#: what the catalog reads of a window of positions (CatalogStore.window): per session
#: (session_id, highest version, latest ts, events), and the special events in order
#: (session_id, version, type, ts, actor, payload)
Totals = Sequence[Sequence[Any]]
Window = tuple[Totals, list[tuple[str, int, str, int, str | None, bytes]]]

_COLS = ", ".join(CATALOG_COLUMNS)
_UPDATES = ", ".join(f"{c} = excluded.{c}" for c in CATALOG_COLUMNS[1:])
#: the PostgreSQL types of CATALOG_COLUMNS, for a write over arrays, read off the table (plain
#: varchar: a cast to varchar(n) would cut a longer value short instead of failing)
_PG_ARRAY_TYPES = tuple(
    {sa.String: "varchar", sa.BigInteger: "bigint", sa.Integer: "int"}[type(column.type)]
    for column in (schema.catalog_tables(sa.MetaData())[0].c[name] for name in CATALOG_COLUMNS))
_CHUNK = 500  # ids per IN (...) list: well below every driver's parameter limit
NEXT = "_next"


#: find() checks up to this many tags with an EXISTS each (a probe of the tag index per row
#: it passes, fast while the page fills), more with one grouped IN clause
_EXISTS_PER_TAG_UP_TO = 4


class CatalogStore:
    """Reads and writes the catalog tables (live, or the "_next" twins of a rebuild)."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.dialect = store.dialect

    def _sql(self, text: str) -> str:
        return text if self.dialect == "sqlite" else text.replace("?", "%s")

    # -- writing (inside a subscriber's transaction) -----------------------------------------

    def load(self, conn: Connection, ids: Sequence[str], suffix: str = "") -> list[CatalogRow]:
        """The stored rows of these sessions (those that have one)."""
        found: list[CatalogRow] = []
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start:start + _CHUNK]
            marks = ", ".join("?" * len(chunk))
            result = conn.exec_driver_sql(self._sql(
                f"SELECT {_COLS} FROM sl_catalog{suffix} WHERE session_id IN ({marks})"),
                tuple(chunk))
            found.extend(tuple(row) for row in result)
        return found

    def write(
        self, conn: Connection, rows: Sequence[CatalogRow],
        new_tags: Iterable[tuple[str, str]], suffix: str = "",
    ) -> None:
        """Upsert `rows` and insert the (tag, session_id) pairs of newly started sessions."""
        tags = list(new_tags)
        if self.dialect == "postgresql":
            # one statement over arrays each, not executemany: psycopg pipelines that, and a
            # failure (a rebuild that lost a race) logged "error ignored terminating Pipeline"
            if rows:
                conn.exec_driver_sql(
                    f"INSERT INTO sl_catalog{suffix} ({_COLS}) SELECT * FROM unnest("
                    f"{', '.join(f'%s::{kind}[]' for kind in _PG_ARRAY_TYPES)}) "
                    f"ON CONFLICT (session_id) DO UPDATE SET {_UPDATES}",
                    columns(rows))
            if tags:
                conn.exec_driver_sql(
                    f"INSERT INTO sl_catalog_tags{suffix} (tag, session_id) SELECT * FROM "
                    "unnest(%s::varchar[], %s::varchar[]) ON CONFLICT DO NOTHING",
                    columns(tags))
            return
        if rows:
            conn.exec_driver_sql(
                f"INSERT INTO sl_catalog{suffix} ({_COLS}) VALUES "
                f"({', '.join('?' * len(CATALOG_COLUMNS))}) "
                f"ON CONFLICT (session_id) DO UPDATE SET {_UPDATES}", list(rows))
        if tags:
            conn.exec_driver_sql(
                f"INSERT INTO sl_catalog_tags{suffix} (tag, session_id) VALUES (?, ?) "
                "ON CONFLICT DO NOTHING", tags)

    def window(
        self, conn: Connection, after: int, upto: int, special: Sequence[str],
        totals: Totals | None = None,
    ) -> Window:
        """The events with positions in (after, upto], as the catalog needs them:

        - per session: (session_id, highest version, latest ts, number of events), grouped by
          SQLite or PostgreSQL itself, so the events that only move a session's version and
          time on never reach Python;
        - the events of the `special` types in order: (session_id, version, type, ts, actor,
          payload).

        `totals`: the first part as read ahead (read_totals), else it is read here.
        """
        cursor = conn.connection.cursor()
        try:
            if totals is None:
                cursor.execute(self._sql(
                    "SELECT session_id, MAX(version), MAX(ts), COUNT(*) FROM sl_events "
                    "WHERE position > ? AND position <= ? GROUP BY session_id"), (after, upto))
                totals = list(cursor.fetchall())
            marks = ", ".join("?" * len(special))
            cursor.execute(self._sql(
                "SELECT session_id, version, type, ts, actor, payload FROM sl_events "
                f"WHERE position > ? AND position <= ? AND type IN ({marks}) ORDER BY position"),
                (after, upto, *special))
            events = list(cursor.fetchall())
        finally:
            cursor.close()
        return totals, events

    def read_totals(self, after: int, upto: int) -> Totals:
        """The per-session totals of window() for (after, upto], on a connection of its own,
        aggregated into one JSON document by the database: the whole query is one step of the
        driver, which runs without the GIL (a read ahead in a thread, TotalsPrefetcher), and
        json.loads builds the rows in a tenth of the time the driver takes row by row.

        Read outside the transaction that folds the window: the sessions purged since are in
        it (the fold skips those, see CatalogConsumer). StorageError on a value JSON cannot
        hold (a damaged row: SQLite keeps any type in any column) or a SQLite built without
        JSON: window() then reads the window, and checks it."""
        if self.dialect == "sqlite":
            sql = ("SELECT json_group_array(json_array(session_id, v, ts, n)) FROM ("
                   "SELECT session_id, MAX(version) AS v, MAX(ts) AS ts, COUNT(*) AS n "
                   "FROM sl_events WHERE position > ? AND position <= ? GROUP BY session_id)")
        else:
            sql = ("SELECT COALESCE(json_agg(json_build_array(session_id, v, ts, n)), '[]') "
                   "FROM (SELECT session_id, MAX(version) AS v, MAX(ts) AS ts, COUNT(*) AS n "
                   "FROM sl_events WHERE position > %s AND position <= %s GROUP BY session_id) t")
        with self.store.storage_errors("read events from"), \
                self.store.connection() as conn:
            cursor = conn.connection.cursor()
            try:
                cursor.execute(sql, (after, upto))
                document = cast(tuple[Any], cursor.fetchone())[0]
            except Exception as error:
                drop_if_broken(conn, error)
                raise
            finally:
                cursor.close()
        totals = json.loads(document) if isinstance(document, str) else document
        if type(totals) is not list:
            raise StorageError(f"catalog window totals are not a list: {type(totals)}")
        return cast(Totals, totals)

    def purged(self, conn: Connection, session_id: str) -> bool:
        """True when `session_id` has a tombstone (as the transaction of `conn` sees it)."""
        return conn.exec_driver_sql(self._sql(
            "SELECT 1 FROM sl_tombstones WHERE session_id = ?"), (session_id,)).first() is not None

    def get_meta(self, key: str, conn: Connection | None = None) -> object:
        """The value recorded for `key` in sl_meta (None when there is none), read in the
        transaction of `conn` if given. (Inside a transaction that holds SQLite's write lock,
        always pass `conn`: the store's own connection may be held by a command waiting for
        that lock.)"""
        sql = "SELECT value FROM sl_meta WHERE key = ?"
        rows: Sequence[Any] = (
            self.store.query(sql, (key,)) if conn is None
            else conn.exec_driver_sql(self._sql(sql), (key,)).fetchall())
        return rows[0][0] if rows else None

    def set_meta(self, conn: Connection, key: str, value: str) -> None:
        """Record `key` = `value` in sl_meta (in the transaction of `conn`)."""
        conn.exec_driver_sql(self._sql(
            "INSERT INTO sl_meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value"), (key, value))

    def delete(self, conn: Connection, session_id: str) -> None:
        """Remove one session (a purge) from the live catalog."""
        for table in ("sl_catalog", "sl_catalog_tags"):
            conn.exec_driver_sql(self._sql(f"DELETE FROM {table} WHERE session_id = ?"),
                                 (session_id,))

    # -- rebuilds ------------------------------------------------------------------------------

    def create_next(self, conn: Connection) -> None:
        """Make the empty "_next" tables a rebuild fills (kept if they exist: a resume).

        PostgreSQL: StorageError first when this role cannot swap them in (the swap drops the
        live tables: only their owner may). Found only at the swap, it failed after the whole
        fill, and left "_next" tables of this role that the owner's rebuilds could not use.
        """
        if self.dialect == "postgresql":
            self._check_owner(conn)
        target = sa.MetaData()
        for table in schema.catalog_tables(target, NEXT):
            conn.execute(CreateTable(table, if_not_exists=True))

    def drop_purged_next(self, conn: Connection) -> None:
        """Remove from the rebuild's rows the sessions purged since it folded them (a purge
        deletes the live row only; the swap would bring a folded one back). On SQLite with
        secure_delete on, as purges run."""
        with secure_delete(conn, "ON"):
            conn.exec_driver_sql(f"DELETE FROM sl_catalog{NEXT} WHERE session_id IN "
                                 "(SELECT session_id FROM sl_tombstones)")

    def fill_next_tags(self, conn: Connection) -> None:
        """Fill the rebuild's tag table from the JSON tags of its catalog rows, in one statement
        (tags never change after SessionStarted, so a row's tags are its session's tags).

        Delete-then-insert: the result is the same whatever an interrupted rebuild left there.
        Sorted so the (tag, session_id) key is appended in order. Measured on the 212,000 pairs
        of a 500,000-event rebuild: 0.2 s here, against 0.45 s less in the windows' writes (and
        less in their commits, which rewrote tag pages all over the key range): 3.4 -> 2.9 s.
        """
        conn.exec_driver_sql(f"DELETE FROM sl_catalog_tags{NEXT}")
        if self.dialect == "sqlite":
            pairs = "json_each(c.tags) AS j"
        else:
            pairs = "jsonb_array_elements_text(c.tags::jsonb) AS j(value)"
        conn.exec_driver_sql(
            f"INSERT INTO sl_catalog_tags{NEXT} (tag, session_id) "
            f"SELECT j.value, c.session_id FROM sl_catalog{NEXT} c, {pairs} "
            # "WHERE true": SQLite's parser needs it before an upsert clause of INSERT ... SELECT;
            # ON CONFLICT rather than DISTINCT: 0.2 s against 0.27 (a second sort)
            "WHERE true ORDER BY 1, 2 ON CONFLICT DO NOTHING")

    def swap(self, conn: Connection) -> None:
        """Replace the live tables by the rebuilt ones, with the live indexes (in the caller's
        transaction: readers see the old catalog until it commits)."""
        # Debian's SQLite (and others) are built with SECURE_DELETE, which zeroes every page a
        # DROP frees: the whole old catalog written again. Its content is all derived from the
        # events, which stay in this file, so zeroing it hides nothing; FAST zeroes only within
        # pages written anyway. Measured on a 100,000-session catalog: the swap 0.38 -> 0.21 s,
        # a 500,000-event rebuild 1.96 -> 1.70 s.
        with secure_delete(conn, "FAST"):
            for name in ("sl_catalog", "sl_catalog_tags"):
                if self.dialect == "postgresql":
                    self._copy_grants(conn, name, name + NEXT)
                    self._keep_owner(conn, name, name + NEXT)
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
                conn.exec_driver_sql(f"ALTER TABLE {name}{NEXT} RENAME TO {name}")
        if self.dialect == "postgresql":
            # PostgreSQL keeps the primary key's own name through a rename: give it back the
            # live name so the next rebuild's "_next" key does not collide with it
            conn.exec_driver_sql("ALTER INDEX IF EXISTS sl_catalog_next_pkey "
                                 "RENAME TO sl_catalog_pkey")
            conn.exec_driver_sql("ALTER TABLE sl_catalog_tags RENAME CONSTRAINT "
                                 "sl_catalog_tags_next_pk TO sl_catalog_tags_pk")
        for index in schema.catalog.indexes | schema.catalog_tags.indexes:
            conn.execute(CreateIndex(index, if_not_exists=True))

    def _check_owner(self, conn: Connection) -> None:
        for name in ("sl_catalog", "sl_catalog_tags"):
            row = conn.exec_driver_sql(
                "SELECT pg_has_role(current_user, relowner, 'USAGE'), "
                "pg_get_userbyid(relowner), current_user FROM pg_class "
                "WHERE oid = to_regclass(%(name)s)", {"name": name}).first()
            if row is not None and not row[0]:
                raise StorageError(
                    f"a catalog rebuild needs to own the catalog tables: {name} belongs to role "
                    f"{row[1]!r}, not {row[2]!r} (rebuild as that role; see README, PostgreSQL)")

    @staticmethod
    def _keep_owner(conn: Connection, live: str, rebuilt: str) -> None:
        """Give `rebuilt` the owner of `live` (a superuser's rebuild, or one by a member of the
        owning role, made tables of its own, and the owner lost its catalog)."""
        row = conn.exec_driver_sql(
            "SELECT quote_ident(pg_get_userbyid(relowner)), pg_get_userbyid(relowner) <> "
            "current_user FROM pg_class WHERE oid = to_regclass(%(name)s)",
            {"name": live}).first()
        if row is not None and row[1]:
            conn.exec_driver_sql(f"ALTER TABLE {rebuilt} OWNER TO {row[0]}")

    @staticmethod
    def _copy_grants(conn: Connection, live: str, rebuilt: str) -> None:
        """Grant on `rebuilt` what is granted on `live` (the swap replaces the table: other
        roles' privileges went with the dropped one, and their engines' find() then failed with
        "permission denied for table sl_catalog")."""
        grants = conn.exec_driver_sql(
            "SELECT a.privilege_type, a.is_grantable, CASE WHEN a.grantee = 0 THEN 'PUBLIC' "
            "ELSE quote_ident(pg_get_userbyid(a.grantee)) END "
            "FROM pg_class c, aclexplode(c.relacl) a "
            "WHERE c.oid = to_regclass(%(name)s) AND a.grantee <> c.relowner",
            {"name": live}).all()
        for privilege, grantable, grantee in grants:
            # (privilege names and grantees come from the server's catalog, quoted there)
            option = " WITH GRANT OPTION" if grantable else ""
            conn.exec_driver_sql(f"GRANT {privilege} ON {rebuilt} TO {grantee}{option}")

    # -- queries -------------------------------------------------------------------------------

    def find(
        self,
        statuses: Sequence[str] | None,
        tags: Sequence[str] | None,
        name: str | None,
        parent: str | None,
        updated_after: int | None,
        updated_before: int | None,
        limit: int,
        after_key: tuple[int, str] | None,
    ) -> list[CatalogRow]:
        """Rows matching every given filter, newest update first, after the keyset `after_key`
        ((updated_ts, session_id) of the last row of the previous page)."""
        where: list[str] = []
        params: list[Any] = []
        if statuses:
            where.append(f"c.status IN ({', '.join('?' * len(statuses))})")
            params.extend(statuses)
        if name is not None:
            where.append("c.name = ?")
            params.append(name)
        if parent is not None:
            where.append("c.parent = ?")
            params.append(parent)
        if updated_after is not None:
            where.append("c.updated_ts > ?")
            params.append(updated_after)
        if updated_before is not None:
            where.append("c.updated_ts < ?")
            params.append(updated_before)
        if tags and len(tags) > _EXISTS_PER_TAG_UP_TO:
            # one clause for them all (tags are distinct, and so is each (tag, session) row):
            # an EXISTS per tag made PostgreSQL plan for 0.2 s at 64 tags, minutes at 1,500
            where.append("c.session_id IN (SELECT t.session_id FROM sl_catalog_tags t "
                         f"WHERE t.tag IN ({', '.join('?' * len(tags))}) "
                         "GROUP BY t.session_id HAVING COUNT(*) = ?)")
            params.extend((*tags, len(tags)))
        else:
            for tag in tags or ():
                where.append("EXISTS (SELECT 1 FROM sl_catalog_tags t "
                             "WHERE t.tag = ? AND t.session_id = c.session_id)")
                params.append(tag)
        if after_key is not None:
            where.append("(c.updated_ts < ? OR (c.updated_ts = ? AND c.session_id < ?))")
            params.extend((after_key[0], after_key[0], after_key[1]))
        # Two steps: the page's ids first, from the indexes alone (the filters, the tag checks
        # and the order need no row), then their rows. In one step SQLite fetched the row of
        # every index entry it passed over, and a sparse filter passes thousands (tags=[x] at
        # 2%: 2.6 -> 1.4 ms on 100,000 sessions; a dense one costs 0.03 ms more).
        page = "SELECT c.session_id FROM sl_catalog c"
        if where:
            page += " WHERE " + " AND ".join(where)
        page += " ORDER BY c.updated_ts DESC, c.session_id DESC LIMIT ?"
        params.append(limit)
        sql = (f"SELECT {', '.join('c.' + c for c in CATALOG_COLUMNS)} FROM sl_catalog c "
               f"WHERE c.session_id IN ({page}) ORDER BY c.updated_ts DESC, c.session_id DESC")
        return [tuple(row) for row in self.store.query(sql, params)]

    def all_rows(self) -> list[CatalogRow]:
        """Every live row, by session id (for comparisons and tests)."""
        return [tuple(row) for row in self.store.query(
            f"SELECT {_COLS} FROM sl_catalog ORDER BY session_id")]


class TotalsPrefetcher:
    """Reads the next window's totals (CatalogStore.read_totals) in a thread while the caller
    folds the current window.

    A catalog rebuild spends a quarter of its time on the totals' GROUP BY (SQLite sorts each
    window of 100,000 events by session): read ahead, that time overlaps the fold of the window
    before on a machine with a second CPU. A read ahead that fetched rows one by one gained
    nothing (measured: 2.2-2.3 s -> 2.3-2.6 s on 500,000 events): the driver lets go of the GIL
    for each row and waits to take it back while the fold runs. One window ahead at most;
    close() waits for a read under way.
    """

    def __init__(self, tables: CatalogStore) -> None:
        self._tables = tables
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sessionledger-read")
        self._ahead: tuple[int, int, Future[Totals]] | None = None

    def ask(self, after: int, upto: int) -> None:
        """Start reading the totals of the window (after, upto]."""
        self._ahead = (after, upto, self._pool.submit(self._tables.read_totals, after, upto))

    def take(self, after: int, upto: int) -> Totals | None:
        """The totals of (after, upto] if they were asked for; None when they were not, or
        their read failed (the caller reads them itself, and meets the error there if it
        lasts)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[:2] != (after, upto):
            return None
        try:
            return ahead[2].result()
        except Exception:
            return None

    def close(self) -> None:
        self._ahead = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TotalsPrefetcher:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
