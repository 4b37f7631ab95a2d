"""The stored shape, owned by SQLAlchemy: tables are created on first use (SQLite, PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    UniqueConstraint,
)

#: bumped when a stored shape changes incompatibly; a database newer than this is refused
SCHEMA_VERSION = 2  # 2: snapshots, tombstones, tracking and catalog tables

metadata = MetaData()

# One row per event. `position` is the global commit order (SQLite: AUTOINCREMENT, never reused
# even after a purge; PostgreSQL: an identity). The unique (session_id, version) gives optimistic
# concurrency: two writers of the same next version cannot both commit.
events = Table(
    "sl_events",
    metadata,
    Column("position", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("session_id", String(36), nullable=False),
    Column("version", Integer, nullable=False),
    Column("type", String(64), nullable=False),
    Column("ts", BigInteger, nullable=False),  # microseconds since the epoch, UTC
    Column("actor", String(256)),
    Column("correlation_id", String(256)),
    Column("payload", LargeBinary, nullable=False),
    Column("digest", LargeBinary, nullable=False),  # blake3 chain over the session's events
    UniqueConstraint("session_id", "version", name="sl_events_session_version"),
    sqlite_autoincrement=True,
)

# Idempotency keys: a command retried with a key already used writes nothing and returns the
# first result. `scope` is the session id, or "create" for create().
idempotency = Table(
    "sl_idempotency",
    metadata,
    Column("scope", String(64), nullable=False),
    Column("key", String(256), nullable=False),
    Column("session_id", String(36), nullable=False),
    Column("version", Integer, nullable=False),
    PrimaryKeyConstraint("scope", "key", name="sl_idempotency_pk"),
)

# Snapshots: a session projected at one version, a cache that is always safe to drop and rebuild
# from the events. `format_version` NULL is format 0 (written before the column had a value);
# `digest` is blake3 of the uncompressed body; `flags` bit 0 means the body is lz4-compressed.
snapshots = Table(
    "sl_snapshots",
    metadata,
    Column("session_id", String(36), nullable=False),
    Column("version", Integer, nullable=False),
    Column("format_version", SmallInteger),
    Column("flags", SmallInteger, nullable=False),
    Column("digest", LargeBinary, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("ts", BigInteger, nullable=False),
    PrimaryKeyConstraint("session_id", "version", name="sl_snapshots_pk"),
)

# Sessions purged for good by cleanup(): their events and snapshots are gone, this row says so.
tombstones = Table(
    "sl_tombstones",
    metadata,
    Column("session_id", String(36), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("final_status", String(16), nullable=False),
    Column("version", Integer, nullable=False),  # its last version when it was purged
    Column("purged_ts", BigInteger, nullable=False),
)

# Durable subscribers: the global position up to which each has handled the events.
tracking = Table(
    "sl_tracking",
    metadata,
    Column("name", String(256), primary_key=True),
    Column("position", BigInteger, nullable=False),
    Column("updated_ts", BigInteger, nullable=False),
)



#: the characters a catalog row keeps of a session's tags (as JSON, for display)
TAGS_TEXT_LENGTH = 8192


def catalog_tables(target: MetaData, suffix: str = "") -> tuple[Table, Table]:
    """The catalog read model: one row per session, and its tags.

    The live tables have no suffix; a rebuild fills "_next" twins (without secondary indexes,
    which are made at the swap) and renames them into place.
    """
    catalog = Table(
        f"sl_catalog{suffix}",
        target,
        Column("session_id", String(36), primary_key=True),
        Column("name", String(256), nullable=False),
        Column("status", String(16), nullable=False),
        Column("parent", String(36)),
        Column("created_by", String(256)),
        Column("created_ts", BigInteger, nullable=False),
        Column("updated_ts", BigInteger, nullable=False),
        Column("version", Integer, nullable=False),
        Column("event_count", Integer, nullable=False),
        Column("last_checkpoint", String(256)),
        # the tags as a JSON list, for display. Bounded, as it always was: a rebuild that
        # changed the column's type would break every other engine's prepared find() on
        # PostgreSQL ("cached plan must not change result type")
        Column("tags", String(TAGS_TEXT_LENGTH), nullable=False),
        # SQLite: the rows in their key's own B-tree, not in a rowid table beside a key index
        # (here and in the tag table: a write touches one tree instead of two; a 500,000-event
        # rebuild 1.59-1.76 -> 1.51-1.65 s, alternating runs). find() reads pages in two steps
        # because of it (CatalogStore.find). A catalog made by an older release keeps its
        # rowid tables until it is rebuilt; both shapes answer the same.
        sqlite_with_rowid=False,
    )
    tags = Table(
        f"sl_catalog_tags{suffix}",
        target,
        Column("tag", String(256), nullable=False),
        Column("session_id", String(36), nullable=False),
        PrimaryKeyConstraint("tag", "session_id", name=f"sl_catalog_tags{suffix}_pk"),
        sqlite_with_rowid=False,
    )
    return catalog, tags


#: index name -> (table, columns) of the live catalog (made with it, and again at a swap)
CATALOG_INDEXES = {
    "ix_sl_catalog_updated": ("sl_catalog", ("updated_ts", "session_id")),
    "ix_sl_catalog_status_updated": ("sl_catalog", ("status", "updated_ts", "session_id")),
    "ix_sl_catalog_parent": ("sl_catalog", ("parent",)),
    "ix_sl_catalog_name": ("sl_catalog", ("name",)),
    "ix_sl_catalog_tags_session": ("sl_catalog_tags", ("session_id",)),
}

catalog, catalog_tags = catalog_tables(metadata)
for _index_name, (_table, _columns) in CATALOG_INDEXES.items():
    _owner = catalog if _table == "sl_catalog" else catalog_tags
    Index(_index_name, *(_owner.c[c] for c in _columns))

meta = Table(
    "sl_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)
