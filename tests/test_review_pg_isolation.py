"""Review round 17 (PostgreSQL operations): the engine runs READ COMMITTED whatever the server's
default_transaction_isolation (a DBA's ALTER DATABASE ... SET, here given per connection in the
URL's options).

Under REPEATABLE READ an append that waited for the ordering lock while a purge committed read
its tombstone check from a snapshot taken before the wait and wrote into the purged session
(verify() then failed, get() raised CorruptedData and every later purge too); under
SERIALIZABLE commands on sessions of their own failed with serialization errors as StorageError.
"""

from __future__ import annotations

import threading

import pytest
from _helpers import Backend
from sqlalchemy import make_url
from test_purge_races import assert_refused_after_waiting_for_a_purge, assert_store_sound

from sessionledger import SessionConfig, SessionEngine

LEVELS = ["repeatable read", "serializable"]


def url_with_default_isolation(backend: Backend, level: str) -> str:
    """The backend's URL, its connections starting with `level` as their default isolation."""
    url = make_url(backend.url)
    options = url.query["options"]
    assert isinstance(options, str)
    escaped = level.replace(" ", "\\ ")  # libpq's options split at unescaped spaces
    return url.update_query_dict(
        {"options": f"{options} -cdefault_transaction_isolation={escaped}"}
    ).render_as_string(hide_password=False)


@pytest.mark.parametrize("level", LEVELS)
def test_every_connection_of_the_engine_reads_committed(pg_backend: Backend, level: str) -> None:
    with SessionEngine(url_with_default_isolation(pg_backend, level)) as engine:
        engine.create("s")
        store = engine._store
        with store.connection() as conn:  # a pooled connection (subscribers, scans, purges)
            pooled = conn.exec_driver_sql("SHOW default_transaction_isolation").scalar()
        own = store._fetchall("SHOW default_transaction_isolation", ())[0][0]  # the hot path's
    assert (pooled, own) == ("read committed", "read committed")


@pytest.mark.parametrize("keyed", [False, True], ids=["one-statement", "keyed"])
@pytest.mark.parametrize("level", LEVELS)
def test_an_append_waiting_for_a_purge_sees_it_whatever_the_server_default(
    pg_backend: Backend, level: str, keyed: bool,
) -> None:
    url = url_with_default_isolation(pg_backend, level)
    opened: list[SessionEngine] = []

    def engine_factory(**fields: object) -> SessionEngine:
        engine = SessionEngine(url, SessionConfig(**fields))  # type: ignore[arg-type]
        opened.append(engine)
        return engine

    try:
        writer = engine_factory()
        sid = writer.create("s", state={"n": 0})
        writer.end(sid)
        assert_refused_after_waiting_for_a_purge(
            pg_backend, sid, lambda: writer.archive(sid, idempotency_key="k" if keyed else None))
        assert_store_sound(engine_factory)  # type: ignore[arg-type]
    finally:
        for engine in opened:
            engine.close()


def test_commands_on_their_own_sessions_never_fail_under_serializable(
    pg_backend: Backend,
) -> None:
    url = url_with_default_isolation(pg_backend, "serializable")
    failures: list[BaseException] = []
    done: list[int] = []

    def work() -> None:
        try:
            with SessionEngine(url) as engine:
                sid = engine.create("own")
                for i in range(60):
                    engine.record(sid, "tick", {"i": i})
                    engine.find(limit=1)  # the catalog's fold: a FOR UPDATE on its tracking row
                done.append(engine.get(sid, refresh=True).version)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == []
    assert done == [61, 61, 61]
