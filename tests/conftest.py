"""Shared fixtures: every backend-facing test runs on a SQLite file and on PostgreSQL.

PostgreSQL comes from $SESSIONLEDGER_TEST_POSTGRES_URL (for example
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). Each test gets a fresh schema (the
engine's URL points its search_path there) that is dropped afterwards. Without the variable the
PostgreSQL tests are skipped locally, but they FAIL when $CI is set: CI never skips PostgreSQL.

Fixtures:
    backend         a SQLite file or a PostgreSQL schema (``.url``, ``.sql()`` for raw access)
    url             backend.url
    engine_factory  opens SessionEngines on that one database (closed after the test)
    engine          one engine on a SQLite file, SQLite in memory (``sqlite://``) or PostgreSQL
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import MEMORY, POSTGRESQL, SQLITE, Backend, Cli
from sqlalchemy.engine import make_url

from sessionledger import SessionConfig, SessionEngine

PG_ENV = "SESSIONLEDGER_TEST_POSTGRES_URL"

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgresql: the test runs against PostgreSQL")


def _pg_param(name: str) -> Any:
    return pytest.param(name, marks=pytest.mark.postgresql, id=name)


SHARED_KINDS = [pytest.param(SQLITE, id=SQLITE), _pg_param(POSTGRESQL)]
ALL_KINDS = [pytest.param(SQLITE, id=SQLITE), pytest.param(MEMORY, id=MEMORY),
             _pg_param(POSTGRESQL)]


def postgres_base_url() -> str:
    """$SESSIONLEDGER_TEST_POSTGRES_URL; skip without it locally, fail without it in CI."""
    base = os.environ.get(PG_ENV, "").strip()
    if not base:
        if os.environ.get("CI", "").strip():
            pytest.fail(
                f"{PG_ENV} is not set but CI is: the PostgreSQL tests are required in CI and "
                f"must never be skipped (set {PG_ENV}=postgresql+psycopg://USER@HOST:PORT/DB)",
                pytrace=False,
            )
        pytest.skip(f"{PG_ENV} is not set: PostgreSQL tests skipped (they fail in CI)")
    return base


def libpq_url(base: str) -> str:
    """The SQLAlchemy URL as a plain libpq URL psycopg.connect() accepts."""
    url = make_url(base).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


@contextlib.contextmanager
def _postgres_backend() -> Iterator[Backend]:
    base = postgres_base_url()  # skips (locally) before the driver is needed
    import psycopg

    admin_url = libpq_url(base)
    schema = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    engine_url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield Backend(POSTGRESQL, engine_url.render_as_string(hide_password=False),
                      pg_url=admin_url, pg_schema=schema)
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as admin:
            admin.execute("SET lock_timeout = '10s'")
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextlib.contextmanager
def make_backend(kind: str, tmp_path: Path) -> Iterator[Backend]:
    if kind == SQLITE:
        path = tmp_path / "sessions.db"
        yield Backend(SQLITE, f"sqlite:///{path}", sqlite_path=path)
    elif kind == MEMORY:
        yield Backend(MEMORY, "sqlite://")
    else:
        with _postgres_backend() as backend:
            yield backend


@pytest.fixture(params=SHARED_KINDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A database several engines can share: a SQLite file, or a fresh PostgreSQL schema."""
    with make_backend(request.param, tmp_path) as b:
        yield b


@pytest.fixture
def url(backend: Backend) -> str:
    return backend.url


EngineFactory = Callable[..., SessionEngine]


@pytest.fixture
def engine_factory(backend: Backend) -> Iterator[EngineFactory]:
    """engine_factory(config=None, **config_fields) -> a new SessionEngine on `backend`."""
    opened: list[SessionEngine] = []

    def make(config: SessionConfig | None = None, **fields: Any) -> SessionEngine:
        if fields:
            assert config is None
            config = SessionConfig(**fields)
        engine = SessionEngine(backend.url, config)
        opened.append(engine)
        return engine

    yield make
    for engine in opened:
        engine.close()


@pytest.fixture(params=ALL_KINDS)
def engine_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A SQLite file, SQLite in memory or a PostgreSQL schema (single-engine tests)."""
    with make_backend(request.param, tmp_path) as b:
        yield b


@pytest.fixture
def engine(engine_backend: Backend) -> Iterator[SessionEngine]:
    with SessionEngine(engine_backend.url) as e:
        yield e


@pytest.fixture
def memory_engine() -> Iterator[SessionEngine]:
    """One engine on SQLite in memory, for checks that happen before the store is involved."""
    with SessionEngine("sqlite://") as e:
        yield e


@pytest.fixture
def pg_backend() -> Iterator[Backend]:
    """A fresh PostgreSQL schema (for PostgreSQL-only tests; skips/fails like the others)."""
    with make_backend(POSTGRESQL, Path()) as b:
        yield b


@pytest.fixture
def cli(backend: Backend, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Runs `sessionledger ...` on `backend`'s database, capturing what it prints."""
    return Cli(backend.url, capsys)
