"""Review round 17 (PostgreSQL operations): a catalog rebuild where the tables belong to one role
and engines of another role, with the README's privileges, do the everyday work.

The swap replaced the catalog tables, and other roles' grants went with the dropped ones: every
engine of the application's role then failed its find() ("permission denied for table
sl_catalog") until a DBA granted again. A rebuild by a role that does not own the tables failed
only at the swap, after the whole fill, and left "_next" tables of its own that the owner's
rebuilds could not use.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from _helpers import Backend
from sqlalchemy import make_url

from sessionledger import SessionEngine, StorageError

TABLES = ("sl_events", "sl_snapshots", "sl_idempotency", "sl_tracking", "sl_catalog",
          "sl_catalog_tags", "sl_tombstones", "sl_meta")


@pytest.fixture
def app_role(pg_backend: Backend) -> Iterator[str]:
    """A login role with the privileges the README lists for everyday work, on tables that
    the backend's own role created and owns."""
    assert pg_backend.pg_url is not None
    role = f"sl_app_{uuid.uuid4().hex[:12]}"
    with SessionEngine(pg_backend.url):  # the owner creates the tables
        pass
    with psycopg.connect(pg_backend.pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        try:
            schema = pg_backend.pg_schema
            admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}')
            for table in TABLES:
                admin.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON "{schema}".{table} '
                              f"TO {role}")
            admin.execute(f'GRANT USAGE ON SEQUENCE "{schema}".sl_events_position_seq TO {role}')
            yield role
        finally:
            admin.execute(f'DROP OWNED BY {role}')
            admin.execute(f"DROP ROLE {role}")


def url_as(backend: Backend, role: str) -> str:
    return make_url(backend.url).set(username=role).render_as_string(hide_password=False)


def test_the_application_role_keeps_its_catalog_after_the_owner_rebuilds(
    pg_backend: Backend, app_role: str,
) -> None:
    with SessionEngine(url_as(pg_backend, app_role)) as app:
        sid = app.create("s", tags=["t"])
        assert [s.id for s in app.find(tags=["t"])] == [sid]
        with SessionEngine(pg_backend.url) as owner:
            assert owner.rebuild("catalog") > 0
        app.update(sid, {"n": 1})
        assert [s.version for s in app.find(tags=["t"])] == [2]  # its fold writes, too
    with SessionEngine(url_as(pg_backend, app_role)) as fresh:
        assert [s.id for s in fresh.find(tags=["t"])] == [sid]


def test_a_rebuild_by_a_role_that_does_not_own_the_catalog_fails_first_and_leaves_nothing(
    pg_backend: Backend, app_role: str,
) -> None:
    # (given CREATE on the schema, as a role that makes tables of its own may have)
    assert pg_backend.pg_url is not None
    with psycopg.connect(pg_backend.pg_url, autocommit=True) as admin:
        admin.execute(f'GRANT CREATE ON SCHEMA "{pg_backend.pg_schema}" TO {app_role}')
    with SessionEngine(url_as(pg_backend, app_role)) as app:
        sid = app.create("s")
        with pytest.raises(StorageError, match="needs to own the catalog tables: sl_catalog "
                                               "belongs to role"):
            app.rebuild("catalog")
        assert app.find() and app.find()[0].id == sid
    left = pg_backend.sql("SELECT table_name FROM information_schema.tables WHERE "
                          "table_schema = ? AND table_name LIKE ?", (pg_backend.pg_schema, "%next"))
    assert left == []
    with SessionEngine(pg_backend.url) as owner:
        assert owner.rebuild("catalog") > 0
        assert [s.id for s in owner.find()] == [sid]


def test_a_select_only_role_finds_in_a_catalog_that_is_caught_up(
    pg_backend: Backend, app_role: str, tmp_path: Path,
) -> None:
    """find() opened a write transaction on the catalog's tracking row even with nothing to
    fold, so a read-only role never got a page ("permission denied for table sl_tracking").
    SQLite's read-only file, the same."""
    assert pg_backend.pg_url is not None
    with SessionEngine(pg_backend.url) as owner:
        sid = owner.create("s", tags=["t"])
        owner.find()
    with psycopg.connect(pg_backend.pg_url, autocommit=True) as admin:
        for table in TABLES:
            admin.execute(f'REVOKE INSERT, UPDATE, DELETE ON "{pg_backend.pg_schema}".{table} '
                          f"FROM {app_role}")
    with SessionEngine(url_as(pg_backend, app_role)) as reader:
        assert [s.id for s in reader.find(tags=["t"])] == [sid]
        assert [(s.name, s.lag) for s in reader.subscribers()] == [("catalog", 0)]
    path = tmp_path / "ro.db"
    with SessionEngine(f"sqlite:///{path}") as writer:
        sid = writer.create("a")
        writer.find()
    with SessionEngine(f"sqlite:///file:{path}?mode=ro&uri=true") as reader:
        assert [s.id for s in reader.find()] == [sid]


def test_a_superuser_rebuild_leaves_the_catalog_to_its_owner(pg_backend: Backend,
                                                              app_role: str) -> None:
    """(Review 17, adversarial.) The application's role owns its tables; an administrator
    (a superuser) rebuilds: the new tables were the administrator's, and the owner's find()
    and rebuilds were refused."""
    assert pg_backend.pg_url is not None
    schema = pg_backend.pg_schema
    with psycopg.connect(pg_backend.pg_url, autocommit=True) as admin:
        for table in ("sl_catalog", "sl_catalog_tags"):
            admin.execute(f'ALTER TABLE "{schema}".{table} OWNER TO {app_role}')
        admin.execute(f'GRANT CREATE ON SCHEMA "{schema}" TO {app_role}')
    with SessionEngine(url_as(pg_backend, app_role)) as app:
        sid = app.create("s")
        with SessionEngine(pg_backend.url) as superuser:
            assert superuser.rebuild("catalog") > 0
        owners = pg_backend.sql("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = ? "
                                "AND tablename LIKE ? ORDER BY 1", (schema, "sl_catalog%"))
        assert owners == [("sl_catalog", app_role), ("sl_catalog_tags", app_role)]
        app.update(sid, {"n": 1})
        assert [s.version for s in app.find()] == [2]
        assert app.rebuild("catalog") > 0
