"""User code against the public API, type-checked by CI (`mypy --strict tests/typed_usage`) and run
by tests/test_review_contract.py: the hints must accept what the README says the calls take.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from sessionledger import BlameEntry, SessionEngine, StateDiff, VerifyReport


def exercise(engine: SessionEngine, wait: bool, fmt: str) -> list[object]:
    """Calls whose arguments are plain variables of the types the README allows."""
    sid = engine.create("typed", state={"step": 0})
    engine.update(sid, {"step": 1})
    day = date(2000, 1, 1)
    later = datetime(2100, 1, 1, tzinfo=UTC)
    diff: StateDiff = engine.diff(sid, 1, 2)
    blame: list[BlameEntry] = engine.blame(sid, "step")
    report: VerifyReport = engine.verify(sid=sid)
    return [
        engine.history(sid, since=day, until=later),
        engine.state_at(sid, at=later).version,
        list(engine.timeline(since=day)),
        engine.find(updated_after=day, updated_before=later).items,
        engine.run_subscribers(until_idle=wait),
        engine.metrics(format=fmt),
        diff.changed,
        [entry.time for entry in blame],
        report.ok,
    ]
