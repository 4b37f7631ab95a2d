"""Review round 12, many engines on one database: each test failed on the code before its fix."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from _helpers import Backend
from conftest import EngineFactory

from sessionledger.catalog import CATALOG, REBUILD_TRACKING


def test_a_rebuild_swapped_in_by_another_engine_leaves_a_later_rebuild_alone(
        engine_factory: EngineFactory, backend: Backend) -> None:
    """B's rebuild has folded every window; before its swap, A rebuilds and swaps (B's tables
    are in) and C starts a rebuild (new "_next" tables, a new tracking row). B's swap read
    C's tracking row (or none: 0) as its own and folded the whole log into C's tables without
    holding C's row: on PostgreSQL C's window and B's swap deadlocked. B must return 0 and
    leave C's rebuild to C."""
    writer = engine_factory()
    sids = [writer.create(f"s{i}", tags=["t"]) for i in range(5)]
    for sid in sids:
        writer.update(sid, {"k": 1})
    writer.find()
    a, b, c = engine_factory(), engine_factory(), engine_factory()
    real_transaction = b._subscriptions.transaction
    others_ran: list[int] = []

    def transaction(name: str, **options: Any) -> AbstractContextManager[Any]:
        if name == CATALOG and not others_ran:  # B's swap is about to begin
            others_ran.append(a.rebuild("catalog"))
            with c._subscriptions.transaction(REBUILD_TRACKING) as (conn, _):
                c._catalog.tables.create_next(conn)  # as c.rebuild() begins
        return real_transaction(name, **options)

    b._subscriptions.transaction = transaction  # type: ignore[method-assign]
    assert b.rebuild("catalog") == 0
    assert others_ran == [0]  # A swapped in the tables B had filled (shared work)
    assert c.rebuild("catalog") == 10  # C's rebuild was left to C, from its start
    rows = [(s.id, s.version, s.event_count) for s in writer.find(limit=100)]
    writer.rebuild("catalog")
    assert [(s.id, s.version, s.event_count) for s in writer.find(limit=100)] == rows
    assert sorted(r[0] for r in rows) == sorted(sids)
