"""Helpers shared by the test modules (not fixtures)."""

from __future__ import annotations

import json
import sqlite3
import struct
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sessionledger import SessionEngine
from sessionledger.cli import main

SQLITE = "sqlite"
MEMORY = "memory"
POSTGRESQL = "postgresql"

EVENT_TYPE_NAMES = {
    "SessionStarted",
    "StateChanged",
    "EventRecorded",
    "CheckpointTaken",
    "SessionSaved",
    "SessionRestored",
    "SessionSuspended",
    "SessionResumed",
    "SessionEnded",
    "SessionArchived",
}


def same(expected: Any, actual: Any) -> bool:
    """Exact, type-strict equality of stored values (tuples are expected back as lists).

    1 == 1.0 == True and Decimal("1.0") == Decimal("1.00") in Python, so == alone would hide a
    value that changed on the way through the store.
    """
    if isinstance(expected, tuple):
        expected = list(expected)
    if type(expected) is not type(actual):
        return False
    if isinstance(expected, dict):
        return expected.keys() == actual.keys() and all(
            same(expected[k], actual[k]) for k in expected
        )
    if isinstance(expected, list):
        return len(expected) == len(actual) and all(
            same(e, a) for e, a in zip(expected, actual, strict=True)
        )
    if isinstance(expected, float):
        return struct.pack("<d", expected) == struct.pack("<d", actual)
    if isinstance(expected, Decimal):
        return str(expected) == str(actual)
    if isinstance(expected, datetime):
        return (
            (expected.tzinfo is None) == (actual.tzinfo is None)
            and expected == actual
            and expected.utcoffset() == actual.utcoffset()
        )
    return bool(expected == actual)


def differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Keys of `expected` whose value did not come back exactly (for readable failures)."""
    out = []
    for key, value in expected.items():
        if key not in actual:
            out.append(f"{key}: missing")
        elif not same(value, actual[key]):
            out.append(f"{key}: sent {value!r}, got {actual[key]!r}")
    extra = set(actual) - set(expected)
    if extra:
        out.append(f"unexpected keys {sorted(extra)}")
    return out


def snapshot(engine: SessionEngine, sid: str) -> tuple[int, int, Any]:
    """(version, history length, status) read from the store, to prove nothing was written."""
    session = engine.get(sid, refresh=True)
    return session.version, len(engine.history(sid)), session.status


@dataclass
class Backend:
    """One database a test runs against, with raw SQL access for inspecting the store."""

    kind: str
    url: str
    sqlite_path: Path | None = None
    pg_url: str | None = None
    pg_schema: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shared(self) -> bool:
        """True when several engines can open this same database."""
        return self.kind != MEMORY

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement directly on the database (qmark params), commit, return rows."""
        if self.kind == SQLITE:
            assert self.sqlite_path is not None
            db = sqlite3.connect(self.sqlite_path)
            try:
                cursor = db.execute(statement, params)
                rows = cursor.fetchall()
                db.commit()
                return rows
            finally:
                db.close()
        if self.kind == POSTGRESQL:
            import psycopg

            assert self.pg_url is not None
            with psycopg.connect(self.pg_url, autocommit=True,
                                 options=f"-csearch_path={self.pg_schema}") as db:
                cursor = db.execute(statement.replace("?", "%s"), params)
                rows = cursor.fetchall() if cursor.description is not None else []
                return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                        for row in rows]
        raise AssertionError(f"no raw SQL access to a {self.kind} database")


class Cli:
    """Runs `sessionledger ...` and captures its output; `url` is appended unless given."""

    def __init__(self, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.url = url
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main([*argv] if "--url" in argv else [*argv, "--url", self.url])
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert (code, err) == (0, ""), err
        return out

    def json(self, *argv: str) -> Any:
        return strict_json(self.ok(*argv, "--json"))

    def fails(self, *argv: str, match: str) -> str:
        code, out, err = self(*argv)
        assert code == 1 and out == "", (code, out, err)
        assert err.startswith("sessionledger: error: ") and err.count("\n") == 1, err
        assert match in err, err
        return err


def strict_json(text: str) -> Any:
    """json.loads refusing NaN and Infinity, which Python reads but JSON does not have."""
    def refuse(constant: str) -> None:
        raise AssertionError(f"not valid JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def once_after(monkeypatch: pytest.MonkeyPatch, obj: Any, method: str, meanwhile: Any,
               when: Any = None) -> None:
    """The first call of `obj.<method>` (whose arguments pass `when`) is followed by
    `meanwhile()`, before the caller gets its result."""
    real = getattr(obj, method)

    def call_then_act(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if when is None or when(*args):
            monkeypatch.setattr(obj, method, real)
            meanwhile()
        return result

    monkeypatch.setattr(obj, method, call_then_act)
